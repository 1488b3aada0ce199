"""OpenVLA checkpoint directory -> ``OpenVLAForActionPrediction`` (meta build, streamed, validated)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from models.common.loading import assert_fully_loaded, init_empty_weights, read_json, stream_load
from models.common.tokenizer import load_tokenizer
from models.openvla.config import OpenVLAConfig
from models.openvla.modeling import OpenVLAForActionPrediction
from models.openvla.processing import OpenVLAProcessor

logger = logging.getLogger(__name__)


def read_config(path: str | os.PathLike[str]) -> OpenVLAConfig:
    return OpenVLAConfig.from_dict(read_json(Path(path) / "config.json"))


def build_empty(path: str | os.PathLike[str] | OpenVLAConfig) -> OpenVLAForActionPrediction:
    """The architecture with parameters on ``meta`` (from a directory's config.json or a config object)."""
    cfg = path if isinstance(path, OpenVLAConfig) else read_config(path)
    with init_empty_weights():
        return OpenVLAForActionPrediction(cfg)


def load(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> OpenVLAForActionPrediction:
    root = Path(path)
    model = build_empty(root)
    stream_load(model, root, dtype=dtype, device=device, checkpoint_aliases=model.checkpoint_aliases())
    assert_fully_loaded(model, root)
    stats_file = root / "dataset_statistics.json"
    if stats_file.exists():
        model.norm_stats = read_json(stats_file)
    if not model.norm_stats:
        logger.warning("%s: no norm_stats; predict_action will need them", root)
    model.processor = OpenVLAProcessor(model.config, load_tokenizer(root))
    model.after_load()
    return model.to(device)
