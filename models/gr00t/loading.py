"""GR00T N1.5 checkpoint directory -> ``GR00TPolicyModel`` (meta build, streamed, validated)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from models.common.errors import CheckpointError
from models.common.loading import assert_fully_loaded, init_empty_weights, read_json, stream_load
from models.common.tokenizer import load_tokenizer
from models.gr00t.config import GR00TConfig
from models.gr00t.modeling import GR00TPolicyModel
from models.gr00t.prompt import read_chat_template

logger = logging.getLogger(__name__)


def read_config(path: str | os.PathLike[str]) -> GR00TConfig:
    return GR00TConfig.from_dict(read_json(Path(path) / "config.json"))


def build_empty(path: str | os.PathLike[str] | GR00TConfig) -> GR00TPolicyModel:
    """The architecture with parameters on ``meta`` (from a directory's config.json or a config object)."""
    cfg = path if isinstance(path, GR00TConfig) else read_config(path)
    with init_empty_weights():
        return GR00TPolicyModel(cfg)


def load(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> GR00TPolicyModel:
    root = Path(path)
    model = build_empty(root)
    stream_load(model, root, dtype=dtype, device=device, checkpoint_aliases=model.checkpoint_aliases())
    model.after_load()
    assert_fully_loaded(model, root)
    model.metadata = read_json(root / "experiment_cfg" / "metadata.json")
    tag = model.data_config.embodiment_tag
    if tag not in model.metadata:
        raise CheckpointError(f"{root / 'experiment_cfg' / 'metadata.json'}: no statistics for embodiment {tag!r}")
    model.tokenizer = load_tokenizer(root)
    model.chat_template = read_chat_template(root)
    return model.to(device)
