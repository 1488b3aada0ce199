"""Writes synthetic pick-and-place demonstrations in LIBERO's HDF5 layout (actions only).

Why: the RFSQ tokenizer and its tests need action chunks before the scripted-expert demonstrations recorded in
the real simulator exist. These sequences imitate what LIBERO's OSC_POSE actions look like: a point end-effector
driven by a proportional controller with operator lag and correlated noise through the phases approach →
descend → grasp → lift → carry → place → release → retreat; Δpos saturating near ±1 on long moves, Δrot small,
the gripper switching between -1 (open) and +1 (closed), short pauses. Not a substitute for real data: the
benchmark says loudly when it falls back to them.

Usage: python scripts/make_synthetic_demos.py --out artifacts/demos/synthetic.hdf5 --demos 50 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("make_synthetic_demos")

# Effective end-effector displacement per step at action 1.0 (metres). The OSC controller commands up to 5 cm
# but the arm lags; ~1 cm/step at 20 Hz keeps episodes near LIBERO's typical 100-250 steps.
_STEP_M = 0.01
_MAX_STEPS = 400


def _ou(rng: np.random.Generator, n: int, dim: int, sigma: float, theta: float) -> np.ndarray:
    """Ornstein-Uhlenbeck noise: smooth, mean-reverting, like an operator's hand tremor and drift."""
    out = np.zeros((n, dim))
    x = np.zeros(dim)
    for t in range(n):
        x = x - theta * x + sigma * np.sqrt(2 * theta) * rng.standard_normal(dim)
        out[t] = x
    return out


def synth_demo(rng: np.random.Generator) -> np.ndarray:
    """One pick-and-place episode as a (T, 7) float64 action array."""
    pos = np.array([0.0, 0.0, 1.05]) + rng.uniform(-0.05, 0.05, 3)
    obj = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.25), 0.90])
    tgt = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.25), 0.92])
    hover = rng.uniform(0.08, 0.14)
    lift = rng.uniform(0.12, 0.2)
    yaw_goal = rng.uniform(-0.6, 0.6)  # rotate to align with the object during the approach
    # (waypoint, gripper command while heading there, hold steps once reached, position tolerance)
    plan = [
        (obj + [0, 0, hover], -1.0, 0, 0.02),
        (obj + [0, 0, 0.005], -1.0, 0, 0.008),
        (obj + [0, 0, 0.005], 1.0, int(rng.integers(6, 12)), 0.02),  # grasp: close and wait
        (obj + [0, 0, lift], 1.0, 0, 0.02),
        (tgt + [0, 0, lift], 1.0, 0, 0.02),
        (tgt + [0, 0, 0.03], 1.0, 0, 0.01),
        (tgt + [0, 0, 0.03], -1.0, int(rng.integers(4, 9)), 0.02),  # release
        (tgt + [0, 0, hover + 0.05], -1.0, 0, 0.03),
    ]
    kp = rng.uniform(6.0, 10.0)  # proportional gain in action units per metre-of-error per step (scaled below)
    lag = rng.uniform(0.55, 0.8)  # operator/controller smoothing of the commanded Δpos
    noise_pos = _ou(rng, _MAX_STEPS, 3, sigma=rng.uniform(0.03, 0.08), theta=0.15)
    noise_rot = _ou(rng, _MAX_STEPS, 3, sigma=rng.uniform(0.01, 0.03), theta=0.1)
    yaw = 0.0
    cmd = np.zeros(3)
    actions: list[np.ndarray] = []
    t = 0
    for phase, (wp, grip, hold, tol) in enumerate(plan):
        held = 0
        while t < _MAX_STEPS:
            err = wp - pos
            reached = np.linalg.norm(err) < tol
            if reached and held >= hold:
                break
            target_cmd = np.clip(kp * err / (_STEP_M * 10.0), -1.0, 1.0)
            if reached:
                held += 1
                target_cmd = 0.1 * target_cmd
            cmd = lag * cmd + (1 - lag) * target_cmd
            if rng.random() < 0.01:  # a short operator pause
                cmd = cmd * 0.1
            a_pos = np.clip(cmd + noise_pos[t], -1.0, 1.0)
            pos = pos + a_pos * _STEP_M * rng.uniform(0.8, 1.2)
            rot = noise_rot[t].copy()
            if phase <= 1:  # yaw alignment during the approach
                rot[2] += np.clip(2.0 * (yaw_goal - yaw), -0.3, 0.3)
                yaw += rot[2] * 0.5  # OSC: 1.0 rotation unit = 0.5 rad
            actions.append(np.concatenate([a_pos, np.clip(rot, -1.0, 1.0), [grip]]))
            t += 1
    return np.asarray(actions, dtype=np.float64)


def write_demos(out: str | Path, num_demos: int, seed: int) -> Path:
    """Writes ``num_demos`` episodes to ``out`` (LIBERO layout: data/demo_i/actions); returns the path."""
    from client.dataset import write_action_demos

    rng = np.random.default_rng(seed)
    demos = [synth_demo(rng) for _ in range(num_demos)]
    env_args = json.dumps({"env_name": "synthetic_pick_place", "type": 1, "env_kwargs": {}})
    path = write_action_demos(out, demos, {"env_args": env_args, "synthetic": True, "seed": seed})
    logger.info("wrote %d demos (%d actions) to %s", num_demos, sum(len(d) for d in demos), path)
    return path


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--demos", type=int, default=50, help="number of demonstrations")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.demos < 1:
        p.error("--demos must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = write_demos(args.out, args.demos, args.seed)
    print(path)


if __name__ == "__main__":
    main()
