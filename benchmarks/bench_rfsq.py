"""Naive vs robust RFSQ on the same action chunks: reconstruction error per layer depth and in physical units.

    python -m benchmarks.bench_rfsq [--quick] [--data GLOB] [--steps N] [--seed S]

Both tokenizers are trained in one run with the same data split, steps, seed and architecture; only the
quantiser differs. Data (first that exists): ``--data``, ``data/libero_spatial_actions.hdf5``,
``artifacts/demos/libero_spatial/*.hdf5``, else synthetic demonstrations generated on the fly (a loud warning:
figures on synthetic data are not LIBERO figures).

Definitions (held-out demonstrations, normalised action space [-1, 1], all 7 dims):
  depth-k MSE     MSE of ``decode(tokens, layers=k)``; "layer Lj" in the tables = depth j+1.
  L0–L2           mean of the depth-1..3 MSEs;  L3–L7: mean of depth-4..8;  overall: depth-8 (full decode).
  gain            relative MSE drop when a layer is added (layer 0 against predicting all zeros);
                  a layer is "dead" when its gain is below 1 %.
  physical        after unnormalisation, against the raw actions (so q01/q99 clipping counts): LIBERO's
                  OSC_POSE controller (robosuite default: input ±1 → output_max 0.05 m, 0.5 rad) means
                  1.0 Δpos unit = 50 mm and 1.0 Δrot unit = 0.5 rad; errors are per-step Euclidean norms of the
                  3-vectors; gripper error = fraction of steps whose ±1 command flips.
The last stdout line is one JSON object with the key figures.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.dataset import load_demos
from client.testing import REPO
from rsd.rfsq import RFSQTokenizer
from rsd.train_rfsq import Dataset, TrainConfig, prepare_dataset, train_rfsq

POS_MM_PER_UNIT = 50.0  # robosuite OSC_POSE output_max 0.05 m at input 1.0
ROT_RAD_PER_UNIT = 0.5  # robosuite OSC_POSE output_max 0.5 rad at input 1.0
DEAD_GAIN = 0.01
MIN_DEMOS = 4


def _synthetic(path: Path, demos: int, seed: int) -> Path:
    spec = importlib.util.spec_from_file_location("make_synthetic_demos", REPO / "scripts" / "make_synthetic_demos.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.write_demos(path, demos, seed)


def _num_demos(pattern: str) -> int:
    try:
        return len(load_demos(pattern))
    except (OSError, ValueError) as e:  # a file still being written by the recorder, or not LIBERO layout
        print(f"WARNING: cannot read {pattern}: {e}")
        return 0


def _is_synthetic(pattern: str) -> bool:
    """True when any matching file was written by scripts/make_synthetic_demos.py (data.attrs['synthetic'])."""
    from client.dataset import dataset_attrs

    for path in glob.glob(pattern):
        try:
            if bool(dataset_attrs(path).get("synthetic", False)):
                return True
        except OSError:
            continue
    return False


def resolve_data(arg: str | None, quick: bool, seed: int) -> tuple[str, bool]:
    """Returns (glob, synthetic?) following the documented preference order.

    A default candidate with fewer than MIN_DEMOS demonstrations (the recorder may still be running) is skipped
    with a warning: a held-out split needs whole demonstrations on both sides.
    """
    if arg:
        return arg, _is_synthetic(arg)
    for cand in (REPO / "data" / "libero_spatial_actions.hdf5", REPO / "artifacts" / "demos" / "libero_spatial" / "*.hdf5"):
        if not glob.glob(str(cand)):
            continue
        n = _num_demos(str(cand))
        if n >= MIN_DEMOS:
            return str(cand), False
        print(f"WARNING: {cand} has only {n} demonstrations (< {MIN_DEMOS}); skipped")
    demos = 30 if quick else 50
    path = REPO / "artifacts" / "rfsq" / f"synthetic_demos_{demos}_s{seed}.hdf5"
    if not path.is_file():
        _synthetic(path, demos, seed)
    print(f"WARNING: no usable LIBERO demonstrations (data/libero_spatial_actions.hdf5, "
          f"artifacts/demos/libero_spatial/*.hdf5); using SYNTHETIC demos {path} — not LIBERO figures")
    return str(path), True


@torch.no_grad()
def evaluate(tok: RFSQTokenizer, raw: np.ndarray) -> dict[str, Any]:
    """All figures for one tokenizer on raw held-out chunks [N, H, A]."""
    model = tok.model
    x = tok.normalize(raw)
    tokens = model.encode(x)
    depth_mse = [float(((model.decode(tokens, k) - x) ** 2).mean()) for k in range(1, tok.num_layers + 1)]
    base = float((x**2).mean())
    prev = [base] + depth_mse[:-1]
    gains = [(p - m) / p if p > 0 else 0.0 for p, m in zip(prev, depth_mse, strict=True)]
    full = model.decode(tokens)
    dec_raw = tok.normalizer.unnormalize(full.numpy())
    err = dec_raw - raw
    # What normalisation alone loses (q01/q99 clipping): the floor under any tokenizer's physical error.
    clip_err = tok.normalizer.unnormalize(x.numpy()) - raw
    stats = model.residual_stats(model.encode_latent(x))
    lo, hi = depth_mse[:3], depth_mse[3:]
    return {
        "depth_mse": depth_mse,
        "gain": gains,
        "dead_layers": int(sum(g < DEAD_GAIN for g in gains)),
        "mse_l0_l2": float(np.mean(lo)),
        "mse_l3_l7": float(np.mean(hi)),
        "mse_overall": depth_mse[-1],
        "max_abs_err": float((full - x).abs().max()),
        "pos_err_mm": float(np.linalg.norm(err[..., 0:3], axis=-1).mean() * POS_MM_PER_UNIT),
        "rot_err_deg": float(np.degrees(np.linalg.norm(err[..., 3:6], axis=-1).mean() * ROT_RAD_PER_UNIT)),
        "clip_pos_err_mm": float(np.linalg.norm(clip_err[..., 0:3], axis=-1).mean() * POS_MM_PER_UNIT),
        "clip_rot_err_deg": float(np.degrees(np.linalg.norm(clip_err[..., 3:6], axis=-1).mean() * ROT_RAD_PER_UNIT)),
        "gripper_err": float((np.sign(dec_raw[..., 6]) != np.sign(np.where(raw[..., 6] > 0, 1.0, -1.0))).mean()),
        **stats,
    }


def _pct(naive: float, robust: float) -> float:
    return 100.0 * (naive - robust) / naive if naive > 0 else 0.0


def print_report(n: dict[str, Any], r: dict[str, Any], header: str) -> None:
    """The human-readable tables (naive vs robust summary plus per-layer detail)."""
    print(header)
    print()
    print("| metric | naive | robust | change |")
    print("|---|---|---|---|")
    for key, label, fmt in [
        ("mse_l0_l2", "MSE L0–L2 (mean depth 1–3)", ".3e"),
        ("mse_l3_l7", "MSE L3–L7 (mean depth 4–8)", ".3e"),
        ("mse_overall", "MSE overall (all 8 layers)", ".3e"),
        ("max_abs_err", "max |error| (normalised)", ".4f"),
        ("pos_err_mm", "position error (mm/step)", ".3f"),
        ("rot_err_deg", "rotation error (deg/step)", ".3f"),
        ("clip_pos_err_mm", "  of which q01/q99 clipping (mm)", ".3f"),
        ("clip_rot_err_deg", "  of which q01/q99 clipping (deg)", ".3f"),
        ("gripper_err", "gripper flips (fraction)", ".4f"),
        ("dead_layers", "dead layers (gain < 1%)", "d"),
    ]:
        a, b = n[key], r[key]
        change = f"{-_pct(a, b):+.1f}%" if key != "dead_layers" else f"{b - a:+d}"
        print(f"| {label} | {a:{fmt}} | {b:{fmt}} | {change} |")
    print()
    print("| layer | naive MSE | robust MSE | improvement | naive gain | robust gain | naive resid std "
          "| robust resid std | robust norm. std | active codes n/r |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i in range(len(n["depth_mse"])):
        print(f"| L{i} | {n['depth_mse'][i]:.3e} | {r['depth_mse'][i]:.3e} | "
              f"{_pct(n['depth_mse'][i], r['depth_mse'][i]):.1f}% | {100 * n['gain'][i]:.1f}% | "
              f"{100 * r['gain'][i]:.1f}% | {n['residual_std'][i]:.2e} | {r['residual_std'][i]:.2e} | "
              f"{r['normalized_residual_std'][i]:.2f} | {n['active_code_frac'][i]:.2f}/{r['active_code_frac'][i]:.2f} |")
    print()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; returns the summary dict that is printed as the last line."""
    p = argparse.ArgumentParser(description="naive vs robust RFSQ reconstruction benchmark")
    p.add_argument("--quick", action="store_true", help="CI size: fewer steps, < 90 s on one core")
    p.add_argument("--data", default=None, help="glob of LIBERO-layout HDF5 files")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 2000, quick 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="optional directory to save both tokenizers into")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    steps = args.steps or (300 if args.quick else 2000)
    if steps < 1:
        p.error("--steps must be >= 1")
    data, synthetic = resolve_data(args.data, args.quick, args.seed)
    ds: Dataset = prepare_dataset(data, 8, 0.1, args.seed)
    if ds.heldout_chunks.shape[0] == 0:
        p.error("need at least two demonstrations for a held-out split")
    results, summaries = {}, {}
    for mode in ("naive", "robust"):
        cfg = TrainConfig(mode=mode, steps=steps, seed=args.seed, progress=False,
                          batch_size=128 if args.quick else 256,
                          out=str(Path(args.out) / mode) if args.out else None)
        tok, summaries[mode] = train_rfsq(cfg, ds)
        results[mode] = evaluate(tok, ds.heldout_chunks)
    n, r = results["naive"], results["robust"]
    header = (f"RFSQ naive vs robust — data: {data}{' (SYNTHETIC)' if synthetic else ''}; "
              f"{ds.info['num_train_demos']}/{ds.info['num_heldout_demos']} train/held-out demos, "
              f"{ds.info['num_train_chunks']}/{ds.info['num_heldout_chunks']} chunks; {steps} steps, seed {args.seed}; "
              f"train {summaries['naive']['train_seconds']:.0f}s + {summaries['robust']['train_seconds']:.0f}s")
    print_report(n, r, header)
    out = {
        "robust_overall_improvement_pct": round(_pct(n["mse_overall"], r["mse_overall"]), 2),
        "robust_l3_l7_improvement_pct": round(_pct(n["mse_l3_l7"], r["mse_l3_l7"]), 2),
        "robust_l0_l2_improvement_pct": round(_pct(n["mse_l0_l2"], r["mse_l0_l2"]), 2),
        "naive_overall_mse": n["mse_overall"],
        "robust_overall_mse": r["mse_overall"],
        "naive_depth_mse": [float(f"{v:.4e}") for v in n["depth_mse"]],
        "robust_depth_mse": [float(f"{v:.4e}") for v in r["depth_mse"]],
        "dead_layers_naive": n["dead_layers"],
        "dead_layers_robust": r["dead_layers"],
        "robust_every_layer_lowers_error": bool(all(g > 0 for g in r["gain"])),
        "naive_pos_err_mm": round(n["pos_err_mm"], 4),
        "robust_pos_err_mm": round(r["pos_err_mm"], 4),
        "naive_rot_err_deg": round(n["rot_err_deg"], 4),
        "robust_rot_err_deg": round(r["rot_err_deg"], 4),
        "clip_floor_pos_err_mm": round(r["clip_pos_err_mm"], 4),
        "clip_floor_rot_err_deg": round(r["clip_rot_err_deg"], 4),
        "naive_gripper_err": n["gripper_err"],
        "robust_gripper_err": r["gripper_err"],
        "steps": steps,
        "seed": args.seed,
        "data": data,
        "synthetic": synthetic,
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
