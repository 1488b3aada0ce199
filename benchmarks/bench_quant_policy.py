"""W4A8 fake quantisation of whole policies: RTN vs DuQuant against full precision, on held-out observations.

For each available policy (GR00T N1.5 from ``--gr00t-dir``, OpenVLA-RSD from ``--openvla-rsd-dir``):

* action error: mean |a_q - a_fp| of the 16 (GR00T) / 8 (RSD) step action chunks in raw env units, and in the
  normalised [-1, 1] space, RTN W4A8 and DuQuant W4A8 (default settings) each against FP. GR00T's flow-matching
  sampler gets the *same* initial noise for every variant, so the difference is quantisation alone;
* latency: median wall time of one single-observation action (FP / RTN / DuQuant; fake quantisation, so this is
  the simulation overhead, not an int4 kernel speed);
* per-layer sensitivity: the FP model with exactly one layer quantised (its DuQuant/RTN module, with the
  activation scale from the whole-model calibration), which layers move the actions most;
* optionally (``--libero-trials N``) the LIBERO ``libero_spatial`` success rate of FP / RTN W4A8 / DuQuant W4A8 /
  DuQuant W4A4 on the same episodes (same seed, trials, tasks): one server per variant, one pool of simulator
  processes draining the episodes (``benchmarks/support/libero_matrix.py``, as ``bench_libero_success.py``).
  The RTN server is DuQuant with every transform off (ROT=none, PERMUTE=0, ROW_ROT=0, CLIP_SEARCH=0), which the
  benchmark checks equals :class:`quant.RTNLinear` offline (``*_rtn_env_vs_rtn_max_diff``).

Observations: calibration frames from even-numbered demonstrations and held-out frames from odd-numbered ones of
``--demos`` (never evaluation episodes), else synthetic observations (said in the output). ``--quick`` with no
directories builds a random tiny GR00T: its numbers measure quantisation noise of an untrained network only.

Policies are the server's own: every variant is built by ``server.policies.create_policy`` from server flags and
read through its public ``infer``/``metadata`` (``reset`` before each action, so GR00T's sampler noise is the
same); RTN/DuQuant swap the policy model's Linears with quant's API and calibrate through ``infer``, as the
server's start-up calibration does. Normalised errors use the model's own normalisation (GR00T data config,
RSD tokenizer).

    .venv/bin/python -m benchmarks.bench_quant_policy [--quick] [--gr00t-dir DIR] [--demos GLOB] [--out FILE]

The last stdout line is one JSON object of key figures; ``--out`` also writes the full report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.support.libero_matrix import DUQUANT_SEED_ENV as SEED_ENV
from benchmarks.support.libero_matrix import RTN_ENV
from client.testing import REPO
from quant import DuQuantConfig, calibrate, quantized_layers, replace_linear_layers

LOG = logging.getLogger("bench_quant_policy")
INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
    "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
]
# SEED_ENV: the published recipe's W4A8 defaults (docs/duquant.md); RTN_ENV: DuQuant with every transform off == RTN (per-row symmetric
# weights without clip search, per-tensor activations).


# ---------------------------------------------------------------------------------------------- observations
def synthetic_observations(n: int, seed: int, size: int = 128) -> list[dict[str, Any]]:
    """Structured random LIBERO observations (smooth colour fields, plausible 8-D states) when no demos exist."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        def img() -> np.ndarray:
            base = rng.uniform(40, 200, 3)
            grad = rng.uniform(-60, 60, (2, 3))
            im = base + xx[..., None] * grad[0] + yy[..., None] * grad[1] + rng.normal(0, 8, (size, size, 3))
            return np.clip(im, 0, 255).astype(np.uint8)

        state = np.array([rng.uniform(-0.2, 0.1), rng.uniform(-0.2, 0.2), rng.uniform(0.9, 1.2),
                          rng.uniform(2.9, 3.3), rng.uniform(-0.3, 0.3), rng.uniform(-0.5, 0.5),
                          rng.uniform(0, 0.04), -rng.uniform(0, 0.04)], dtype=np.float32)
        out.append({"image": img(), "wrist_image": img(), "state": state, "instruction": INSTRUCTIONS[i % 4]})
    return out


def split_observations(demos: str | None, n_calib: int, n_eval: int, seed: int) -> tuple[list, list, str]:
    """Calibration frames from even demonstrations, held-out frames from odd ones (or synthetic)."""
    if demos:
        from client.dataset import sample_observations

        calib = sample_observations(demos, n_calib, seed, lambda _p, d: int(d.split("_")[1]) % 2 == 0)
        held = sample_observations(demos, n_eval, seed + 1, lambda _p, d: int(d.split("_")[1]) % 2 == 1)
        return calib, held, f"demonstrations {demos} (calibration: even demos, held-out: odd demos)"
    return (synthetic_observations(n_calib, seed), synthetic_observations(n_eval, seed + 1000),
            "synthetic observations (no --demos)")


# ---------------------------------------------------------------------------------------------- policies
@contextlib.contextmanager
def _without_duquant_env() -> Iterator[None]:
    """The policy factory reads GR00T_DUQUANT_* from the environment; the benchmark builds full-precision policies
    and quantises them itself with explicit configurations, so a caller's variables must not apply."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("GR00T_DUQUANT_")}
    try:
        yield
    finally:
        os.environ.update(saved)


class PolicyUnderTest:
    """How to build one server policy (``server.policies.create_policy``) and read its actions.

    Every variant (FP, RTN, DuQuant) is a fresh policy from the same server flags, so what is measured is what the
    server would serve; ``act`` resets the policy first, so GR00T's flow-matching sampler starts from the same
    noise for every variant and the difference is quantisation alone.
    """

    def __init__(self, name: str, server_args: list[str], normalize: Callable[[Any, np.ndarray], np.ndarray],
                 note: str) -> None:
        self.name, self.server_args, self._normalize, self.note = name, server_args, normalize, note

    def build(self) -> Any:
        from server.config import parse_server_config
        from server.policies import create_policy

        config, _ = parse_server_config(self.server_args, environ={})
        with _without_duquant_env():
            return create_policy(config)

    @staticmethod
    def act(policy: Any, observations: list[dict[str, Any]]) -> np.ndarray:
        """``[B, H, action_dim]`` actions from the policy's public ``infer`` (after ``reset``)."""
        policy.reset()
        return np.stack([out.actions for out in policy.infer(observations)])

    def normalize(self, policy: Any, actions: np.ndarray) -> np.ndarray:
        return self._normalize(policy, actions)


def gr00t_policy(path: str | None, denoising_steps: int, workdir: Path) -> PolicyUnderTest:
    if path:
        note = f"GR00T N1.5 from {path}"
    else:
        from models.gr00t.tiny import build_tiny, save_pretrained

        path = str(save_pretrained(build_tiny(seed=0), workdir / "gr00t_tiny"))
        note = "random tiny GR00T N1.5 (untrained: quantisation noise only; pass --gr00t-dir for a trained one)"
    # The model's own normalisation (models/gr00t/data_config.py), reached through the policy.
    return PolicyUnderTest("gr00t", ["--policy", "gr00t", "--model-path", path, "--denoising-steps",
                                     str(denoising_steps)],
                           lambda p, a: p.data_config.normalize_action(a, p.model.metadata), note)


def openvla_rsd_policy(path: str) -> PolicyUnderTest:
    # Main-model greedy decoding (RSD off); the RFSQ tokenizer's own normalisation (rsd/normalization.py).
    return PolicyUnderTest("openvla_rsd", ["--policy", "openvla-rsd", "--model-path", path, "--rsd-enabled", "0"],
                           lambda p, a: p.model.tokenizer.normalizer.normalize(a),
                           f"OpenVLA-RSD (main-model greedy) from {path}")


# ---------------------------------------------------------------------------------------------- measurements
def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return float(statistics.median(times))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def quantise(p: PolicyUnderTest, cfg: DuQuantConfig, method: str, calib_obs: list[dict]) -> Any:
    """A fresh policy with its model's selected Linears swapped (quant's public API) and calibrated through the
    policy's own ``infer`` on ``calib_obs``, one observation per batch, as the server's start-up calibration."""
    policy = p.build()
    replace_linear_layers(policy.model, cfg, method=method, force=True)
    calibrate(policy.model, [[o] for o in calib_obs], lambda _m, b: policy.infer(b), steps=len(calib_obs))
    policy.reset()
    return policy


def sensitivity(fp: Any, quantised: Any, held: list[dict], a_fp: np.ndarray) -> dict[str, float]:
    """Action error of the FP policy with exactly one layer swapped for its calibrated quantised module."""
    out: dict[str, float] = {}
    for name, qmod in quantized_layers(quantised.model).items():
        parent, leaf = _parent(fp.model, name)
        orig = getattr(parent, leaf)
        setattr(parent, leaf, qmod)
        try:
            out[name] = float(np.abs(PolicyUnderTest.act(fp, held) - a_fp).mean())
        finally:
            setattr(parent, leaf, orig)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def bench_policy(p: PolicyUnderTest, calib: list[dict], held: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    cfg = DuQuantConfig.from_env({**SEED_ENV, "GR00T_DUQUANT_CALIB_STEPS": str(len(calib))})
    rtn_env_cfg = DuQuantConfig.from_env({**SEED_ENV, **RTN_ENV, "GR00T_DUQUANT_CALIB_STEPS": str(len(calib))})
    fp = p.build()
    act = PolicyUnderTest.act
    a_fp = act(fp, held)
    meta = fp.metadata()
    res: dict[str, Any] = {"note": p.note, "heldout_observations": len(held), "calibration_observations": len(calib),
                           "model_id": meta.get("model_id"), "action_horizon": meta.get("action_horizon")}
    variants = {}
    # RTN baselines: data-free weights and one activation scale per layer, whatever the defaults (RTN_ENV says so
    # for the env-built one). The DuQuant rows: defaults (WOPT=auto -> GPTQ with this calibration set,
    # DIT_STEP_SCALES=auto -> one activation scale per denoising step in the DiT) and the same with a single scale,
    # at W4A8 and W4A4 (issue 18: the DiT's static scales per Euler step).
    rtn_cfg = cfg.replace(wopt="clip", dit_step_scales="0")
    runs = [("rtn", rtn_cfg, "rtn"), ("duquant", cfg, "duquant"), ("rtn_env", rtn_env_cfg, "duquant"),
            ("duquant_single_scale", cfg.replace(dit_step_scales="0"), "duquant"),
            ("duquant_step_scales", cfg.replace(dit_step_scales="1"), "duquant")]
    if p.name == "gr00t":
        # W4A4: static per-tensor scales (one, or one per Euler step in the DiT) against the default ACT_GRAN=auto,
        # which gives every A4 layer dynamic per-token scales
        runs += [("duquant_w4a4_single_scale", cfg.replace(abits=4, act_gran="tensor", dit_step_scales="0"), "duquant"),
                 ("duquant_w4a4_step_scales", cfg.replace(abits=4, act_gran="tensor", dit_step_scales="1"), "duquant"),
                 ("duquant_w4a4", cfg.replace(abits=4), "duquant")]
    for label, c, method in runs:
        t = time.perf_counter()
        q = quantise(p, c, method, calib)
        a = act(q, held)
        variants[label] = (q, a)
        res[f"{label}_layers"] = len(quantized_layers(q.model))
        res[f"{label}_action_err"] = float(np.abs(a - a_fp).mean())
        res[f"{label}_action_err_normalized"] = float(np.abs(p.normalize(fp, a) - p.normalize(fp, a_fp)).mean())
        res[f"{label}_action_err_max"] = float(np.abs(a - a_fp).max())
        res[f"{label}_build_calibrate_s"] = round(time.perf_counter() - t, 2)
    if "rtn_env" in variants:
        res["rtn_env_vs_rtn_max_diff"] = float(np.abs(variants["rtn_env"][1] - variants["rtn"][1]).max())
    res["fp_action_abs_mean"] = float(np.abs(a_fp).mean())
    # How much FP actions vary across observations: an error is small or large relative to this, and a
    # barely trained model (near-constant output) shows tiny absolute errors that mean nothing.
    spread = float(np.abs(a_fp - a_fp.mean(axis=0, keepdims=True)).mean())
    res["fp_action_spread"] = spread
    for label in variants:
        res[f"{label}_action_err_rel_spread"] = res[f"{label}_action_err"] / max(spread, 1e-12)
    res["duquant_to_rtn_error_ratio"] = res["duquant_action_err"] / max(res["rtn_action_err"], 1e-12)
    for a in ("", "_w4a4"):
        if f"duquant{a}_step_scales_action_err" in res:
            res[f"dit_step{a}_to_single_scale_error_ratio"] = (
                res[f"duquant{a}_step_scales_action_err"] / max(res[f"duquant{a}_single_scale_action_err"], 1e-12))
    if "duquant_w4a4_action_err" in res:  # ACT_GRAN=auto (per-token at A4) against the best static A4 scales
        res["w4a4_token_to_step_scales_error_ratio"] = (
            res["duquant_w4a4_action_err"] / max(res["duquant_w4a4_step_scales_action_err"], 1e-12))
    one = held[:1]
    res["latency_ms_fp"] = _median_ms(lambda: act(fp, one), args.repeats)
    res["latency_ms_rtn"] = _median_ms(lambda: act(variants["rtn"][0], one), args.repeats)
    res["latency_ms_duquant"] = _median_ms(lambda: act(variants["duquant"][0], one), args.repeats)
    if not args.no_sensitivity:
        sens_obs = held[: args.sensitivity_obs]
        a_fp_s = act(fp, sens_obs)
        res["sensitivity_duquant"] = sensitivity(fp, variants["duquant"][0], sens_obs, a_fp_s)
        res["sensitivity_rtn"] = sensitivity(fp, variants["rtn"][0], sens_obs, a_fp_s)
        res["sensitivity_top_duquant"] = list(res["sensitivity_duquant"].items())[: args.top]
        res["sensitivity_top_rtn"] = list(res["sensitivity_rtn"].items())[: args.top]
    return res


# ---------------------------------------------------------------------------------------------- LIBERO
def libero_success(policy: str, path: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """FP / RTN / DuQuant servers evaluated on the same LIBERO episodes (benchmarks/support/libero_matrix.py)."""
    from benchmarks.support.libero_matrix import MatrixConfig, quant_variants, run_matrix

    if not (REPO / ".venv-libero" / "bin" / "python").exists():
        return {"skipped": ".venv-libero is missing (scripts/setup.sh libero)"}
    variants = quant_variants(policy, path, workdir / "packs", args.demos, args.calib, args.denoising_steps)
    tasks = [int(t) for t in args.libero_tasks.split(",")] if args.libero_tasks else list(range(10))
    cfg = MatrixConfig(suite=args.libero_suite, tasks=tasks, trials=args.libero_trials, workers=args.libero_workers,
                       out_dir=workdir, seed=args.seed, max_steps=args.libero_max_steps,
                       server_extra=["--torch-threads", "1"])
    report = run_matrix(variants, cfg)
    out: dict[str, Any] = {"logs": str(workdir), "failures": report["failures"]}
    for v in variants:
        label = v.label[len(policy) + 1:]  # fp, rtn, duquant, duquant_w4a4
        s = report["variants"][v.label]
        out[f"{label}_success_rate"] = s["success_rate"]
        out[f"{label}_episodes"] = s["valid_episodes"]
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size (< 3 min): fewer observations, no LIBERO")
    ap.add_argument("--gr00t-dir", default=None)
    ap.add_argument("--openvla-rsd-dir", default=None,
                    help="OpenVLA-RSD checkpoint (default: the embedded default model, when it exists)")
    ap.add_argument("--demos", default=None, help="glob of demonstration HDF5 files for calibration/held-out frames")
    ap.add_argument("--libero-trials", type=int, default=0, help="trials per task for LIBERO success (0: off)")
    ap.add_argument("--libero-suite", default="libero_spatial")
    ap.add_argument("--libero-workers", type=int, default=2, help="simulator processes at once (one per core)")
    ap.add_argument("--libero-tasks", default=None, help="comma-separated task ids (default: all)")
    ap.add_argument("--libero-max-steps", type=int, default=None, help="episode step cap (smoke runs only)")
    ap.add_argument("--denoising-steps", type=int, default=8)
    ap.add_argument("--calib", type=int, default=None, help="calibration observations (CALIB_STEPS; default 32)")
    ap.add_argument("--heldout", type=int, default=None, help="held-out observations (default 32)")
    ap.add_argument("--sensitivity-obs", type=int, default=None)
    ap.add_argument("--no-sensitivity", action="store_true")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared CPU)")
    ap.add_argument("--out", default=None, help="write the full report (JSON) here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.calib = args.calib or (8 if args.quick else 32)
    args.heldout = args.heldout or (8 if args.quick else 32)
    args.sensitivity_obs = args.sensitivity_obs or (4 if args.quick else 16)
    args.repeats = args.repeats or (5 if args.quick else 20)
    if args.quick:
        args.libero_trials = 0
    t0 = time.time()
    calib, held, source = split_observations(args.demos, args.calib, args.heldout, args.seed)
    print(f"observations: {source}; {len(calib)} calibration, {len(held)} held-out")
    report: dict[str, Any] = {"observations": source, "quick": args.quick}
    skipped = []
    targets: list[tuple[str, Callable[[], PolicyUnderTest], str | None]] = []
    tmp = tempfile.TemporaryDirectory(prefix="bench_quant_policy_")
    embedded = REPO / "models" / "checkpoints" / "openvla-rsd-libero-spatial"
    if args.openvla_rsd_dir is None and (embedded / "config.json").is_file():
        args.openvla_rsd_dir = str(embedded)
    if args.gr00t_dir or args.quick:
        targets.append(("gr00t", lambda: gr00t_policy(args.gr00t_dir, args.denoising_steps, Path(tmp.name)), args.gr00t_dir))
    else:
        skipped.append("gr00t (no --gr00t-dir)")
    if args.openvla_rsd_dir:
        targets.append(("openvla_rsd", lambda: openvla_rsd_policy(args.openvla_rsd_dir), args.openvla_rsd_dir))
    else:
        skipped.append("openvla_rsd (no --openvla-rsd-dir and no embedded default model)")
    if not args.libero_trials:
        skipped.append("LIBERO success rates (--libero-trials 0" + (", --quick" if args.quick else "") + ")")
    summary: dict[str, Any] = {}
    for key, build, path in targets:
        p = build()
        print(f"[{key}] {p.note}")
        r = bench_policy(p, calib, held, args)
        report[key] = r
        print(f"[{key}] layers W4A8: {r['duquant_layers']}; action error vs FP (raw units, mean |da|): "
              f"RTN {r['rtn_action_err']:.5f}  DuQuant {r['duquant_action_err']:.5f}  "
              f"(ratio {r['duquant_to_rtn_error_ratio']:.3f}); normalised: RTN {r['rtn_action_err_normalized']:.4f} "
              f"DuQuant {r['duquant_action_err_normalized']:.4f}")
        print(f"[{key}] latency median ms: FP {r['latency_ms_fp']:.1f}  RTN {r['latency_ms_rtn']:.1f}  "
              f"DuQuant {r['latency_ms_duquant']:.1f}")
        if "sensitivity_top_duquant" in r:
            print(f"[{key}] most sensitive layers (DuQuant alone, action error):")
            for name, err in r["sensitivity_top_duquant"]:
                print(f"    {err:.5f}  {name}")
        for f in ("duquant_action_err", "rtn_action_err", "duquant_to_rtn_error_ratio", "duquant_action_err_normalized",
                  "rtn_action_err_normalized", "latency_ms_fp", "latency_ms_rtn", "latency_ms_duquant",
                  "duquant_layers", "rtn_env_vs_rtn_max_diff", "duquant_action_err_rel_spread",
                  "rtn_action_err_rel_spread", "fp_action_spread", "duquant_single_scale_action_err",
                  "duquant_step_scales_action_err", "dit_step_to_single_scale_error_ratio",
                  "duquant_w4a4_single_scale_action_err", "duquant_w4a4_step_scales_action_err",
                  "dit_step_w4a4_to_single_scale_error_ratio", "duquant_w4a4_action_err",
                  "w4a4_token_to_step_scales_error_ratio"):
            if f in r:
                summary[f"{key}_{f}"] = round(r[f], 6) if isinstance(r[f], float) else r[f]
        if r.get("sensitivity_top_duquant"):
            summary[f"{key}_most_sensitive_layer"] = r["sensitivity_top_duquant"][0][0]
        if args.libero_trials and path:
            (REPO / "artifacts").mkdir(exist_ok=True)
            workdir = Path(tempfile.mkdtemp(prefix=f"bench_quant_{key}_", dir=REPO / "artifacts"))
            lib = libero_success("gr00t" if key == "gr00t" else "openvla-rsd", path, args, workdir)
            report[key]["libero"] = lib
            print(f"[{key}] LIBERO {args.libero_suite}: {lib}")
            for label in ("fp", "rtn", "duquant"):
                if f"{label}_success_rate" in lib:
                    summary[f"{key}_libero_{label}_success"] = lib[f"{label}_success_rate"]
            if lib.get("skipped"):
                skipped.append(f"LIBERO for {key}: {lib['skipped']}")
        del p
    tmp.cleanup()
    for s in skipped:
        print(f"skipped: {s}")
    summary["skipped"] = skipped
    summary["observations"] = "demos" if args.demos else "synthetic"
    summary["seconds"] = round(time.time() - t0, 1)
    report["summary"] = summary
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
