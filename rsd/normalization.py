"""Per-dimension action normalisation with dataset statistics (OpenVLA-style q01/q99 bounds).

Why quantile bounds and not min/max: teleoperated and scripted demonstrations contain rare spikes; mapping the
1st..99th percentile to [-1, 1] spends the tokenizer's resolution on the actions that actually occur and clips
the rest. The gripper is a binary command in LIBERO (-1 open, +1 close), so it is kept as exactly ±1 rather
than stretched: a decoded gripper value is re-binarised on the way out.

The statistics travel with the tokenizer checkpoint as JSON (``normalization.json``) so that decoding tokens
back to environment actions never needs the training data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

NORMALIZATION_FILENAME = "normalization.json"
_FORMAT_VERSION = 1
# A dimension whose q01..q99 span is below this is treated as constant (maps to 0); avoids dividing by ~0.
_MIN_SPAN = 1e-8


def _as_float_array(x: Any, name: str) -> np.ndarray:
    """Converts ``x`` to a float64 numpy array, refusing non-finite values with a clear message."""
    try:
        import torch  # local import: this module must stay importable without torch for light users

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is always present in the server env
        pass
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


@dataclass
class ActionNormalizer:
    """Maps raw environment actions to [-1, 1] per dimension and back.

    Attributes:
        q01: per-dimension 1st percentile of the training actions (the value mapped to -1).
        q99: per-dimension 99th percentile (the value mapped to +1).
        gripper_dim: index of the binary gripper dimension, or ``None`` when there is none.
        gripper_threshold: raw values above it mean "close" (+1), at or below "open" (-1).
    """

    q01: np.ndarray
    q99: np.ndarray
    gripper_dim: int | None = 6
    gripper_threshold: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.q01 = np.asarray(self.q01, dtype=np.float64).reshape(-1)
        self.q99 = np.asarray(self.q99, dtype=np.float64).reshape(-1)
        if self.q01.shape != self.q99.shape:
            raise ValueError(f"q01 {self.q01.shape} and q99 {self.q99.shape} differ in shape")
        if not (np.all(np.isfinite(self.q01)) and np.all(np.isfinite(self.q99))):
            raise ValueError("normalisation statistics contain NaN or infinite values")
        if np.any(self.q99 < self.q01):
            raise ValueError("q99 must be >= q01 in every dimension")
        if self.gripper_dim is not None and not 0 <= self.gripper_dim < self.action_dim:
            raise ValueError(f"gripper_dim {self.gripper_dim} outside 0..{self.action_dim - 1}")

    @property
    def action_dim(self) -> int:
        """Number of action dimensions the statistics describe."""
        return int(self.q01.shape[0])

    @classmethod
    def fit(cls, actions: np.ndarray, gripper_dim: int | None = 6, gripper_threshold: float = 0.0) -> ActionNormalizer:
        """Computes q01/q99 from raw actions of shape (..., A)."""
        arr = _as_float_array(actions, "actions")
        if arr.ndim < 2:
            raise ValueError(f"actions must have shape (..., A); got {arr.shape}")
        flat = arr.reshape(-1, arr.shape[-1])
        if flat.shape[0] == 0:
            raise ValueError("cannot fit normalisation statistics on zero actions")
        q01 = np.quantile(flat, 0.01, axis=0)
        q99 = np.quantile(flat, 0.99, axis=0)
        extra = {
            "mean": flat.mean(axis=0).tolist(),
            "std": flat.std(axis=0).tolist(),
            "min": flat.min(axis=0).tolist(),
            "max": flat.max(axis=0).tolist(),
            "num_actions": int(flat.shape[0]),
        }
        if gripper_dim is not None:
            # The gripper is binarised, never stretched: its bounds are fixed to the binary values.
            q01[gripper_dim], q99[gripper_dim] = -1.0, 1.0
        return cls(q01=q01, q99=q99, gripper_dim=gripper_dim, gripper_threshold=gripper_threshold, extra=extra)

    def _check(self, arr: np.ndarray, name: str) -> None:
        if arr.ndim < 1 or arr.shape[-1] != self.action_dim:
            raise ValueError(f"{name} must have last dimension {self.action_dim}; got shape {arr.shape}")

    def normalize(self, actions: Any) -> np.ndarray:
        """Raw actions (..., A) → float32 in [-1, 1]; the gripper dim becomes exactly ±1."""
        arr = _as_float_array(actions, "actions")
        self._check(arr, "actions")
        span = self.q99 - self.q01
        safe = np.where(span > _MIN_SPAN, span, 1.0)
        out = np.where(span > _MIN_SPAN, 2.0 * (arr - self.q01) / safe - 1.0, 0.0)
        out = np.clip(out, -1.0, 1.0)
        if self.gripper_dim is not None:
            g = arr[..., self.gripper_dim]
            out[..., self.gripper_dim] = np.where(g > self.gripper_threshold, 1.0, -1.0)
        return out.astype(np.float32)

    def unnormalize(self, normalized: Any) -> np.ndarray:
        """[-1, 1] values (..., A) → raw float32 actions; the gripper is re-binarised to ±1."""
        arr = _as_float_array(normalized, "normalized actions")
        self._check(arr, "normalized actions")
        arr = np.clip(arr, -1.0, 1.0)
        span = self.q99 - self.q01
        out = np.where(span > _MIN_SPAN, (arr + 1.0) * 0.5 * span + self.q01, self.q01)
        if self.gripper_dim is not None:
            out[..., self.gripper_dim] = np.where(arr[..., self.gripper_dim] > 0.0, 1.0, -1.0)
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored next to the tokenizer weights)."""
        return {
            "format_version": _FORMAT_VERSION,
            "kind": "q01_q99",
            "q01": self.q01.tolist(),
            "q99": self.q99.tolist(),
            "gripper_dim": self.gripper_dim,
            "gripper_threshold": self.gripper_threshold,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActionNormalizer:
        """Inverse of :meth:`to_dict`; refuses unknown formats rather than guessing."""
        if d.get("kind", "q01_q99") != "q01_q99":
            raise ValueError(f"unsupported normalisation kind {d.get('kind')!r}")
        if int(d.get("format_version", _FORMAT_VERSION)) > _FORMAT_VERSION:
            raise ValueError(f"normalisation format_version {d['format_version']} is newer than this code")
        return cls(
            q01=np.asarray(d["q01"], dtype=np.float64),
            q99=np.asarray(d["q99"], dtype=np.float64),
            gripper_dim=d.get("gripper_dim"),
            gripper_threshold=float(d.get("gripper_threshold", 0.0)),
            extra=dict(d.get("extra", {})),
        )

    def save(self, path: str | Path) -> None:
        """Writes the statistics as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ActionNormalizer:
        """Reads statistics written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
