"""LIBERO evaluation throughput with 1 vs 2 simulator processes (``--workers``), against one real server.

The server runs the deterministic ``debug`` policy (microseconds per query), so the simulator is what is measured:
the same episodes are evaluated with ``--workers 1`` and ``--workers 2`` (each a full ``client.libero.evaluate``
run: process start, env creation, episodes, results file), and episodes per hour are compared. On N free cores the
ideal ratio is min(N, 2); on a busy machine it shows what the spare cores give.

Without a GPU the cameras are drawn by Mesa's llvmpipe, which renders with one thread per core in every process,
so a single worker already uses part of the second core (the pool gives each of its workers cores / workers
render threads: ``client.libero.parallel.render_threads_per_worker``). Two figures therefore come out:
``eval_scaling_2_vs_1`` against one worker at its defaults (the wall-clock gain a user sees), and
``eval_scaling_2_vs_1_per_core`` against one worker whose renderer has one thread (``LP_NUM_THREADS=1``), i.e.
what each simulator process added to the pool gives when every process has one core.

    .venv-libero/bin/python -m benchmarks.bench_libero_parallel --quick      # CI: 2 tasks x 1 trial, 12 steps
    .venv-libero/bin/python -m benchmarks.bench_libero_parallel --tasks 0,1,2,3 --trials 2 --max-steps 100
    .venv-libero/bin/python -m benchmarks.bench_libero_parallel --tasks 0,1,2,3,4,5,6,7,8,9 --trials 4 \
        --max-steps 220 --more-workers 4,8,16                          # a many-core machine

Last line: one JSON object with ``eval_scaling_2_vs_1`` (= eph(2) / eph(1)) and both rates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from client.testing import REPO, ServerProcess, venv_python


def run_eval(port: int, workers: int, args: argparse.Namespace, out: Path, one_render_thread: bool = False) -> dict:
    results = out / f"workers{workers}{'_1thread' if one_render_thread else ''}.json"
    cmd = [args.client_python, "-m", "client.libero.evaluate", args.suite, "--headless", "--port", str(port),
           "--tasks", args.tasks, "--trials", str(args.trials), "--max-steps", str(args.max_steps),
           "--resolution", str(args.resolution), "--no-video", "--no-progress", "--results", str(results),
           "--workers", str(workers)]
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    env.setdefault("OMP_NUM_THREADS", "1")
    if one_render_thread:
        env["LP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"error: --workers {workers} run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    doc = json.loads(results.read_text())
    eps = doc["episodes"]
    return {"workers": workers, "render": "1 thread" if one_render_thread else "default", "episodes": len(eps), "errored": sum(e["errored"] for e in eps),
            "successes": sum(e["success"] for e in eps), "wall_s": round(wall, 2),
            "episode_wall_s_mean": round(sum(e["wall_time_s"] for e in eps) / max(1, len(eps)), 2),
            "eph": round(3600.0 * len(eps) / wall, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="libero_spatial")
    ap.add_argument("--tasks", default="0,1,2,3")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--client-python", default=sys.executable)
    ap.add_argument("--server-python", default=venv_python(".venv"))
    ap.add_argument("--timeout", type=float, default=1800.0, help="per evaluation run, seconds")
    ap.add_argument("--more-workers", default="",
                    help="comma-separated worker counts beyond 2 to run too, e.g. 4,8,16 on a many-core machine "
                         "(keys eval_scaling_N_vs_1 and eph_workers_N)")
    ap.add_argument("--quick", action="store_true", help="CI size: 2 tasks x 1 trial, 12 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.trials, args.max_steps = "0,1", 1, 12
    try:
        more = [int(n) for n in args.more_workers.split(",") if n.strip()]
    except ValueError:
        ap.error(f"--more-workers: expected comma-separated integers, got {args.more_workers!r}")
    if any(n <= 2 for n in more):
        ap.error(f"--more-workers: counts must be > 2 (1 and 2 always run), got {args.more_workers!r}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_libero_parallel_") as tmp, \
            ServerProcess(python=args.server_python) as server:
        for workers, single in ((1, False), (1, True), (2, False), *((n, False) for n in more)):
            rows.append(run_eval(server.port, workers, args, Path(tmp), single))
    one, one_core, two = rows[:3]
    if (one["episodes"], one["successes"]) != (two["episodes"], two["successes"]):
        print(f"warning: the runs differ: {one} vs {two}", file=sys.stderr)
    print(f"\nLIBERO {args.suite}: tasks {args.tasks}, {args.trials} trial(s), {args.max_steps} steps, "
          f"{args.resolution}px, debug policy, {os.cpu_count()} CPUs")
    print(f"{'workers':>7} {'render':>9} {'episodes':>8} {'errored':>7} {'wall s':>8} {'s/episode':>9} "
          f"{'episodes/h':>10}")
    for r in rows:
        print(f"{r['workers']:>7} {r['render']:>9} {r['episodes']:>8} {r['errored']:>7} {r['wall_s']:>8.1f} "
              f"{r['episode_wall_s_mean']:>9.2f} {r['eph']:>10.1f}")
    scaling = round(two["eph"] / one["eph"], 3) if one["eph"] else None
    per_core = round(two["eph"] / one_core["eph"], 3) if one_core["eph"] else None
    print(f"scaling 2 vs 1 workers: {scaling} (vs one worker rendering on one thread: {per_core})")
    print(json.dumps({"eval_scaling_2_vs_1": scaling, "eval_scaling_2_vs_1_per_core": per_core,
                      "eph_workers_1": one["eph"], "eph_workers_1_one_render_thread": one_core["eph"],
                      "eph_workers_2": two["eph"],
                      **{f"eph_workers_{r['workers']}": r["eph"] for r in rows[3:]},
                      **{f"eval_scaling_{r['workers']}_vs_1": round(r["eph"] / one["eph"], 3) if one["eph"] else None
                         for r in rows[3:]},
                      "episodes": one["episodes"], "wall_s_workers_1": one["wall_s"],
                      "wall_s_workers_2": two["wall_s"], "max_steps": args.max_steps, "quick": args.quick}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
