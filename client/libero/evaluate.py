"""Headless LIBERO evaluation against a running policy server: ``python -m client.libero.evaluate SUITE``.

Protocol (OpenVLA/openpi): for each task and trial k: ``env.seed(seed)``, ``env.reset()``,
``env.set_init_state(init_states[k])``, ``num_wait_steps`` do-nothing steps, then query the server with the
rotated images + 8-d state + instruction, execute ``replan`` actions of the returned chunk (gripper in the
env convention), repeat until ``done`` (success) or the suite's step limit.

Infrastructure failures (server down, timeout, error reply) mark the episode ``errored``: it is not a
policy failure, it is excluded from success rates, ``--resume`` retries it, and the run continues unless
``--stop-on-error``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from client.libero.config import EvalConfig, EvalConfigError, config_from_args
from client.libero.ensemble import TemporalEnsemble
from client.libero.protocol import (
    GRIPPER_LIBERO,
    PREPROCESS_AUTO,
    PREPROCESS_CHOICES,
    PREPROCESS_NONE,
    WAIT_ACTION,
    actions_before_gripper_flip,
    convert_gripper,
    rotate_180,
)
from client.libero.results import EpisodeResult, ResultsFile, ResultsFileError, server_identity
from client.libero.trajectory import TrajectoryRecorder
from client.libero.video import episode_video_name

log = logging.getLogger("client.libero.evaluate")

EXIT_OK = 0
EXIT_BAD_CONFIG = 2
EXIT_STOPPED_ON_ERROR = 3


class ServerContract:
    """What the client learned from ``metadata``: chunk length, replan steps, gripper convention, image path."""

    def __init__(self, meta: dict[str, Any], cfg: EvalConfig) -> None:
        self.meta = meta
        self.gripper = cfg.gripper_convention or str(meta.get("gripper_convention", GRIPPER_LIBERO))
        self.horizon = int(meta.get("action_horizon", 1) or 1)
        replan = cfg.replan if cfg.replan is not None else meta.get("replan_steps")
        self.replan = int(replan) if replan else None  # None = execute the whole returned chunk
        # normally settled before the run (settle_from_server); a config built in code may still say auto
        self.preprocess = cfg.preprocess if cfg.preprocess != PREPROCESS_AUTO else advertised_preprocess(meta)


def advertised_preprocess(meta: dict[str, Any]) -> str:
    """The image preset a server's ``metadata`` asks for (``none`` when it advertises none, as older servers);
    :class:`EvalConfigError` naming ``--preprocess`` for one this client does not implement."""
    value = meta.get("preprocess", PREPROCESS_NONE)
    if value not in PREPROCESS_CHOICES:
        raise EvalConfigError(f"--preprocess auto: the server advertises preprocess {value!r}, which this client "
                              f"does not implement (known: {', '.join(PREPROCESS_CHOICES)}); pass --preprocess")
    return str(value)


def wait_for_server(cfg: EvalConfig, poll_s: float = 2.0) -> dict[str, Any] | None:
    """The server's ``metadata`` once it reports ready (a server still loading its checkpoint is polled for up to
    ``--server-wait`` seconds), or its last answer when it failed or is still loading; ``None`` when nothing answered
    within ``--timeout``."""
    from client.policy_client import PolicyClient, PolicyClientError

    deadline = time.monotonic() + cfg.server_wait_s
    with PolicyClient(cfg.host, cfg.port, timeout_s=cfg.timeout_s) as client:
        while True:
            try:
                meta = client.metadata()
            except PolicyClientError as e:
                log.warning("server %s:%d did not answer metadata: %s", cfg.host, cfg.port, e)
                return None
            status = meta.get("status", "ready")
            if status != "loading" or time.monotonic() + poll_s > deadline:
                return meta
            log.info("server %s:%d is loading its policy; waiting (up to %.0fs, --server-wait)",
                     cfg.host, cfg.port, cfg.server_wait_s)
            time.sleep(poll_s)


def settle_from_server(cfg: EvalConfig) -> None:
    """What the run takes from the server before its first episode: ``cfg.server``, the served model's identity
    (:func:`client.libero.results.server_identity`: policy, checkpoint digest, quantisation, decoding settings;
    recorded in the results file, and a ``--resume`` against other weights is refused), and the preset that
    replaces ``--preprocess auto`` (``metadata["preprocess"]``), so the results file records the image path actually
    used; raises :class:`EvalConfigError` (naming the flag) when the server cannot say. An explicit preset only
    waits for a loading server (episodes against a missing one are errored)."""
    meta = wait_for_server(cfg)
    if meta is not None and meta.get("status", "ready") == "ready":
        cfg.server = server_identity(meta)
    if cfg.preprocess != PREPROCESS_AUTO:
        return
    where = f"{cfg.host}:{cfg.port}"
    if meta is None:
        raise EvalConfigError(f"--preprocess auto: the server at {where} did not answer within --timeout "
                              f"{cfg.timeout_s:g}s, so the image path its checkpoint expects is unknown: start the "
                              f"server, or pass --preprocess {'|'.join(PREPROCESS_CHOICES)}")
    status = meta.get("status", "ready")
    if status != "ready":
        raise EvalConfigError(f"--preprocess auto: the server at {where} is {status!r}, not ready (see its log; "
                              f"--server-wait {cfg.server_wait_s:g}s), so its image path is unknown")
    cfg.preprocess = value = advertised_preprocess(meta)
    cfg.extra["preprocess_from"] = "server metadata" if "preprocess" in meta else "default (server advertises none)"
    log.info("image preprocessing %r (the server's %s policy advertises it)", value, meta.get("policy", "?"))
    cfg.validate()  # e.g. gr00t needs --resolution 256


def _percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if xs else None


def run_episode(env: Any, task: Any, trial: int, cfg: EvalConfig, client: Any,
                contract_box: dict[str, Any], gate: Any = None,
                labeler: Any = None) -> tuple[EpisodeResult, list[np.ndarray]]:
    """One episode; never raises for server trouble (returns an errored result instead).

    With a :class:`client.libero.env.CameraGate`, cameras render only on the steps whose observation is
    sent to the server (the step that empties the action queue, the last wait step); the video's camera
    renders at every step when videos are saved. With a :class:`client.libero.dagger.ExpertLabeler`
    (``--expert-labels``), every query is also labelled with the scripted expert's chunk from that state.
    """
    from client.libero.env import extract_obs, reset_to_init

    def need_images(needed: bool) -> None:
        if gate is not None:
            gate.open = needed
    from client.policy_client import PolicyClientError

    t0 = time.monotonic()
    trajectory = TrajectoryRecorder() if cfg.trajectory_dir else None
    start: dict[str, Any] | None = None
    frames: list[np.ndarray] = []
    latencies: list[float] = []
    server_timings: dict[str, list[float]] = {}
    steps = 0
    success = False
    errored = False
    error: str | None = None
    init_index = trial % task.num_init_states
    try:
        if "c" not in contract_box:
            meta = client.metadata()
            if meta.get("status", "ready") != "ready":  # never learn the contract from a loading server
                raise PolicyClientError(f"the server is {meta.get('status')!r}, not ready")
            contract_box["c"] = ServerContract(meta, cfg)
            c = contract_box["c"]
            log.info("server: %s, horizon %d, replan %s, gripper convention %s, preprocess %s",
                     c.meta.get("model_id", "?"), c.horizon, c.replan or "full chunk", c.gripper, c.preprocess)
            if cfg.ensemble is not None and (c.replan is None or c.replan >= c.horizon):
                log.warning("--ensemble %g: each chunk is executed whole (replan %s, horizon %d), so no two chunks "
                            "overlap and ensembling changes nothing; pass --replan N < %d",
                            cfg.ensemble, c.replan or "full chunk", c.horizon, c.horizon)
        contract = contract_box["c"]
        client.reset()
        need_images(cfg.num_wait_steps == 0)
        raw = reset_to_init(env, task, init_index, cfg.seed, gate, cfg.fixtures)
        for i in range(cfg.num_wait_steps):
            need_images(i == cfg.num_wait_steps - 1)
            raw, _, _, _ = env.step(WAIT_ACTION.astype(np.float64))
        labelling = labeler is not None and labeler.begin(task, trial, init_index, cfg.seed)
        ensemble = TemporalEnsemble(cfg.ensemble) if cfg.ensemble is not None else None
        queue: list[np.ndarray] = []
        start = raw
        gripper_now = float(WAIT_ACTION[6])  # the command in force (--gripper-confirm)
        confirming = False  # the queue was cut at a flip: the next chunk is executed as returned
        max_steps = cfg.effective_max_steps
        while steps < max_steps:
            if cfg.save_video:
                frames.append(rotate_180(raw["agentview_image"]))
            if not queue:
                obs = extract_obs(raw, task.instruction, contract.preprocess)
                q0 = time.perf_counter()
                chunk = client.infer(obs)
                latencies.append((time.perf_counter() - q0) * 1000.0)
                for k, v in (getattr(client, "last_reply", {}) or {}).get("timing", {}).items():
                    if isinstance(v, (int, float)):
                        server_timings.setdefault(k, []).append(float(v))
                chunk = convert_gripper(chunk, contract.gripper)
                if trajectory is not None:
                    trajectory.query(steps, chunk)
                n = len(chunk) if contract.replan is None else min(contract.replan, len(chunk))
                if ensemble is not None:
                    ensemble.add(steps, chunk)
                    queue = ensemble.actions(steps, n)
                else:
                    if cfg.gripper_confirm and not confirming:
                        cut = actions_before_gripper_flip(chunk[:n], gripper_now)
                        confirming, n = cut < n, cut
                    else:
                        confirming = False
                    queue = list(chunk[:n])
                if labelling and (expert := labeler.observe(env, raw, steps)) is not None:
                    queue = list(expert[:n])  # --expert-mix: the expert acts on this query
            action = queue.pop(0)
            gripper_now = float(action[6]) if action[6] != 0 else gripper_now
            # the observation after this step is sent only if the queue is now empty and steps remain
            need_images(not queue and steps + 1 < max_steps)
            raw, reward, done, _ = env.step(action.astype(np.float64))
            steps += 1
            if trajectory is not None:
                trajectory.step(action, raw)
            if labelling:
                labeler.step(env, action, reward, done)
            if done:
                success = True
                if cfg.save_video:
                    frames.append(rotate_180(raw["agentview_image"]))
                break
    except PolicyClientError as e:
        errored = True
        error = f"{type(e).__name__}: {e}"
        log.warning("task %d trial %d errored: %s", task.task_id, trial, error)
    except (ValueError, FloatingPointError) as e:  # malformed actions from the policy: a policy failure
        error = f"{type(e).__name__}: {e}"
        log.warning("task %d trial %d failed on a bad action: %s", task.task_id, trial, error)
    except Exception as e:  # noqa: BLE001 - a simulator exception ends the episode as a failure (OpenVLA's rule)
        error = f"simulator {type(e).__name__}: {e}"
        log.exception("task %d trial %d: simulator raised; counted as a failure, env will be recreated",
                      task.task_id, trial)
        contract_box["env_broken"] = True  # type: ignore[assignment]
    if labeler is not None and labeler.active:
        labeler.end(success, errored or contract_box.get("env_broken", False))
    if trajectory is not None and start is not None:
        outcome = "errored" if errored else ("success" if success else "failure")
        trajectory.write(Path(cfg.trajectory_dir) / episode_video_name(task.task_id, task.name, trial, outcome, "npz"),
                         start, success)
    ep = EpisodeResult(
        task_id=task.task_id, task_name=task.name, instruction=task.instruction, trial=trial,
        init_state_index=init_index, success=success, errored=errored, steps=steps,
        wall_time_s=round(time.monotonic() - t0, 3),
        latency_ms_p50=_percentile(latencies, 50), latency_ms_p95=_percentile(latencies, 95),
        num_queries=len(latencies), error=error,
        server_timing_ms_p50={k: float(np.median(v)) for k, v in server_timings.items()},
    )
    return ep, frames


def evaluate(cfg: EvalConfig) -> int:
    """Run the whole evaluation; returns the process exit code."""
    from client.libero.env import (
        CameraGate,
        close_env,
        get_suite_tasks,
        library_versions,
        make_env,
        setup_headless_gl,
        write_libero_config,
    )
    from client.libero.video import write_video
    from client.policy_client import PolicyClient

    if not cfg.headless:
        log.info("no on-screen viewer is implemented; rendering off-screen")
    settle_from_server(cfg)
    backend = setup_headless_gl()
    write_libero_config()
    tasks = get_suite_tasks(cfg.suite)
    task_ids = cfg.tasks if cfg.tasks is not None else list(range(len(tasks)))
    bad = [t for t in task_ids if t >= len(tasks)]
    if bad:
        print(f"error: --tasks {bad} out of range: {cfg.suite} has {len(tasks)} tasks (0..{len(tasks) - 1})",
              file=sys.stderr)
        return EXIT_BAD_CONFIG
    versions = library_versions()
    versions["gl_backend"] = backend
    results = ResultsFile(cfg.results_path, cfg.suite, cfg.to_dict(), versions, resume=cfg.resume)
    done_keys = results.done_keys() if cfg.resume else set()
    trials = range(cfg.first_trial, cfg.first_trial + cfg.trials)
    todo = [(t, k) for t in task_ids for k in trials if (t, k) not in done_keys]
    log.info("%s: %d episodes to run (%d already done), results -> %s",
             cfg.suite, len(todo), len(done_keys), cfg.results_path)
    if cfg.ray is not None or cfg.workers > 1:  # several simulators: client.libero.parallel; 1 stays this loop
        from client.libero.parallel import evaluate_parallel

        stopped = evaluate_parallel(cfg, todo, results, backend)
        return _finish(cfg, results, stopped)

    from tqdm import tqdm

    client = PolicyClient(cfg.host, cfg.port, timeout_s=cfg.timeout_s)
    labeler = make_labeler(cfg)
    contract_box: dict[str, Any] = {}  # "c": ServerContract once known; "env_broken" after a sim exception
    bar = tqdm(total=len(todo), desc=cfg.suite, unit="ep", disable=not cfg.progress, dynamic_ncols=True)
    stopped = False
    env = None
    gate = None
    current_task = None
    try:
        for task_id, trial in todo:
            task = tasks[task_id]
            if current_task != task_id or contract_box.pop("env_broken", None):
                if env is not None:
                    close_env(env)
                env = make_env(task, cfg.resolution, cameras=True)
                gate = None if cfg.render_all_steps else CameraGate(
                    env, always_render=("agentview",) if cfg.save_video else ())
                current_task = task_id
            ep, frames = run_episode(env, task, trial, cfg, client, contract_box, gate, labeler)
            if cfg.save_video and frames:
                outcome = "errored" if ep.errored else ("success" if ep.success else "failure")
                path = cfg.videos_path / episode_video_name(task_id, task.name, trial, outcome)
                write_video(path, frames)
                ep.video = str(path)
            results.add(ep)
            s = results.document()["summary"]
            rate = "-" if s["success_rate"] is None else f"{100 * s['success_rate']:.1f}%"
            bar.set_postfix_str(f"success {s['successes']}/{s['valid_episodes']} ({rate}) err {s['errored']}")
            bar.update(1)
            if ep.errored and cfg.stop_on_error:
                stopped = True
                log.error("stopping on error (--stop-on-error): %s", ep.error)
                break
    finally:
        bar.close()
        client.close()
        if labeler is not None:
            labeler.close()
        if env is not None:
            close_env(env)
    return _finish(cfg, results, stopped)


def make_labeler(cfg: EvalConfig) -> Any:
    """The DAgger labeler ``--expert-labels`` asks for (one per simulator process), else ``None``."""
    if cfg.expert_labels is None:
        return None
    from client.libero.dagger import ExpertLabeler

    return ExpertLabeler(cfg.expert_labels, mix=cfg.expert_mix, seed=cfg.seed)


def _finish(cfg: EvalConfig, results: ResultsFile, stopped: bool) -> int:
    results.write()
    print(results.summary_table())
    print(f"results: {cfg.results_path}")
    if cfg.save_video:
        print(f"videos:  {cfg.videos_path}")
    if cfg.expert_labels is not None:
        print(f"expert labels (DAgger): {cfg.expert_labels}")
    return EXIT_STOPPED_ON_ERROR if stopped else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("robosuite", "OpenGL", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = config_from_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        return evaluate(cfg)
    except (FileExistsError, EvalConfigError, ResultsFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":
    sys.exit(main())
