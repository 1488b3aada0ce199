"""OpenVLA prompt building, tokenisation and image preprocessing (Prismatic processor semantics).

- Prompt: ``In: What action should the robot take to {instruction}?\\nOut:``; BOS is prepended by the tokenizer and
  the lone metaspace piece (Llama id 29871, ``▁``) is appended when the prompt does not already end with it.
- Batches are left-padded so every row's last prompt token is at the same index (generation appends there).
- Images: optional center crop of 90% area (LIBERO fine-tunes saw random crops in training), then per featurizer
  Prismatic's ``image_resize_strategy`` (bicubic), then DINOv2 and SigLIP normalisations stacked on channels ->
  ``[B, 6, S, S]``. The strategies follow Prismatic's vision backbones: ``resize-naive`` resizes to ``S x S``
  ignoring aspect; ``resize-crop`` is timm's eval transform, shorter side to ``S`` then a centre ``S x S`` crop;
  ``letterbox`` pads the shorter side symmetrically with the featurizer's normalisation mean as 0-255 ints
  (``int(m * 255)``) and then resizes + centre-crops. (Prismatic's training transforms give each featurizer its own
  mean as the fill; the HF ``PrismaticImageProcessor`` keeps only the last featurizer's, SigLIP's, for both: the
  checkpoints were trained with the former, which is what is followed here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from models.common.image import (
    center_crop,
    center_crop_area,
    letterbox_pad_symmetric,
    normalize,
    resize_bicubic,
    resize_shorter_bicubic,
    to_float_batch,
)
from models.openvla.config import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD, OpenVLAConfig

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
METASPACE = "\u2581"
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")


def build_prompt(instruction: str) -> str:
    """The OpenVLA prompt exactly as upstream's robot harness builds it: the instruction lower-cased and nothing
    else touched (a trailing ``?`` or space is kept, so ``"why?"`` gives ``... to why??``), because the released
    checkpoints were fine-tuned and evaluated on that string."""
    return PROMPT_TEMPLATE.format(instruction=instruction.lower())


def letterbox_fill(mean: tuple[float, ...]) -> tuple[float, ...]:
    """Prismatic's letterbox padding colour, ``int(m * 255)`` per channel, back on the [0, 1] scale."""
    return tuple(int(m * 255) / 255.0 for m in mean)


def apply_resize_strategy(x: torch.Tensor, strategy: str, size: int, mean: tuple[float, ...]) -> torch.Tensor:
    """One featurizer's resize of float BCHW images to ``size x size`` under Prismatic's ``strategy``."""
    if strategy == "resize-naive":
        return resize_bicubic(x, size)
    if strategy == "letterbox":
        x = letterbox_pad_symmetric(x, letterbox_fill(mean))
    elif strategy != "resize-crop":
        raise ValueError(f"unsupported image_resize_strategy {strategy!r}")
    return center_crop(resize_shorter_bicubic(x, size), size)


@dataclass
class OpenVLAProcessor:
    """Turns (images, instructions) into ``pixel_values``, ``input_ids`` and ``attention_mask``."""

    config: OpenVLAConfig
    tokenizer: Tokenizer
    center_crop: bool = False
    crop_area: float = 0.9

    @property
    def empty_token_id(self) -> int:
        """Id of the lone ``▁`` piece (29871 in Llama-2's vocabulary)."""
        tid = self.tokenizer.token_to_id(METASPACE)
        if tid is None:
            raise ValueError("tokenizer has no lone metaspace piece")
        return tid

    @property
    def pad_token_id(self) -> int:
        return int(self.config.pad_token_id)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (BOS first, ``▁`` last) left-padded to a common length, and the attention mask."""
        rows = []
        for p in prompts:
            ids = self.tokenizer.encode(p).ids
            if not ids or ids[-1] != self.empty_token_id:
                ids.append(self.empty_token_id)
            rows.append(ids)
        n = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), n), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, n - len(r) :] = torch.tensor(r)
            mask[i, n - len(r) :] = 1
        return input_ids, mask

    def preprocess_images(self, images: Any, center_crop: bool | None = None) -> torch.Tensor:
        """uint8 HWC image(s) -> normalised ``[B, 3*k, S, S]`` float32 (k featurizers, channels stacked)."""
        x = to_float_batch(images)
        if self.center_crop if center_crop is None else center_crop:
            x = center_crop_area(x, self.crop_area)
        strategy = self.config.image_resize_strategy
        if strategy not in RESIZE_STRATEGIES:
            raise ValueError(f"unsupported image_resize_strategy {strategy!r}")
        parts = []
        for kind, vcfg in zip(self.config.norm_kinds(), self.config.vision_configs(), strict=True):
            mean, std = (SIGLIP_MEAN, SIGLIP_STD) if kind == "siglip" else (DINO_MEAN, DINO_STD)
            parts.append(normalize(apply_resize_strategy(x, strategy, vcfg.image_size, mean), mean, std))
        return torch.cat(parts, dim=1)

    def __call__(
        self, images: Any, instructions: str | list[str], center_crop: bool | None = None
    ) -> dict[str, torch.Tensor]:
        instr = [instructions] if isinstance(instructions, str) else list(instructions)
        pixel_values = self.preprocess_images(images, center_crop)
        if pixel_values.shape[0] != len(instr):
            raise ValueError(f"{pixel_values.shape[0]} images for {len(instr)} instructions")
        input_ids, mask = self.tokenize([build_prompt(i) for i in instr])
        return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": mask}


def bin_centers(n_action_bins: int) -> np.ndarray:
    """Centres of the ``n_action_bins - 1`` intervals of ``linspace(-1, 1, n_action_bins)`` (255 for 256)."""
    bins = np.linspace(-1.0, 1.0, n_action_bins)
    return (bins[:-1] + bins[1:]) / 2.0


def token_ids_to_normalized(token_ids: np.ndarray, vocab_base: int, n_action_bins: int) -> np.ndarray:
    """Upstream mapping: ``d = vocab_base - id``; ``d = clip(d - 1, 0, n_bins - 2)``; value = ``bin_centers[d]``."""
    centers = bin_centers(n_action_bins)
    d = vocab_base - np.asarray(token_ids, dtype=np.int64)
    d = np.clip(d - 1, 0, centers.shape[0] - 1)
    return centers[d]


def unnormalize_actions(normalized: np.ndarray, action_stats: dict[str, Any]) -> np.ndarray:
    """``0.5 * (a + 1) * (q99 - q01) + q01`` where ``mask`` (default all true); masked-out dims pass through."""
    q01 = np.asarray(action_stats["q01"], dtype=np.float64)
    q99 = np.asarray(action_stats["q99"], dtype=np.float64)
    mask = np.asarray(action_stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    return np.where(mask, 0.5 * (normalized + 1.0) * (q99 - q01) + q01, normalized)
