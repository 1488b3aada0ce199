"""LIBERO success rates of several server variants on the same episodes, evaluated in parallel processes.

Matrices:
* ``rsd``   — the OpenVLA-RSD policy decoded main-only, with RSD ``exact``, ``relaxed`` and ``relaxed-action``.
* ``quant`` — full precision vs RTN W4A8 vs DuQuant W4A8 vs DuQuant W4A4 (default settings, calibrated on
  demonstrations, never on evaluation episodes) for each ``--quant-policy``.

Every variant gets its own server; one pool of ``--workers`` simulator processes (``client.libero.parallel``)
drains the (variant, task, trial) episodes, so all variants run the same init states with the same seed. Re-running
the same command resumes (one results file per variant, ``OUT/<label>/results.json``).

    .venv-libero/bin/python -m benchmarks.bench_libero_success --matrix rsd --trials 10 --workers 2
    .venv-libero/bin/python -m benchmarks.bench_libero_success --matrix quant --quant-policy gr00t \
        --gr00t-path DIR --calib-data 'artifacts/demos/*.hdf5' --trials 10

``--quick`` (CI): main-only vs exact, task 0, one trial, 12 steps — it checks the machinery (real servers, real
simulator), not the policy. Last line: one JSON object of the key figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from benchmarks.support.libero_matrix import (
    MatrixConfig,
    Variant,
    default_python,
    plot_success,
    quant_variants,
    rsd_variants,
    run_matrix,
)
from client.libero.results import mcnemar_exact_p


def parse_tasks(spec: str) -> list[int]:
    try:
        tasks = [int(t) for t in spec.split(",") if t.strip()]
    except ValueError as e:
        raise SystemExit(f"error: --tasks must be comma-separated integers, got {spec!r}") from e
    if not tasks or min(tasks) < 0:
        raise SystemExit(f"error: --tasks must list task ids >= 0, got {spec!r}")
    return tasks


def build_variants(args: argparse.Namespace, out: Path) -> list[Variant]:
    variants: list[Variant] = []
    if args.matrix in ("rsd", "all"):
        variants += rsd_variants(args.openvla_rsd_path, args.relaxed_r, args.relaxed_tau, args.action_eps)
    if args.matrix in ("quant", "all"):
        for policy in args.quant_policy:
            path = args.gr00t_path if policy == "gr00t" else args.openvla_rsd_path
            if policy == "gr00t" and not path:
                raise SystemExit("error: --quant-policy gr00t needs --gr00t-path DIR (a trained checkpoint)")
            variants += quant_variants(policy, path, out / "packs", args.calib_data, args.calib_n,
                                       args.denoising_steps, args.initial_noise, args.gr00t_replan_steps)
    if args.rsd_fixed_depth:  # every OpenVLA-RSD server: a function of its inputs alone (no timing, no history)
        variants = [dataclasses.replace(v, server_args=[*v.server_args, "--rsd-adaptive", "0"])
                    if "openvla-rsd" in v.server_args else v for v in variants]
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {v.label for v in variants}
        if unknown:
            raise SystemExit(f"error: --only names unknown variants {sorted(unknown)}; "
                             f"known: {[v.label for v in variants]}")
        variants = [v for v in variants if v.label in keep]
    return variants


def _reference(label: str) -> str | None:
    if label in ("exact", "relaxed", "relaxed_action"):
        return "main_only"
    for suffix in ("_rtn", "_duquant", "_duquant_w4a4", "_duquant_w4a4_token"):
        if label.endswith(suffix):
            return label[: -len(suffix)] + "_fp"
    return None


def comparisons(labels: list[str]) -> list[tuple[str, str]]:
    """(variant, baseline) pairs worth a paired test: each variant vs its reference, DuQuant vs RTN."""
    pairs = [(label, ref) for label in labels if (ref := _reference(label)) in labels]
    pairs += [(label, label[: -len("_duquant")] + "_rtn") for label in labels
              if label.endswith("_duquant") and label[: -len("_duquant")] + "_rtn" in labels]
    return pairs


def derived_figures(variants: dict) -> dict[str, float]:
    """Ratios against the reference variant of each group (main-only; full precision), and paired tests.

    Paired: on the episodes both variants ran, how many only one of them solved, and the exact McNemar
    p-value (``*_vs_*_mcnemar_p``) — the variants run the same init states, so this is the right test.
    """
    out: dict[str, float] = {}
    rate = {k: v["success_rate"] for k, v in variants.items()}
    for label, r in rate.items():
        if r is None:
            continue
        out[f"{label}_success_rate"] = round(r, 4)
        ref = _reference(label)
        if ref and rate.get(ref) is not None:
            out[f"{label}_minus_{ref}_pts"] = round(100 * (r - rate[ref]), 2)
            if rate[ref] > 0:
                out[f"{label}_retention_vs_{ref}_pct"] = round(100 * r / rate[ref], 1)
    for a, b in comparisons(list(variants)):
        oa, ob = variants[a].get("outcomes") or {}, variants[b].get("outcomes") or {}
        shared = oa.keys() & ob.keys()
        if not shared:
            continue
        only_a = sum(oa[k] and not ob[k] for k in shared)
        only_b = sum(ob[k] and not oa[k] for k in shared)
        out[f"{a}_vs_{b}_paired_episodes"] = len(shared)
        out[f"{a}_vs_{b}_only_{a}"] = only_a
        out[f"{a}_vs_{b}_only_{b}"] = only_b
        out[f"{a}_vs_{b}_mcnemar_p"] = round(mcnemar_exact_p(only_a, only_b), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", choices=("rsd", "quant", "all"), default="rsd")
    ap.add_argument("--suite", default="libero_spatial")
    ap.add_argument("--tasks", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--trials", type=int, default=10, help="trials (init states) per task")
    ap.add_argument("--first-trial", type=int, default=0,
                    help="first init state index (e.g. 10 with --trials 20 runs init states 10-29: more paired "
                         "episodes for a run that already has 0-9)")
    ap.add_argument("--workers", type=int, default=2, help="simulator client processes at once (one per core)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--resolution", type=int, default=None, help="camera resolution (client default: 256)")
    ap.add_argument("--max-steps", type=int, default=None, help="episode step cap (smoke runs only)")
    ap.add_argument("--replan", type=int, default=None,
                    help="actions executed per query (client --replan; default: the server's, else the whole chunk)")
    ap.add_argument("--trajectories", action="store_true",
                    help="client --trajectory-dir: each episode's actions and arm positions as OUT/<variant>/"
                         "trajectories/*.npz")
    ap.add_argument("--gripper-confirm", action="store_true",
                    help="client --gripper-confirm: ask again before executing a chunk's gripper flip")
    ap.add_argument("--ensemble", type=float, default=None, metavar="M",
                    help="client --ensemble M: temporal ensembling of the overlapping chunks (needs a replan "
                         "shorter than the chunk; default off)")
    ap.add_argument("--openvla-rsd-path", default=None, help="checkpoint (default: the embedded default model)")
    ap.add_argument("--gr00t-path", default=None)
    ap.add_argument("--quant-policy", nargs="+", default=["openvla-rsd"], choices=("openvla-rsd", "gr00t"))
    ap.add_argument("--calib-data", default=None, help="glob of demonstration HDF5s for W4A8 calibration")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--denoising-steps", type=int, default=None,
                    help="GR00T variants: Euler steps (server --denoising-steps; default: the checkpoint's "
                         "serving.json, else its config)")
    ap.add_argument("--initial-noise", choices=("gaussian", "zero"), default=None,
                    help="GR00T variants: where the flow-matching sampler starts (server --policy-option "
                         "initial_noise=...; default: the checkpoint's serving.json -- zero for the shipped tiny "
                         "GR00T -- else upstream's gaussian)")
    ap.add_argument("--gr00t-replan-steps", type=int, default=None,
                    help="GR00T variants: actions of each 16-step chunk executed before the next query, as the "
                         "server advertises it (--policy-option replan_steps=...; 0: the whole chunk; default: the "
                         "checkpoint's serving.json -- 8 for the shipped tiny GR00T, 55/100 against 38/100 with "
                         "whole chunks)")
    ap.add_argument("--relaxed-r", type=int, default=1)
    ap.add_argument("--relaxed-tau", type=float, default=0.9)
    ap.add_argument("--action-eps", type=float, default=0.5,
                    help="relaxed_action variant: tolerance per drafted layer in mm and degrees")
    ap.add_argument("--only", default=None, help="comma-separated variant labels to keep")
    ap.add_argument("--device", default="cpu", help="server --device (cpu or cuda)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch CPU threads per server: many servers + simulators share the cores (also with cuda)")
    ap.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="run the episodes as Ray tasks (cluster address, auto, or local) instead of --workers "
                         "local processes; same results files (client.libero.parallel.RayEpisodePool)")
    ap.add_argument("--server-host", default=None, metavar="HOST",
                    help="with --ray on a cluster: this machine's address as the other nodes reach it (the "
                         "servers then bind every interface; default: loopback, for a one-machine cluster)")
    ap.add_argument("--rsd-fixed-depth", action="store_true",
                    help="serve OpenVLA-RSD with --rsd-adaptive 0 (draft every layer each round). The adaptive "
                         "planner picks draft depths from measured pass times and running acceptance, so a chunk "
                         "depends on timing and on the requests before it (actions move by ~1e-7): two identical "
                         "runs of the shipped model differed in 1 outcome and 12 step counts of 100 episodes. Fixed "
                         "depth makes them repeat")
    ap.add_argument("--server-max-batch", type=int, default=1,
                    help="server --max-batch. 1 (default): every forward pass sees one observation, so an episode is "
                         "a function of (task, init state, seed, policy) alone -- batched with another worker's "
                         "request, GR00T's actions move by up to 2.4e-7 and 2 of 100 episodes changed outcome. "
                         "Raise it for many workers on a GPU, where one-at-a-time serving would queue them")
    ap.add_argument("--server-python", default=default_python(".venv"))
    ap.add_argument("--client-python", default=default_python(".venv-libero"))
    ap.add_argument("--out", default="artifacts/libero_success")
    ap.add_argument("--plot", default=None, help="PNG of success per task and variant (default: OUT/success.png)")
    ap.add_argument("--quick", action="store_true", help="CI size: main-only vs exact, task 0, 1 trial, 12 steps")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.trials < 1 or args.workers < 1 or args.server_max_batch < 1:
        ap.error("--trials, --workers and --server-max-batch must be >= 1")
    if args.first_trial < 0:
        ap.error("--first-trial must be >= 0")
    out = Path(args.out)
    if args.quick:
        args.matrix, args.only, args.tasks, args.trials, args.max_steps = "rsd", "main_only,exact", "0", 1, 12
        out = out / "quick"
    variants = build_variants(args, out)
    cfg = MatrixConfig(suite=args.suite, tasks=parse_tasks(args.tasks), trials=args.trials, workers=args.workers,
                       out_dir=out, seed=args.seed, first_trial=args.first_trial, max_steps=args.max_steps,
                       resolution=args.resolution,
                       replan=args.replan,
                       ensemble=args.ensemble,
                       gripper_confirm=args.gripper_confirm,
                       trajectories=args.trajectories,
                       server_python=args.server_python,
                       client_python=args.client_python,
                       ray=args.ray,
                       server_host=args.server_host,
                       server_extra=["--device", args.device, "--torch-threads", str(args.server_threads),
                                     "--max-batch", str(args.server_max_batch)])
    report = run_matrix(variants, cfg)
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    plot = plot_success(report, Path(args.plot) if args.plot else out / "success.png")
    print(f"\nLIBERO {cfg.suite}: tasks {cfg.tasks}, {cfg.trials} trials each (from {cfg.first_trial}), seed {cfg.seed}, "
          f"{cfg.workers} workers, {report['wall_s']} s")
    print(f"{'variant':<22} {'success':>12} {'rate':>7} {'95% CI':>15} {'mean steps':>10}  per task")
    for label, s in report["variants"].items():
        rate = "-" if s["success_rate"] is None else f"{100 * s['success_rate']:.1f}%"
        ci = f"[{100 * s['ci95'][0]:.0f}, {100 * s['ci95'][1]:.0f}]"
        steps = "-" if s["mean_steps"] is None else f"{s['mean_steps']:.0f}"
        print(f"{label:<22} {s['successes']:>5}/{s['valid_episodes']:<6} {rate:>7} {ci:>15} {steps:>10}  "
              f"{' '.join(s['per_task'].values())}")
        acc = (s["server_report"].get("metadata", {}).get("rsd_totals") or {})
        if acc:
            print(f"{'':<22} rsd: {json.dumps(acc)[:200]}")
    figures = derived_figures(report["variants"])
    for a, b in comparisons(list(report["variants"])):
        if f"{a}_vs_{b}_mcnemar_p" in figures:
            print(f"paired {a} vs {b}: {figures[f'{a}_vs_{b}_paired_episodes']} episodes, only {a} "
                  f"{figures[f'{a}_vs_{b}_only_{a}']}, only {b} {figures[f'{a}_vs_{b}_only_{b}']}, "
                  f"exact McNemar p = {figures[f'{a}_vs_{b}_mcnemar_p']}")
    print(f"plot: {plot}")
    for f in report["failures"]:
        print(f"FAILED job: {f}")
    figures.update({"episodes_per_variant": cfg.trials * len(cfg.tasks), "wall_s": report["wall_s"],
                    "failed_jobs": len(report["failures"]), "quick": args.quick})
    print(json.dumps(figures))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
