"""Noise-injected expert demonstrations (DART): ``python -m client.libero.dart --suite libero_spatial --out DIR``.

Why: both shipped policies miss where a centimetre of drift takes them off the expert's states (docs/dagger.md), and
three DAgger rounds made them worse: the take-over that labels the policy's states is a different controller from
the one that recorded the demonstrations, so near the demonstrations' states the two contradict each other. DART
(Laskey et al., 2017) gets corrective data from the *same* controller instead: the scripted expert runs closed loop
as it does for the demonstrations, but a perturbation is added to each action it executes, and the sample's target
is what the expert *meant* to do. The episode wanders off the clean trajectory the way a policy's does and the
labels show the expert's own way back -- nothing for the policy to reconcile with the demonstrations.

Per (task, init state): physics-only attempts (~1 s each) with the expert's default parameters, then the search's
jittered variants, each with its own noise draw, until one succeeds; then the executed actions are replayed open
loop in a rendering env (``replay_and_record``, observations every ``--frame-every``-th step, same frame offsets as
the demonstrations; where that replay diverges, as the drawer task's often do, the same attempt runs again closed
loop in the rendering env with the same parameters and noise) and the episode is written in the DAgger layout
(:func:`client.dataset.write_labelled_episode`): ``actions`` = what was executed, ``obs/expert_chunks`` = the
expert's clean actions from each frame's step on (16 steps, padded with the last), so the trainers'
``--extra-demos`` / ``--extra-share`` take it as is.
The noise is a Gaussian of ``--sigma`` (action units: 1.0 = 5 cm or 0.5 rad per step) on the 6 arm dimensions,
held for ``--hold`` steps (a chunk-long bias, like a policy's error, rather than white noise the controller
averages away); the gripper is never perturbed. Resumable: an episode already in ``--out`` is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.dataset import EXPERT_CHUNKS_KEY, chunk_actions, write_labelled_episode
from client.libero.dagger import LABEL_HORIZON

log = logging.getLogger("client.libero.dart")


@dataclass(frozen=True)
class NoiseSpec:
    # std of the perturbation per arm dimension, in action units. Measured on libero_spatial task 0, 6 init states,
    # first attempt: 0.05 -> 5/6 solved (mean |executed - clean| 0.04 on x/y/z, ~2 cm of drift per 8-step hold),
    # 0.1 -> 4/6, 0.2 -> 2/6, 0.3 -> 0/6 (task 5: 5/6 at 0.1, 1/6 at 0.2)
    sigma: float = 0.05
    hold: int = 8  # steps each draw is held

    def validate(self) -> None:
        if not 0.0 <= self.sigma <= 1.0:
            raise ValueError(f"--sigma must be in [0, 1], got {self.sigma}")
        if self.hold < 1:
            raise ValueError(f"--hold must be >= 1, got {self.hold}")


def held_noise(spec: NoiseSpec, steps: int, rng: np.random.Generator) -> np.ndarray:
    """``[steps, 7]`` perturbations: a fresh N(0, sigma^2) draw on dims 0-5 every ``hold`` steps, gripper 0."""
    draws = rng.normal(0.0, spec.sigma, size=(-(-steps // spec.hold), 6))
    noise = np.zeros((steps, 7), np.float32)
    noise[:, :6] = np.repeat(draws, spec.hold, axis=0)[:steps]
    return noise


def episode_path(out: str | Path, task_name: str, init_index: int) -> Path:
    return Path(out) / f"{task_name}_init{int(init_index):03d}.hdf5"


def record_task(suite: str, tid: int, inits: list[int], out: str, spec: NoiseSpec, seed: int, attempts: int,
                frame_every: int) -> dict[str, Any]:
    """Noisy episodes of one task's ``inits`` into ``out`` (one file each); returns counts."""
    from client.libero.env import close_env, get_suite_tasks, make_env, setup_headless_gl
    from client.libero.expert import ExpertParams, run_expert
    from client.libero.protocol import NUM_WAIT_STEPS, max_steps_for
    from client.libero.record_demos import RENDER_RES, replay_and_record

    setup_headless_gl()
    task = get_suite_tasks(suite)[tid]
    counts = {"task": tid, "written": 0, "skipped_existing": 0, "unsolved": 0, "replay_failures": 0,
              "closed_loop": 0}
    todo = [k for k in inits if not episode_path(out, task.name, k).exists()]
    counts["skipped_existing"] = len(inits) - len(todo)
    if not todo:
        return counts
    max_steps = max_steps_for(suite)
    phys = make_env(task, cameras=False)
    rend = make_env(task, RENDER_RES, cameras=True)
    try:
        for k in todo:
            t0 = time.time()
            found = None
            for attempt in range(attempts):
                rng = np.random.default_rng([seed, tid, k, attempt])
                params = ExpertParams.sample(rng, attempt)
                noise = held_noise(spec, max_steps, rng)
                run = run_expert(phys, task.init_states[k], params, max_steps, seed=seed, wait_steps=NUM_WAIT_STEPS,
                                 noise=noise)
                if run.success:
                    found = (attempt, params, run, noise)
                    break
            if found is None:
                counts["unsolved"] += 1
                log.info("task %d init %d: no noisy attempt of %d succeeded", tid, k, attempts)
                continue
            attempt, params, run, noise = found
            rec = replay_and_record(rend, task, k, run.actions, seed, frame_every=frame_every,
                                    frame_offset=k % frame_every)
            labels, phases, closed_loop = run.labels, run.phases, False
            if rec["success_step"] is None or len(rec["actions"]) != run.steps:
                # A rendering env is not bit-identical to a physics-only one in contact-rich scenes (the drawer
                # task: 11 of its first 25 open-loop replays diverged), so the same noisy attempt runs again closed
                # loop in the rendering env itself: same parameters and noise, the expert reacting to its states.
                rec = replay_and_record(rend, task, k, run.actions, seed, params=params, max_steps=max_steps,
                                        frame_every=frame_every, frame_offset=k % frame_every, noise=noise)
                if rec["success_step"] is None:
                    counts["replay_failures"] += 1
                    log.warning("task %d init %d: neither the rendered replay nor a closed-loop rerun of the noisy "
                                "episode succeeded", tid, k)
                    continue
                labels, phases, closed_loop = rec["labels"], rec["phases"], True
                counts["closed_loop"] += 1
            steps = rec["frame_steps"] if "frame_steps" in rec else np.arange(len(rec["actions"]))
            rec[EXPERT_CHUNKS_KEY] = chunk_actions(labels, LABEL_HORIZON)[steps]
            rec["phases"] = [phases[s] for s in steps]
            rec["executed_expert"] = np.ones(len(steps), np.uint8)
            write_labelled_episode(episode_path(out, task.name, k), task, k, k, rec["actions"], rec, seed,
                                   success=True, dart_sigma=spec.sigma, dart_hold=spec.hold, attempt=attempt,
                                   rim_angle=params.rim_angle, closed_loop=closed_loop)
            counts["written"] += 1
            log.info("task %d init %d: noisy episode of %d steps (attempt %d, %d frames) in %.1fs", tid, k,
                     len(rec["actions"]), attempt + 1, len(steps), time.time() - t0)
    finally:
        close_env(phys)
        close_env(rend)
    return counts


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    from client.libero.protocol import DEFAULT_SEED, SUITES

    p = argparse.ArgumentParser(prog="python -m client.libero.dart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="libero_spatial", choices=SUITES)
    p.add_argument("--out", required=True, help="directory for the episodes (one HDF5 each; resumable)")
    p.add_argument("--tasks", default=None, help="comma-separated task ids (default: all)")
    p.add_argument("--inits", default="0-49", help="init state indices, 'A-B' inclusive or comma-separated")
    p.add_argument("--sigma", type=float, default=NoiseSpec.sigma)
    p.add_argument("--hold", type=int, default=NoiseSpec.hold)
    p.add_argument("--attempts", type=int, default=6, help="noisy attempts per init state (expert variants)")
    p.add_argument("--frame-every", type=int, default=8, help="observation every k-th step (as the demonstrations)")
    p.add_argument("--workers", type=int, default=1, help="parallel simulator processes (one per core)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ns = p.parse_args(argv)
    spec = NoiseSpec(ns.sigma, ns.hold)
    try:
        spec.validate()
        a, _, b = ns.inits.partition("-")
        inits = list(range(int(a), int(b) + 1)) if b else [int(x) for x in ns.inits.split(",")]
    except ValueError as exc:
        p.error(str(exc))
    if ns.attempts < 1 or ns.frame_every < 1 or ns.workers < 1:
        p.error("--attempts, --frame-every and --workers must be >= 1")
    _log_to_stderr()
    from client.libero.env import get_suite_tasks

    n_tasks = len(get_suite_tasks(ns.suite))
    wanted = [int(t) for t in ns.tasks.split(",")] if ns.tasks else list(range(n_tasks))
    if bad := [t for t in wanted if not 0 <= t < n_tasks]:
        p.error(f"--tasks {bad} not in {ns.suite} (0-{n_tasks - 1})")
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    jobs = [(ns.suite, t, inits, ns.out, spec, ns.seed, ns.attempts, ns.frame_every) for t in wanted]
    if ns.workers > 1:
        with mp.get_context("spawn").Pool(ns.workers, initializer=_log_to_stderr) as pool:
            results = pool.starmap(record_task, jobs, chunksize=1)
    else:
        results = [record_task(*job) for job in jobs]
    print(json.dumps({"suite": ns.suite, "out": ns.out, "sigma": spec.sigma, "hold": spec.hold, "tasks": results,
                      "written": sum(r["written"] for r in results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
