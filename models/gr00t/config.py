"""``GR00TConfig``: the released ``config.json`` of nvidia/GR00T-N1.5-3B, plus the Eagle 2.5 VLM config.

Upstream builds the Eagle VLM from a config bundled inside the ``gr00t`` package (``eagle2_hg_model``), not
from the checkpoint. We keep the published values as defaults (``EAGLE_N15_DEFAULT``) and let a checkpoint
override them with an optional top-level ``eagle_config`` key (our extension; tiny checkpoints use it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from transformers import Qwen3Config, SiglipVisionConfig

from models.common.errors import CheckpointError
from models.gr00t.prompt import PROMPT_FORMATS, PROMPT_UPSTREAM

MODEL_TYPE = "gr00t_n1_5"
ARCHITECTURE = "GR00T_N1_5"

# Eagle 2.5 VL as bundled with GR00T N1.5 (Qwen3-1.7B text, SigLIP-400M/14 @224, 1-layer MLP, no pixel shuffle).
EAGLE_N15_DEFAULT: dict[str, Any] = {
    "image_token_index": 151669,
    "mlp_connector_layers": 1,
    "use_pixel_shuffle": False,
    "force_image_size": 224,
    # Released eagle2_hg_model/config.json: -1 = SigLIP ``last_hidden_state`` (last layer + post_layernorm).
    "select_layer": -1,
    "text_config": {
        "model_type": "qwen3", "vocab_size": 151680, "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "attention_bias": False,
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
        "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14, "image_size": 224,
        "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3,
    },
}

ACTION_HEAD_N15_DEFAULT: dict[str, Any] = {
    "action_dim": 32, "action_horizon": 16, "add_pos_embed": True, "backbone_embedding_dim": 2048,
    "diffusion_model_cfg": {
        "attention_head_dim": 48, "cross_attention_dim": 2048, "dropout": 0.2, "final_dropout": True,
        "interleave_self_attention": True, "norm_type": "ada_norm", "num_attention_heads": 32,
        "num_layers": 16, "output_dim": 1024, "positional_embeddings": None,
    },
    "hidden_size": 1024, "input_embedding_dim": 1536, "max_action_dim": 32, "max_state_dim": 64,
    "max_num_embodiments": 32, "max_seq_len": 1024, "model_dtype": "float32", "noise_beta_alpha": 1.5,
    "noise_beta_beta": 1.0, "noise_s": 0.999, "num_inference_timesteps": 4, "num_target_vision_tokens": 32,
    "num_timestep_buckets": 1000, "tune_diffusion_model": True, "tune_projector": True, "use_vlln": True,
    "vl_self_attention_cfg": {
        "attention_head_dim": 64, "dropout": 0.2, "final_dropout": True, "num_attention_heads": 32,
        "num_layers": 4, "positional_embeddings": None,
    },
}

BACKBONE_N15_DEFAULT: dict[str, Any] = {
    "eagle_path": "NVEagle/eagle_er-qwen3_1_7B-Siglip2_400M_stage1_5_128gpu_er_v7_1mlp_nops",
    "load_bf16": False, "project_to_dim": None, "reproject_vision": False, "select_layer": 12,
    "tune_llm": False, "tune_visual": True, "use_flash_attention": True,
}

# GR00T N1.5 embodiment tag -> row of the per-embodiment (CategorySpecific) weights.
EMBODIMENT_TAG_MAPPING: dict[str, int] = {"new_embodiment": 31, "oxe_droid": 17, "agibot_genie1": 26, "gr1": 24}


def _merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@dataclass
class GR00TConfig:
    """Typed view of GR00T N1.5's ``config.json``."""

    action_dim: int = 32
    action_horizon: int = 16
    backbone_cfg: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(BACKBONE_N15_DEFAULT))
    action_head_cfg: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(ACTION_HEAD_N15_DEFAULT))
    eagle_config: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(EAGLE_N15_DEFAULT))
    compute_dtype: str = "bfloat16"
    hidden_size: int = 2048
    model_dtype: str = "float32"
    torch_dtype: str = "bfloat16"
    embodiment_tag_mapping: dict[str, int] = field(default_factory=lambda: dict(EMBODIMENT_TAG_MAPPING))
    # Our key (absent in released checkpoints => upstream); see models/gr00t/prompt.py.
    prompt_format: str = PROMPT_UPSTREAM
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def select_layer(self) -> int:
        return int(self.backbone_cfg.get("select_layer", 12))

    @property
    def head(self) -> dict[str, Any]:
        return self.action_head_cfg

    def qwen3_config(self) -> Qwen3Config:
        tc = {k: v for k, v in self.eagle_config["text_config"].items()
              if k not in ("model_type", "architectures", "torch_dtype")}
        return Qwen3Config(**tc)

    def siglip_config(self) -> SiglipVisionConfig:
        vc = {k: v for k, v in self.eagle_config["vision_config"].items()
              if k not in ("model_type", "architectures", "torch_dtype")}
        return SiglipVisionConfig(**vc)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GR00TConfig:
        mt = d.get("model_type")
        if mt != MODEL_TYPE:
            raise CheckpointError(f"config.json: model_type {mt!r} is not {MODEL_TYPE!r}")
        archs = d.get("architectures") or [ARCHITECTURE]
        if ARCHITECTURE not in archs:
            raise CheckpointError(f"config.json: unsupported architectures {archs}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        kw["backbone_cfg"] = _merge(BACKBONE_N15_DEFAULT, d.get("backbone_cfg"))
        kw["action_head_cfg"] = _merge(ACTION_HEAD_N15_DEFAULT, d.get("action_head_cfg"))
        kw["eagle_config"] = _merge(EAGLE_N15_DEFAULT, d.get("eagle_config"))
        extra = {k: v for k, v in d.items() if k not in known and k not in ("model_type", "architectures")}
        cfg = cls(**kw, extra=extra)
        if cfg.eagle_config["text_config"].get("model_type", "qwen3") != "qwen3":
            raise CheckpointError("config.json: eagle text model must be qwen3")
        if cfg.eagle_config.get("use_pixel_shuffle") or int(cfg.eagle_config.get("mlp_connector_layers", 1)) != 1:
            raise CheckpointError("config.json: only the N1.5 Eagle layout (1-layer MLP, no pixel shuffle) is supported")
        if cfg.prompt_format not in PROMPT_FORMATS:
            raise CheckpointError(f"config.json: prompt_format {cfg.prompt_format!r} not one of {PROMPT_FORMATS}")
        n_vit = int(cfg.eagle_config["vision_config"]["num_hidden_layers"])
        if not -(n_vit + 1) <= int(cfg.eagle_config.get("select_layer", -1)) <= n_vit:
            raise CheckpointError(f"config.json: eagle_config.select_layer outside -{n_vit + 1}..{n_vit}")
        n_llm = int(cfg.eagle_config["text_config"]["num_hidden_layers"])
        if not 0 < cfg.select_layer <= n_llm:
            raise CheckpointError(f"config.json: backbone_cfg.select_layer {cfg.select_layer} outside 1..{n_llm}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        for k in self.__dataclass_fields__:
            if k != "extra":
                d[k] = copy.deepcopy(getattr(self, k))
        d.update(copy.deepcopy(self.extra))
        return d
