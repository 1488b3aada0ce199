"""LIBERO <-> GR00T N1.5 modality mapping and ``experiment_cfg/metadata.json`` normalisation.

GR00T's LIBERO fine-tunes use the ``new_embodiment`` tag with modality keys ``video.image``,
``video.wrist_image``, ``state.{x,y,z,roll,pitch,yaw,gripper}`` (gripper 2-D: the two finger joints, so the
state is 8-D) and ``action.{x,y,z,roll,pitch,yaw,gripper}`` (7-D), and language
``annotation.human.action.task_description``. State and action are normalised per key with the statistics
in ``metadata.json``; ``min_max`` maps ``[min, max]`` to ``[-1, 1]`` (upstream default for LIBERO; ``q99``
uses ``[q01, q99]`` instead, with clipping). The state is zero-padded to ``max_state_dim`` and the predicted
``[B, 16, action_dim]`` is cut to the first 7 dims before unnormalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LANGUAGE_KEY = "annotation.human.action.task_description"


@dataclass
class LiberoDataConfig:
    """Key layout and normalisation modes for LIBERO (``new_embodiment``)."""

    embodiment_tag: str = "new_embodiment"
    video_keys: list[str] = field(default_factory=lambda: ["video.image", "video.wrist_image"])
    state_keys: dict[str, int] = field(default_factory=lambda: {
        "state.x": 1, "state.y": 1, "state.z": 1, "state.roll": 1, "state.pitch": 1, "state.yaw": 1,
        "state.gripper": 2,
    })
    action_keys: dict[str, int] = field(default_factory=lambda: {
        "action.x": 1, "action.y": 1, "action.z": 1, "action.roll": 1, "action.pitch": 1, "action.yaw": 1,
        "action.gripper": 1,
    })
    normalization: str = "min_max"  # default per key: "min_max" or "q99"
    # per-key overrides, e.g. {"action.gripper": "none"} to leave a binary gripper raw
    normalization_modes: dict[str, str] = field(default_factory=dict)
    crop_scale: float = 0.95  # upstream VideoCrop(scale=0.95): a centred crop at eval time

    @property
    def state_dim(self) -> int:
        return sum(self.state_keys.values())

    @property
    def action_dim(self) -> int:
        return sum(self.action_keys.values())

    # ------------------------------------------------------------------ LIBERO observation -> GR00T keys
    def from_libero(self, image: np.ndarray, wrist_image: np.ndarray, state: np.ndarray,
                    instruction: str | list[str]) -> dict[str, Any]:
        """Raw LIBERO arrays (``[H,W,3]`` or ``[B,H,W,3]``, state ``[8]`` or ``[B,8]``) -> GR00T obs dict."""
        state = np.atleast_2d(np.asarray(state, dtype=np.float64))
        if state.shape[-1] != self.state_dim:
            raise ValueError(f"LIBERO state must be {self.state_dim}-D, got {state.shape[-1]}")
        obs: dict[str, Any] = {
            "video.image": np.asarray(image)[None] if np.asarray(image).ndim == 3 else np.asarray(image),
            "video.wrist_image": np.asarray(wrist_image)[None] if np.asarray(wrist_image).ndim == 3 else np.asarray(wrist_image),
            LANGUAGE_KEY: [instruction] if isinstance(instruction, str) else list(instruction),
        }
        i = 0
        for key, width in self.state_keys.items():
            obs[key] = state[:, i : i + width]
            i += width
        return obs

    # ------------------------------------------------------------------ normalisation
    def _bounds(self, stats: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-key ``(low, high)``; mode "none" maps to (-1, 1), i.e. the identity."""
        mode = self.normalization_modes.get(key, self.normalization)
        if mode == "none":
            return np.array(-1.0), np.array(1.0)
        if mode not in ("min_max", "q99"):
            raise ValueError(f"unsupported normalization mode {mode!r} for {key}")
        s = stats[key.split(".", 1)[1]]
        lo, hi = ("min", "max") if mode == "min_max" else ("q01", "q99")
        return np.asarray(s[lo], dtype=np.float64), np.asarray(s[hi], dtype=np.float64)

    def normalize_state(self, obs: dict[str, Any], metadata: dict[str, Any]) -> np.ndarray:
        """Concatenate state keys -> ``[B, state_dim]`` in ``[-1, 1]``."""
        stats = metadata[self.embodiment_tag]["statistics"]["state"]
        parts = []
        for key in self.state_keys:
            x = np.asarray(obs[key], dtype=np.float64)
            x = x.reshape(x.shape[0], -1)[:, -self.state_keys[key]:]  # last time step if a history is sent
            lo, hi = self._bounds(stats, key)
            parts.append(_to_unit(x, lo, hi))
        return np.concatenate(parts, axis=-1)

    def normalize_action(self, actions: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
        """``[B, H, action_dim]`` raw -> ``[-1, 1]`` (training targets)."""
        stats = metadata[self.embodiment_tag]["statistics"]["action"]
        out, i = np.empty_like(actions, dtype=np.float64), 0
        for key, width in self.action_keys.items():
            lo, hi = self._bounds(stats, key)
            out[..., i : i + width] = _to_unit(actions[..., i : i + width], lo, hi)
            i += width
        return out

    def unnormalize_action(self, normalized: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
        """``[B, H, >=action_dim]`` in ``[-1, 1]`` -> raw ``[B, H, action_dim]``."""
        stats = metadata[self.embodiment_tag]["statistics"]["action"]
        a = np.clip(np.asarray(normalized, dtype=np.float64)[..., : self.action_dim], -1.0, 1.0)
        out, i = np.empty_like(a), 0
        for key, width in self.action_keys.items():
            lo, hi = self._bounds(stats, key)
            out[..., i : i + width] = (a[..., i : i + width] + 1.0) / 2.0 * (hi - lo) + lo
            i += width
        return out

    def split_actions(self, actions: np.ndarray) -> dict[str, np.ndarray]:
        """``[B, H, 7]`` -> ``{"action.x": [B, H, 1], ...}`` (the upstream server's reply format)."""
        out, i = {}, 0
        for key, width in self.action_keys.items():
            out[key] = actions[..., i : i + width]
            i += width
        return out


def _to_unit(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    span = np.where(hi - lo == 0, 1.0, hi - lo)
    return np.clip(2.0 * (x - lo) / span - 1.0, -1.0, 1.0)


def make_metadata(data_config: LiberoDataConfig, state_stats: dict[str, dict[str, list[float]]],
                  action_stats: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """``experiment_cfg/metadata.json`` content in upstream's layout (statistics + modalities per tag)."""
    return {
        data_config.embodiment_tag: {
            "statistics": {"state": state_stats, "action": action_stats},
            "modalities": {
                "video": {k.split(".", 1)[1]: {"resolution": [256, 256], "channels": 3, "fps": 20.0}
                          for k in data_config.video_keys},
                "state": {k.split(".", 1)[1]: {"absolute": True, "rotation_type": None, "shape": [w], "continuous": True}
                          for k, w in data_config.state_keys.items()},
                "action": {k.split(".", 1)[1]: {"absolute": False, "rotation_type": None, "shape": [w], "continuous": True}
                           for k, w in data_config.action_keys.items()},
            },
            "embodiment_tag": data_config.embodiment_tag,
        }
    }
