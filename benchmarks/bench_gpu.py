"""GPU costs at release scale: a 7B-shaped OpenVLA-RSD and a 3B-shaped GR00T N1.5 with random bf16 weights.

    python -m benchmarks.bench_gpu [--quick] [--device cuda] [--size 7b|tiny]

Builds the models from their configs (no download): Llama-2-7B (hidden 4096, 32 layers, intermediate 11008, vocab
32064) + DINOv2-L/SigLIP-So400m-shaped towers at 224 px for OpenVLA-RSD; Qwen3-1.7B truncated at layer 12 +
SigLIP2-shaped tower + the 16-layer DiT for GR00T. Measures build time, peak GPU memory, prefill / one-layer step
/ 7-layer verification pass, chunk latency main-only vs RSD with an oracle draft (the main model's own greedy
layers: every layer accepted) and an adversarial one (every layer rejected), batch 1 vs 8 throughput, DuQuant
fake-quant overhead on GR00T's ``get_action``, and a few LoRA (r=32, bf16 autocast) training steps' peak memory
and time. A measured acceptance needs a trained draft of that size, which does not exist here: reported as null.

Without CUDA it prints why and, with ``--quick``, still runs the tiny sizes on the CPU (< 60 s) so the code paths
are exercised. The last line is one JSON object (``rsd7b_*``/``gr00t3b_*``/``lora7b_*`` keys on a GPU,
``*_tiny_*``-sized figures under the same keys with ``"size": "tiny"`` on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(ts), 3)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def _build_on(device: torch.device, dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------------- OpenVLA-RSD
def openvla_7b_config():
    from models.common.vit import ViTConfig
    from models.openvla.config import OpenVLAConfig
    from models.openvla.tiny import libero_like_norm_stats

    dino = ViTConfig(image_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096,
                     class_token=True, num_reg_tokens=4, layer_scale=True)
    siglip = ViTConfig(image_size=224, patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_hidden_dim=4304,
                       class_token=False, global_pool="map")
    text = {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048, "pad_token_id": 32000, "torch_dtype": "bfloat16"}
    return OpenVLAConfig(vision_backbone_id="dinosiglip-vit-so-224px", llm_backbone_id="llama2-7b-pure",
                         pad_token_id=32000, text_config=text,
                         timm_model_ids=["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
                         image_sizes=[224, 224], hf_llm_id="", norm_stats=libero_like_norm_stats(),
                         vit_configs=[dino.to_dict(), siglip.to_dict()], vocab_base=32000, torch_dtype="bfloat16")


def build_openvla_rsd(size: str, device: torch.device, dtype: torch.dtype):
    from models.openvla import tiny
    from models.openvla.modeling import OpenVLAForActionPrediction
    from rsd.vla import OpenVLARSD, VLARSDConfig

    torch.manual_seed(0)
    cfg = openvla_7b_config() if size == "7b" else tiny.tiny_config("tiny")
    with _build_on(device, dtype):
        backbone = OpenVLAForActionPrediction(cfg)
        model = OpenVLARSD(backbone, VLARSDConfig())
    return model.to(device=device, dtype=dtype).eval()


class FixedDraft(nn.Module):
    """Proposes given layers (one-hot logits) whatever the hidden state: oracle or adversarial."""

    def __init__(self, tokens: torch.Tensor, levels: int = 7) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(tokens.long(), levels).float() * 10.0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(hidden.shape[0], *self.logits.shape[1:])


def bench_rsd(model, device: torch.device, seq: int, reps: int, prefix: str) -> dict[str, Any]:
    from rsd.config import RSDConfig
    from rsd.engine import SpeculativeDecoder

    main = model.main
    h = main.hidden_size
    dtype = next(main.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    embeds = {b: (torch.randn(b, seq, h, generator=g) * 0.02).to(device, dtype) for b in (1, 8)}
    x = embeds[1]
    out: dict[str, Any] = {}
    out[f"{prefix}_prefill_ms"] = _ms(lambda: main.prefill(x), device, reps)
    one = torch.zeros(1, 1, main.codes_per_layer, dtype=torch.long, device=device)
    seven = torch.zeros(1, 7, main.codes_per_layer, dtype=torch.long, device=device)

    def step(n: int) -> Callable[[], Any]:
        def run() -> None:
            pre = main.prefill(x)
            main.step(one if n == 1 else seven, pre.cache)
        return run

    pre_ms = out[f"{prefix}_prefill_ms"]
    out[f"{prefix}_layer_step_ms"] = round(max(0.0, _ms(step(1), device, reps) - pre_ms), 3)
    out[f"{prefix}_verify7_pass_ms"] = round(max(0.0, _ms(step(7), device, reps) - pre_ms), 3)
    greedy = main.decode_greedy(x)
    out[f"{prefix}_main_only_chunk_ms"] = _ms(lambda: main.decode_greedy(x), device, reps)
    for name, tokens in (("oracle", greedy[:, :7]), ("adversarial", (greedy[:, :7] + 1) % main.levels)):
        eng = SpeculativeDecoder(main, FixedDraft(tokens[0:1]).to(device), RSDConfig(mode="exact", draft_layers=7))
        toks, stats = eng.generate(x)
        assert torch.equal(toks, greedy), f"{name}: exact RSD must reproduce main-only greedy decoding"
        out[f"{prefix}_rsd_{name}_chunk_ms"] = _ms(lambda eng=eng: eng.generate(x), device, reps)
        out[f"{prefix}_rsd_{name}_main_passes"] = int(stats.main_passes)
    out[f"{prefix}_rsd_measured_acceptance"] = None  # no trained draft at this size
    from rsd.draft import DeepDraftConfig, DeepDraftModel, draft_width_for

    dcfg = DeepDraftConfig(input_dim=h, hidden_dim=draft_width_for(h), num_layers=main.num_layers,
                           codes=main.codes_per_layer, levels=main.levels)
    draft = DeepDraftModel(dcfg).to(device).eval()
    hid = torch.randn(1, h, device=device)
    dec = greedy[:, :1]
    with torch.no_grad():
        out[f"{prefix}_deep_draft_ms"] = _ms(lambda: draft(hid, dec, 7), device, reps)
    for b in (1, 8):
        xb = embeds[b]
        ms = _ms(lambda xb=xb: main.decode_greedy(xb), device, max(1, reps // 2))
        out[f"{prefix}_batch{b}_chunks_per_s"] = round(b * 1e3 / ms, 2)
    return out


def bench_lora(model, device: torch.device, seq: int, batch: int, steps: int, prefix: str) -> dict[str, Any]:
    """A few LoRA r=32 (bf16 autocast) steps of the layer-head loss on random prefixes, through the one loop."""
    from argparse import Namespace

    from models.common import scale, training

    args = Namespace(lora_r=32, lora_alpha=16.0, lora_dropout=0.0, lora_targets=",".join(scale.LORA_DEFAULT_TARGETS),
                     precision="bf16", grad_accum=1, grad_checkpointing=device.type == "cuda")
    main = model.main
    for p in main.parameters():
        p.requires_grad_(True)
    # the trainable head in fp32 (master weights); the frozen base stays in its bf16
    for m in (main.code_embed, main.layer_embed, main.head):
        m.float()
    scale.prepare_model(model, model.backbone.language_model, args,
                        keep_trainable=[main.code_embed, main.layer_embed, main.head])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator(device="cpu").manual_seed(1)
    embeds = (torch.randn(batch, seq, main.hidden_size, generator=g) * 0.02).to(device, torch.bfloat16)
    layers = torch.randint(0, main.levels, (batch, main.num_layers, main.codes_per_layer), generator=g).to(device)

    def loss(_b: training.Batch) -> torch.Tensor:
        return main(embeds, layers)[0]

    cfg = training.TrainConfig(steps=steps, batch_size=batch, lr=1e-4, grad_clip=1.0, progress=False,
                               log_every=1000, precision="bf16", grad_checkpointing=args.grad_checkpointing)
    _reset_peak(device)
    t0 = time.perf_counter()
    r = training.fit(model, batch, cfg, loss)
    _sync(device)
    sec = time.perf_counter() - t0
    return {f"{prefix}_trainable_params_m": round(trainable / 1e6, 2), f"{prefix}_peak_mem_gb": _peak_gb(device),
            f"{prefix}_step_s": round(sec / steps, 4), f"{prefix}_batch": batch,
            f"{prefix}_loss_finite": bool(all(np.isfinite(v) for _, v in r.losses))}


# ---------------------------------------------------------------------------------------------- GR00T
def gr00t_3b_config(vocab: int, image_token: int, bos: int, eos: int):
    from models.gr00t.config import GR00TConfig
    from models.gr00t.tiny import tiny_config

    d = tiny_config(vocab, image_token, bos, eos).to_dict()
    llm = 2048
    d["hidden_size"] = llm
    d["backbone_cfg"]["select_layer"] = 12
    e = d["eagle_config"]
    e.update(select_layer=12, force_image_size=224, mlp_connector_layers=2, use_pixel_shuffle=False)
    e["text_config"].update(hidden_size=llm, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128)
    e["vision_config"].update(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=224)
    h = d["action_head_cfg"]
    h.update(backbone_embedding_dim=llm, hidden_size=1024, input_embedding_dim=1536)
    h["diffusion_model_cfg"].update(attention_head_dim=48, num_attention_heads=32, num_layers=16, output_dim=1024,
                                    cross_attention_dim=llm)
    h["vl_self_attention_cfg"].update(attention_head_dim=64, num_attention_heads=32, num_layers=4)
    d["torch_dtype"] = d["compute_dtype"] = "bfloat16"
    return GR00TConfig.from_dict(d)


def build_gr00t(size: str, device: torch.device, dtype: torch.dtype):
    from models.common.tokenizer import train_qwen_style
    from models.gr00t.data_config import make_metadata
    from models.gr00t.modeling import GR00TPolicyModel
    from models.gr00t.tiny import VOCAB_BPE, build_tiny, libero_stats

    if size != "3b":
        return build_tiny(0).to(device=device, dtype=dtype)
    tok = train_qwen_style(VOCAB_BPE)
    cfg = gr00t_3b_config(151680, tok.token_to_id("<IMG_CONTEXT>"), tok.token_to_id("<|endoftext|>"),
                          tok.token_to_id("<|im_end|>"))
    torch.manual_seed(0)
    with _build_on(device, dtype):
        model = GR00TPolicyModel(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    model.tokenizer = tok
    model.metadata = make_metadata(model.data_config, *libero_stats())
    return model


def bench_gr00t(model, device: torch.device, reps: int, prefix: str) -> dict[str, Any]:
    from quant import DuQuantConfig, replace_linear_layers

    rng = np.random.default_rng(0)
    size = model.image_size

    def obs(b: int) -> dict[str, Any]:
        img = rng.integers(0, 255, (b, size, size, 3), dtype=np.uint8)
        return model.data_config.from_libero(img, img[:, ::-1].copy(), rng.standard_normal((b, 8)),
                                             ["put the bowl on the plate"] * b)

    o1, o8 = obs(1), obs(8)
    out: dict[str, Any] = {}
    with torch.no_grad():
        out[f"{prefix}_get_action_ms"] = _ms(lambda: model.get_action(o1), device, reps)
        ms8 = _ms(lambda: model.get_action(o8), device, max(1, reps // 2))
        out[f"{prefix}_batch1_actions_per_s"] = round(1e3 / out[f"{prefix}_get_action_ms"], 2)
        out[f"{prefix}_batch8_actions_per_s"] = round(8e3 / ms8, 2)
        q = copy.deepcopy(model)
        n = len(replace_linear_layers(q, DuQuantConfig(enabled=True), method="duquant", force=True))
        q.get_action(o1)  # lazy calibration on first use
        out[f"{prefix}_duquant_layers"] = n
        out[f"{prefix}_duquant_get_action_ms"] = _ms(lambda q=q: q.get_action(o1), device, reps)
        out[f"{prefix}_duquant_overhead_pct"] = round(
            100 * (out[f"{prefix}_duquant_get_action_ms"] / out[f"{prefix}_get_action_ms"] - 1), 1)
    return out


# ---------------------------------------------------------------------------------------------- main
def run(device: torch.device, big: bool, reps: int) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "size": "release" if big else "tiny", "dtype": str(dtype).removeprefix("torch.")}
    rsd, gr, lora = ("rsd7b", "gr00t3b", "lora7b")
    _reset_peak(device)
    t0 = time.perf_counter()
    model = build_openvla_rsd("7b" if big else "tiny", device, dtype)
    _sync(device)
    res[f"{rsd}_build_s"] = round(time.perf_counter() - t0, 2)
    res[f"{rsd}_params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    res[f"{rsd}_weights_peak_mem_gb"] = _peak_gb(device)
    seq = 300 if big else 80  # BOS + 256 patches + prompt (+ layer tokens fed later)
    res.update(bench_rsd(model, device, seq, reps, rsd))
    res[f"{rsd}_inference_peak_mem_gb"] = _peak_gb(device)
    res.update(bench_lora(model, device, seq, batch=16 if big else 4, steps=3, prefix=lora))
    from models.common.memory import openvla_rsd_7b_estimate

    res["lora7b_estimate_gb"] = round(openvla_rsd_7b_estimate(batch=16, checkpointing=big).total / 1e9, 2)
    del model
    _reset_peak(device)
    t0 = time.perf_counter()
    g = build_gr00t("3b" if big else "tiny", device, dtype)
    _sync(device)
    res[f"{gr}_build_s"] = round(time.perf_counter() - t0, 2)
    res[f"{gr}_params_b"] = round(sum(p.numel() for p in g.parameters()) / 1e9, 3)
    res.update(bench_gr00t(g, device, reps, gr))
    res[f"{gr}_peak_mem_gb"] = _peak_gb(device)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions; on a CPU: the tiny sizes only")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default=None, choices=["release", "tiny"], help="default: release on CUDA")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    reps = 3 if args.quick else 10
    if not cuda:
        reason = "no CUDA device"
        print(f"bench_gpu: skipping the release-size (7B / 3B) pass: {reason}", flush=True)
        if not args.quick:
            print(json.dumps({"skipped": reason}))
            return 0
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        res = run(torch.device("cpu"), big=False, reps=reps)
        for k, v in res.items():
            print(f"  {k}: {v}")
        print(json.dumps({"skipped": reason, "cpu_tiny": res}))
        return 0
    device = torch.device(args.device)
    res = run(device, big=(args.size or "release") == "release", reps=reps)
    for k, v in res.items():
        print(f"  {k}: {v}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
