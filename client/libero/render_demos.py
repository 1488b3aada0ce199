"""Render full demonstrations (images + proprioception) from the compact, shipped actions file.

``python -m client.libero.render_demos --actions data/libero_spatial_actions.hdf5 --out artifacts/demos/libero_spatial
[--per-task N] [--tasks 0,3] [--workers 2] [--frame-every 8 [--frame-phase 4]]``
``python -m client.libero.render_demos --merge DIR_PHASE0 DIR_PHASE4 --out DIR`` (one render at every 4th step)

Why: the expert's physics-only search is cheap and its result -- per task, the init-state index and the
action sequence of each solved episode -- is a few hundred KB that the repository ships. Rendering is ~15x
the physics and produces ~6 MB per episode, so it is done where and when the images are needed (before
training), by replaying each action sequence from its init state with the evaluation client's cameras.
MuJoCo is deterministic from a full state, so the replay reproduces the search's trajectory; a replay that
does not end in success is dropped and counted. Output: the same per-task files ``record_demos`` writes
(LIBERO layout); ``--resume`` semantics are implicit -- episodes already in an output file are skipped, and so
are the replays recorded as failed in ``<task_name>_replay_failures.json`` beside it (23-30 of the 498 shipped
libero_spatial episodes, ~5 min on 2 cores to retry; delete the file to retry them). Replays do not pin the fixture
layout (``client.libero.env.reset_to_init``), so which ones fail depends on the order a worker replays a task's
episodes in: one run dropped 23, another 30.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from client.dataset import dataset_attrs, merge_frame_renders, read_actions_file, recorded_init_states

log = logging.getLogger("client.libero.render_demos")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def render_task(suite: str, tid: int, episodes: list[tuple[int, np.ndarray]], out: str, seed: int,
                frame_every: int = 1, frame_phase: int = 0) -> dict[str, Any]:
    """Render one task's episodes into ``out/<task_name>_demo.hdf5``; returns counts.

    ``frame_every = k`` records every k-th step's observation, at offset ``(init_index + frame_phase) mod k`` so
    the frames of the task's episodes cover every phase of a chunk (see ``replay_and_record``). Two renders at
    phases 0 and k/2 hold disjoint frames of the same episodes; :func:`client.dataset.merge_frame_renders` joins
    them into one render at every (k/2)-th step for the cost of the second alone.
    """
    from client.dataset import STORE_RES, write_demo
    from client.libero.env import close_env, get_suite_tasks, library_versions, make_env, setup_headless_gl
    from client.libero.record_demos import RENDER_RES, replay_and_record

    setup_headless_gl()
    task = get_suite_tasks(suite)[tid]
    path = Path(out) / f"{task.name}_demo.hdf5"
    existing = dataset_attrs(path).get("env_args") if path.exists() else None
    if existing is not None:
        was = json.loads(existing)
        if (int(was.get("frame_every", 1)), int(was.get("frame_phase", 0))) != (frame_every, frame_phase):
            raise ValueError(f"{path} was rendered with frame_every={was.get('frame_every', 1)}, frame_phase="
                             f"{was.get('frame_phase', 0)}; resume it with those values or render into another --out")
    done = recorded_init_states(path)
    failures_path = path.with_name(f"{task.name}_replay_failures.json")
    failed = _read_failures(failures_path, frame_every, seed, frame_phase)
    todo = [(k, a) for k, a in episodes if k not in done and k not in failed]
    env_args = {"type": 1, "env_name": "OffScreenRenderEnv", "env_kwargs": {
        "camera_heights": RENDER_RES, "camera_widths": RENDER_RES, "controller": "OSC_POSE", "control_freq": 20,
        "camera_names": ["agentview", "robot0_eye_in_hand"]}, "stored_resolution": STORE_RES, "resize": "area",
        "seed": seed, "versions": library_versions(), "rendered_from": "compact actions file",
        "frame_every": frame_every, "frame_phase": frame_phase}
    counts = {"task": tid, "rendered": 0, "replay_failures": 0,
              "skipped_existing": sum(k in done for k, _ in episodes),
              "skipped_failed_before": sum(k in failed and k not in done for k, _ in episodes)}
    if not todo:
        return counts
    env = make_env(task, RENDER_RES, cameras=True)
    try:
        n = len(done)
        for k, actions in todo:
            t0 = time.time()
            rec = replay_and_record(env, task, k, actions, seed, frame_every=frame_every,
                                    frame_offset=(k + frame_phase) % frame_every)
            if rec["success_step"] is None:
                counts["replay_failures"] += 1
                failed.add(k)
                failures_path.write_text(json.dumps({"frame_every": frame_every, "frame_phase": frame_phase,
                                                     "seed": seed, "init_indices": sorted(failed)}))
                log.warning("task %d init %d: replay did not succeed; dropped (recorded in %s)", tid, k,
                            failures_path.name)
                continue
            # The replay stops at success: store the actions that produced the recorded observations.
            write_demo(path, task, n, k, rec["actions"], rec, env_args, {}, seed)
            n += 1
            counts["rendered"] += 1
            log.info("task %d init %d: rendered %d steps (%d frames) in %.1fs", tid, k, len(rec["actions"]),
                     len(rec["agentview_rgb"]), time.time() - t0)
    finally:
        close_env(env)
    return counts


def _read_failures(path: Path, frame_every: int, seed: int, frame_phase: int = 0) -> set[int]:
    """Init indices whose replay failed in an earlier run with the same ``frame_every``, phase and seed (else none)."""
    if not path.exists():
        return set()
    try:
        rec = json.loads(path.read_text())
        if (int(rec.get("frame_every", 1)), int(rec.get("frame_phase", 0)), int(rec.get("seed", -1))) != (
                frame_every, frame_phase, seed):
            return set()
        return {int(k) for k in rec["init_indices"]}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s unreadable (%s); its replays are tried again", path, exc)
        return set()


def _log_to_stderr() -> None:
    """Pool initializer: spawned workers start with logging unconfigured, so their per-episode lines would be lost."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def main(argv: list[str] | None = None) -> int:
    from client.libero.protocol import DEFAULT_SEED

    p = argparse.ArgumentParser(prog="python -m client.libero.render_demos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actions", help="compact actions file (record_demos --actions-out)")
    p.add_argument("--merge", nargs="+", metavar="DIR", default=None,
                   help="instead of rendering: join renders of the same actions at frame phases 0, k/n, ... into "
                        "one render in --out (client.dataset.merge_frame_renders)")
    p.add_argument("--out", required=True, help="directory for the per-task demonstration files")
    p.add_argument("--per-task", type=int, default=None, help="at most this many episodes per task")
    p.add_argument("--tasks", default=None, help="comma-separated task ids (default: all in the file)")
    p.add_argument("--workers", type=int, default=1, help="parallel simulator processes (one per core)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--frame-every", type=int, default=1,
                   help="record (and render) the observation of every k-th step only (~k x faster on a CPU)")
    p.add_argument("--frame-phase", type=int, default=0,
                   help="shift the recorded steps by this many (0 <= P < k): a render at P = k/2 holds the frames a "
                        "phase-0 render skipped (join them with client.dataset.merge_frame_renders)")
    ns = p.parse_args(argv)
    if ns.merge is not None:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        try:
            counts = merge_frame_renders(ns.merge, ns.out)
        except (ValueError, FileNotFoundError) as exc:
            p.error(str(exc))
        print(json.dumps({"out": ns.out, **counts}))
        return 0
    if ns.actions is None:
        p.error("--actions is required (or --merge DIR DIR ...)")
    if ns.frame_every < 1:
        p.error(f"--frame-every must be >= 1, got {ns.frame_every}")
    if not 0 <= ns.frame_phase < ns.frame_every:
        p.error(f"--frame-phase must be in [0, {ns.frame_every}), got {ns.frame_phase}")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    suite, by_task = read_actions_file(Path(ns.actions))
    wanted = [int(t) for t in ns.tasks.split(",")] if ns.tasks else sorted(by_task)
    missing = [t for t in wanted if t not in by_task]
    if missing:
        p.error(f"--tasks {missing} are not in {ns.actions} (it has {sorted(by_task)})")
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    jobs = [(suite, t, by_task[t][: ns.per_task], ns.out, ns.seed, ns.frame_every, ns.frame_phase)
            for t in wanted]
    # longest tasks first (total expert steps), so the last task to finish is a short one
    jobs.sort(key=lambda job: -sum(len(a) for _, a in job[2]))
    if ns.workers > 1:
        with mp.get_context("spawn").Pool(ns.workers, initializer=_log_to_stderr) as pool:
            # chunksize 1: tasks go to whichever worker is free (starmap's default hands out pairs of tasks,
            # which left one core idle for the last ~6 min of a 2-worker run)
            results = pool.starmap(render_task, jobs, chunksize=1)
    else:
        results = [render_task(*job) for job in jobs]
    print(json.dumps({"suite": suite, "out": ns.out, "tasks": results,
                      "rendered": sum(r["rendered"] for r in results),
                      "replay_failures": sum(r["replay_failures"] for r in results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
