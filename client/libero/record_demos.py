"""Record scripted-expert demonstrations in LIBERO's HDF5 layout.

``python -m client.libero.record_demos --suite libero_spatial --trials-per-task 20 --out artifacts/demos/libero_spatial --resume``

Two phases per demonstration, because rendering costs ~15x the physics:
1. search, physics only (no renderer, no camera observations): from init state k, run the expert with
   parameter variants until one succeeds within the suite's step limit;
2. replay the found action sequence in a rendering env from the same init state (seed, reset,
   set_init_state, wait steps), recording the observations the evaluation client would send. The replay
   must succeed too (MuJoCo is deterministic from a full state); a replay that does not is dropped and
   counted.

Tasks are visited round-robin in blocks, so an interrupted run has about the same number of demos for
every task; ``--resume`` continues from ``progress.json``. Output per task: ``<task_name>_demo.hdf5`` with
``data/demo_N/{actions, obs/*, states, dones, rewards}`` (gzip; the schema lives in :mod:`client.dataset`), plus ``expert_stats.json`` (the expert's
success rate per task) and optionally the compact actions-only file (``--actions-out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.dataset import STORE_RES, write_actions_file, write_demo
from client.libero.protocol import (
    DEFAULT_SEED,
    NUM_WAIT_STEPS,
    SUITES,
    WAIT_ACTION,
    max_steps_for,
    quat2axisangle,
    rotate_180,
    state_8d,
)
from client.libero.results import atomic_write_json

log = logging.getLogger("client.libero.record_demos")

RENDER_RES = 256  # rendered side; stored at client.dataset.STORE_RES (exact 2x area downsampling)


@dataclass
class RecordConfig:
    suite: str
    out: str
    trials_per_task: int = 20
    tasks: list[int] | None = None
    attempts: int = 6  # expert parameter variants tried per init state
    seed: int = DEFAULT_SEED
    block: int = 5  # demos per task per round-robin visit
    resume: bool = False
    actions_out: str | None = None
    physics_only: bool = False  # only search; write the actions file, no rendered demos
    max_steps: int | None = None

    def validate(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"--suite must be one of {', '.join(SUITES)}")
        if self.trials_per_task < 1:
            raise ValueError("--trials-per-task must be >= 1")
        if self.attempts < 1:
            raise ValueError("--attempts must be >= 1")
        if self.block < 1:
            raise ValueError("--block must be >= 1")


@dataclass
class TaskProgress:
    """Per-task bookkeeping persisted in progress.json (what --resume reads)."""

    task_id: int
    name: str
    instruction: str
    next_init: int = 0  # next init-state index to try
    demos: int = 0  # rendered demos written
    searched: int = 0  # init states searched
    search_successes: int = 0  # init states the expert solved (physics only)
    first_attempt_successes: int = 0  # solved with the default parameters
    attempts_total: int = 0
    replay_failures: int = 0
    unsolved_inits: list[int] = field(default_factory=list)
    # compact actions of every solved init state: {init_index: [[...7], ...]}
    solved_actions: dict[str, list[list[float]]] = field(default_factory=dict)
    demo_inits: list[int] = field(default_factory=list)
    angle_wins: dict[str, int] = field(default_factory=dict)  # rim angle (rad, 3 d.p.) -> successes
    closed_loop_diverged: int = 0  # demos whose closed-loop re-run differed from the searched actions
    skipped: str | None = None  # why the expert cannot script this task (not a pick-and-place goal)


def area_resize_half(img: np.ndarray) -> np.ndarray:
    """Exact 2x area downsampling (256 -> 128): the mean of each 2x2 block, rounded."""
    h, w, c = img.shape
    x = img.reshape(h // 2, 2, w // 2, 2, c).astype(np.uint16).sum(axis=(1, 3))
    return ((x + 2) // 4).astype(np.uint8)


def _resize(img: np.ndarray, res: int) -> np.ndarray:
    if img.shape[0] == res:
        return img
    if img.shape[0] == 2 * res:
        return area_resize_half(img)
    import cv2

    return cv2.resize(img, (res, res), interpolation=cv2.INTER_AREA)


def store_frame(raw_image: np.ndarray) -> np.ndarray:
    """A raw LIBERO render as a demonstration stores it: rotated as the client sends it, ``STORE_RES`` square."""
    return _resize(rotate_180(raw_image), STORE_RES)


def record_frame(rec: dict[str, list[Any]], raw: dict[str, Any]) -> None:
    """Append one observation, as a demonstration stores it, to the recording ``rec`` (both cameras, the robot's
    proprio keys and the 8-D state the client sends)."""
    rec["agentview_rgb"].append(store_frame(raw["agentview_image"]))
    rec["eye_in_hand_rgb"].append(store_frame(raw["robot0_eye_in_hand_image"]))
    rec["ee_pos"].append(np.asarray(raw["robot0_eef_pos"], np.float32))
    rec["ee_ori"].append(quat2axisangle(raw["robot0_eef_quat"]).astype(np.float32))
    rec["gripper_states"].append(np.asarray(raw["robot0_gripper_qpos"], np.float32))
    rec["joint_states"].append(np.asarray(raw["robot0_joint_pos"], np.float32))
    rec["state_8d"].append(state_8d(raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"]))


def search_demo(env: Any, task: Any, init_index: int, cfg: RecordConfig, max_steps: int,
                rng: np.random.Generator, angle_wins: dict[str, int] | None = None) -> tuple[Any, int]:
    """Physics-only search over expert parameter variants; returns (rollout or None, attempts used).

    ``angle_wins`` counts, per task, which rim angle succeeded before; the most successful goes first.
    """
    from client.libero.expert import RIM_ANGLES, ExpertParams, parse_goal, run_expert

    env.seed(cfg.seed)
    env.reset()
    goal = parse_goal(env)
    wins = angle_wins or {}
    order = sorted(RIM_ANGLES, key=lambda a: (-wins.get(f"{a:.3f}", 0), RIM_ANGLES.index(a)))
    for attempt in range(cfg.attempts):
        params = ExpertParams.sample(rng, attempt, order)
        params.base_angle = order[attempt % len(order)]
        r = run_expert(env, task.init_states[init_index], params, max_steps, seed=cfg.seed,
                       wait_steps=NUM_WAIT_STEPS, goal=goal)
        if r.success:
            return r, attempt + 1
    return None, cfg.attempts


def replay_and_record(env: Any, task: Any, init_index: int, actions: np.ndarray, seed: int,
                      params: Any = None, max_steps: int | None = None, frame_every: int = 1,
                      frame_offset: int = 0, noise: np.ndarray | None = None) -> dict[str, Any]:
    """Re-run an episode from the init state in a rendering env, recording obs before each action.

    With ``params`` the scripted expert runs again closed loop with the parameters the search found
    (the recorded actions are then exactly what produced the recorded observations); otherwise
    ``actions`` are replayed open loop. MuJoCo is deterministic from a full state, but a rendering env
    is not bit-identical to a physics-only one in contact-rich scenes (a drawer), so closed loop is the
    robust choice; ``open_loop_match`` records whether the actions came out identical anyway.

    ``frame_every = k > 1`` records the observation only at steps ``t = frame_offset (mod k)`` and renders
    the cameras only for those steps (:class:`client.libero.env.CameraGate`); ``frame_steps`` lists them.
    Why: rendering is ~95% of a step on a CPU (~360 ms for the two cameras against ~6 ms of physics), and
    consecutive frames of one demonstration are nearly the same training sample; at ``k = 4`` an episode
    renders ~3.5x faster and the rendered frames are bit-identical to those of an every-step recording.

    ``noise`` (closed loop only, DART: :mod:`client.libero.dart`) is added to each of the expert's actions before it
    is executed, as :func:`client.libero.expert.run_expert` does; ``labels`` and ``phases`` then hold the expert's
    own actions and phase names step by step.
    """
    from client.libero.env import CameraGate
    from client.libero.expert import ScriptedExpert, parse_goal

    if frame_every < 1 or not 0 <= frame_offset < frame_every:
        raise ValueError(f"need frame_every >= 1 and 0 <= frame_offset < frame_every, got {frame_every}, "
                         f"{frame_offset}")
    gate = CameraGate(env) if frame_every > 1 else None

    def is_frame(t: int) -> bool:
        return t % frame_every == frame_offset

    env.seed(seed)
    env.reset()
    if gate is not None:
        gate.install()
        gate.open = NUM_WAIT_STEPS == 0 and is_frame(0)
    raw = env.set_init_state(task.init_states[init_index])
    for w in range(NUM_WAIT_STEPS):
        if gate is not None:
            gate.open = w == NUM_WAIT_STEPS - 1 and is_frame(0)  # the last wait step's obs is step 0's
        raw, _, _, _ = env.step(WAIT_ACTION.astype(np.float64))
    rec: dict[str, list[Any]] = {k: [] for k in (
        "agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states", "joint_states", "state_8d",
        "states", "rewards", "dones", "actions", "frame_steps")}
    expert = ScriptedExpert(env, parse_goal(env), params) if params is not None else None
    if noise is not None and expert is None:
        raise ValueError("noise needs params: only a closed-loop replay perturbs the expert's actions")
    labels: list[np.ndarray] = []
    phases: list[str] = []
    limit = (max_steps or len(actions)) if expert is not None else len(actions)
    success_step = None
    for t in range(limit):
        a = expert.act(raw) if expert is not None else np.asarray(actions[t], np.float32)
        if expert is not None and expert.failed:
            break
        if noise is not None:
            labels.append(np.asarray(a, np.float32))
            phases.append(expert.phase.name)
            a = np.clip(a + noise[t], -1.0, 1.0).astype(np.float32)
        if is_frame(t):
            rec["frame_steps"].append(t)
            record_frame(rec, raw)
        rec["states"].append(np.asarray(env.get_sim_state(), np.float64))
        rec["actions"].append(np.asarray(a, np.float32))
        if gate is not None:
            gate.open = is_frame(t + 1)
        raw, reward, done, _ = env.step(np.asarray(a, np.float64))
        rec["rewards"].append(float(reward))
        rec["dones"].append(int(done))
        if done:
            success_step = t + 1
            break
    out = {k: np.asarray(v) for k, v in rec.items()}
    out["frame_steps"] = out["frame_steps"].astype(np.int32)
    if frame_every == 1:
        del out["frame_steps"]  # every step has its observation: the standard LIBERO layout
    out["success_step"] = success_step
    if noise is not None:
        out["labels"], out["phases"] = np.asarray(labels, np.float32), phases
    ref = np.asarray(actions, np.float32)
    out["open_loop_match"] = bool(out["actions"].shape == ref.shape and np.array_equal(out["actions"], ref))
    return out


def expert_stats(progress: dict[int, TaskProgress]) -> dict[str, Any]:
    rows = {}
    for tid, p in sorted(progress.items()):
        rows[str(tid)] = {
            "task_name": p.name, "instruction": p.instruction, "init_states_searched": p.searched,
            "expert_success_rate": (p.search_successes / p.searched) if p.searched else None,
            "first_attempt_success_rate": (p.first_attempt_successes / p.searched) if p.searched else None,
            "mean_attempts": (p.attempts_total / p.searched) if p.searched else None,
            "unsolved_inits": p.unsolved_inits, "demos_written": p.demos, "replay_failures": p.replay_failures,
            "skipped": p.skipped, "closed_loop_diverged": p.closed_loop_diverged,
        }
    searched = sum(p.searched for p in progress.values())
    solved = sum(p.search_successes for p in progress.values())
    return {"per_task": rows, "overall_expert_success_rate": solved / searched if searched else None,
            "demos_written": sum(p.demos for p in progress.values())}


def _load_progress(path: Path) -> dict[int, TaskProgress]:
    doc = json.loads(path.read_text())
    return {int(k): TaskProgress(**v) for k, v in doc["tasks"].items()}


def _save_progress(path: Path, cfg: RecordConfig, progress: dict[int, TaskProgress]) -> None:
    atomic_write_json(path, {"config": asdict(cfg), "tasks": {str(k): asdict(v) for k, v in progress.items()}})


def record(cfg: RecordConfig) -> int:
    import signal

    from client.libero.env import (
        close_env,
        get_suite_tasks,
        library_versions,
        make_env,
        setup_headless_gl,
        write_libero_config,
    )

    # SIGTERM -> SystemExit, so an open HDF5 file is closed cleanly by its ``with`` block (a plain
    # SIGTERM would end the process mid-write and could leave the file unreadable).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    setup_headless_gl()
    write_libero_config()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    progress_path = out / "progress.json"
    tasks = get_suite_tasks(cfg.suite)
    task_ids = cfg.tasks if cfg.tasks is not None else list(range(len(tasks)))
    if progress_path.exists() and cfg.resume:
        progress = _load_progress(progress_path)
        log.info("resuming: %s", {t: p.demos for t, p in progress.items()})
    elif progress_path.exists():
        print(f"error: {progress_path} exists; pass --resume or choose another --out", file=sys.stderr)
        return 2
    else:
        progress = {}
    for t in task_ids:
        progress.setdefault(t, TaskProgress(t, tasks[t].name, tasks[t].instruction))
    max_steps = cfg.max_steps or max_steps_for(cfg.suite)
    env_args = {"type": 1, "env_name": "OffScreenRenderEnv", "env_kwargs": {
        "camera_heights": RENDER_RES, "camera_widths": RENDER_RES, "controller": "OSC_POSE",
        "control_freq": 20, "camera_names": ["agentview", "robot0_eye_in_hand"]},
        "stored_resolution": STORE_RES, "resize": "area", "seed": cfg.seed, "num_wait_steps": NUM_WAIT_STEPS,
        "versions": library_versions()}

    def target(p: TaskProgress) -> int:
        return p.search_successes if cfg.physics_only else p.demos

    from tqdm import tqdm

    total = cfg.trials_per_task * len(task_ids)
    bar = tqdm(total=total, initial=sum(min(target(progress[t]), cfg.trials_per_task) for t in task_ids),
               desc=f"demos {cfg.suite}", unit="demo", dynamic_ncols=True)
    t_start = time.time()
    while True:
        pending = [t for t in task_ids if target(progress[t]) < cfg.trials_per_task
                   and progress[t].next_init < tasks[t].num_init_states]
        if not pending:
            break
        pending.sort(key=lambda t: (target(progress[t]), t))  # fewest demos first: balanced if interrupted
        for tid in pending:
            task, p = tasks[tid], progress[tid]
            phys = make_env(task, cameras=False)
            rend = None if cfg.physics_only else make_env(task, RENDER_RES, cameras=True)
            try:
                goal_n = min(cfg.trials_per_task, target(p) + cfg.block)
                while target(p) < goal_n and p.next_init < task.num_init_states:
                    k = p.next_init
                    rng = np.random.default_rng([cfg.seed, tid, k])
                    t0 = time.time()
                    try:
                        found, used = search_demo(phys, task, k, cfg, max_steps, rng, p.angle_wins)
                    except NotImplementedError as e:
                        p.skipped = str(e)
                        p.next_init = task.num_init_states
                        log.warning("task %d skipped: %s", tid, e)
                        _save_progress(progress_path, cfg, progress)
                        break
                    p.searched += 1
                    p.attempts_total += used
                    p.next_init += 1
                    if found is None:
                        p.unsolved_inits.append(k)
                        log.info("task %d init %d: expert failed %d attempts", tid, k, used)
                        _save_progress(progress_path, cfg, progress)
                        continue
                    p.search_successes += 1
                    key = f"{found.params.base_angle:.3f}"
                    p.angle_wins[key] = p.angle_wins.get(key, 0) + 1
                    p.first_attempt_successes += int(used == 1)
                    p.solved_actions[str(k)] = np.round(found.actions.astype(np.float64), 6).tolist()
                    if rend is not None:
                        rec = replay_and_record(rend, task, k, found.actions, cfg.seed, params=found.params,
                                                max_steps=max_steps)
                        if rec["success_step"] is None:
                            p.replay_failures += 1
                            log.warning("task %d init %d: replay did not succeed (search succeeded at %s)",
                                        tid, k, found.success_step)
                        else:
                            if not rec["open_loop_match"]:
                                p.closed_loop_diverged += 1
                            write_demo(out / f"{task.name}_demo.hdf5", task, p.demos, k, rec["actions"], rec,
                                       env_args, asdict(found.params), cfg.seed)
                            p.demos += 1
                            p.demo_inits.append(k)
                            bar.update(1)
                    else:
                        bar.update(1)
                    log.info("task %d init %d: solved in %d attempt(s), %d steps, %.1fs", tid, k, used,
                             found.steps, time.time() - t0)
                    _save_progress(progress_path, cfg, progress)
                    atomic_write_json(out / "expert_stats.json", expert_stats(progress))
            finally:
                close_env(phys)
                if rend is not None:
                    close_env(rend)
            if cfg.actions_out:
                write_actions_file(Path(cfg.actions_out), cfg.suite, progress)
    bar.close()
    stats = expert_stats(progress)
    atomic_write_json(out / "expert_stats.json", stats)
    if cfg.actions_out:
        write_actions_file(Path(cfg.actions_out), cfg.suite, progress)
    print(format_stats_table(stats))
    print(f"done in {time.time() - t_start:.0f}s; demos in {out}")
    return 0


def format_stats_table(stats: dict[str, Any]) -> str:
    lines = [f"{'task':<5} {'expert succ':>11} {'1st try':>8} {'searched':>8} {'demos':>6} {'replay fail':>11}  name"]
    for tid, r in stats["per_task"].items():
        rate = "-" if r["expert_success_rate"] is None else f"{100 * r['expert_success_rate']:.0f}%"
        if r.get("skipped"):
            rate = "skipped"
        first = "-" if r["first_attempt_success_rate"] is None else f"{100 * r['first_attempt_success_rate']:.0f}%"
        lines.append(f"{tid:<5} {rate:>11} {first:>8} {r['init_states_searched']:>8} {r['demos_written']:>6} "
                     f"{r['replay_failures']:>11}  {r['task_name']}")
    o = stats["overall_expert_success_rate"]
    lines.append(f"overall expert success {'-' if o is None else f'{100 * o:.1f}%'}, demos {stats['demos_written']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.libero.record_demos", description=__doc__.split("\n")[0])
    ap.add_argument("--suite", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--trials-per-task", type=int, default=20, help="successful demos wanted per task")
    ap.add_argument("--tasks", default=None, help="comma-separated task ids (default: all)")
    ap.add_argument("--attempts", type=int, default=6, help="expert variants tried per init state")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--block", type=int, default=5, help="demos per task per round-robin visit")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--actions-out", default=None, help="also write the compact actions-only HDF5 here")
    ap.add_argument("--physics-only", action="store_true", help="search only: no rendering, no demo files")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--export-actions", action="store_true",
                    help="no simulation: write --actions-out from OUT/progress.json (and print the expert table)")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ns.export_actions:
        if not ns.actions_out:
            print("error: --export-actions needs --actions-out", file=sys.stderr)
            return 2
        progress = _load_progress(Path(ns.out) / "progress.json")
        write_actions_file(Path(ns.actions_out), ns.suite, progress)
        print(format_stats_table(expert_stats(progress)))
        n = sum(len(p.solved_actions) for p in progress.values())
        print(f"wrote {ns.actions_out}: {n} expert trajectories")
        return 0
    for noisy in ("robosuite", "OpenGL", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = RecordConfig(suite=ns.suite, out=ns.out, trials_per_task=ns.trials_per_task,
                       tasks=[int(x) for x in ns.tasks.split(",")] if ns.tasks else None, attempts=ns.attempts,
                       seed=ns.seed, block=ns.block, resume=ns.resume, actions_out=ns.actions_out,
                       physics_only=ns.physics_only, max_steps=ns.max_steps)
    try:
        cfg.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return record(cfg)


if __name__ == "__main__":
    sys.exit(main())

