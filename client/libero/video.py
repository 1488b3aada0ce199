"""Per-episode mp4 videos (agent-view frames) via imageio-ffmpeg.

Frames are buffered in memory for one episode (a 220-step episode at 256x256 is ~43 MB) and
written once the outcome is known, so the file name can carry it and a crashed episode leaves no
half-written video behind.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def episode_video_name(task_id: int, task_name: str, trial: int, outcome: str, suffix: str = "mp4") -> str:
    """``task03_<slug>__trial007__success.mp4``: sortable, unique per episode, outcome visible (``suffix``: the
    episode's other files, e.g. its ``npz`` trajectory, share the name)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", task_name).strip("_")[:80]
    return f"task{task_id:02d}_{slug}__trial{trial:03d}__{outcome}.{suffix}"


def write_video(path: str | os.PathLike[str], frames: list[np.ndarray], fps: int = 20) -> Path | None:
    """Write ``frames`` (H x W x 3 uint8) to an mp4 atomically; returns the path, or None if no frames."""
    if not frames:
        return None
    import imageio.v2 as imageio

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.stem}.tmp.mp4")
    # macro_block_size=1: keep odd sizes as they are; quality 7 is plenty for inspection.
    with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=7, macro_block_size=1,
                            ffmpeg_log_level="error") as w:
        for f in frames:
            w.append_data(np.ascontiguousarray(f, dtype=np.uint8))
    os.replace(tmp, p)
    return p
