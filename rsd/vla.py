"""OpenVLA-RSD: the Prismatic backbone + RFSQ layer head + draft + robust RFSQ tokenizer, as one policy model.

Checkpoint directory (the released OpenVLA layout, plus an ``rsd/`` folder)::

    config.json, model-0000K-of-0000N.safetensors, model.safetensors.index.json,
    dataset_statistics.json, tokenizer files              <- the backbone, loaded by models.load_pretrained
    rsd/rsd_config.json                                    <- head sizes, draft/tokenizer folders, preprocessing
    rsd/rsd_head.safetensors                               <- RFSQ layer embedding + head (not the LLM)
    rsd/rfsq/                                              <- RFSQTokenizer.save_pretrained
    rsd/draft/                                             <- RFSQDraftModel.save

A 7B directory gets the same ``rsd/`` folder next to its shards; the LLM weights are never duplicated.
The backbone's LLM is shared by reference with the layer head, so fine-tuning the head trains the LLM too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rsd.layer_head import RFSQLayerHeadModel

logger = logging.getLogger(__name__)

RSD_DIR = "rsd"
RSD_CONFIG = "rsd_config.json"
RSD_HEAD = "rsd_head.safetensors"


@dataclass
class VLARSDConfig:
    """What the policy needs besides the backbone: sizes, preprocessing and where the parts live."""

    num_layers: int = 8
    codes_per_layer: int = 128
    levels: int = 7
    center_crop: bool = True  # trained with random 90%-area crops -> centre crop at inference (OpenVLA)
    rfsq_dir: str = "rfsq"
    draft_dir: str = "draft"
    trained_on: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLARSDConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class OpenVLARSD(nn.Module):
    """Backbone (OpenVLAForActionPrediction) + :class:`RFSQLayerHeadModel` sharing its LLM."""

    def __init__(self, backbone: nn.Module, cfg: VLARSDConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.main = RFSQLayerHeadModel(backbone.language_model, cfg.num_layers, cfg.codes_per_layer, cfg.levels)
        self.draft: nn.Module | None = None
        self.tokenizer: Any = None

    @property
    def processor(self) -> Any:
        return self.backbone.processor

    @property
    def hidden_size(self) -> int:
        return self.main.hidden_size

    def prefix(self, images: Any, instructions: list[str], center_crop: bool | None = None,
               pixel_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Image + prompt -> left-padded ``inputs_embeds`` and attention mask, ready for ``main.prefill``."""
        proc = self.processor
        crop = self.cfg.center_crop if center_crop is None else center_crop
        if pixel_values is None:
            pixel_values = proc.preprocess_images(images, crop)
        from models.openvla.processing import build_prompt

        input_ids, mask = proc.tokenize([build_prompt(i) for i in instructions])
        device = next(self.backbone.parameters()).device
        input_ids, mask = input_ids.to(device), mask.to(device)
        embeds = self.backbone.embed_prefix(pixel_values.to(device), input_ids, mask)
        full_mask = self.backbone.extend_attention_mask(mask, *input_ids.shape).to(device)
        return embeds, full_mask

    def training_loss(self, pixel_values: Tensor, instructions: list[str], layers: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced cross-entropy over all RFSQ layers (``layers`` ``[B, L, 128]``)."""
        embeds, mask = self.prefix(None, instructions, pixel_values=pixel_values)
        return self.main(embeds, layers, mask)

    # ------------------------------------------------------------------ persistence
    def save_rsd(self, out: str | Path) -> Path:
        """Write the ``rsd/`` folder (head, tokenizer, draft, config). The backbone is saved separately."""
        d = Path(out) / RSD_DIR
        d.mkdir(parents=True, exist_ok=True)
        head = {k: v.detach().contiguous().cpu().clone() for k, v in self.main.head_state_dict().items()}
        save_file(head, str(d / RSD_HEAD), metadata={"format": "pt", "kind": "rsd-layer-head"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(d / self.cfg.rfsq_dir)
        if self.draft is not None:
            self.draft.save(d / self.cfg.draft_dir)
        (d / RSD_CONFIG).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        return d


def has_rsd_parts(path: str | Path) -> bool:
    return (Path(path) / RSD_DIR / RSD_CONFIG).is_file()


def load_openvla_rsd(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     with_draft: bool = True) -> OpenVLARSD:
    """Load backbone (streamed, via models.load_pretrained), head, RFSQ tokenizer and draft from ``path``."""
    import models
    from models import CheckpointError
    from rsd.draft import load_draft
    from rsd.rfsq import RFSQTokenizer

    root = Path(path)
    rsd_root = root / RSD_DIR
    if not (rsd_root / RSD_CONFIG).is_file():
        raise CheckpointError(f"{rsd_root / RSD_CONFIG} is missing: {root} is not an OpenVLA-RSD checkpoint "
                              "(train one with scripts/train_default_model.sh, or serve it with --policy openvla)")
    cfg = VLARSDConfig.from_dict(json.loads((rsd_root / RSD_CONFIG).read_text()))
    backbone = models.load_pretrained("openvla-rsd", root, device=device, dtype=dtype)
    model = OpenVLARSD(backbone, cfg)
    head_file = rsd_root / RSD_HEAD
    try:
        head = load_file(str(head_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CheckpointError(f"{head_file}: cannot read ({exc})") from None
    missing, unexpected = model.main.load_state_dict(head, strict=False)
    missing = [m for m in missing if not m.startswith("llm.")]
    if missing or unexpected:
        raise CheckpointError(f"{head_file}: missing {missing}, unexpected {unexpected}")
    model.main.to(device=device, dtype=dtype)
    model.tokenizer = RFSQTokenizer.from_pretrained(rsd_root / cfg.rfsq_dir)
    if with_draft and (rsd_root / cfg.draft_dir).is_dir():
        model.draft = load_draft(rsd_root / cfg.draft_dir, device=device).to(dtype).eval()
    return model.eval()


def chunk_actions_from_tokens(model: OpenVLARSD, layers: Tensor, depth: int | None = None) -> np.ndarray:
    """RFSQ layers ``[B, L, 128]`` -> unnormalised action chunks ``[B, H, 7]`` (float32) from the first ``depth``."""
    from rsd.rfsq import layers_to_tokens

    tok = model.tokenizer
    actions = tok.decode(layers_to_tokens(layers.cpu(), tok.chunk_len, tok.config.latent_dim), depth)
    return np.asarray(actions.detach().cpu().numpy() if isinstance(actions, Tensor) else actions, dtype=np.float32)
