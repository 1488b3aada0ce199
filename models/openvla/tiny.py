"""Tiny (and medium) same-architecture OpenVLA checkpoints, saved in the released directory format.

The project trains these and the server loads them through the same loader a 7B checkpoint goes through, so
everything (config.json, >=2 safetensors shards + index, dataset_statistics.json, preprocessor and tokenizer
files) mirrors openvla/openvla-7b. The tokenizer is trained offline on a shipped corpus; ``vocab_base`` (ids
below padding) takes the role of Llama's 32000, so action tokens are ``vocab_base-256 .. vocab_base-1``.

CLI: ``python -m models.openvla.tiny --out DIR [--preset tiny|medium] [--shards N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

from models.common.loading import checkpoint_state_dict
from models.common.safetensors_io import save_sharded
from models.common.tokenizer import save_tokenizer, train_llama_style
from models.common.vit import ViTConfig
from models.openvla.config import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD, OpenVLAConfig
from models.openvla.modeling import OpenVLAForActionPrediction
from models.openvla.processing import OpenVLAProcessor

logger = logging.getLogger(__name__)

UNNORM_KEY = "libero_spatial_no_noops"


def libero_like_norm_stats() -> dict[str, Any]:
    """Plausible LIBERO statistics (7-D delta EEF + gripper; gripper is not normalised: mask false)."""
    q01 = [-0.75, -0.80, -0.90, -0.10, -0.16, -0.20, -1.0]
    q99 = [0.90, 0.85, 0.93, 0.15, 0.19, 0.26, 1.0]
    return {
        UNNORM_KEY: {
            "action": {
                "mean": [0.15, 0.13, -0.15, -0.005, 0.004, 0.002, -0.03],
                "std": [0.41, 0.35, 0.50, 0.04, 0.07, 0.08, 0.99],
                "max": [0.94, 0.94, 0.94, 0.19, 0.31, 0.38, 1.0],
                "min": [-0.94, -0.94, -0.94, -0.18, -0.31, -0.38, -1.0],
                "q01": q01,
                "q99": q99,
                "mask": [True, True, True, True, True, True, False],
            },
            "proprio": {k: [0.0] * 8 for k in ("mean", "std", "max", "min", "q01", "q99")},
            "num_transitions": 52970,
            "num_trajectories": 432,
        }
    }


#: Backbone presets :func:`tiny_config` builds.
PRESETS = ("tiny", "small", "small_wide_vision", "small_p8", "medium")


def tiny_config(preset: str = "tiny", vocab_base: int = 1024) -> OpenVLAConfig:
    """Small widths/depths of the real architecture.

    ``tiny`` (1.3 M parameters with the RSD head) is the CI/test size; ``small`` (2.7 M, 1.65x tiny's training step
    on 2 cores) is the shipped LIBERO policy's size; ``small_wide_vision`` is ``small`` with both vision towers
    twice as wide and 3 layers deep (the capacity lever GR00T's ``tiny_wide_vision`` tries); ``small_p8`` is
    ``small`` with 8-pixel patches (a 14x14 grid per 112 px camera instead of 8x8: the released 224 px / 14 px
    models see a 16x16 grid, so the 14-pixel tiny ones see half as finely; vision + prefill ~2.6x, still inside the
    60 ms chunk budget on one thread); ``medium`` is ~300 MB in fp32 (for the load benchmark).
    """
    patch = 14
    if preset == "tiny":
        img, vdim, vdepth, heads, llm = 112, 64, 2, 4, dict(hidden_size=128, intermediate_size=256,
                                                               num_hidden_layers=2, num_attention_heads=4)
    elif preset == "small":
        img, vdim, vdepth, heads, llm = 112, 96, 2, 4, dict(hidden_size=192, intermediate_size=512,
                                                               num_hidden_layers=2, num_attention_heads=4)
    elif preset == "small_wide_vision":  # small's LLM, both ViTs 128 wide and 3 deep
        img, vdim, vdepth, heads, llm = 112, 128, 3, 4, dict(hidden_size=192, intermediate_size=512,
                                                                num_hidden_layers=2, num_attention_heads=4)
    elif preset == "small_p8":  # small with 8-pixel patches: 196 per camera instead of 64
        img, vdim, vdepth, heads, llm = 112, 96, 2, 4, dict(hidden_size=192, intermediate_size=512,
                                                               num_hidden_layers=2, num_attention_heads=4)
        patch = 8
    elif preset == "medium":
        img, vdim, vdepth, heads, llm = 112, 128, 2, 4, dict(hidden_size=1024, intermediate_size=2816,
                                                                num_hidden_layers=6, num_attention_heads=8)
    else:
        raise ValueError(f"unknown preset {preset!r}")
    dino = ViTConfig(image_size=img, patch_size=patch, embed_dim=vdim, depth=vdepth, num_heads=heads,
                     mlp_hidden_dim=4 * vdim, class_token=True, num_reg_tokens=4, layer_scale=True)
    siglip = ViTConfig(image_size=img, patch_size=patch, embed_dim=vdim, depth=vdepth, num_heads=heads,
                       mlp_hidden_dim=4 * vdim - 16, class_token=False, global_pool="map")
    text = {"model_type": "llama", "vocab_size": vocab_base + 64, "num_key_value_heads": llm["num_attention_heads"],
            "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "pad_token_id": vocab_base,
            "torch_dtype": "float32", **llm}
    return OpenVLAConfig(
        vision_backbone_id=f"{preset}-dinosiglip-vit-{img}px",
        llm_backbone_id=f"{preset}-llama",
        pad_token_id=vocab_base,
        text_config=text,
        timm_model_ids=[f"{preset}_vit_patch{patch}_reg4_dinov2", f"{preset}_vit_patch{patch}_siglip_{img}"],
        image_sizes=[img, img],
        hf_llm_id="",
        norm_stats=libero_like_norm_stats(),
        vit_configs=[dino.to_dict(), siglip.to_dict()],
        vocab_base=vocab_base,
        torch_dtype="float32",
    )


def build_tiny(preset: str = "tiny", seed: int = 0, vocab_base: int = 1024) -> OpenVLAForActionPrediction:
    """Randomly initialised model with its processor (tokenizer trained offline) attached."""
    torch.manual_seed(seed)
    cfg = tiny_config(preset, vocab_base)
    model = OpenVLAForActionPrediction(cfg).eval()
    model.processor = OpenVLAProcessor(cfg, train_llama_style(vocab_base))
    return model


def preprocessor_config(cfg: OpenVLAConfig) -> dict[str, Any]:
    """Prismatic-style ``preprocessor_config.json`` (informational; our processor reads config.json)."""
    kinds = cfg.norm_kinds()
    sizes = [v.image_size for v in cfg.vision_configs()]
    return {
        "image_processor_type": "PrismaticImageProcessor",
        "processor_class": "PrismaticProcessor",
        "image_resize_strategy": cfg.image_resize_strategy,
        "use_fused_vision_backbone": cfg.use_fused_vision_backbone,
        "input_sizes": [[3, s, s] for s in sizes],
        "interpolations": ["bicubic"] * len(kinds),
        "means": [list(SIGLIP_MEAN if k == "siglip" else DINO_MEAN) for k in kinds],
        "stds": [list(SIGLIP_STD if k == "siglip" else DINO_STD) for k in kinds],
    }


def save_pretrained(
    model: OpenVLAForActionPrediction, out: str | Path, num_shards: int = 2, dtype: torch.dtype | None = None
) -> Path:
    """Write the released directory layout for ``model`` (and its processor's tokenizer)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = checkpoint_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        cfg.torch_dtype = str(dtype).removeprefix("torch.")
    save_sharded(sd, out, num_shards=num_shards)
    cfg.norm_stats = model.norm_stats
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out / "dataset_statistics.json").write_text(json.dumps(model.norm_stats, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg), indent=2) + "\n")
    if model.processor is not None:
        save_tokenizer(model.processor.tokenizer, out, {
            "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<PAD>", "add_bos_token": True, "add_eos_token": False,
            "model_max_length": cfg.llm_max_length, "padding_side": "left",
        })
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    model = build_tiny(args.preset, args.seed)
    save_pretrained(model, args.out, args.shards, getattr(torch, args.dtype))
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(args.out), "params": n, "preset": args.preset}))


if __name__ == "__main__":
    main()
