"""Benchmark residual speculative decoding (RSD) against main-only decoding on a tiny main model.

    python benchmarks/bench_rsd.py --quick            # CI size, ~1-2 min on 2 CPU cores
    python benchmarks/bench_rsd.py                    # larger training, relaxed (r, tau) sweep
    python benchmarks/bench_rsd.py --model-dir DIR    # reuse main + draft/ + draft_l0/ saved with --save-dir

Setup (no checkpoints needed): a synthetic task whose prefix (16 embeddings) encodes a low-dimensional latent z;
the target RFSQ layers are ordered levels of smooth functions of z, finer layers more sensitive to z (harder).
The tiny main model (Llama, RFSQ layer head) is trained teacher-forced for a short while, then the draft is
trained by distillation on the main model's own greedy tokens (DESIGN section 8). All decoders then run on the
same held-out inputs in one process: main-only greedy and sampling, RSD exact / relaxed / sampling, and the
DESIGN section 8 variant whose draft proposes layers 1..3 given main's free layer 0 (trained the same way).

Reported: median wall time per chunk (B = 1), main passes per chunk, per-layer acceptance, speed-up, the
per-pass costs (prefill, 1-token step, 3-token verification, draft) and the speed-up they predict, and a
projection to the OpenVLA-7B configuration. The last stdout line is one JSON object of key figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rsd.config import RSDConfig  # noqa: E402
from rsd.draft import (  # noqa: E402
    DraftTrainConfig,
    RFSQDraftModel,
    collect_distillation_data,
    evaluate_draft,
    train_draft,
)
from rsd.engine import SpeculativeDecoder  # noqa: E402
from rsd.layer_head import RFSQLayerHeadModel, load_layer_head_model, save_layer_head_model  # noqa: E402

LOG = logging.getLogger("bench_rsd")
NUM_LAYERS, CODES, LEVELS = 8, 128, 7


class SyntheticTask:
    """A stand-in for LIBERO action tokens: a few tasks, and within a task a smooth dependence on a latent.

    The prefix (16 embeddings) encodes a task id (one of ``num_tasks`` prompts) and a latent z in [-1, 1]^zdim.
    Per task most codes are fixed; a fraction of codes per layer (growing from coarse to fine layers, as finer
    RFSQ residuals look noisier) are ordered levels of smooth functions of z. ``vary`` scales those fractions:
    it is the knob that sets how hard whole-layer agreement is for the draft.
    """

    FRACTIONS = (0.03, 0.05, 0.08, 0.15, 0.3, 0.5, 0.7, 0.9)

    def __init__(
        self, hidden: int, prefix_len: int = 16, zdim: int = 2, num_tasks: int = 8, vary: float = 1.0, seed: int = 0
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.hidden, self.prefix_len, self.zdim, self.num_tasks = hidden, prefix_len, zdim, num_tasks
        self.enc = torch.randn(zdim, prefix_len * hidden, generator=g) / math.sqrt(zdim)
        self.prompts = torch.randn(num_tasks, prefix_len, hidden, generator=g) * 0.5
        self.base = torch.randint(0, LEVELS, (num_tasks, NUM_LAYERS, CODES), generator=g)
        frac = torch.tensor(self.FRACTIONS)[:, None] * vary
        self.varying = torch.rand(NUM_LAYERS, CODES, generator=g) < frac
        self.w = torch.randn(num_tasks, NUM_LAYERS, CODES, zdim, generator=g)
        self.b = torch.rand(num_tasks, NUM_LAYERS, CODES, generator=g) * 2 - 1

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        task = torch.randint(0, self.num_tasks, (n,), generator=g)
        z = torch.rand(n, self.zdim, generator=g) * 2 - 1
        x = (z @ self.enc).view(n, self.prefix_len, self.hidden) + self.prompts[task]
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        u = torch.tanh(2.0 * (torch.einsum("nlcz,nz->nlc", self.w[task], z) + self.b[task]))
        smooth = torch.round(3 + 3 * u).clamp(0, LEVELS - 1).long()
        tokens = torch.where(self.varying[None], smooth, self.base[task])
        return x, tokens


def build_main(hidden: int, blocks: int, seed: int) -> RFSQLayerHeadModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return RFSQLayerHeadModel(LlamaForCausalLM(cfg), NUM_LAYERS, CODES, LEVELS)


def train_main(main: RFSQLayerHeadModel, task: SyntheticTask, steps: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(main.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    main.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        x, y = task.sample(32, g)
        loss, _ = main(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(main.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            LOG.info("main step %d loss %.4f", step + 1, float(loss.detach()))
    main.eval()
    return float(loss.detach())


def timeit(fn, reps: int) -> float:
    """Median wall time of ``fn()`` in ms."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def pass_costs(main: RFSQLayerHeadModel, draft: RFSQDraftModel, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Per-pass costs at B = 1: prefill, 1-token step, 3-token verification, draft (ms)."""
    lay = torch.zeros(1, 3, CODES, dtype=torch.long)

    def step(n: int) -> None:
        pre = main.prefill(x)
        t = time.perf_counter()
        main.step(lay[:, :n], pre.cache)
        out.append((time.perf_counter() - t) * 1e3)

    with torch.no_grad():
        prefill = timeit(lambda: main.prefill(x), reps)
        out: list[float] = []
        for _ in range(reps):
            step(1)
        step1 = statistics.median(out)
        out = []
        for _ in range(reps):
            step(3)
        step3 = statistics.median(out)
        h = main.prefill(x).hidden_last
        draft_ms = timeit(lambda: draft(h), reps)
    return {"prefill_ms": prefill, "step_ms": step1, "verify3_ms": step3, "draft_ms": draft_ms}


def predicted_speedup(costs: dict[str, float], chain: list[float], include_prefill: bool = True) -> float:
    """Our pass counting: RSD = prefill + draft + verify + (6 - E[saved]) steps vs prefill + 7 steps.

    ``chain`` holds P(drafted layer j accepted | previous ones accepted) for the layers that can save a pass
    (seed draft: d_1, d_2; layer-0-conditioned variant: d_1, d_2, d_3); E[saved] = a1 + a1 a2 + a1 a2 a3 ...
    """
    pre = costs["prefill_ms"] if include_prefill else 0.0
    saved, run = 0.0, 1.0
    for a in chain:
        run *= a
        saved += run
    base = pre + 7 * costs["step_ms"]
    rsd = pre + costs["draft_ms"] + costs["verify3_ms"] + (6 - saved) * costs["step_ms"]
    return base / rsd


def leviathan(alpha: float, gamma: int, c: float) -> float:
    """Leviathan et al. 2023 expected improvement factor (1 - a^(g+1)) / ((1 - a)(g c + 1))."""
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def run_all(main, configs: dict[str, tuple[RSDConfig, object]], xs: list[torch.Tensor], warm: int) -> dict[str, dict]:
    """Time every (config, draft) decoder on the same inputs, interleaved per input so load drift hits all alike."""
    engines = {name: SpeculativeDecoder(main, draft, cfg) for name, (cfg, draft) in configs.items()}
    for x in xs[:warm]:
        for eng in engines.values():
            eng.generate(*x) if isinstance(x, tuple) else eng.generate(x)
    for name, eng in engines.items():
        eng.reseed(configs[name][0].seed)
    rec: dict[str, dict[str, list]] = {
        n: {"t": [], "p": [], "tok": [], "acc": [], "reach": [], "parts": []} for n in engines
    }
    for x in xs:
        for name, eng in engines.items():
            t = time.perf_counter()
            tokens, st = eng.generate(*x) if isinstance(x, tuple) else eng.generate(x)
            r = rec[name]
            r["t"].append((time.perf_counter() - t) * 1e3)
            r["p"].append(st.main_passes)
            r["tok"].append(tokens)
            r["acc"].append(st.accepted.float())
            r["reach"].append(st.reached.float())
            r["parts"].append(st.timings_ms)
    out = {}
    for name, r in rec.items():
        acc_t, reached_t = torch.cat(r["acc"]), torch.cat(r["reach"])
        out[name] = {
            "median_ms": statistics.median(r["t"]),
            "passes": statistics.mean(r["p"]),
            "tokens": torch.cat(r["tok"]),
            "acceptance": acc_t.mean(0).tolist(),
            "acceptance_given_reached": (acc_t.sum(0) / reached_t.sum(0).clamp_min(1)).tolist(),
            "parts_ms": {k: statistics.median(p[k] for p in r["parts"]) for k in r["parts"][0]},
        }
    return out


def checkpoint_mode(args: argparse.Namespace) -> None:
    """RSD vs main-only on a trained OpenVLA-RSD checkpoint, on real demonstration frames (B = 1)."""
    from rsd.vla import load_openvla_rsd
    from server.policies.calibration import calibration_observations

    model = load_openvla_rsd(args.openvla_rsd_dir)
    model.eval()
    if model.draft is None:
        raise SystemExit(f"error: {args.openvla_rsd_dir} has no draft model")
    n = args.eval or (16 if args.quick else 64)
    obs = calibration_observations(args.demos, n=n, seed=args.seed + 1)
    with torch.inference_mode():
        xs = [model.prefix(o["image"][None], [o["instruction"]]) for o in obs]
    configs: dict[str, tuple[RSDConfig, object]] = {
        "main-only": (RSDConfig(mode="exact", enabled=False), None),
        "exact": (RSDConfig(mode="exact"), model.draft),
    }
    for r, tau in ((1, 0.9), (1, 0.8), (2, 0.9)):
        configs[f"relaxed r={r} tau={tau}"] = (RSDConfig(mode="relaxed", relaxed_r=r, relaxed_tau=tau), model.draft)
    with torch.inference_mode():
        res = run_all(model.main, configs, xs, warm=min(4, len(xs)))
    base = res["main-only"]
    print(f"checkpoint {args.openvla_rsd_dir}: {len(xs)} demonstration frames, B=1, threads {args.threads}")
    print(f"{'decoder':24s} {'ms/chunk':>9s} {'passes':>7s} {'speed-up':>9s} {'identical':>9s}  acceptance per layer")
    figures: dict[str, object] = {"checkpoint": str(args.openvla_rsd_dir), "frames": len(xs)}
    for name, r in res.items():
        same = bool(torch.equal(r["tokens"], base["tokens"]))
        speed = base["median_ms"] / r["median_ms"]
        print(f"{name:24s} {r['median_ms']:9.2f} {r['passes']:7.2f} {speed:9.3f} {str(same):>9s}  "
              f"{[round(a, 3) for a in r['acceptance']]}")
        key = name.replace(" ", "_").replace("=", "").replace(".", "")
        figures[f"{key}_speedup"] = round(speed, 4)
        figures[f"{key}_main_passes"] = round(r["passes"], 3)
    figures["exact_identical_to_main_only"] = bool(torch.equal(res["exact"]["tokens"], base["tokens"]))
    print(json.dumps(figures))


def main_cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI size")
    ap.add_argument("--model-dir", type=Path, default=None, help="load main (rsd_main.*) + draft (draft/) from here")
    ap.add_argument("--save-dir", type=Path, default=None, help="save the trained main + draft here")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--vary", type=float, default=1.0, help="scale of the z-dependent code fractions (difficulty)")
    ap.add_argument("--draft-width", type=int, default=128, help="draft hidden_dim (seed: 512 for a 4096-d backbone)")
    ap.add_argument("--eval", type=int, default=None, help="held-out chunks timed per mode")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the batched exact run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--openvla-rsd-dir", type=Path, default=None,
                    help="time a trained OpenVLA-RSD checkpoint on demonstration frames instead (needs --demos)")
    ap.add_argument("--demos", default=None, help="glob of LIBERO demonstration HDF5 files (with --openvla-rsd-dir)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.openvla_rsd_dir is not None:
        if not args.demos:
            ap.error("--openvla-rsd-dir needs --demos GLOB (frames to decode)")
        checkpoint_mode(args)
        return
    q = args.quick
    main_steps, n_distill, draft_steps = (300, 2048, 400) if q else (1500, 8192, 3000)
    n_eval = args.eval or (24 if q else 64)
    t_start = time.perf_counter()

    task = SyntheticTask(args.hidden, vary=args.vary, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    if args.model_dir is not None:
        main = load_layer_head_model(args.model_dir)
        draft = RFSQDraftModel.load(args.model_dir / "draft")
        draft_l0 = RFSQDraftModel.load(args.model_dir / "draft_l0")
        main_loss = float("nan")
    else:
        main = build_main(args.hidden, args.blocks, args.seed)
        t = time.perf_counter()
        main_loss = train_main(main, task, main_steps, args.seed)
        print(f"main: trained {main_steps} steps in {time.perf_counter() - t:.1f}s, final loss {main_loss:.4f}")
        draft = RFSQDraftModel(
            input_dim=args.hidden,
            hidden_dim=args.draft_width,
            feedforward_dim=4 * args.draft_width,
            num_heads=8,
        )
        # DESIGN section 8 variant: proposes layers 1..3 given main's free layer 0
        draft_l0 = RFSQDraftModel(
            input_dim=args.hidden,
            hidden_dim=args.draft_width,
            feedforward_dim=4 * args.draft_width,
            num_heads=8,
            condition_on_layer0=True,
        )
    # distillation data: main's own greedy tokens on fresh inputs
    x_all, gt_all = task.sample(n_distill + 512, g)
    t = time.perf_counter()
    hidden, tokens, teacher = collect_distillation_data(main, x_all, batch_size=256)
    tr, va = slice(0, n_distill), slice(n_distill, n_distill + 512)
    main_gt_acc = (tokens[va] == gt_all[va]).float().mean().item()
    if args.model_dir is None:
        # hard CE on main's greedy tokens (exact/relaxed acceptance) + soft KL to main's distribution (sampling
        # acceptance is sum(min(p, q)) per code, 1 when q = p)
        cfg = DraftTrainConfig(
            steps=draft_steps, batch_size=64, lr=2e-3, warmup_steps=50, log_every=draft_steps, kl_weight=0.2
        )
        train_draft(draft, hidden[tr], tokens[tr, :3], cfg, teacher_logits=teacher[tr, :3])
        print(f"draft: distilled {draft_steps} steps in {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        train_draft(draft_l0, hidden[tr], tokens[tr, 1:4], cfg, teacher_logits=teacher[tr, 1:4], layer0=tokens[tr, 0])
        print(f"draft (layers 1-3 | layer 0): distilled {draft_steps} steps in {time.perf_counter() - t:.1f}s")
    metrics = evaluate_draft(draft, hidden[va], tokens[va, :3])
    metrics_l0 = evaluate_draft(draft_l0, hidden[va], tokens[va, 1:4], layer0=tokens[va, 0])
    print(
        f"main vs ground truth (val, per code): {main_gt_acc:.4f}; draft vs main greedy (val): per-code "
        f"{[round(a, 4) for a in metrics.code_accuracy]}, whole layer {[round(a, 4) for a in metrics.layer_agreement]}"
    )
    print(
        f"variant draft (layers 1-3 | layer 0) vs main greedy (val): per-code "
        f"{[round(a, 4) for a in metrics_l0.code_accuracy]}, whole layer "
        f"{[round(a, 4) for a in metrics_l0.layer_agreement]}"
    )
    if args.save_dir is not None:
        save_layer_head_model(main, args.save_dir)
        draft.save(args.save_dir / "draft")
        draft_l0.save(args.save_dir / "draft_l0")
        print(f"saved main + draft to {args.save_dir}")

    # ---------------------------------------------------------------- timing on held-out inputs, B = 1
    x_eval, gt_eval = task.sample(n_eval, g)
    xs = [x_eval[i : i + 1] for i in range(n_eval)]
    warm = min(4, n_eval)
    relaxed_grid = [(1, 1.0), (1, 0.95)] if q else [(1, 1.0), (1, 0.95), (1, 0.9), (2, 0.9)]
    configs: dict[str, tuple[RSDConfig, object]] = {
        "base": (RSDConfig(mode="exact", enabled=False), None),
        "base_sampling": (RSDConfig(mode="sampling", enabled=False, seed=1), None),
        "exact": (RSDConfig(mode="exact"), draft),
        "sampling": (RSDConfig(mode="sampling", seed=1), draft),
        "variant exact": (RSDConfig(mode="exact"), draft_l0),
        "variant relaxed r=1 tau=0.95": (RSDConfig(mode="relaxed", relaxed_r=1, relaxed_tau=0.95), draft_l0),
    }
    for r, tau in relaxed_grid:
        configs[f"relaxed r={r} tau={tau}"] = (RSDConfig(mode="relaxed", relaxed_r=r, relaxed_tau=tau), draft)
    results = run_all(main, configs, xs, warm)
    base, base_s = results["base"], results["base_sampling"]
    greedy = base["tokens"]
    relaxed_rows = []
    for r, tau in relaxed_grid:
        res = results[f"relaxed r={r} tau={tau}"]
        diff = (res["tokens"] - greedy).abs()
        res["code_mismatch_vs_greedy"] = (diff > 0).float().mean().item()
        res["max_level_diff"] = int(diff.max())
        res["gt_acc"] = (res["tokens"] == gt_eval).float().mean().item()
        relaxed_rows.append((r, tau, res))
    exact_identical = torch.equal(results["exact"]["tokens"], greedy) and torch.equal(
        results["variant exact"]["tokens"], greedy
    )
    # the reported relaxed setting: fewest main passes among those whose ground-truth code accuracy (our success
    # proxy without a simulator) stays within 0.5 points of main-only greedy decoding
    gt_greedy = (greedy == gt_eval).float().mean().item()
    ok_rows = [row for row in relaxed_rows if row[2]["gt_acc"] >= gt_greedy - 0.005] or relaxed_rows[:1]
    r_sel, tau_sel, relaxed = min(ok_rows, key=lambda row: row[2]["passes"])

    # batched exact run: per-sample acceptance in a batch, crop-to-minimum cost
    eng = SpeculativeDecoder(main, draft, RSDConfig(mode="exact"))
    bt = args.batch
    batch_passes, per_sample_passes, batch_identical = [], [], True
    for i in range(0, n_eval - bt + 1, bt):
        xb = x_eval[i : i + bt]
        tok_b, st_b = eng.generate(xb)
        batch_identical &= torch.equal(tok_b, main.decode_greedy(xb))
        batch_passes.append(st_b.main_passes)
        per_sample_passes.extend(st_b.main_passes_per_sample)

    costs = pass_costs(main, draft, xs[0], reps=20 if q else 50)
    a = results["exact"]["acceptance_given_reached"]
    a1, a2 = a[1], a[2]

    # ---------------------------------------------------------------- report
    print(f"\nper-pass costs at B=1 (tiny main, {args.hidden}-d x {args.blocks} blocks, CPU, {args.threads} thread):")
    print(
        f"  prefill {costs['prefill_ms']:.2f} ms | 1-token step {costs['step_ms']:.2f} ms | 3-token verify "
        f"{costs['verify3_ms']:.2f} ms | draft {costs['draft_ms']:.2f} ms"
    )
    print(
        f"  ratios to a step: prefill {costs['prefill_ms'] / costs['step_ms']:.2f}, verify "
        f"{costs['verify3_ms'] / costs['step_ms']:.2f}, draft {costs['draft_ms'] / costs['step_ms']:.2f}"
    )
    print(
        f"\n{'decoder':<36}{'median ms/chunk':>16}{'main passes':>13}{'speed-up':>10}  acceptance of drafted layers "
        "(L0,L1,L2; variant L1,L2,L3) | given reached"
    )
    print(f"{'main-only greedy':<36}{base['median_ms']:>16.2f}{base['passes']:>13.2f}{1.0:>10.3f}")
    print(f"{'main-only sampling':<36}{base_s['median_ms']:>16.2f}{base_s['passes']:>13.2f}{1.0:>10.3f}")
    speedups = {}
    shown = ["exact", "sampling"] + [f"relaxed r={r} tau={tau}" for r, tau, _ in relaxed_rows]
    shown += ["variant exact", "variant relaxed r=1 tau=0.95"]
    for name in shown:
        res = results[name]
        ref = base_s if name == "sampling" else base
        sp = ref["median_ms"] / res["median_ms"]
        speedups[name] = sp
        acc = ",".join(f"{v:.2f}" for v in res["acceptance"])
        accr = ",".join(f"{v:.2f}" for v in res["acceptance_given_reached"])
        print(f"{'RSD ' + name:<36}{res['median_ms']:>16.2f}{res['passes']:>13.2f}{sp:>10.3f}  {acc} | {accr}")
    print("engine time split, median ms per chunk (prefill | draft | verify incl. acceptance | tail decode):")
    for name in ["base", "exact", "sampling", f"relaxed r={r_sel} tau={tau_sel}", "variant exact"]:
        pm = results[name]["parts_ms"]
        print(
            f"  {name:<28} {pm['prefill']:.2f} | {pm['draft']:.2f} | {pm['verify']:.2f} | {pm['decode']:.2f}"
            f"  (sum {pm['total']:.2f})"
        )
    for r, tau, res in relaxed_rows:
        print(
            f"  relaxed r={r} tau={tau}: code mismatch vs greedy {res['code_mismatch_vs_greedy']:.4f}, max level "
            f"diff {res['max_level_diff']}, ground-truth code acc {res['gt_acc']:.4f} (greedy "
            f"{(greedy == gt_eval).float().mean().item():.4f})"
        )
    print(f"exact tokens identical to main-only greedy: {exact_identical} (B=1), {batch_identical} (B={bt})")
    if batch_passes:
        print(
            f"batched exact B={bt}: main passes per chunk {statistics.mean(batch_passes):.2f} (batch) vs "
            f"{statistics.mean(per_sample_passes):.2f} (mean of what each sample alone needs)"
        )
    pred_tiny = predicted_speedup(costs, [a1, a2])
    print(f"\npass-count model with these costs and exact acceptance (a1={a1:.3f}, a2={a2:.3f}): {pred_tiny:.3f}x")

    # 7B projection: cost ratios for OpenVLA-7B decoding at B=1 on one GPU (not measured here: no GPU lent)
    proj_costs = {"prefill_ms": 2.5, "step_ms": 1.0, "verify3_ms": 1.05, "draft_ms": 0.08}
    proj = {
        "assumed_ratios": {"prefill+vision": 2.5, "verify3": 1.05, "draft": 0.08},
        "exact": predicted_speedup(proj_costs, [a1, a2]),
        "exact_decode_only": predicted_speedup(proj_costs, [a1, a2], include_prefill=False),
        "all_accepted": predicted_speedup(proj_costs, [1.0, 1.0]),
        "all_accepted_decode_only": predicted_speedup(proj_costs, [1.0, 1.0], include_prefill=False),
    }
    va_ = results["variant exact"]["acceptance_given_reached"]
    proj["variant_exact"] = predicted_speedup(proj_costs, va_)
    proj["variant_all_accepted"] = predicted_speedup(proj_costs, [1.0, 1.0, 1.0])
    alpha = (a1 + a2) / 2
    proj["leviathan_exact"] = leviathan(alpha, 2, 0.08)
    ra = relaxed["acceptance_given_reached"]
    proj["relaxed"] = predicted_speedup(proj_costs, [ra[1], ra[2]])
    print(
        "7B projection (ratios to one 7B decode step, assumed: prefill+vision 2.5, 3-token verify 1.05, draft 0.08):"
        f"\n  exact {proj['exact']:.3f}x (decode only {proj['exact_decode_only']:.3f}x); relaxed "
        f"{proj['relaxed']:.3f}x; all layers accepted {proj['all_accepted']:.3f}x (decode only "
        f"{proj['all_accepted_decode_only']:.3f}x); Leviathan formula (alpha={alpha:.3f}, gamma=2, c=0.08) "
        f"{proj['leviathan_exact']:.3f}x -- it assumes speculation every pass, RSD speculates once per chunk"
        f"\n  variant draft (layers 1-3 | layer 0): exact {proj['variant_exact']:.3f}x, all accepted "
        f"{proj['variant_all_accepted']:.3f}x"
    )
    print("  sensitivity (all layers accepted / measured exact acceptance), rows prefill+vision ratio, cols draft ratio:")
    for rp in (1.0, 2.5, 5.0):
        cells = []
        for cd in (0.02, 0.08, 0.15):
            c = {"prefill_ms": rp, "step_ms": 1.0, "verify3_ms": 1.05, "draft_ms": cd}
            cells.append(f"{predicted_speedup(c, [1.0, 1.0]):.3f}/{predicted_speedup(c, [a1, a2]):.3f}")
        print(f"    prefill {rp:>3}: " + "  ".join(f"draft {cd}: {cell}" for cd, cell in zip((0.02, 0.08, 0.15), cells, strict=True)))
    print(f"total benchmark time {time.perf_counter() - t_start:.1f}s")

    summary = {
        "exact_speedup": round(speedups["exact"], 4),
        "relaxed_speedup": round(base["median_ms"] / relaxed["median_ms"], 4),
        "relaxed_r": r_sel,
        "relaxed_tau": tau_sel,
        "relaxed_code_mismatch": round(relaxed["code_mismatch_vs_greedy"], 5),
        "relaxed_gt_code_acc": round(relaxed["gt_acc"], 5),
        "greedy_gt_code_acc": round(gt_greedy, 5),
        "sampling_speedup": round(speedups["sampling"], 4),
        "exact_identical": bool(exact_identical and batch_identical),
        "draft_coarse_layer_accuracy": round(metrics.mean_code_accuracy, 4),
        "draft_layer_agreement": [round(v, 4) for v in metrics.layer_agreement],
        "exact_acceptance": [round(v, 4) for v in results["exact"]["acceptance"]],
        "main_passes_per_chunk_exact": round(results["exact"]["passes"], 3),
        "main_passes_per_chunk_relaxed": round(relaxed["passes"], 3),
        "main_passes_per_chunk_sampling": round(results["sampling"]["passes"], 3),
        "main_passes_per_chunk_baseline": base["passes"],
        "batched_passes_exact": round(statistics.mean(batch_passes), 3) if batch_passes else None,
        "step_ms": round(costs["step_ms"], 3),
        "prefill_ms": round(costs["prefill_ms"], 3),
        "verify3_ms": round(costs["verify3_ms"], 3),
        "draft_ms": round(costs["draft_ms"], 3),
        "predicted_speedup_tiny": round(pred_tiny, 4),
        "projected_7b_speedup_exact": round(proj["exact"], 4),
        "projected_7b_speedup_relaxed": round(proj["relaxed"], 4),
        "projected_7b_speedup_all_accepted": round(proj["all_accepted"], 4),
        "variant_exact_speedup": round(speedups["variant exact"], 4),
        "variant_relaxed_speedup": round(speedups["variant relaxed r=1 tau=0.95"], 4),
        "main_passes_per_chunk_variant_exact": round(results["variant exact"]["passes"], 3),
        "variant_draft_layer_agreement": [round(v, 4) for v in metrics_l0.layer_agreement],
        "projected_7b_speedup_variant_exact": round(proj["variant_exact"], 4),
        "quick": q,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main_cli()
