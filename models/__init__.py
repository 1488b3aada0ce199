"""Model zoo: OpenVLA (Prismatic) and GR00T N1.5, loaded from local released-format checkpoints.

Public entry points:

- ``load_pretrained(policy, path, device="cpu", dtype=torch.float32)``: build on the meta device, stream the
  safetensors shards one tensor at a time, validate everything, attach tokenizer/statistics, return an
  eval-mode ``nn.Module``.
- ``build_for_scan(policy, path)``: the same architecture from ``config.json`` alone, parameters on ``meta``
  (for ``python -m quant.scan``: names and shapes without memory).
- ``shipped_checkpoint(name)``: the directory of a checkpoint shipped inside this package (``EMBEDDED_OPENVLA_RSD``,
  ``EMBEDDED_GR00T``), found through the package, not the repository layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from models.common.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

POLICIES = ("openvla", "openvla-rsd", "openvla-oft", "gr00t")
CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"
#: The embedded default (a trained tiny OpenVLA-RSD) and the tiny GR00T N1.5, both for libero_spatial.
EMBEDDED_OPENVLA_RSD = "openvla-rsd-libero-spatial"
EMBEDDED_GR00T = "gr00t-n1.5-tiny-libero-spatial"

__all__ = ["CHECKPOINTS_DIR", "EMBEDDED_GR00T", "EMBEDDED_OPENVLA_RSD", "POLICIES", "CheckpointError",
           "build_for_scan", "load_pretrained", "shipped_checkpoint"]


def shipped_checkpoint(name: str = EMBEDDED_OPENVLA_RSD) -> Path:
    """Directory of a checkpoint shipped with the package (it may be absent in a stripped install: check
    ``(path / "config.json").is_file()``)."""
    return CHECKPOINTS_DIR / name


def _family(policy: str) -> str:
    if policy in ("openvla", "openvla-rsd"):
        return "openvla"
    if policy == "openvla-oft":
        return "openvla-oft"
    if policy == "gr00t":
        return "gr00t"
    raise CheckpointError(f"unknown policy {policy!r}; expected one of {POLICIES}")


def build_for_scan(policy: str, path: str | os.PathLike[str]) -> nn.Module:
    """Architecture from ``path/config.json`` with every parameter on the meta device (no weights read)."""
    if _family(policy) == "openvla":
        from models.openvla.loading import build_empty
    elif _family(policy) == "openvla-oft":
        from models.openvla.oft import build_empty
    else:
        from models.gr00t.loading import build_empty
    return build_empty(path)


def load_pretrained(
    policy: str,
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a released-format checkpoint directory; raises ``CheckpointError`` naming the bad file/key."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if _family(policy) == "openvla":
        from models.openvla.loading import load
    elif _family(policy) == "openvla-oft":
        from models.openvla.oft import load
    else:
        from models.gr00t.loading import load
    return load(path, device=device, dtype=dtype)
