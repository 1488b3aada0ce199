"""Run LIBERO success-rate evaluations for several server variants in parallel processes.

Why a scheduler rather than one ``run_libero_eval.sh`` per variant: an episode is dominated by the
simulator (one core each), so the throughput is set by how many simulator processes run at once, not by
how many variants there are. Every variant gets one server; the work is cut into (variant, task) jobs
that a pool of client processes drains, interleaved so all variants advance together and a run stopped
early still compares them on the same episodes. Each job writes its own results file with ``--resume``,
so re-running the same command continues where it stopped.

Only the client side is imported here (no torch): servers run under ``server_python``, clients under
``client_python``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """Main-only vs RSD exact vs RSD relaxed (code distance) vs RSD relaxed-action on the OpenVLA-RSD policy."""
    base = ["--policy", "openvla-rsd"] + (["--model-path", model_path] if model_path else [])
    return [
        Variant("main_only", base + ["--rsd-enabled", "0"]),
        Variant("exact", base + ["--rsd-mode", "exact"]),
        Variant("relaxed", base + ["--rsd-mode", "relaxed", "--rsd-relaxed-r", str(relaxed_r),
                                   "--rsd-relaxed-tau", str(relaxed_tau)]),
        Variant("relaxed_action", base + ["--rsd-mode", "relaxed-action", "--rsd-action-eps-mm", str(action_eps),
                                          "--rsd-action-eps-deg", str(action_eps)]),
    ]


def quant_variants(policy: str, model_path: str | None, packdir: Path, calib_data: str | None, calib_n: int,
                   denoising_steps: int) -> list[Variant]:
    """Full precision vs RTN W4A8 vs DuQuant W4A8 (default settings) for one policy."""
    base = ["--policy", policy] + (["--model-path", model_path] if model_path else [])
    if policy == "gr00t":
        base += ["--denoising-steps", str(denoising_steps), "--embodiment-tag", "new_embodiment"]
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
    max_steps: int | None = None
    resolution: int | None = None
    replan: int | None = None  # client --replan (None: the server's replan_steps, else the whole chunk)
    server_python: str = field(default_factory=lambda: default_python(".venv"))
    client_python: str = field(default_factory=lambda: default_python(".venv-libero"))
    server_extra: list[str] = field(default_factory=list)
    ready_timeout_s: float = 900.0
    job_timeout_s: float = 7200.0


class _Server:
    """One variant's server (:class:`client.testing.ServerProcess`), its output in ``server_<label>.log``."""

    def __init__(self, v: Variant, cfg: MatrixConfig) -> None:
        self.variant = v
        self.log_path = cfg.out_dir / f"server_{v.label}.log"
        # The caller's GR00T_DUQUANT_* never leak into a variant: each one's environment is exactly v.env.
        self.server = ServerProcess([*v.server_args, *cfg.server_extra], env=v.env, python=cfg.server_python,
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


def _job_cmd(cfg: MatrixConfig, v: Variant, port: int, task: int, results: Path) -> list[str]:
    cmd = [cfg.client_python, "-m", "client.libero.evaluate", cfg.suite, "--headless", "--port", str(port),
           "--tasks", str(task), "--trials", str(cfg.trials), "--seed", str(cfg.seed), "--no-video",
           "--no-progress", "--results", str(results), "--resume"]
    if cfg.max_steps:
        cmd += ["--max-steps", str(cfg.max_steps)]
    if cfg.resolution:
        cmd += ["--resolution", str(cfg.resolution)]
    if cfg.replan:
        cmd += ["--replan", str(cfg.replan)]
    return cmd + v.client_args


def _summarise(results_files: Sequence[Path]) -> dict[str, Any]:
    succ = valid = errored = steps = 0
    per_task: dict[str, list[int]] = {}
    outcomes: dict[str, bool] = {}  # "task:trial" -> success, for paired comparisons between variants
    wall: list[float] = []
    for f in results_files:
        if not f.is_file():
            continue
        doc = json.loads(f.read_text())
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
    from client.libero.results import wilson_ci

    lo, hi = wilson_ci(succ, valid)
    return {
        "successes": succ, "valid_episodes": valid, "errored": errored,
        "success_rate": (succ / valid) if valid else None, "ci95": [round(lo, 4), round(hi, 4)],
        "per_task": {k: f"{s}/{n}" for k, (s, n) in sorted(per_task.items(), key=lambda kv: int(kv[0]))},
        "mean_steps": (steps / valid) if valid else None,
        "median_episode_wall_s": sorted(wall)[len(wall) // 2] if wall else None,
        "outcomes": outcomes,
    }


def run_matrix(variants: Sequence[Variant], cfg: MatrixConfig) -> dict[str, Any]:
    """Start one server per variant, drain (variant, task) jobs with ``cfg.workers`` clients, summarise."""
    from tqdm import tqdm

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    labels = [v.label for v in variants]
    by_label = {v.label: v for v in variants}
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant labels must be unique: {labels}")
    servers: dict[str, _Server] = {}
    running: list[tuple[subprocess.Popen, str, int, float, Any]] = []
    failures: list[str] = []
    t_start = time.monotonic()
    try:
        for v in variants:
            servers[v.label] = _Server(v, cfg)
        for s in servers.values():
            s.wait_ready(cfg.ready_timeout_s)
        log.info("%d servers ready in %.1fs", len(servers), time.monotonic() - t_start)
        # Task-major order: every variant sees task t before any variant sees task t+1.
        jobs = [(v.label, t) for t in cfg.tasks for v in variants]
        client_env = dict(os.environ)
        client_env.setdefault("MUJOCO_GL", "egl")
        bar = tqdm(total=len(jobs), desc="libero jobs", unit="job", dynamic_ncols=True)
        pending = list(jobs)
        while pending or running:
            while pending and len(running) < cfg.workers:
                label, task = pending.pop(0)
                res = cfg.out_dir / label / f"task_{task:02d}.json"
                res.parent.mkdir(parents=True, exist_ok=True)
                logf = open(cfg.out_dir / label / f"task_{task:02d}.log", "a")  # noqa: SIM115 - closed below
                proc = subprocess.Popen(_job_cmd(cfg, by_label[label], servers[label].port, task, res), cwd=REPO,
                                        env=client_env, stdout=logf, stderr=subprocess.STDOUT)
                running.append((proc, label, task, time.monotonic(), logf))
            time.sleep(0.5)
            still = []
            for proc, label, task, t0, logf in running:
                rc = proc.poll()
                if rc is None and time.monotonic() - t0 > cfg.job_timeout_s:
                    proc.kill()
                    rc = proc.wait()
                if rc is None:
                    still.append((proc, label, task, t0, logf))
                    continue
                logf.close()
                if rc != 0:
                    failures.append(f"{label} task {task}: exit {rc} (see {cfg.out_dir / label})")
                bar.update(1)
            running = still
        bar.close()
        summary: dict[str, Any] = {}
        for v in variants:
            files = sorted((cfg.out_dir / v.label).glob("task_*.json"))
            summary[v.label] = _summarise(files)
            summary[v.label]["server"] = {"args": v.server_args, "env": v.env, "client_args": v.client_args}
            summary[v.label]["server_report"] = servers[v.label].server_report()
        return {"variants": summary, "failures": failures, "wall_s": round(time.monotonic() - t_start, 1),
                "suite": cfg.suite, "tasks": cfg.tasks, "trials": cfg.trials, "seed": cfg.seed,
                "max_steps": cfg.max_steps, "resolution": cfg.resolution, "replan": cfg.replan,
                "workers": cfg.workers}
    finally:
        for proc, *_rest in running:
            if proc.poll() is None:
                proc.kill()
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
