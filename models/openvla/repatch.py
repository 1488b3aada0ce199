"""Re-grid an OpenVLA's vision towers to another patch size, keeping everything it has learnt.

The project's tiny backbones cut a 112 px camera into 14-pixel patches, an 8x8 grid, where the released 224 px
models see 16x16; placing a bowl on a plate needs finer positions than that. Training a finer-grid model from
scratch repeats hours of CPU training, so :func:`repatch` carries a trained model over: each patch-embedding kernel
is PI-resized (``models.common.vit.resize_patch_embed``: a new patch is embedded as the old kernel embeds it
resized to the old size), the position embeddings are resampled to the new grid, and every other weight (ViT
blocks, projector, LLM) is copied unchanged; the LLM then sees ``(112 / patch)^2`` patch tokens per camera and
training adapts it (``python -m rsd.train_vla main --init DIR --patch-size 8``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging

from models.common.vit import resize_patch_embed, resize_pos_embed
from models.openvla.config import OpenVLAConfig
from models.openvla.modeling import OpenVLAForActionPrediction

logger = logging.getLogger(__name__)


def repatched_config(config: OpenVLAConfig, patch: int) -> OpenVLAConfig:
    """``config`` with every vision tower cut into ``patch``-pixel patches (explicit ``vit_configs``)."""
    cfg = copy.deepcopy(config)
    towers = [v.to_dict() for v in config.vision_configs()]
    bad = [v["image_size"] for v in towers if v["image_size"] % patch]
    if patch < 1 or bad:
        raise ValueError(f"patch size {patch} does not divide the vision towers' image sizes {bad}")
    cfg.vit_configs = [dict(v, patch_size=patch) for v in towers]
    old = {v["patch_size"] for v in towers}
    if len(old) == 1:  # the names are informational; keep them truthful
        was = f"patch{next(iter(old))}"
        cfg.timm_model_ids = [t.replace(was, f"patch{patch}") for t in config.timm_model_ids]
    return cfg


def repatch(model: OpenVLAForActionPrediction, patch: int) -> OpenVLAForActionPrediction:
    """A new model with ``patch``-pixel patches initialised from ``model`` (see the module docstring)."""
    cfg = repatched_config(model.config, patch)
    new = OpenVLAForActionPrediction(cfg)
    grid = cfg.vision_configs()[0].image_size // patch
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("vision_backbone.") and name.endswith("patch_embed.proj.weight"):
            value = resize_patch_embed(value, patch)
        elif name.startswith("vision_backbone.") and name.endswith(".pos_embed"):
            value = resize_pos_embed(value, grid)
        state[name] = value
    new.load_state_dict(state, strict=True)
    new.norm_stats = copy.deepcopy(getattr(model, "norm_stats", None))
    processor = getattr(model, "processor", None)
    if processor is not None:
        new.processor = dataclasses.replace(processor, config=cfg)
    logger.info("re-gridded the vision towers from %d to %d patches per camera (%d-pixel patches)",
                model.num_patches, new.num_patches, patch)
    return new.to(next(model.parameters()).device).train(model.training)
