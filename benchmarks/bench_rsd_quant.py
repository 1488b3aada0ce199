"""OpenVLA-RSD under DuQuant W4A8: where the RFSQ code flips come from, and what keeps them down.

    python -m benchmarks.bench_rsd_quant --quick     # CI size: 4 + 4 frames, the main rows (~25 s of one CPU core)
    python -m benchmarks.bench_rsd_quant             # all 64 held-out frames, full sensitivity scan (~5 min of CPU)

Frames: ``benchmarks/data/libero_spatial_heldout_frames.npz``, held-out demonstrations of the embedded default model
(agent view, wrist camera, state, instruction and ``expert_chunks``: the expert's 8-step chunk from that frame's step,
``frame_steps``). The shipped file's steps were recovered by replaying the compact expert actions
(``data/libero_spatial_actions_50.hdf5``, physics only) and matching each frame's 8-D state to 1e-4; the 4 frames of
one drawer-task demonstration matched no step (the replay diverges in contact) and hold NaN / -1. The frames are
split by demonstration: those of every third demonstration calibrate (the role of the server's ``calib_data``; never
a frame that is evaluated), the others are evaluated (``--split-offset`` picks which third).

Every quantised model is made as the server makes it: :func:`server.policies.quantize.apply_duquant` on the whole
:class:`rsd.vla.OpenVLARSD` (``WOPT=auto`` -> GPTQ with the calibration set; calibration forward = prefill + greedy
decoding of all 8 layers, so the layer tokens' activations are calibrated too). "W4A8" is the generic default
(what the LIBERO matrix measured, 26/100 vs 36/100 in full precision); "W4A8 rsd default" is what
``--policy openvla-rsd`` now gets, ``DuQuantConfig.from_env(policy="openvla-rsd")`` with
``quant.patterns.POLICY_DEFAULTS``. The prefixes (vision towers, projector, proprio token) are computed once in full
precision: no configuration here quantises them.

Figures, against the full-precision (FP) model on the evaluation frames:

* greedy-code flip rate (fraction of the 8 x 128 codes that differ from FP): free running (each model decodes its
  own layers; a flip in a coarse layer changes every finer residual layer, so this compounds) and teacher forced
  (both fed FP's layers: the flips each layer makes itself), with layer 0 (from the last prefix token) apart;
* action MAE of the decoded chunk vs FP and vs the expert's chunk (raw LIBERO action units, 7-D, gripper +-1);
* RSD with the (float) draft and the quantised main, fixed full-depth drafting (deterministic): exact mode's accepted
  drafted layers per chunk, its code agreement (drafted codes equal to main's argmax), main passes per chunk, and
  relaxed-action's (default tolerance) accepted layers; ``RSD=main`` says whether exact RSD reproduced main-only
  greedy decoding bit for bit;
* where flips come from: flip rate by FP's top1-top2 logit margin, and per layer the fraction of activations
  clipped by the static A8 scale at the last prefix token (what the layer head reads for layer 0) and elsewhere.

Sensitivity scan: one group quantised at a time (each decoder block, each projection kind, the RFSQ layer head
``main.head``, which the default selection leaves in float), at W4A8 and at W16A8 (its activations only). The
fixes table lists per-pattern overrides (``GR00T_DUQUANT_ACT_PCT_RE`` / ``WBITS_RE`` / ``ABITS_RE``) and the share of
quantised weights each keeps above 4 bits. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.bench_rsd import CHECKPOINT, FRAMES, load_frames
from quant import DuQuantConfig, quantized_layers
from quant.patterns import POLICY_DEFAULTS
from rsd.config import RSDConfig
from rsd.engine import SpeculativeDecoder

LOG = logging.getLogger("bench_rsd_quant")

#: FP top-1 minus top-2 logit margin bins for the "where do flips come from" line.
MARGIN_BINS = (0.0, 0.25, 0.5, 1.0, 2.0, float("inf"))
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD = "main.head"
POLICY = "openvla-rsd"

Prefix = tuple[Tensor, Tensor]


@dataclass
class BenchData:
    """The model and what every configuration is evaluated on."""

    model: nn.Module
    calib: list[Prefix]
    evals: list[Prefix]
    expert: np.ndarray  # [N_eval, H, 7], NaN rows where the frame's expert chunk is unknown
    calib_demos: int
    eval_demos: int


def split_by_demo(sources: Sequence[str], every: int = 3, offset: int = 0) -> tuple[list[int], list[int]]:
    """Frame indices of every ``every``-th demonstration from ``offset`` (calibration) and of the others
    (evaluation)."""
    demos = sorted(set(sources))
    calib_demos = set(demos[offset::every])
    calib = [i for i, s in enumerate(sources) if s in calib_demos]
    return calib, [i for i, s in enumerate(sources) if s not in calib_demos]


def _spread(idx: list[int], n: int | None) -> list[int]:
    """``n`` indices spread evenly over ``idx`` (all of them for ``None``), so a small run still sees several
    demonstrations."""
    if n is None or n >= len(idx):
        return idx
    return [idx[int(i)] for i in np.linspace(0, len(idx) - 1, n).round()]


def load_data(checkpoint: Path = CHECKPOINT, frames: Path = FRAMES, n_calib: int | None = None,
              n_eval: int | None = None, split_offset: int = 0) -> BenchData:
    """Load the model and the frames file; build FP prefixes of the calibration and evaluation frames."""
    from rsd.vla import load_openvla_rsd

    model = load_openvla_rsd(checkpoint).eval()
    images, instructions, extra = load_frames(frames)
    with np.load(frames, allow_pickle=False) as f:
        sources = [str(s) for s in f["sources"]]
        expert = (f["expert_chunks"].astype(np.float32) if "expert_chunks" in f.files
                  else np.full((len(images), model.tokenizer.chunk_len, 7), np.nan, np.float32))
    needed = {"wrist_images": model.cfg.use_wrist_image, "states": model.cfg.use_proprio}
    calib_idx, eval_idx = split_by_demo(sources, offset=split_offset)
    calib_idx, eval_idx = _spread(calib_idx, n_calib), _spread(eval_idx, n_eval)

    def prefix(i: int) -> Prefix:
        kw = {k: v[i : i + 1] for k, v in extra.items() if needed.get(k)}
        return model.prefix(images[i : i + 1], [instructions[i]], **kw)

    with torch.inference_mode():
        calib = [prefix(i) for i in calib_idx]
        evals = [prefix(i) for i in eval_idx]
    return BenchData(model, calib, evals, expert[eval_idx], len({sources[i] for i in calib_idx}),
                     len({sources[i] for i in eval_idx}))


def base_config(**changes: Any) -> DuQuantConfig:
    """The generic W4A8 defaults (what ``GR00T_DUQUANT_WBITS_DEFAULT=4`` alone gives any policy), with ``changes``."""
    return DuQuantConfig(enabled=True).replace(**changes)


def policy_config(**changes: Any) -> DuQuantConfig:
    """What ``--policy openvla-rsd`` gets from ``GR00T_DUQUANT_WBITS_DEFAULT=4`` (its ``POLICY_DEFAULTS``)."""
    return DuQuantConfig.from_env({"GR00T_DUQUANT_WBITS_DEFAULT": "4"}, policy=POLICY).replace(**changes)


def greedy_forward(model: nn.Module, batch: Prefix) -> Tensor:
    """Calibration forward: prefill + greedy decoding of every RFSQ layer (the server's main passes)."""
    return model.main.decode_greedy(*batch)


def quantise(model: nn.Module, cfg: DuQuantConfig, calib: list[Prefix]) -> tuple[nn.Module, dict[str, Any]]:
    """A quantised copy of ``model``, made as the server makes it (``apply_duquant``, calibrated on ``calib``)."""
    from server.policies.quantize import apply_duquant

    qm = copy.deepcopy(model)
    cfg = cfg.replace(calib_steps=max(1, len(calib)))
    with torch.inference_mode(False), torch.no_grad():
        report = apply_duquant(qm, cfg, calibration=calib, forward_fn=greedy_forward)
    return qm.eval(), report


@torch.no_grad()
def decode(model: nn.Module, prefixes: list[Prefix]) -> dict[str, Any]:
    """Greedy layers ``[N, L, C]`` and action chunks of every prefix (batch 1 each: no padding): ``actions`` from
    the codes (greedy decode), ``expected`` from main's distributions given its own codes (the server's default
    ``--rsd-action-decode expected``)."""
    from rsd.vla import chunk_actions_from_tokens

    layers = torch.cat([model.main.decode_greedy(e, m) for e, m in prefixes])
    logits = teacher_forced_logits(model, prefixes, layers).float()
    return {"layers": layers, "logits": logits, "actions": chunk_actions_from_tokens(model, layers),
            "expected": model.tokenizer.decode_expected(logits.softmax(-1)).numpy()}


@torch.no_grad()
def teacher_forced_logits(model: nn.Module, prefixes: list[Prefix], layers: Tensor) -> Tensor:
    """``[N, L, C, V]`` logits of every layer with ``layers`` (FP's greedy layers) as the fed layer tokens."""
    return torch.cat([model.main(e, layers[i : i + 1], m)[1] for i, (e, m) in enumerate(prefixes)])


@torch.no_grad()
def rsd_acceptance(model: nn.Module, prefixes: list[Prefix], mode: str = "exact") -> dict[str, Any]:
    """RSD with the draft and this model's main: accepted drafted layers, code agreement and main passes per chunk.

    Fixed full-depth drafting (``adaptive=False``): the adaptive planner's depth follows measured timings, which
    would make the comparison between configurations depend on the machine's load.
    """
    eng = SpeculativeDecoder(model.main, model.draft, RSDConfig(mode=mode, adaptive=False), tokenizer=model.tokenizer)
    acc, passes, agree, reached, outs = [], [], [], [], []
    for e, m in prefixes:
        layers, st = eng.generate(e, m)
        acc.append(float(st.accepted.float().sum()))
        passes.append(st.main_passes)
        agree.append(float((st.code_pass * st.reached).sum()))
        reached.append(float(st.reached.float().sum()))
        outs.append(layers)
    return {"accepted": float(np.mean(acc)), "passes": float(np.mean(passes)),
            "code_agreement": sum(agree) / max(sum(reached), 1.0), "layers": torch.cat(outs)}


def margin_of(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 logit of every code."""
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def weight_share(model: nn.Module) -> dict[str, float]:
    """Of the quantised layers' weights: the fraction above 4 bits, and the packed bytes relative to all at W4
    (codes only: W<=4 packs two per byte, W5..8 one, per-row scales and rotations left out)."""
    layers = list(quantized_layers(model).values())
    n = sum(m.in_features * m.out_features for m in layers)
    hi = sum(m.in_features * m.out_features for m in layers if m.wbits > 4)
    bits = sum(m.in_features * m.out_features * (4 if m.wbits <= 4 else 8 if m.wbits <= 8 else 16) for m in layers)
    return {"hi_frac": hi / max(n, 1), "bytes_vs_w4": bits / max(4 * n, 1), "layers": len(layers)}


@torch.no_grad()
def clip_profile(model: nn.Module, prefixes: list[Prefix]) -> dict[str, dict[str, float]]:
    """Per quantised layer with a static activation scale: the fraction of its (rotated) inputs beyond the clip
    level at the last prefix token (the one whose hidden state predicts RFSQ layer 0), at the other prefix tokens
    and at the layer tokens, over greedy decoding of ``prefixes``."""
    from quant import transforms as T

    sums: dict[str, dict[str, list[float]]] = {}

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], _out: Tensor) -> None:
        if mod.abits <= 0 or mod.act_gran != "tensor" or mod.calib_state != "frozen":
            return
        over = mod.to_qspace(inp[0].float()).abs() > float(mod.act_scale) * T.qmax_for(mod.abits)
        s = sums.setdefault(mod.name, {"last": [0, 0], "prefix": [0, 0], "layers": [0, 0]})
        parts = {"last": over[:, -1:], "prefix": over[:, :-1]} if over.shape[1] > 1 else {"layers": over}
        for k, v in parts.items():
            s[k][0] += int(v.sum())
            s[k][1] += v.numel()

    hooks = [m.register_forward_hook(hook) for m in quantized_layers(model).values()]
    try:
        for e, m in prefixes:
            model.main.decode_greedy(e, m)
    finally:
        for h in hooks:
            h.remove()
    return {n: {k: c / max(t, 1) for k, (c, t) in s.items()} for n, s in sums.items()}


def fp_reference(data: BenchData) -> dict[str, Any]:
    """FP greedy layers and actions, teacher-forced argmax and logit margins."""
    ref = decode(data.model, data.evals)  # its logits are FP's teacher forced on FP's own layers
    ref["tf_argmax"] = ref["logits"].argmax(-1)
    ref["margin"] = margin_of(ref["logits"])
    return ref


def evaluate(label: str, model: nn.Module, data: BenchData, fp: dict[str, Any]) -> dict[str, Any]:
    """Every figure of one configuration against the FP reference ``fp``."""
    out = decode(model, data.evals)
    flips = (out["layers"] != fp["layers"]).float()  # [N, L, C]
    tf_flips = (teacher_forced_logits(model, data.evals, fp["layers"]).argmax(-1) != fp["tf_argmax"]).float()
    by_margin = []
    for lo, hi in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:], strict=True):
        sel = (fp["margin"] >= lo) & (fp["margin"] < hi)
        by_margin.append(float(tf_flips[sel].mean()) if bool(sel.any()) else float("nan"))
    ok = ~np.isnan(data.expert).any(axis=(1, 2))
    exact = rsd_acceptance(model, data.evals, "exact")
    relaxed = rsd_acceptance(model, data.evals, "relaxed-action")
    err = np.abs(out["actions"] - fp["actions"]).mean(axis=(1, 2))
    exp_err = np.abs(out["expected"] - fp["expected"]).mean(axis=(1, 2))
    return {
        "label": label,
        "flip_rate": float(flips.mean()),
        "flip_per_layer": flips.mean((0, 2)).tolist(),
        "tf_flip_rate": float(tf_flips.mean()),
        "tf_flip_per_layer": tf_flips.mean((0, 2)).tolist(),
        "tf_flip_by_margin": by_margin,
        "mae_vs_fp": float(err.mean()),
        "mae_vs_fp_frames": err,
        "mae_vs_expert": float(np.abs(out["actions"][ok] - data.expert[ok]).mean()) if ok.any() else float("nan"),
        "expected_mae_vs_fp": float(exp_err.mean()),
        "expected_mae_vs_expert": (float(np.abs(out["expected"][ok] - data.expert[ok]).mean()) if ok.any()
                                   else float("nan")),
        "rsd_accepted": exact["accepted"],
        "rsd_code_agreement": exact["code_agreement"],
        "rsd_passes": exact["passes"],
        "rsd_relaxed_accepted": relaxed["accepted"],
        "rsd_exact_equal": bool(torch.equal(exact["layers"], out["layers"])),
        **weight_share(model),
    }


def group_names(model: nn.Module) -> dict[str, list[str]]:
    """Sensitivity groups over the default selection and the RFSQ layer head: per block, per projection kind."""
    from quant.selection import select_layers

    names = [s.name for s in select_layers(model, base_config())]
    groups: dict[str, list[str]] = {}
    for b in sorted({int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n))}):
        groups[f"block {b}"] = [n for n in names if f".layers.{b}." in n]
    for kind in KINDS:
        groups[kind] = [n for n in names if n.endswith("." + kind)]
    groups["layer head"] = [HEAD]
    return {k: v for k, v in groups.items() if v}


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0, n: int = 2000) -> dict[str, float]:
    """Per-frame ``b - a``: mean, bootstrap 95 % interval, and the fraction of frames where ``b`` is lower."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    return {"mean": float(d.mean()), "lo": float(np.percentile(boots, 2.5)), "hi": float(np.percentile(boots, 97.5)),
            "better": float((d < 0).mean())}


def print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}  (MAE: greedy decode; E: expected decode, the server default; vs FP and vs the expert)")
    hdr = (f"{'config':<30} {'flip':>5} {'tf flip':>7} {'tf L0':>5} {'MAE fp':>7} {'MAE exp':>7} {'E fp':>7} "
           f"{'E exp':>7} {'ex acc':>6} "
           f"{'ex agr':>6} {'passes':>6} {'ra acc':>6} {'>W4 w':>5} {'B/W4':>4} {'RSD=main':>8}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['label']:<30} {r['flip_rate']:5.3f} {r['tf_flip_rate']:7.3f} {r['tf_flip_per_layer'][0]:5.3f} "
              f"{r['mae_vs_fp']:7.4f} {r['mae_vs_expert']:7.4f} {r['expected_mae_vs_fp']:7.4f} "
              f"{r['expected_mae_vs_expert']:7.4f} {r['rsd_accepted']:6.2f} "
              f"{r['rsd_code_agreement']:6.3f} {r['rsd_passes']:6.2f} {r['rsd_relaxed_accepted']:6.2f} "
              f"{r['hi_frac']:5.2f} {r['bytes_vs_w4']:4.2f} {str(r['rsd_exact_equal']):>8}")


def print_layers(rows: list[dict[str, Any]]) -> None:
    n = len(rows[0]["flip_per_layer"])
    print(f"\nflip rate per RFSQ layer L0..L{n - 1}: free running | teacher forced")
    for r in rows:
        print(f"{r['label']:<30} " + " ".join(f"{x:.3f}" for x in r["flip_per_layer"]) + " | "
              + " ".join(f"{x:.3f}" for x in r["tf_flip_per_layer"]))


def print_clips(profiles: dict[str, dict[str, dict[str, float]]]) -> None:
    labels = list(profiles)
    print("\nactivations clipped by the static A8 scale (fraction of the layer's rotated inputs), per layer: "
          "last prefix token / other prefix tokens / layer tokens")
    print(f"{'layer':<34} " + " ".join(f"{lab:>26}" for lab in labels))
    for name in profiles[labels[0]]:
        cells = []
        for lab in labels:
            p = profiles[lab].get(name)
            cells.append(f"{p['last']:8.4f} {p['prefix']:8.4f} {p['layers']:8.4f}" if p else f"{'':>26}")
        print(f"{name.split('language_model.model.')[-1]:<34} " + " ".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: 4 calibration + 4 evaluation frames, main rows")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--frames", type=Path, default=FRAMES)
    ap.add_argument("--split-offset", type=int, default=0, choices=(0, 1, 2),
                    help="which third of the demonstrations calibrates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    n = 4 if args.quick else None
    data = load_data(args.checkpoint, args.frames, n, n, args.split_offset)
    fp = fp_reference(data)
    rows: dict[str, dict[str, Any]] = {"FP": evaluate("FP", data.model, data, fp)}
    models: dict[str, nn.Module] = {}

    def run(label: str, cfg: DuQuantConfig) -> dict[str, Any]:
        qm, _ = quantise(data.model, cfg, data.calib)
        rows[label] = evaluate(label, qm, data, fp)
        models[label] = qm
        return rows[label]

    fixed_label = "W4A8 rsd default"
    run("W4A8", base_config())
    run(fixed_label, policy_config())
    for label, cfg in (("W4A16", base_config(abits=16)), ("W16A8", base_config(wbits_default=16)),
                       ("W8A8", base_config(wbits_default=8))):
        run(label, cfg)
    clips = {lab: clip_profile(models[lab], data.evals) for lab in ("W4A8", fixed_label)}

    groups = group_names(data.model)
    scan_groups = ["layer head", "block 0", "block 1", "down_proj"] if args.quick else list(groups)
    scan: list[dict[str, Any]] = []
    for g in scan_groups:
        scan.append(run(f"only {g}", base_config(layers=tuple(groups[g]))))
        if not args.quick:
            run(f"only {g} A8", base_config(layers=tuple(groups[g]), wbits_default=16))
    scan.sort(key=lambda r: r["mae_vs_fp"], reverse=True)
    ranked = [r["label"].removeprefix("only ") for r in scan]

    down = r"\.down_proj$"
    options: dict[str, DuQuantConfig] = {} if args.quick else {
        "down_proj ACT_PCT 100 (no W8)": base_config(act_pct_re={down: 100.0}),
        "rsd default, mlp W8": policy_config(wbits_re={r"\.mlp\.": 8}),
        "rsd default, W8A8": policy_config(wbits_default=8),
        "rsd default, WGROUP 16": policy_config(wgroup=16),
        "rsd default, WGROUP 32": policy_config(wgroup=32),
        "rsd default, WGROUP 64": policy_config(wgroup=64),
        "down_proj A16 (no clip fix)": base_config(abits_re={down: 16}),
        "down_proj W8 (no clip fix)": base_config(wbits_re={down: 8}),
        "mlp W8 (no clip fix)": base_config(wbits_re={r"\.mlp\.": 8}),
        "ACT_PCT=100 (every layer)": base_config(act_pct=100.0),
        "ACT_GRAN=token": base_config(act_gran="token"),
    }
    for label, cfg in options.items():
        run(label, cfg)

    n_exp = int((~np.isnan(data.expert).any(axis=(1, 2))).sum())
    print(f"checkpoint {args.checkpoint.name}: {len(data.calib)} calibration frames ({data.calib_demos} demos), "
          f"{len(data.evals)} evaluation frames ({data.eval_demos} demos, {n_exp} with the expert's chunk); "
          f"threads {args.threads}; rsd default: {json.dumps(POLICY_DEFAULTS.get(POLICY, {}))}")
    main_rows = [rows[k] for k in ("FP", "W4A8", "W4A16", "W16A8", "W8A8", fixed_label)]
    print_rows("FP vs W4A8 (GPTQ, Hadamard rotations, static per-tensor A8 scales from the 99.9th percentile)",
               main_rows)
    print_layers(main_rows)
    w, fixed = rows["W4A8"], rows[fixed_label]
    print("\nteacher-forced flip rate by FP top1-top2 logit margin (share of FP codes in the bin): " + "; ".join(
        f"[{lo:g},{hi:g}) W4A8 {x:.3f} rsd default {y:.3f} ({float(((fp['margin'] >= lo) & (fp['margin'] < hi)).float().mean()):.2f})"
        for lo, hi, x, y in zip(MARGIN_BINS[:-1], MARGIN_BINS[1:], w["tf_flip_by_margin"], fixed["tf_flip_by_margin"],
                                strict=True)))
    print_clips(clips)
    print_rows("sensitivity: one group quantised (W4A8; 'A8': W16A8), the rest float; by action MAE vs FP",
               [r for g in ranked for r in (rows[f"only {g}"], rows.get(f"only {g} A8")) if r is not None])
    print_rows("fixes: per-pattern overrides (ACT_PCT_RE / WBITS_RE / ABITS_RE)",
               [w, fixed] + [rows[k] for k in options])
    pf = paired(w["mae_vs_fp_frames"], fixed["mae_vs_fp_frames"])
    print(f"\nrsd default vs W4A8, per-frame action MAE vs FP: {pf['mean']:+.4f} (95 % bootstrap "
          f"[{pf['lo']:+.4f}, {pf['hi']:+.4f}]), lower on {pf['better']:.0%} of {len(data.evals)} frames")
    for label in [k for k in options if "WGROUP" in k]:
        pg = paired(fixed["mae_vs_fp_frames"], rows[label]["mae_vs_fp_frames"])
        print(f"{label} vs rsd default, per-frame action MAE vs FP: {pg['mean']:+.4f} "
              f"[{pg['lo']:+.4f}, {pg['hi']:+.4f}]")
    print(f"total {time.perf_counter() - t0:.1f}s")

    fp_acc = rows["FP"]["rsd_accepted"]
    fp_ra = rows["FP"]["rsd_relaxed_accepted"]

    def ratio(x: float, ref: float) -> float | None:
        return round(x / ref, 4) if ref else None

    last = {lab: float(np.mean([p["last"] for n_, p in clips[lab].items() if n_.endswith("down_proj")]))
            for lab in clips}
    summary = {
        "w4a8_code_flip_rate": round(w["flip_rate"], 5),
        "w4a8_fixed_code_flip_rate": round(fixed["flip_rate"], 5),
        "w4a8_tf_code_flip_rate": round(w["tf_flip_rate"], 5),
        "w4a8_fixed_tf_code_flip_rate": round(fixed["tf_flip_rate"], 5),
        "w4a8_tf_layer0_flip_rate": round(w["tf_flip_per_layer"][0], 5),
        "w4a8_fixed_tf_layer0_flip_rate": round(fixed["tf_flip_per_layer"][0], 5),
        "w4a8_action_mae_vs_fp": round(w["mae_vs_fp"], 5),
        "w4a8_fixed_action_mae_vs_fp": round(fixed["mae_vs_fp"], 5),
        "w4a8_fixed_mae_diff_ci95": [round(pf["lo"], 5), round(pf["hi"], 5)],
        "fp_action_mae_vs_expert": round(rows["FP"]["mae_vs_expert"], 5),
        "w4a8_action_mae_vs_expert": round(w["mae_vs_expert"], 5),
        "w4a8_fixed_action_mae_vs_expert": round(fixed["mae_vs_expert"], 5),
        # the default expected action decode: continuous in main's logits, so a flipped near-tie code moves the
        # chunk by its probability gap instead of a whole level
        "fp_expected_action_mae_vs_expert": round(rows["FP"]["expected_mae_vs_expert"], 5),
        "w4a8_fixed_expected_action_mae_vs_fp": round(fixed["expected_mae_vs_fp"], 5),
        "w4a8_fixed_expected_action_mae_vs_expert": round(fixed["expected_mae_vs_expert"], 5),
        "fp_rsd_accepted_per_chunk": round(fp_acc, 4),
        "w4a8_rsd_accept_ratio_vs_fp": ratio(w["rsd_accepted"], fp_acc),
        "w4a8_fixed_rsd_accept_ratio_vs_fp": ratio(fixed["rsd_accepted"], fp_acc),
        "w4a8_rsd_code_agreement_ratio_vs_fp": ratio(w["rsd_code_agreement"], rows["FP"]["rsd_code_agreement"]),
        "w4a8_relaxed_action_accept_ratio_vs_fp": ratio(w["rsd_relaxed_accepted"], fp_ra),
        "w4a8_fixed_relaxed_action_accept_ratio_vs_fp": ratio(fixed["rsd_relaxed_accepted"], fp_ra),
        "w4a16_action_mae_vs_fp": round(rows["W4A16"]["mae_vs_fp"], 5),
        "w16a8_action_mae_vs_fp": round(rows["W16A8"]["mae_vs_fp"], 5),
        "w4a16_tf_code_flip_rate": round(rows["W4A16"]["tf_flip_rate"], 5),
        "w16a8_tf_code_flip_rate": round(rows["W16A8"]["tf_flip_rate"], 5),
        "w4a8_down_proj_last_token_clipped": round(last["W4A8"], 5),
        "w4a8_fixed_down_proj_last_token_clipped": round(last[fixed_label], 5),
        "top_sensitive_group": ranked[0] if ranked else None,
        "sensitivity_ranking": ranked,
        "fixed_config": POLICY_DEFAULTS.get(POLICY, {}),
        "fixed_weights_above_w4_frac": round(fixed["hi_frac"], 4),
        "options_action_mae_vs_fp": {k: round(rows[k]["mae_vs_fp"], 5) for k in options},
        "options_weights_above_w4_frac": {k: round(rows[k]["hi_frac"], 4) for k in options},
        "calib_frames": len(data.calib),
        "eval_frames": len(data.evals),
        "quick": args.quick,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
