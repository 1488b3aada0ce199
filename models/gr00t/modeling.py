"""``GR00TPolicyModel``: GR00T N1.5 (``backbone`` + ``action_head``) plus its LIBERO I/O.

Checkpoint names equal the released ones except one level: the checkpoint's
``backbone.eagle_model.vision_model.vision_model.X`` is our ``backbone.eagle_model.vision_model.X``
(transformers 5's ``SiglipVisionModel`` has no inner ``vision_model``). Qwen3's ``lm_head`` is tied to the
embeddings; either name is accepted when loading and only ``embed_tokens`` is written when saving.

Text prompt: ``config.prompt_format`` picks upstream's Eagle 2.5 chat prompt (the default, and what released
checkpoints need) or the project's legacy prompt (the shipped tiny checkpoint); see ``models/gr00t/prompt.py``.
Rows are left-padded with ``<|endoftext|>``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from models.common.image import center_crop_area, normalize, resize_bilinear, to_float_batch
from models.gr00t.action_head import FlowmatchingActionHead
from models.gr00t.backbone import EagleBackbone
from models.gr00t.config import GR00TConfig
from models.gr00t.data_config import LANGUAGE_KEY, LiberoDataConfig
from models.gr00t.prompt import (
    EAGLE25_CHAT_TEMPLATE,
    INSTRUCTION_LIST_REPR,
    PROMPT_LEGACY,
    legacy_prompt_ids,
    upstream_prompt_ids,
)

logger = logging.getLogger(__name__)

_CKPT_VISION = "backbone.eagle_model.vision_model.vision_model."
_MOD_VISION = "backbone.eagle_model.vision_model."
_EMBED = "backbone.eagle_model.language_model.model.embed_tokens.weight"
_LM_HEAD = "backbone.eagle_model.language_model.lm_head.weight"
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class GR00TPolicyModel(nn.Module):
    """GR00T N1.5 with ``get_action(obs_batch) -> [B, 16, 7]`` for LIBERO-style observations."""

    def __init__(self, config: GR00TConfig, data_config: LiberoDataConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = EagleBackbone(config)
        self.action_head = FlowmatchingActionHead(config.action_head_cfg)
        self.data_config = data_config or LiberoDataConfig()
        self.tokenizer: Tokenizer | None = None
        self.chat_template = EAGLE25_CHAT_TEMPLATE  # replaced by the checkpoint's own template when it ships one
        self.instruction_text = INSTRUCTION_LIST_REPR  # upstream inference's list repr (models/gr00t/prompt.py)
        self.metadata: dict[str, Any] = {}
        self.denoising_steps = int(config.action_head_cfg["num_inference_timesteps"])
        self.initial_noise = "gaussian"  # where the sampler starts: gaussian (upstream) | zero (action_head.py)

    # ------------------------------------------------------------------ checkpoint naming
    @staticmethod
    def to_checkpoint_key(module_key: str) -> str:
        if module_key.startswith(_MOD_VISION):
            return _CKPT_VISION + module_key[len(_MOD_VISION):]
        return module_key

    @staticmethod
    def from_checkpoint_key(checkpoint_key: str) -> str:
        if checkpoint_key.startswith(_CKPT_VISION):
            return _MOD_VISION + checkpoint_key[len(_CKPT_VISION):]
        return checkpoint_key

    def tied_aliases(self) -> dict[str, str]:
        """Module keys that are the same tensor as another key (saved once)."""
        if self.config.eagle_config["text_config"].get("tie_word_embeddings", True):
            return {_LM_HEAD: _EMBED}
        return {}

    def checkpoint_aliases(self) -> dict[str, str]:
        """A released file may store the tied matrix under ``lm_head`` instead of ``embed_tokens``."""
        return {_LM_HEAD: _EMBED} if self.tied_aliases() else {}

    def after_load(self) -> None:
        lm = self.backbone.eagle_model.language_model
        if self.tied_aliases():
            lm.lm_head.weight = lm.model.embed_tokens.weight
        self.eval()

    # ------------------------------------------------------------------ inputs
    @property
    def embodiment_id(self) -> int:
        tag = self.data_config.embodiment_tag
        if tag not in self.config.embodiment_tag_mapping:
            raise KeyError(f"unknown embodiment tag {tag!r}; known: {sorted(self.config.embodiment_tag_mapping)}")
        return int(self.config.embodiment_tag_mapping[tag])

    @property
    def image_size(self) -> int:
        return int(self.config.eagle_config.get("force_image_size") or self.config.eagle_config["vision_config"]["image_size"])

    @property
    def tokens_per_image(self) -> int:
        patch = int(self.config.eagle_config["vision_config"]["patch_size"])
        return (self.image_size // patch) ** 2

    def _special(self, token: str) -> int:
        assert self.tokenizer is not None
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer lacks special token {token!r}")
        return tid

    def build_input_ids(self, instructions: list[str], num_views: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids (format per ``config.prompt_format``) with image placeholders, left-padded;
        returns ``(input_ids, mask)``."""
        if self.tokenizer is None:
            raise RuntimeError("no tokenizer attached (load with models.load_pretrained)")
        ctx = int(self.config.eagle_config["image_token_index"])
        if self.tokenizer.token_to_id("<IMG_CONTEXT>") not in (None, ctx):
            raise ValueError("tokenizer's <IMG_CONTEXT> id differs from config image_token_index")
        n_tok = self.tokens_per_image
        if self.config.prompt_format == PROMPT_LEGACY:
            rows = [legacy_prompt_ids(self.tokenizer, t, num_views, n_tok, ctx) for t in instructions]
        else:
            rows = [upstream_prompt_ids(self.tokenizer, t, num_views, n_tok, self.chat_template, ctx,
                                        self.instruction_text) for t in instructions]
        n = max(len(r) for r in rows)
        pad = self._special("<|endoftext|>")
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, n - len(r):] = torch.tensor(r)
            mask[i, n - len(r):] = 1
        return ids, mask

    def preprocess_video(self, frames: Any) -> torch.Tensor:
        """``[B, H, W, 3]`` (or ``[B, T, H, W, 3]``, last frame used) uint8 -> ``[B, 3, S, S]`` SigLIP-normalised.

        Eval-time GR00T video transforms: ``VideoCrop(scale=0.95)`` (centred), ``VideoResize(224, "linear")``.
        """
        arr = frames if isinstance(frames, (np.ndarray, torch.Tensor)) else np.asarray(frames)
        if arr.ndim == 5:
            arr = arr[:, -1]
        x = to_float_batch(arr)
        if self.data_config.crop_scale < 1.0:
            x = center_crop_area(x, self.data_config.crop_scale**2)
        return normalize(resize_bilinear(x, self.image_size), SIGLIP_MEAN, SIGLIP_STD)

    def prepare_inputs(self, obs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """GR00T observation dict -> model tensors (pixel_values ``[B, V, 3, S, S]``, ids, mask, state, embodiment)."""
        instr = obs[LANGUAGE_KEY]
        instr = [instr] if isinstance(instr, str) else [str(i) for i in instr]
        views = [self.preprocess_video(obs[k]) for k in self.data_config.video_keys]
        pixel_values = torch.stack(views, dim=1)
        b = pixel_values.shape[0]
        if len(instr) != b:
            raise ValueError(f"{b} observations but {len(instr)} instructions")
        ids, mask = self.build_input_ids(instr, len(views))
        state = torch.zeros(b, 1, int(self.config.action_head_cfg["max_state_dim"]))
        s = self.data_config.normalize_state(obs, self.metadata)
        state[:, 0, : s.shape[1]] = torch.from_numpy(s).float()
        device = self.action_head.future_tokens.weight.device
        return {
            "pixel_values": pixel_values.to(device), "input_ids": ids.to(device),
            "attention_mask": mask.to(device), "state": state.to(device),
            "embodiment_id": torch.full((b,), self.embodiment_id, dtype=torch.long, device=device),
        }

    # ------------------------------------------------------------------ inference / training
    def backbone_features(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])

    @torch.no_grad()
    def get_normalized_action(self, inputs: dict[str, torch.Tensor], denoising_steps: int | None = None,
                              generator: torch.Generator | None = None) -> torch.Tensor:
        """Model-space actions ``[B, horizon, action_dim(32)]`` in ``[-1, 1]``-ish units."""
        feats, mask = self.backbone_features(inputs)
        return self.action_head.get_action(feats, mask, inputs["state"], inputs["embodiment_id"],
                                           denoising_steps or self.denoising_steps, generator, self.initial_noise)

    @torch.no_grad()
    def get_action(self, obs_batch: dict[str, Any], denoising_steps: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """LIBERO-style observations -> unnormalised actions ``[B, 16, 7]`` (float32)."""
        inputs = self.prepare_inputs(obs_batch)
        norm = self.get_normalized_action(inputs, denoising_steps, generator).float().cpu().numpy()
        return torch.from_numpy(self.data_config.unnormalize_action(norm, self.metadata)).float()

    def get_action_dict(self, obs_batch: dict[str, Any], denoising_steps: int | None = None,
                        generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
        """Upstream reply format: ``{"action.x": [B, 16, 1], ...}``."""
        return self.data_config.split_actions(self.get_action(obs_batch, denoising_steps, generator).numpy())

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training forward: ``inputs`` from ``prepare_inputs`` plus ``action`` ``[B, H, 32]`` (normalised,
        zero-padded) and ``action_mask`` (1 on real dims). Returns ``{"loss": ...}``."""
        feats, mask = self.backbone_features(inputs)
        loss = self.action_head(feats, mask, inputs["state"], inputs["embodiment_id"],
                                inputs["action"], inputs["action_mask"])
        return {"loss": loss}

    def training_inputs(self, obs_batch: dict[str, Any], actions: np.ndarray) -> dict[str, torch.Tensor]:
        """Observations + raw ``[B, H, 7]`` actions -> inputs for ``forward`` (normalise, pad to 32 dims)."""
        inputs = self.prepare_inputs(obs_batch)
        a = self.data_config.normalize_action(np.asarray(actions, dtype=np.float64), self.metadata)
        b, h, d = a.shape
        full = torch.zeros(b, h, self.action_head.action_dim)
        full[..., :d] = torch.from_numpy(a).float()
        amask = torch.zeros_like(full)
        amask[..., :d] = 1.0
        device = inputs["state"].device
        inputs["action"], inputs["action_mask"] = full.to(device), amask.to(device)
        return inputs
