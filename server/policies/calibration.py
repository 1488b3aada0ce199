"""DuQuant calibration at server start-up from LIBERO demonstration files.

Why from demonstrations: activation scales are only as good as the inputs they were taken from. Random images or
the policy's first requests (lazy calibration) give scales for the wrong distribution or let the first evaluation
episode decide them; demonstration frames are real scenes of the suite, and, unlike evaluation episodes, using
them cannot leak the test set into the quantised model. Only HDF5 files in LIBERO's demonstration layout
(``data/demo_N/obs/...``) are accepted.

Observations are read one frame at a time (``h5py`` slicing), never a whole suite into memory, and drawn
uniformly over all demonstration steps with a seeded generator (same files + seed = same observations).

Server use: ``--policy-option calib_data=GLOB [--policy-option calib_n=32]`` for every model-backed policy
(options declared in ``server/policies/options.py``, quantisation in ``server/policies/quantize.py``); each
observation goes through the policy's own ``infer`` (its real preprocessing and, for GR00T, every Euler step of
the DiT), one forward per ``CALIB_STEPS`` batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

# Frame reading lives with the demonstration schema (client/dataset.py); re-exported under the names used here.
from client.dataset import (  # noqa: F401
    IMAGE_KEY,
    STATE_KEY,
    WRIST_KEY,
    FrameRef,
    Pattern,
    demo_index,
    resolve_demo_files,
    sample_frames,
    sample_observations,
)
from client.dataset import read_frames as read_observations  # noqa: F401

logger = logging.getLogger(__name__)

DEFAULT_CALIB_N = 32


def calibration_observations(pattern: Pattern, n: int = DEFAULT_CALIB_N, seed: int = 0,
                             demo_filter: Callable[[str, str], bool] | None = None) -> list[dict[str, Any]]:
    """``n`` LIBERO observations drawn (seeded, uniformly over steps) from demonstration HDF5 files."""
    return sample_observations(pattern, n, seed, demo_filter)
