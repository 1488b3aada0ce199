"""Pair LIBERO runs made at different times: ``python -m benchmarks.compare_libero REF=PATH NEW=PATH ...``.

A run is a client results file (``run_libero_eval.sh --results``, a matrix variant's ``results.json``) or one variant
of a kept summary (``docs/results/*.json``: ``PATH#variant label``), or several of them joined by ``+`` (disjoint
episodes of one policy, e.g. init states 0-9 from one run and 10-29 from a later one). Every run is compared with the first (the
reference) on the episodes both ran -- same (task, trial) means the same init state and seed, so the right test is
paired: how many episodes only one of them solved, the exact McNemar p-value, and the success ratio with a paired
bootstrap 95% interval (resampling episodes, which keeps each pair together). ``--out`` writes the runs and the paired
figures in the ``docs/results`` layout, ``--plot`` the per-task bar chart. The last line is one JSON object:
``<label>_success_rate``, ``<label>_vs_<ref>_only_<label>``, ``..._only_<ref>``, ``..._mcnemar_p``,
``<label>_ratio_vs_<ref>`` and ``..._ratio_ci95``.

Why: an improvement shown against an old number rather than against the same episodes is not shown; the runs here
are hours apart, and this is the one place that pairs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.support.libero_matrix import plot_success, summarise
from client.libero.results import common_identity, mcnemar_exact_p, wilson_ci


def _load_source(label: str, where: str) -> dict[str, Any]:
    """One ``PATH`` or ``PATH#variant`` -> its summary with per-episode ``outcomes``."""
    path, _, variant = where.partition("#")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{label}: {path} is not a file")
    doc = json.loads(p.read_text())
    if variant:
        variants = doc.get("variants") or {}
        if variant not in variants:
            raise ValueError(f"{label}: {path} has no variant {variant!r} (has: {', '.join(variants) or 'none'})")
        summary = dict(variants[variant])
    elif "episodes" in doc:
        summary = summarise([p])
    else:
        raise ValueError(f"{label}: {path} is neither a results file (no 'episodes') nor given a #variant")
    cfg = doc.get("config") or doc  # a results file keeps them in its config, a summary at its top
    summary.setdefault("trials", cfg.get("trials"))
    summary.setdefault("seed", cfg.get("seed"))
    if not summary.get("outcomes"):
        raise ValueError(f"{label}: {where} records no per-episode outcomes to pair")
    summary["source"] = where
    return summary


def merge_sources(label: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One run from several sources of disjoint episodes (e.g. init states 0-9 of one run, 10-29 of a later one of
    the same policy): the summary is recomputed from the union of their outcomes; an episode in two sources is an
    error, as is a seed that differs (the same (task, trial) would not be the same episode)."""
    outcomes: dict[str, bool] = {}
    for s in parts:
        dup = outcomes.keys() & s["outcomes"].keys()
        if dup:
            raise ValueError(f"{label}: episode {min(dup)} (task:trial) is in two of its sources")
        outcomes.update(s["outcomes"])
    seeds = {s.get("seed") for s in parts}
    if len(seeds) > 1:
        raise ValueError(f"{label}: its sources ran with different seeds {sorted(seeds, key=str)}")
    try:
        model = common_identity([(s["source"], s.get("model") or {}) for s in parts])
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    per_task: dict[int, list[int]] = {}
    for key, ok in outcomes.items():
        t = per_task.setdefault(int(key.split(":")[0]), [0, 0])
        t[0] += int(ok)
        t[1] += 1
    succ, valid = sum(outcomes.values()), len(outcomes)
    lo, hi = wilson_ci(succ, valid)
    per_trial = {n for _, n in per_task.values()}
    return {"successes": succ, "valid_episodes": valid, "errored": sum(int(s.get("errored") or 0) for s in parts),
            "success_rate": succ / valid, "ci95": [round(lo, 4), round(hi, 4)],
            "per_task": {str(t): f"{a}/{n}" for t, (a, n) in sorted(per_task.items())}, "outcomes": outcomes,
            "trials": per_trial.pop() if len(per_trial) == 1 else None, "seed": seeds.pop(),
            "model": model,
            "source": " + ".join(s["source"] for s in parts)}


def load_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``LABEL=SOURCE[+SOURCE...]``, each SOURCE ``PATH`` or ``PATH#variant`` -> (label, summary with per-episode
    ``outcomes``); several sources are merged into one run (:func:`merge_sources`)."""
    label, sep, where = spec.partition("=")
    if not sep or not label or not where:
        raise ValueError(f"expected LABEL=PATH or LABEL=PATH#variant, got {spec!r}")
    parts = [_load_source(label, w) for w in where.split("+")]
    return label, parts[0] if len(parts) == 1 else merge_sources(label, parts)


def paired(ref: dict[str, bool], new: dict[str, bool], n_boot: int = 4000, seed: int = 0) -> dict[str, Any]:
    """Paired figures of ``new`` against ``ref`` on the episodes both ran (keys ``task:trial``)."""
    shared = sorted(ref.keys() & new.keys())
    if not shared:
        raise ValueError("the two runs share no (task, trial) episode")
    a = np.array([ref[k] for k in shared], dtype=float)
    b = np.array([new[k] for k in shared], dtype=float)
    only_new, only_ref = int(((b == 1) & (a == 0)).sum()), int(((a == 1) & (b == 0)).sum())
    idx = np.random.default_rng(seed).integers(0, len(shared), (n_boot, len(shared)))
    sa, sb = a[idx].sum(1), b[idx].sum(1)
    ratios = sb[sa > 0] / sa[sa > 0]
    ratio = float(b.sum() / a.sum()) if a.sum() else float("nan")
    ci = [round(float(np.quantile(ratios, q)), 4) for q in (0.025, 0.975)] if len(ratios) else [None, None]
    return {"episodes": len(shared), "successes_ref": int(a.sum()), "successes_new": int(b.sum()),
            "only_new": only_new, "only_ref": only_ref, "mcnemar_exact_p": round(mcnemar_exact_p(only_new, only_ref), 4),
            "ratio": round(ratio, 4), "ratio_ci95": ci}


KEPT = Path(__file__).resolve().parents[1] / "docs" / "results" / "libero_spatial_2026-12-06_expected.json"
#: ``--quick`` (CI size): two kept runs of the same 100 episodes, paired from the repository's own results file
QUICK_RUNS = (f"5k_greedy={KEPT}#openvla-rsd 5k greedy", f"shipped={KEPT}#openvla-rsd 10k expected (shipped)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare_libero", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", metavar="LABEL=PATH[#variant][+PATH...]", help="the first is the reference")
    ap.add_argument("--quick", action="store_true",
                    help="CI size: without runs, pair two kept runs of docs/results (5000-step greedy vs shipped)")
    ap.add_argument("--out", type=Path, default=None, help="write runs + paired figures (docs/results layout)")
    ap.add_argument("--plot", type=Path, default=None, help="write the per-task success bar chart (PNG)")
    ap.add_argument("--note", default="", help="a sentence saying what the runs are, kept in --out")
    args = ap.parse_args(argv)
    specs = args.runs or (list(QUICK_RUNS) if args.quick else [])
    if len(specs) < 2:
        print("error: give at least two runs (LABEL=PATH[#variant]), or --quick", file=sys.stderr)
        return 2
    try:
        runs = dict(load_run(s) for s in specs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(runs) != len(specs):
        print("error: run labels must be unique", file=sys.stderr)
        return 2
    ref = next(iter(runs))
    figures: dict[str, Any] = {}
    pairs: dict[str, Any] = {}
    print(f"{'run':<34} {'success':>9} {'95% CI':>14}  per task")
    for label, s in runs.items():
        lo, hi = s["ci95"]
        tasks = " ".join(v.split("/")[0] for _, v in sorted(s["per_task"].items(), key=lambda kv: int(kv[0])))
        print(f"{label:<34} {s['successes']:>4}/{s['valid_episodes']:<4} [{100 * lo:5.1f}, {100 * hi:5.1f}]  {tasks}")
        figures[f"{label}_success_rate"] = round(s["success_rate"], 4)
        if label == ref:
            continue
        try:
            p = pairs[f"{label} vs {ref}"] = paired(runs[ref]["outcomes"], s["outcomes"])
        except ValueError as e:
            print(f"error: {label} vs {ref}: {e}", file=sys.stderr)
            return 2
        figures.update({f"{label}_vs_{ref}_only_{label}": p["only_new"], f"{label}_vs_{ref}_only_{ref}": p["only_ref"],
                        f"{label}_vs_{ref}_mcnemar_p": p["mcnemar_exact_p"], f"{label}_ratio_vs_{ref}": p["ratio"],
                        f"{label}_ratio_vs_{ref}_ci95": p["ratio_ci95"]})
    for name, p in pairs.items():
        print(f"{name}: {p['episodes']} paired episodes, {p['only_new']} only the first, {p['only_ref']} only the "
              f"reference, exact McNemar p = {p['mcnemar_exact_p']}; ratio {p['ratio']:.3f} "
              f"(paired bootstrap 95% {p['ratio_ci95']})")
    first = runs[ref]
    report = {"suite": first.get("suite", "libero_spatial"), "trials": first.get("trials"), "seed": first.get("seed"),
              "note": args.note, "reference": ref, "variants": runs, "paired": pairs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written: {args.out}")
    if args.plot:
        print(f"plot: {plot_success(report, args.plot)}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
