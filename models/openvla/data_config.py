"""LIBERO observation -> OpenVLA model inputs, and the gripper convention of a checkpoint's actions.

The counterpart of ``models/gr00t/data_config.py``: the model package, not the server, knows which observation
keys its model reads. OpenVLA (and OpenVLA-RSD, which shares its Prismatic backbone and processor) sees one
third-person camera and the language instruction: LIBERO's ``image`` (agentview) and ``instruction``. It has no
wrist camera and no proprioception, so ``wrist_image`` and ``state`` are ignored (an observation may carry them;
the same client serves GR00T, which reads both).

Gripper convention: OpenVLA's own LIBERO fine-tunes were trained on actions whose gripper dimension lies in
``[0, 1]`` (1 = open; ``openvla``), while LIBERO's controller takes ``-1`` open / ``+1`` closed (``libero``).
Which one a checkpoint emits is read from its action statistics, so the client can convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

GRIPPER_LIBERO = "libero"
GRIPPER_OPENVLA = "openvla"
GRIPPER_CONVENTIONS = (GRIPPER_LIBERO, GRIPPER_OPENVLA)


@dataclass(frozen=True)
class LiberoDataConfig:
    """Which LIBERO observation keys OpenVLA reads (``None``: the model has no such input)."""

    image_key: str = "image"
    instruction_key: str = "instruction"
    wrist_image_key: str | None = None  # single-camera model
    state_key: str | None = None  # no proprioceptive input

    def from_libero(self, observations: list[dict[str, Any]]) -> tuple[np.ndarray | list[np.ndarray], list[str]]:
        """LIBERO observations -> ``(images, instructions)`` for ``predict_action`` / the processor.

        ``images`` is one ``[B, H, W, 3]`` uint8 array when every image has the same size, else a list of
        ``[H, W, 3]`` arrays (the processor resizes each one).
        """
        images = [np.asarray(o[self.image_key]) for o in observations]
        instructions = [str(o[self.instruction_key]) for o in observations]
        same = all(img.shape == images[0].shape for img in images)
        return (np.stack(images) if same and images else images), instructions


def gripper_convention_from_stats(action_stats: dict[str, Any]) -> str:
    """``openvla`` when the training data's gripper lies in [0, 1] (1 = open), else ``libero`` (-1/+1)."""
    q01 = np.asarray(action_stats.get("q01", action_stats.get("min", [-1.0])), dtype=np.float64)
    return GRIPPER_OPENVLA if q01[-1] >= 0.0 else GRIPPER_LIBERO
