"""Run LIBERO success-rate evaluations for several server variants on one pool of simulator processes.

Why one pool rather than one ``run_libero_eval.sh`` per variant: an episode is dominated by the simulator (one
core each), so the throughput is set by how many simulator processes run at once, not by how many variants there
are. Every variant gets one server; the work is cut into (variant, task, trial) episodes that one
:class:`client.libero.parallel.EpisodePool` of ``workers`` simulator processes drains (the pool of
``client.libero.evaluate --workers``: a lost worker's episode is retried once), in task-major order so all
variants advance together, a worker keeps its env across the variants' episodes of a task, and a run stopped
early still compares them on the same episodes. Only this process writes results: one
:class:`client.libero.results.ResultsFile` per variant (``OUT/<label>/results.json``, the schema of a single
run), always resumed, so re-running the same command runs only the episodes not yet recorded.

No torch here: servers run under ``server_python``, the pool's workers under ``client_python`` (this process may
run either environment).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.libero.config import EvalConfig, config_from_args
from client.libero.evaluate import settle_from_server
from client.libero.parallel import EpisodeJob, EpisodePool, RayEpisodePool
from client.libero.results import EpisodeResult, ResultsFile, common_identity, wilson_ci
from client.testing import REPO, ServerProcess, venv_python

log = logging.getLogger("bench.libero_matrix")

# The published recipe's W4A8 defaults (docs/duquant.md), and the same grid with every DuQuant transform off (plain RTN;
# its empty per-pattern overrides also drop a --policy's own defaults, quant.patterns.POLICY_DEFAULTS, so the RTN row
# stays the plain baseline while the DuQuant row measures what the policy serves).
DUQUANT_SEED_ENV = {
    "GR00T_DUQUANT_WBITS_DEFAULT": "4", "GR00T_DUQUANT_ABITS": "8", "GR00T_DUQUANT_BLOCK": "16",
    "GR00T_DUQUANT_PERMUTE": "1", "GR00T_DUQUANT_ROW_ROT": "restore", "GR00T_DUQUANT_ACT_PCT": "99.9",
    "GR00T_DUQUANT_LS": "0.15",
}
RTN_ENV = {
    "GR00T_DUQUANT_ROT": "none", "GR00T_DUQUANT_PERMUTE": "0", "GR00T_DUQUANT_ROW_ROT": "0",
    "GR00T_DUQUANT_CLIP_SEARCH": "0", "GR00T_DUQUANT_WOPT": "clip", "GR00T_DUQUANT_DIT_STEP_SCALES": "0",
    "GR00T_DUQUANT_WBITS_RE": "", "GR00T_DUQUANT_ABITS_RE": "", "GR00T_DUQUANT_ACT_PCT_RE": "",
}


@dataclass
class Variant:
    """One configuration under evaluation: a label, server flags and environment, extra client flags."""

    label: str
    server_args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    client_args: list[str] = field(default_factory=list)


def default_python(venv: str) -> str:
    """The project's venv interpreter when it exists (set-up done), else the current one."""
    return venv_python(venv)


def rsd_variants(model_path: str | None, relaxed_r: int, relaxed_tau: float, action_eps: float = 0.5) -> list[Variant]:
    """Main-only vs RSD exact vs RSD relaxed (code distance) vs RSD relaxed-action on the OpenVLA-RSD policy, with
    the server's default action decode; and RSD exact with each action decode named (greedy / expected)."""
    base = ["--policy", "openvla-rsd"] + (["--model-path", model_path] if model_path else [])
    return [
        Variant("main_only", base + ["--rsd-enabled", "0"]),
        Variant("exact", base + ["--rsd-mode", "exact"]),
        Variant("exact_greedy", base + ["--rsd-mode", "exact", "--rsd-action-decode", "greedy"]),
        Variant("exact_expected", base + ["--rsd-mode", "exact", "--rsd-action-decode", "expected"]),
        Variant("relaxed", base + ["--rsd-mode", "relaxed", "--rsd-relaxed-r", str(relaxed_r),
                                   "--rsd-relaxed-tau", str(relaxed_tau)]),
        Variant("relaxed_action", base + ["--rsd-mode", "relaxed-action", "--rsd-action-eps-mm", str(action_eps),
                                          "--rsd-action-eps-deg", str(action_eps)]),
    ]


def quant_variants(policy: str, model_path: str | None, packdir: Path, calib_data: str | None, calib_n: int,
                   denoising_steps: int | None = None, initial_noise: str | None = None,
                   gr00t_replan_steps: int | None = None) -> list[Variant]:
    """Full precision vs RTN W4A8 vs DuQuant W4A8 vs DuQuant W4A4 (static, and per-token activation scales) for one
    policy, each served as its checkpoint says (a checkpoint's ``serving.json``: the shipped tiny GR00T's 8 Euler
    steps from zero initial noise, 8 of its 16 actions executed per query; ``server/policies/serving_defaults.py``).
    ``denoising_steps``, ``initial_noise`` and ``gr00t_replan_steps`` (GR00T only; 0 = whole chunks) override it."""
    base = ["--policy", policy] + (["--model-path", model_path] if model_path else [])
    if policy == "gr00t":
        if denoising_steps is not None:
            base += ["--denoising-steps", str(denoising_steps)]
        if initial_noise is not None:
            base += ["--policy-option", f"initial_noise={initial_noise}"]
        if gr00t_replan_steps is not None:
            base += ["--policy-option", f"replan_steps={gr00t_replan_steps}"]
    calib = []
    if calib_data:
        calib = ["--policy-option", f"calib_data={calib_data}", "--policy-option", f"calib_n={calib_n}"]
    q = {"GR00T_DUQUANT_CALIB_STEPS": str(calib_n)}
    return [
        Variant(f"{policy}_fp", base),
        Variant(f"{policy}_rtn", base + calib, {**DUQUANT_SEED_ENV, **RTN_ENV, **q,
                                                "GR00T_DUQUANT_PACKDIR": str(packdir / f"{policy}_rtn")}),
        Variant(f"{policy}_duquant", base + calib, {**DUQUANT_SEED_ENV, **q,
                                                    "GR00T_DUQUANT_PACKDIR": str(packdir / f"{policy}_duquant")}),
        Variant(f"{policy}_duquant_w4a4", base + calib,
                {**DUQUANT_SEED_ENV, **q, "GR00T_DUQUANT_ABITS": "4", "GR00T_DUQUANT_ACT_GRAN": "tensor",
                 "GR00T_DUQUANT_PACKDIR": str(packdir / f"{policy}_duquant_w4a4")}),
        # W4A4 with dynamic per-token activation scales (the DuQuant paper's A4 setting; static per-tensor A4 scales
        # clip the outlier tokens: MiniLM error 0.671x RTN static vs 0.540x per token, docs/duquant.md)
        Variant(f"{policy}_duquant_w4a4_token", base + calib,
                {**DUQUANT_SEED_ENV, **q, "GR00T_DUQUANT_ABITS": "4", "GR00T_DUQUANT_ACT_GRAN": "token",
                 "GR00T_DUQUANT_PACKDIR": str(packdir / f"{policy}_duquant_w4a4_token")}),
    ]


@dataclass
class MatrixConfig:
    """Everything one matrix run needs; filled from the benchmark's flags."""

    suite: str
    tasks: list[int]
    trials: int
    workers: int
    out_dir: Path
    seed: int = 7
    first_trial: int = 0  # trials first_trial .. first_trial + trials - 1 (init states of the suite)
    max_steps: int | None = None
    resolution: int | None = None
    replan: int | None = None  # client --replan (None: the server's replan_steps, else the whole chunk)
    ensemble: float | None = None  # client --ensemble (temporal ensembling of overlapping chunks; None: off)
    gripper_confirm: bool = False  # client --gripper-confirm (re-query before a chunk's gripper flip)
    trajectories: bool = False  # client --trajectory-dir OUT/<label>/trajectories (one npz per episode)
    server_python: str = field(default_factory=lambda: default_python(".venv"))
    client_python: str = field(default_factory=lambda: default_python(".venv-libero"))
    server_extra: list[str] = field(default_factory=list)
    ray: str | None = None  # run the episodes as Ray tasks on this cluster (address | auto | local), not the pool
    server_host: str | None = None  # where the simulators reach the servers (they then bind every interface)
    ready_timeout_s: float = 900.0
    episode_timeout_s: float | None = 1800.0  # a worker holding one episode longer is killed, the episode retried


class _Server:
    """One variant's server (:class:`client.testing.ServerProcess`), its output in ``server_<label>.log``."""

    def __init__(self, v: Variant, cfg: MatrixConfig) -> None:
        self.variant = v
        self.log_path = cfg.out_dir / f"server_{v.label}.log"
        # The caller's GR00T_DUQUANT_* never leak into a variant: each one's environment is exactly v.env.
        bind = ["--host", "0.0.0.0"] if cfg.server_host else []  # other nodes' simulators must reach it
        self.server = ServerProcess([*v.server_args, *cfg.server_extra, *bind], env=v.env, python=cfg.server_python,
                                    default_policy=True, drop_env_prefixes=("GR00T_DUQUANT_",), torch_threads=None,
                                    log_path=self.log_path, wait=False)
        self.port = self.server.port
        self.cmd = self.server.cmd

    def wait_ready(self, timeout_s: float) -> None:
        try:
            self.server.wait_ready(timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(f"server {self.variant.label}: {exc}") from None

    def server_report(self) -> dict[str, Any]:
        """The server's own view after the run: metadata (RSD acceptance aggregates) and stats."""
        from client.policy_client import PolicyClient, PolicyClientError

        out: dict[str, Any] = {}
        with PolicyClient(port=self.port, timeout_s=10.0) as c:
            for name in ("metadata", "stats"):
                try:
                    out[name] = getattr(c, name)()
                except PolicyClientError as e:
                    out[name] = {"error": str(e)}
        return out

    def stop(self) -> int | None:
        return self.server.stop()


def results_path(cfg: MatrixConfig, label: str) -> Path:
    """Where one variant's episodes are recorded."""
    return cfg.out_dir / label / "results.json"


def eval_config(cfg: MatrixConfig, v: Variant, port: int) -> EvalConfig:
    """The client settings of variant ``v``'s episodes against its server on ``port``.

    Built from the flags one ``client.libero.evaluate`` run of the variant would get, so ``Variant.client_args``
    mean (and override) exactly what they do on that command line, and are validated the same way.
    """
    argv = [cfg.suite, "--headless", "--port", str(port), "--tasks", ",".join(str(t) for t in cfg.tasks),
            "--trials", str(cfg.trials), "--first-trial", str(cfg.first_trial), "--seed", str(cfg.seed),
            "--workers", str(cfg.workers), "--no-video",
            "--no-progress", "--results", str(results_path(cfg, v.label)), "--resume"]
    if cfg.server_host:
        argv += ["--host", cfg.server_host]
    if cfg.max_steps:
        argv += ["--max-steps", str(cfg.max_steps)]
    if cfg.resolution:
        argv += ["--resolution", str(cfg.resolution)]
    if cfg.replan:
        argv += ["--replan", str(cfg.replan)]
    if cfg.ensemble is not None:
        argv += ["--ensemble", str(cfg.ensemble)]
    if cfg.gripper_confirm:
        argv += ["--gripper-confirm"]
    if cfg.trajectories:
        argv += ["--trajectory-dir", str(results_path(cfg, v.label).parent / "trajectories")]
    return config_from_args(argv + v.client_args)


def client_versions(python: str, gl_backend: str) -> dict[str, str]:
    """The simulator's library versions as the workers' interpreter sees them (recorded in every results file,
    as a single run records its own); asked of that interpreter, since this process may run another one."""
    code = "import json; from client.libero.env import library_versions; print(json.dumps(library_versions()))"
    r = subprocess.run([python, "-c", code], cwd=REPO, env=dict(os.environ, MUJOCO_GL=gl_backend),
                       capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"client interpreter {python} cannot import the LIBERO client: {r.stderr.strip()[-800:]}")
    versions = json.loads(r.stdout.strip().splitlines()[-1])
    versions["gl_backend"] = gl_backend
    return versions


def open_results(ecfg: EvalConfig, versions: dict[str, str]) -> ResultsFile:
    """A variant's results file, resumed when it exists (the matrix always continues its own earlier runs)."""
    return ResultsFile(ecfg.results_path, ecfg.suite, ecfg.to_dict(), versions, resume=True)


def build_jobs(configs: Mapping[str, EvalConfig], done: Mapping[str, set[tuple[int, int]]], tasks: Iterable[int],
               trials: int, first_trial: int = 0) -> list[EpisodeJob]:
    """One job per (variant, task, trial) not in ``done[label]``, tagged with the variant's label.

    Task-major, then trial, then variant: every variant runs episode (t, k) before any runs a later one, and the
    pool (which prefers jobs of the task a worker's env holds) keeps each env across all the episodes of a task.
    """
    return [EpisodeJob(ecfg, t, k, tag=label) for t in tasks for k in range(first_trial, first_trial + trials)
            for label, ecfg in configs.items() if (t, k) not in done.get(label, set())]


class _Recorder:
    """The pool's callbacks: each episode goes to its variant's results file, here in the parent only.

    ``failures``: errored episodes that a worker had lost (it died, or could not run them), the matrix's
    equivalent of a crashed evaluation client; episodes errored by the server alone stay ``errored`` in the
    summary, as in a single run.
    """

    def __init__(self, results: Mapping[str, ResultsFile], progress: Any = None) -> None:
        self.results = results
        self.progress = progress
        self.failures: list[str] = []
        self._lost: set[tuple[str, int, int]] = set()

    def on_result(self, job: EpisodeJob, ep: EpisodeResult) -> None:
        res = self.results[job.tag]
        res.add(ep)
        if ep.errored and (job.tag, job.task_id, job.trial) in self._lost:
            self.failures.append(f"{job.tag} task {job.task_id} trial {job.trial}: {ep.error} (see {res.path})")
        if self.progress is not None:
            counts = (r.document()["summary"] for r in self.results.values())
            self.progress.set_postfix_str(" ".join(f"{label} {c['successes']}/{c['valid_episodes']}"
                                                   for label, c in zip(self.results, counts, strict=True)))
            self.progress.update(1)

    def on_retry(self, job: EpisodeJob, reason: str, attempt: int) -> None:
        self._lost.add((job.tag, job.task_id, job.trial))
        self.results[job.tag].record_retry(job.task_id, job.trial, reason, attempt)


def summarise(results_files: Sequence[Path]) -> dict[str, Any]:
    """Success, Wilson interval, per task and per-episode outcomes (``"task:trial" -> success``) of results files."""
    succ = valid = errored = steps = 0
    per_task: dict[str, list[int]] = {}
    outcomes: dict[str, bool] = {}  # "task:trial" -> success, for paired comparisons between variants
    wall: list[float] = []
    recorded: list[tuple[str, dict[str, Any]]] = []  # each file's served-model identity (its config's "server")
    for f in results_files:
        if not f.is_file():
            continue
        doc = json.loads(f.read_text())
        recorded.append((str(f), (doc.get("config") or {}).get("server") or {}))
        for ep in doc.get("episodes", []):
            if ep.get("errored"):
                errored += 1
                continue
            valid += 1
            succ += int(bool(ep["success"]))
            steps += int(ep["steps"])
            wall.append(float(ep["wall_time_s"]))
            outcomes[f"{ep['task_id']}:{ep['trial']}"] = bool(ep["success"])
            t = per_task.setdefault(str(ep["task_id"]), [0, 0])
            t[0] += int(bool(ep["success"]))
            t[1] += 1
    lo, hi = wilson_ci(succ, valid)
    return {
        "successes": succ, "valid_episodes": valid, "errored": errored,
        "success_rate": (succ / valid) if valid else None, "ci95": [round(lo, 4), round(hi, 4)],
        "per_task": {k: f"{s}/{n}" for k, (s, n) in sorted(per_task.items(), key=lambda kv: int(kv[0]))},
        "mean_steps": (steps / valid) if valid else None,
        "median_episode_wall_s": sorted(wall)[len(wall) // 2] if wall else None,
        "outcomes": outcomes,
        "model": common_identity(recorded),
    }


def _run_episodes(cfg: MatrixConfig, configs: Mapping[str, EvalConfig], gl_backend: str) -> list[str]:
    """Open (resume) every variant's results file, run the missing episodes on one pool; returns the failures."""
    from tqdm import tqdm

    versions = client_versions(cfg.client_python, gl_backend)
    results = {label: open_results(ecfg, versions) for label, ecfg in configs.items()}
    jobs = build_jobs(configs, {label: r.done_keys() for label, r in results.items()}, cfg.tasks, cfg.trials,
                      cfg.first_trial)
    total = len(configs) * len(cfg.tasks) * cfg.trials
    log.info("%d episodes to run (%d already recorded)", len(jobs), total - len(jobs))
    bar = tqdm(total=len(jobs), desc="libero episodes", unit="ep", dynamic_ncols=True)
    rec = _Recorder(results, bar)
    pool: EpisodePool | RayEpisodePool = (
        RayEpisodePool(cfg.ray, gl_backend) if cfg.ray is not None else
        EpisodePool(cfg.workers, python=cfg.client_python, episode_timeout_s=cfg.episode_timeout_s,
                    gl_backend=gl_backend))
    try:
        pool.run(jobs, rec.on_result, rec.on_retry)
    except RuntimeError as exc:  # every worker died: report what was recorded, and this
        rec.failures.append(f"pool: {exc}")
    finally:
        bar.close()
    return rec.failures


def run_matrix(variants: Sequence[Variant], cfg: MatrixConfig) -> dict[str, Any]:
    """Start one server per variant, run every (variant, task, trial) episode on one pool, summarise."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant labels must be unique: {labels}")
    servers: dict[str, _Server] = {}
    t_start = time.monotonic()
    try:
        for v in variants:
            servers[v.label] = _Server(v, cfg)
        configs = {v.label: eval_config(cfg, v, servers[v.label].port) for v in variants}
        for s in servers.values():
            s.wait_ready(cfg.ready_timeout_s)
        log.info("%d servers ready in %.1fs", len(servers), time.monotonic() - t_start)
        for ecfg in configs.values():  # --preprocess auto -> what each variant's server advertises
            settle_from_server(ecfg)
        failures = _run_episodes(cfg, configs, os.environ.get("MUJOCO_GL") or "egl")
        summary: dict[str, Any] = {}
        for v in variants:
            summary[v.label] = summarise([results_path(cfg, v.label)])
            summary[v.label]["server"] = {"args": v.server_args, "env": v.env, "client_args": v.client_args}
            summary[v.label]["server_report"] = servers[v.label].server_report()
        return {"variants": summary, "failures": failures, "wall_s": round(time.monotonic() - t_start, 1),
                "suite": cfg.suite, "tasks": cfg.tasks, "trials": cfg.trials, "first_trial": cfg.first_trial,
                "seed": cfg.seed,
                "max_steps": cfg.max_steps, "resolution": cfg.resolution, "replan": cfg.replan, "ensemble": cfg.ensemble,
                "gripper_confirm": cfg.gripper_confirm,
                "workers": cfg.workers, "ray": cfg.ray}
    finally:
        for s in servers.values():
            s.stop()


def plot_success(report: dict[str, Any], path: Path) -> Path:
    """Bar chart: success per task and overall for every variant, with Wilson 95% intervals (PNG at ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from client.libero.results import wilson_ci

    variants = report["variants"]
    tasks = sorted({int(t) for v in variants.values() for t in v["per_task"]})
    groups = [str(t) for t in tasks] + ["all"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(variants)) ** 0.5 + 2), 3.6))
    width = 0.8 / max(1, len(variants))
    for i, (label, v) in enumerate(variants.items()):
        counts = [tuple(int(x) for x in v["per_task"].get(str(t), "0/0").split("/")) for t in tasks]
        counts.append((v["successes"], v["valid_episodes"]))
        rate = np.array([s / n if n else np.nan for s, n in counts])
        ci = np.array([wilson_ci(s, n) if n else (np.nan, np.nan) for s, n in counts])
        err = np.vstack([rate - ci[:, 0], ci[:, 1] - rate])
        x = np.arange(len(groups)) + (i - (len(variants) - 1) / 2) * width
        ax.bar(x, 100 * rate, width, yerr=100 * err, capsize=2, label=f"{label} ({v['successes']}/{v['valid_episodes']})")
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_xlabel("task")
    ax.set_ylabel("success (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"LIBERO {report.get('suite', '')}: {report.get('trials')} trials per task, seed {report.get('seed')}"
                 " (bars: Wilson 95%)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
