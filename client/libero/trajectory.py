"""Per-episode trajectories (``--trajectory-dir``): what the client executed, what the policy returned, where the arm
went -- the numbers behind a video.

Why: a video shows that a grasp missed, the trajectory shows by how much. The shipped OpenVLA-RSD's systematic
misses on libero_spatial were read this way: on the table-centre bowl the arm stopped 2-6 cm past the
demonstrations' grasp point in x and closed ~2 cm high; on the bowl-on-ramekin task it carried the bowl ~10 cm past
the plate before releasing (docs/training.md).

One ``.npz`` per episode, named like its video, written atomically once the outcome is known; read it with
:func:`load_trajectory` (``allow_pickle=False``, sizes checked first).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: A trajectory file is tiny (a 220-step episode is ~30 KB); refuse anything far larger before reading it.
MAX_TRAJECTORY_BYTES = 64 << 20


@dataclass
class TrajectoryRecorder:
    """Collects one episode: per executed policy step the action, end-effector position and gripper joints after
    it; per query the step and the returned chunk (after the gripper conversion and clipping)."""

    actions: list[np.ndarray] = field(default_factory=list)
    eef_pos: list[np.ndarray] = field(default_factory=list)
    gripper_qpos: list[np.ndarray] = field(default_factory=list)
    query_steps: list[int] = field(default_factory=list)
    chunks: list[np.ndarray] = field(default_factory=list)

    def query(self, step: int, chunk: np.ndarray) -> None:
        self.query_steps.append(step)
        self.chunks.append(np.asarray(chunk, np.float32))

    def step(self, action: np.ndarray, raw: dict[str, Any]) -> None:
        self.actions.append(np.asarray(action, np.float32))
        self.eef_pos.append(np.asarray(raw["robot0_eef_pos"], np.float32))
        self.gripper_qpos.append(np.asarray(raw["robot0_gripper_qpos"], np.float32))

    def arrays(self, start: dict[str, Any], success: bool) -> dict[str, np.ndarray]:
        """``start`` is the observation the first query saw (its position and gripper are the trajectory's start)."""
        horizon = max((len(c) for c in self.chunks), default=0)
        chunks = np.full((len(self.chunks), horizon, 7), np.nan, np.float32)  # NaN pads a shorter chunk
        for i, c in enumerate(self.chunks):
            chunks[i, :len(c)] = c
        return {
            "actions": np.asarray(self.actions, np.float32).reshape(-1, 7),
            "eef_pos": np.asarray(self.eef_pos, np.float32).reshape(-1, 3),
            "gripper_qpos": np.asarray(self.gripper_qpos, np.float32).reshape(-1, 2),
            "start_eef_pos": np.asarray(start["robot0_eef_pos"], np.float32),
            "start_gripper_qpos": np.asarray(start["robot0_gripper_qpos"], np.float32),
            "query_steps": np.asarray(self.query_steps, np.int32),
            "chunks": chunks,
            "success": np.asarray(success),
        }

    def write(self, path: str | os.PathLike[str], start: dict[str, Any], success: bool) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.stem}.tmp.npz")
        np.savez_compressed(tmp, **self.arrays(start, success))
        os.replace(tmp, p)
        return p


def load_trajectory(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of one trajectory file; :class:`ValueError` for a file too large or not a trajectory."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_TRAJECTORY_BYTES:
        raise ValueError(f"{p}: {size} bytes is not a trajectory file (limit {MAX_TRAJECTORY_BYTES})")
    with zipfile.ZipFile(p) as z:  # uncompressed sizes, before anything is inflated
        total = sum(i.file_size for i in z.infolist())
    if total > MAX_TRAJECTORY_BYTES:
        raise ValueError(f"{p}: {total} bytes uncompressed is not a trajectory file (limit {MAX_TRAJECTORY_BYTES})")
    with np.load(p, allow_pickle=False) as f:
        out = {k: f[k] for k in f.files}
    missing = {"actions", "eef_pos", "gripper_qpos", "query_steps", "chunks"} - set(out)
    if missing:
        raise ValueError(f"{p}: not a trajectory file (missing {', '.join(sorted(missing))})")
    return out
