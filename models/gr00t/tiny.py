"""Tiny same-architecture GR00T N1.5 checkpoints in the released directory format.

Writes ``config.json`` (with an ``eagle_config`` giving the small VLM shapes), >=2 safetensors shards +
``model.safetensors.index.json`` under the released names, ``experiment_cfg/metadata.json`` (LIBERO
statistics for ``new_embodiment``) and a Qwen-style byte-level tokenizer trained offline.

CLI: ``python -m models.gr00t.tiny --out DIR [--shards N] [--seed S]``.
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
from models.common.tokenizer import save_tokenizer, train_qwen_style
from models.gr00t.config import GR00TConfig
from models.gr00t.data_config import make_metadata
from models.gr00t.modeling import GR00TPolicyModel
from models.gr00t.prompt import PROMPT_UPSTREAM

logger = logging.getLogger(__name__)

VOCAB_BPE = 512


def libero_stats() -> tuple[dict[str, Any], dict[str, Any]]:
    """Plausible LIBERO state/action statistics per modality key."""
    def st(lo: list[float], hi: list[float]) -> dict[str, list[float]]:
        mean = [(a + b) / 2 for a, b in zip(lo, hi, strict=True)]
        std = [(b - a) / 4 for a, b in zip(lo, hi, strict=True)]
        q01 = [m - 1.8 * s for m, s in zip(mean, std, strict=True)]
        q99 = [m + 1.8 * s for m, s in zip(mean, std, strict=True)]
        return {"min": lo, "max": hi, "mean": mean, "std": std, "q01": q01, "q99": q99}

    state = {"x": st([-0.48], [0.21]), "y": st([-0.35], [0.39]), "z": st([0.0], [1.3]),
             "roll": st([2.2], [3.6]), "pitch": st([-1.4], [1.0]), "yaw": st([-1.9], [1.4]),
             "gripper": st([-0.001, -0.042], [0.041, 0.001])}
    action = {"x": st([-0.94], [0.94]), "y": st([-0.94], [0.94]), "z": st([-0.94], [0.94]),
              "roll": st([-0.19], [0.19]), "pitch": st([-0.31], [0.31]), "yaw": st([-0.38], [0.38]),
              "gripper": st([-1.0], [1.0])}
    return state, action


def tiny_config(vocab_size: int, image_token_index: int, bos_id: int = 0, eos_id: int = 0,
                prompt_format: str = PROMPT_UPSTREAM) -> GR00TConfig:
    """2-layer SigLIP (width 64, 112 px), 2-layer Qwen3 (hidden 128), small DiT/VL-SA, horizon 16.

    ``prompt_format`` is written to ``config.json`` so a checkpoint always states which prompt it was trained on
    (the shipped tiny checkpoint says ``project_v0``; new builds default to upstream's)."""
    llm_hidden = 128
    eagle = {
        "image_token_index": image_token_index, "mlp_connector_layers": 1, "use_pixel_shuffle": False,
        "force_image_size": 112, "select_layer": 2,
        "text_config": {"model_type": "qwen3", "vocab_size": vocab_size, "hidden_size": llm_hidden,
                        "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
                        "rope_theta": 1000000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True,
                        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": bos_id},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 240,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 14, "image_size": 112,
                          "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3},
    }
    head = {
        "action_dim": 32, "action_horizon": 16, "backbone_embedding_dim": llm_hidden, "hidden_size": 64,
        "input_embedding_dim": 96, "max_state_dim": 64, "max_num_embodiments": 32, "max_seq_len": 1024,
        "num_inference_timesteps": 4, "num_target_vision_tokens": 32,
        "diffusion_model_cfg": {"attention_head_dim": 24, "cross_attention_dim": llm_hidden, "dropout": 0.0,
                                "final_dropout": True, "interleave_self_attention": True, "norm_type": "ada_norm",
                                "num_attention_heads": 4, "num_layers": 4, "output_dim": 64,
                                "positional_embeddings": None},
        "vl_self_attention_cfg": {"attention_head_dim": 32, "dropout": 0.0, "final_dropout": True,
                                  "num_attention_heads": 4, "num_layers": 2, "positional_embeddings": None},
    }
    return GR00TConfig.from_dict({
        "model_type": "gr00t_n1_5", "architectures": ["GR00T_N1_5"], "action_dim": 32, "action_horizon": 16,
        "backbone_cfg": {"select_layer": 2, "project_to_dim": None, "eagle_path": "tiny"},
        "action_head_cfg": head, "eagle_config": eagle, "hidden_size": llm_hidden, "torch_dtype": "float32",
        "compute_dtype": "float32", "prompt_format": prompt_format,
    })


def build_tiny(seed: int = 0, prompt_format: str = PROMPT_UPSTREAM) -> GR00TPolicyModel:
    """Randomly initialised tiny GR00T with tokenizer and LIBERO metadata attached."""
    tok = train_qwen_style(VOCAB_BPE)
    vocab = ((tok.get_vocab_size() + 63) // 64) * 64
    torch.manual_seed(seed)
    cfg = tiny_config(vocab, tok.token_to_id("<IMG_CONTEXT>"), tok.token_to_id("<|endoftext|>"),
                      tok.token_to_id("<|im_end|>"), prompt_format)
    model = GR00TPolicyModel(cfg).eval()
    model.tokenizer = tok
    state, action = libero_stats()
    model.metadata = make_metadata(model.data_config, state, action)
    return model


def save_pretrained(model: GR00TPolicyModel, out: str | Path, num_shards: int = 2,
                    dtype: torch.dtype | None = None) -> Path:
    out = Path(out)
    (out / "experiment_cfg").mkdir(parents=True, exist_ok=True)
    sd = checkpoint_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    save_sharded(sd, out, num_shards=num_shards)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    (out / "experiment_cfg" / "metadata.json").write_text(json.dumps(model.metadata, indent=2) + "\n")
    if model.tokenizer is not None:
        save_tokenizer(model.tokenizer, out, {
            "tokenizer_class": "Qwen2TokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 4096, "padding_side": "left",
        })
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = build_tiny(args.seed)
    save_pretrained(model, args.out, args.shards)
    print(json.dumps({"out": str(args.out), "params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()
