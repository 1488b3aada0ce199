"""``OpenVLAConfig``: the released ``config.json`` of openvla/openvla-7b, read and written without remote code.

Field names follow upstream ``PrismaticConfig``/``OpenVLAConfig`` so a released ``config.json`` loads as is.
Two optional keys are our extensions, needed because tiny models cannot be described by timm ids:
``vit_configs`` (explicit ViT shapes) and ``vocab_base`` (ids below the padding; upstream 32000 =
``text_config.vocab_size - pad_to_multiple_of``, and action tokens are ``vocab_base-256 .. vocab_base-1``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig

from models.common.errors import CheckpointError
from models.common.vit import ViTConfig

MODEL_TYPE = "openvla"
ARCHITECTURE = "OpenVLAForActionPrediction"

# Prismatic's registry: vision backbone id -> timm ids, and timm id -> architecture (timm 0.9.x defaults).
VISION_BACKBONE_TO_TIMM_ID: dict[str, list[str]] = {
    "dinosiglip-vit-so-224px": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "dinov2-vit-l": ["vit_large_patch14_reg4_dinov2.lvd142m"],
    "siglip-vit-so400m": ["vit_so400m_patch14_siglip_224"],
}
TIMM_ID_TO_VIT: dict[str, ViTConfig] = {
    "vit_large_patch14_reg4_dinov2.lvd142m": ViTConfig(
        image_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_hidden_dim=4096,
        class_token=True, num_reg_tokens=4, layer_scale=True, global_pool="", act="gelu",
    ),
    "vit_so400m_patch14_siglip_224": ViTConfig(
        image_size=224, patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_hidden_dim=4304,
        class_token=False, num_reg_tokens=0, layer_scale=False, global_pool="map", act="gelu",
    ),
}
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# Llama-2-7B as OpenVLA's text_config leaves it: LlamaConfig defaults plus the padded vocabulary.
LLAMA2_7B_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048, "pad_token_id": 32000, "torch_dtype": "bfloat16",
}


@dataclass
class OpenVLAConfig:
    """Typed view of OpenVLA's ``config.json`` (unknown keys are kept in ``extra`` and written back)."""

    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "llama2-7b-pure"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    use_fused_vision_backbone: bool = True
    image_resize_strategy: str = "resize-naive"
    llm_max_length: int = 2048
    pad_token_id: int = 32000
    pad_to_multiple_of: int = 64
    n_action_bins: int = 256
    norm_stats: dict[str, Any] = field(default_factory=dict)
    text_config: dict[str, Any] = field(default_factory=lambda: dict(LLAMA2_7B_TEXT_CONFIG))
    timm_model_ids: list[str] = field(default_factory=lambda: list(VISION_BACKBONE_TO_TIMM_ID["dinosiglip-vit-so-224px"]))
    timm_override_act_layers: list[str | None] = field(default_factory=lambda: [None, None])
    image_sizes: list[int] = field(default_factory=lambda: [224, 224])
    hf_llm_id: str = "meta-llama/Llama-2-7b-hf"
    output_projector_states: bool = False
    vit_configs: list[dict[str, Any]] | None = None
    vocab_base: int | None = None
    torch_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------- derived
    @property
    def action_vocab_base(self) -> int:
        """Ids below the padding; action bin tokens are the last ``n_action_bins`` of them."""
        if self.vocab_base is not None:
            return int(self.vocab_base)
        return int(self.text_config["vocab_size"]) - int(self.pad_to_multiple_of)

    def vision_configs(self) -> list[ViTConfig]:
        """ViT architectures, from explicit ``vit_configs`` or Prismatic's timm ids."""
        if self.vit_configs:
            cfgs = [ViTConfig(**c) for c in self.vit_configs]
        else:
            unknown = [t for t in self.timm_model_ids if t not in TIMM_ID_TO_VIT]
            if unknown:
                raise CheckpointError(f"config.json: unknown timm_model_ids {unknown} and no vit_configs")
            cfgs = [copy.deepcopy(TIMM_ID_TO_VIT[t]) for t in self.timm_model_ids]
            for c, size in zip(cfgs, self.image_sizes, strict=False):
                c.image_size = int(size)
        expected = 2 if self.use_fused_vision_backbone else 1
        if len(cfgs) != expected:
            raise CheckpointError(f"config.json: {len(cfgs)} vision backbones but fused={self.use_fused_vision_backbone}")
        return cfgs

    def norm_kinds(self) -> list[str]:
        """Which normalisation each featurizer wants: SigLIP ids get 0.5/0.5, everything else DINOv2's."""
        return ["siglip" if "siglip" in t else "dino" for t in self.timm_model_ids[: len(self.vision_configs())]]

    def llama_config(self) -> LlamaConfig:
        """The Llama config the language model is built from (transformers 5 API, no hub)."""
        tc = {k: v for k, v in self.text_config.items() if k not in ("model_type", "torch_dtype", "architectures")}
        tc.setdefault("pad_token_id", self.pad_token_id)
        return LlamaConfig(**tc)

    # ----------------------------------------------------------------------------------------- json
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpenVLAConfig:
        """Parse a ``config.json`` dict, rejecting the wrong ``model_type``/architecture with a clear error."""
        mt = d.get("model_type")
        if mt != MODEL_TYPE:
            raise CheckpointError(f"config.json: model_type {mt!r} is not {MODEL_TYPE!r}")
        archs = d.get("architectures") or [ARCHITECTURE]
        if ARCHITECTURE not in archs and "PrismaticForConditionalGeneration" not in archs:
            raise CheckpointError(f"config.json: unsupported architectures {archs}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known and k not in ("model_type", "architectures")}
        text = dict(LLAMA2_7B_TEXT_CONFIG)
        text.update(d.get("text_config") or {})
        kwargs["text_config"] = text
        cfg = cls(**kwargs, extra=extra)
        if text.get("model_type", "llama") != "llama":
            raise CheckpointError(f"config.json: text_config.model_type {text.get('model_type')!r} is not 'llama'")
        if cfg.n_action_bins < 2 or cfg.action_vocab_base <= cfg.n_action_bins:
            raise CheckpointError("config.json: inconsistent n_action_bins / vocabulary size")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}
        for k in self.__dataclass_fields__:
            if k == "extra":
                continue
            v = getattr(self, k)
            if v is None and k in ("vit_configs", "vocab_base"):
                continue
            d[k] = copy.deepcopy(v)
        d.update(copy.deepcopy(self.extra))
        return d
