"""OpenVLA-RSD: the Prismatic backbone + RFSQ layer head + draft + robust RFSQ tokenizer, as one policy model.

Checkpoint directory (the released OpenVLA layout, plus an ``rsd/`` folder)::

    config.json, model-0000K-of-0000N.safetensors, model.safetensors.index.json,
    dataset_statistics.json, tokenizer files              <- the backbone, loaded by models.load_pretrained
    rsd/rsd_config.json                                    <- head sizes, draft/tokenizer folders, preprocessing
    rsd/rsd_head.safetensors                               <- RFSQ layer embedding + head (not the LLM)
    rsd/proprio_projector.safetensors                      <- only with ``use_proprio``: state -> one LLM token
    rsd/rfsq/                                              <- RFSQTokenizer.save_pretrained
    rsd/draft/                                             <- RFSQDraftModel.save

A 7B directory gets the same ``rsd/`` folder next to its shards; the LLM weights are never duplicated.
The backbone's LLM is shared by reference with the layer head, so fine-tuning the head trains the LLM too.

Optional inputs (as OpenVLA-OFT; both off by default, so a checkpoint whose config lacks the keys is unchanged):
``use_wrist_image`` runs the wrist camera through the same vision towers + projector and inserts its patches right
after the third-person ones; ``use_proprio`` normalises the 8-D LIBERO state with the training split's mean/std and
projects it (:class:`ProprioProjector`) to one extra token at the end of the prefix, the position whose hidden state
the layer head reads for layer 0.
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

from models.openvla.oft import ProprioProjector  # OpenVLA-OFT's module: the same keys as its file
from rsd.layer_head import RFSQLayerHeadModel

logger = logging.getLogger(__name__)

RSD_DIR = "rsd"
RSD_CONFIG = "rsd_config.json"
RSD_HEAD = "rsd_head.safetensors"
PROPRIO_PROJECTOR = "proprio_projector.safetensors"


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
    use_proprio: bool = False  # one extra prefix token from the normalised robot state
    use_wrist_image: bool = False  # wrist-camera patches after the third-person ones
    proprio_dim: int = 8  # LIBERO: eef pos 3, axis-angle 3, gripper qpos 2
    proprio_mean: list[float] | None = None  # training-split statistics (None: identity normalisation)
    proprio_std: list[float] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLARSDConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _insert_rows(embeds: Tensor, extra: Tensor, at: Tensor) -> Tensor:
    """Insert ``extra[b]`` (``[B, P, D]``) into ``embeds[b]`` before index ``at[b]`` (rows differ by left padding)."""
    if bool((at == at[0]).all()):
        i = int(at[0])
        return torch.cat([embeds[:, :i], extra, embeds[:, i:]], dim=1)
    return torch.stack([torch.cat([embeds[b, : int(i)], extra[b], embeds[b, int(i):]]) for b, i in enumerate(at)])


class OpenVLARSD(nn.Module):
    """Backbone (OpenVLAForActionPrediction) + :class:`RFSQLayerHeadModel` sharing its LLM."""

    def __init__(self, backbone: nn.Module, cfg: VLARSDConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.main = RFSQLayerHeadModel(backbone.language_model, cfg.num_layers, cfg.codes_per_layer, cfg.levels)
        self.proprio_projector: ProprioProjector | None = (
            ProprioProjector(self.main.hidden_size, cfg.proprio_dim) if cfg.use_proprio else None)
        self.draft: nn.Module | None = None
        self.tokenizer: Any = None

    @property
    def processor(self) -> Any:
        return self.backbone.processor

    @property
    def hidden_size(self) -> int:
        return self.main.hidden_size

    @property
    def input_keys(self) -> list[str]:
        """LIBERO observation keys the model reads (the policy requires exactly these)."""
        return (["image"] + (["wrist_image"] if self.cfg.use_wrist_image else [])
                + (["state"] if self.cfg.use_proprio else []) + ["instruction"])

    def normalize_states(self, states: Any, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Raw ``[B, proprio_dim]`` states -> ``(s - mean) / std`` with the training split's statistics."""
        s = torch.as_tensor(np.asarray(states, dtype=np.float32)).to(device=device, dtype=torch.float32)
        if s.ndim != 2 or s.shape[1] != self.cfg.proprio_dim:
            raise ValueError(f"states must be [B, {self.cfg.proprio_dim}], got {tuple(s.shape)}")
        if self.cfg.proprio_mean is not None:
            s = s - torch.tensor(self.cfg.proprio_mean, dtype=torch.float32, device=device)
        if self.cfg.proprio_std is not None:
            s = s / torch.tensor(self.cfg.proprio_std, dtype=torch.float32, device=device).clamp_min(1e-6)
        return s.to(dtype)

    def prefix(self, images: Any, instructions: list[str], center_crop: bool | None = None,
               pixel_values: Tensor | None = None, states: Any = None, wrist_images: Any = None,
               wrist_pixel_values: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Image(s) + prompt (+ state) -> left-padded ``inputs_embeds`` and attention mask for ``main.prefill``.

        Layout per row: padding, BOS, third-person patches, wrist patches (``use_wrist_image``), the rest of the
        prompt, the proprio token (``use_proprio``). ``states``/wrist inputs are ignored when the config does not
        use them, so callers may always pass what they have.
        """
        proc = self.processor
        crop = self.cfg.center_crop if center_crop is None else center_crop
        if self.cfg.use_proprio and states is None:
            raise ValueError("this OpenVLA-RSD model uses proprio (use_proprio): pass states [B, "
                             f"{self.cfg.proprio_dim}]")
        if self.cfg.use_wrist_image and wrist_pixel_values is None and wrist_images is None:
            raise ValueError("this OpenVLA-RSD model uses the wrist camera (use_wrist_image): pass wrist_images "
                             "or wrist_pixel_values")
        if pixel_values is None:
            pixel_values = proc.preprocess_images(images, crop)
        from models.openvla.processing import build_prompt

        input_ids, mask = proc.tokenize([build_prompt(i) for i in instructions])
        device = next(self.backbone.parameters()).device
        input_ids, mask = input_ids.to(device), mask.to(device)
        embeds = self.backbone.embed_prefix(pixel_values.to(device), input_ids, mask)
        full_mask = self.backbone.extend_attention_mask(mask, *input_ids.shape).to(device)
        extra = []
        if self.cfg.use_wrist_image:
            if wrist_pixel_values is None:
                wrist_pixel_values = proc.preprocess_images(wrist_images, crop)
            wrist = self.backbone.project_patches(wrist_pixel_values.to(device)).to(embeds.dtype)
            # Row b's BOS sits after its left padding; the third-person patches follow it.
            at = (mask == 0).sum(1) + 1 + self.backbone.num_patches
            embeds = _insert_rows(embeds, wrist, at)
            extra.append(wrist.shape[1])
        if self.proprio_projector is not None:
            dtype = self.proprio_projector.fc1.weight.dtype
            token = self.proprio_projector(self.normalize_states(states, device, dtype)).to(embeds.dtype)
            embeds = torch.cat([embeds, token[:, None]], dim=1)
            extra.append(1)
        if extra:  # left padding: the new positions are all attended, so their ones go on the right
            full_mask = torch.cat([full_mask, full_mask.new_ones(full_mask.shape[0], sum(extra))], dim=1)
        return embeds, full_mask

    def training_loss(self, pixel_values: Tensor, instructions: list[str], layers: Tensor, states: Any = None,
                      wrist_pixel_values: Tensor | None = None,
                      layer_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher-forced cross-entropy over all RFSQ layers (``layers`` ``[B, L, 128]``), optionally weighted per
        layer (see :meth:`rsd.layer_head.RFSQLayerHeadModel.forward`)."""
        embeds, mask = self.prefix(None, instructions, pixel_values=pixel_values, states=states,
                                   wrist_pixel_values=wrist_pixel_values)
        return self.main(embeds, layers, mask, layer_weights=layer_weights)

    # ------------------------------------------------------------------ persistence
    def save_rsd(self, out: str | Path) -> Path:
        """Write the ``rsd/`` folder (head, tokenizer, draft, config). The backbone is saved separately."""
        d = Path(out) / RSD_DIR
        d.mkdir(parents=True, exist_ok=True)
        head = {k: v.detach().contiguous().cpu().clone() for k, v in self.main.head_state_dict().items()}
        save_file(head, str(d / RSD_HEAD), metadata={"format": "pt", "kind": "rsd-layer-head"})
        if self.proprio_projector is not None:
            proj = {k: v.detach().contiguous().cpu().clone() for k, v in self.proprio_projector.state_dict().items()}
            save_file(proj, str(d / PROPRIO_PROJECTOR), metadata={"format": "pt", "kind": "proprio-projector"})
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
    load_layer_head(model, root)
    model.main.to(device=device, dtype=dtype)
    if model.proprio_projector is not None:
        load_proprio_projector(model, root)
        model.proprio_projector.to(device=device, dtype=dtype)
    model.tokenizer = RFSQTokenizer.from_pretrained(rsd_root / cfg.rfsq_dir)
    if with_draft and (rsd_root / cfg.draft_dir).is_dir():
        model.draft = load_draft(rsd_root / cfg.draft_dir, device=device).to(dtype).eval()
    return model.eval()


def _load_part(module: nn.Module, path: str | Path, name: str, strict: bool) -> tuple[list[str], list[str]]:
    """``path/rsd/<name>`` into ``module``; an unreadable file or a shape mismatch is a ``CheckpointError``."""
    from models import CheckpointError

    file = Path(path) / RSD_DIR / name
    try:
        state = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a missing or bad file
        raise CheckpointError(f"{file}: cannot read ({exc})") from None
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:  # a shape mismatch: another LLM width, RFSQ or state size
        raise CheckpointError(f"{file}: {exc}") from None


def load_layer_head(model: OpenVLARSD, path: str | Path) -> None:
    """``path/rsd/rsd_head.safetensors`` into ``model.main`` (its LLM is the backbone's, not in the file)."""
    from models import CheckpointError

    missing, unexpected = _load_part(model.main, path, RSD_HEAD, strict=False)
    missing = [m for m in missing if not m.startswith("llm.")]
    if missing or unexpected:
        raise CheckpointError(f"{Path(path) / RSD_DIR / RSD_HEAD}: missing {missing}, unexpected {unexpected}")


def load_proprio_projector(model: OpenVLARSD, path: str | Path) -> None:
    """``path/rsd/proprio_projector.safetensors`` into ``model.proprio_projector`` (the config sets use_proprio)."""
    assert model.proprio_projector is not None
    _load_part(model.proprio_projector, path, PROPRIO_PROJECTOR, strict=True)


def chunk_actions_from_tokens(model: OpenVLARSD, layers: Tensor, depth: int | None = None) -> np.ndarray:
    """RFSQ layers ``[B, L, 128]`` -> unnormalised action chunks ``[B, H, 7]`` (float32) from the first ``depth``."""
    from rsd.rfsq import layers_to_tokens

    tok = model.tokenizer
    actions = tok.decode(layers_to_tokens(layers.cpu(), tok.chunk_len, tok.config.latent_dim), depth)
    return np.asarray(actions.detach().cpu().numpy() if isinstance(actions, Tensor) else actions, dtype=np.float32)
