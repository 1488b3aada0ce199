"""DuQuant calibration at server start-up from LIBERO demonstration files.

Why from demonstrations: activation scales are only as good as the inputs they were taken from. Random images or
the policy's first requests (lazy calibration) give scales for the wrong distribution or let the first evaluation
episode decide them; demonstration frames are real scenes of the suite, and, unlike evaluation episodes, using
them cannot leak the test set into the quantised model. Only HDF5 files in LIBERO's demonstration layout
(``data/demo_N/obs/...``) are accepted.

Observations are read one frame at a time (``h5py`` slicing), never a whole suite into memory, and drawn
uniformly over all demonstration steps with a seeded generator (same files + seed = same observations).

Server use: ``--policy-option calib_data=GLOB [--policy-option calib_n=32]`` for the ``openvla`` and ``gr00t``
policies; each observation goes through the policy's own ``infer`` (its real preprocessing and, for GR00T, every
Euler step of the DiT), one forward per ``CALIB_STEPS`` batch.
"""

from __future__ import annotations

import glob as globlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_KEY = "agentview_rgb"
WRIST_KEY = "eye_in_hand_rgb"
STATE_KEY = "state_8d"
DEFAULT_CALIB_N = 32


@dataclass(frozen=True)
class FrameRef:
    """Where one calibration observation came from (file, demonstration group, step)."""

    path: str
    demo: str
    step: int


def resolve_demo_files(pattern: str | Path | list[str | Path]) -> list[Path]:
    """Expand a glob (or list of globs/paths) to sorted HDF5 files; raise if nothing matches."""
    from rsd.action_data import resolve_paths

    try:
        return resolve_paths(pattern)
    except FileNotFoundError:
        raise FileNotFoundError(f"calibration data: no files match {pattern!r}") from None


def _instruction(f: Any, demo: Any) -> str:
    for holder in (demo, f["data"], f):
        value = holder.attrs.get("language_instruction")
        if value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    raise ValueError(f"{f.filename}: no 'language_instruction' attribute on the demo, data group or file")


def demo_index(pattern: str | Path | list[str | Path],
               demo_filter: Callable[[str, str], bool] | None = None) -> list[tuple[str, str, int]]:
    """``(path, demo_name, num_steps)`` of every demonstration (that passes ``demo_filter(path, demo)``)."""
    import h5py

    out: list[tuple[str, str, int]] = []
    for path in resolve_demo_files(pattern):
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ValueError(f"{path}: not a LIBERO demonstration file (no 'data' group)")
            names = sorted((k for k in f["data"] if k.startswith("demo_")), key=lambda s: int(s.split("_")[1]))
            for name in names:
                if demo_filter is not None and not demo_filter(str(path), name):
                    continue
                obs = f["data"][name].get("obs")
                if obs is None or IMAGE_KEY not in obs:
                    raise ValueError(f"{path}:{name} has no obs/{IMAGE_KEY}: not a demonstration with images")
                out.append((str(path), name, int(obs[IMAGE_KEY].shape[0])))
    if not out:
        raise ValueError(f"calibration data: no demonstrations in {pattern!r}")
    return out


def sample_frames(pattern: str | Path | list[str | Path], n: int, seed: int = 0,
                  demo_filter: Callable[[str, str], bool] | None = None) -> list[FrameRef]:
    """``n`` distinct demonstration steps drawn uniformly over all steps (fewer if the files hold fewer)."""
    if n < 1:
        raise ValueError(f"calibration: n must be >= 1, got {n}")
    index = demo_index(pattern, demo_filter)
    lengths = np.array([t for _, _, t in index], dtype=np.int64)
    total = int(lengths.sum())
    flat = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    refs = []
    for k in flat:
        d = int(np.searchsorted(starts, k, side="right") - 1)
        path, demo, _ = index[d]
        refs.append(FrameRef(path, demo, int(k - starts[d])))
    if len(refs) < n:
        logger.warning("calibration: only %d demonstration steps available (asked for %d)", len(refs), n)
    return refs


def read_observations(refs: list[FrameRef]) -> list[dict[str, Any]]:
    """The LIBERO observation (``image``, ``wrist_image``, ``state``, ``instruction``) at each reference."""
    import h5py

    out: list[dict[str, Any]] = []
    by_file: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        by_file.setdefault(r.path, []).append(i)
    slots: list[dict[str, Any] | None] = [None] * len(refs)
    for path, members in by_file.items():
        with h5py.File(path, "r") as f:
            for i in members:
                r = refs[i]
                g = f["data"][r.demo]
                obs = g["obs"]
                item: dict[str, Any] = {
                    "image": np.ascontiguousarray(obs[IMAGE_KEY][r.step], dtype=np.uint8),
                    "instruction": _instruction(f, g),
                }
                if WRIST_KEY in obs:
                    item["wrist_image"] = np.ascontiguousarray(obs[WRIST_KEY][r.step], dtype=np.uint8)
                if STATE_KEY in obs:
                    item["state"] = np.asarray(obs[STATE_KEY][r.step], dtype=np.float32)
                slots[i] = item
    out = [s for s in slots if s is not None]
    return out


def calibration_observations(pattern: str | Path | list[str | Path], n: int = DEFAULT_CALIB_N, seed: int = 0,
                             demo_filter: Callable[[str, str], bool] | None = None) -> list[dict[str, Any]]:
    """``n`` LIBERO observations drawn (seeded, uniformly over steps) from demonstration HDF5 files."""
    return read_observations(sample_frames(pattern, n, seed, demo_filter))


# ---------------------------------------------------------------------------------------------- server wiring
@dataclass(frozen=True)
class CalibrationOptions:
    """``--policy-option calib_data=GLOB`` and ``calib_n=N`` (N defaults to 32, the seed's CALIB_STEPS)."""

    data: str | None = None
    n: int = DEFAULT_CALIB_N
    seed: int = 0


def pop_calibration_options(options: dict[str, Any]) -> CalibrationOptions:
    """Remove and validate the calibration policy options (a bad value fails start-up naming the option)."""
    data = options.pop("calib_data", None)
    raw_n = options.pop("calib_n", None)
    raw_seed = options.pop("calib_seed", None)
    try:
        n = DEFAULT_CALIB_N if raw_n is None else int(raw_n)
        seed = 0 if raw_seed is None else int(raw_seed)
    except ValueError:
        raise ValueError(f"--policy-option calib_n={raw_n!r} / calib_seed={raw_seed!r} must be integers") from None
    if n < 1:
        raise ValueError(f"--policy-option calib_n={n} must be >= 1")
    if data is not None and not str(data).strip():
        raise ValueError("--policy-option calib_data= is empty; give a glob of demonstration HDF5 files")
    if data is not None and not globlib.glob(str(data), recursive=True):
        raise ValueError(f"--policy-option calib_data={data!r}: no files match")
    return CalibrationOptions(data, n, seed)


def quantize_policy(policy: Any, model: Any, dq: Any, calib: CalibrationOptions) -> dict[str, Any]:
    """``apply_duquant`` on ``model`` (already wrapped by ``policy``), calibrating through ``policy.infer`` on
    observations from ``calib.data`` when given; returns the quantisation summary for the metadata reply."""
    from server.policies.quantize import apply_duquant

    if calib.data is None or not getattr(dq, "enabled", False):
        if calib.data is not None:
            logger.warning("calib_data=%s given but DuQuant is not enabled (no GR00T_DUQUANT_* set): ignored",
                           calib.data)
        return apply_duquant(model, dq)
    observations = calibration_observations(calib.data, calib.n, calib.seed)
    for obs in observations:
        policy.validate(obs)
    logger.info("[GR00T-DUQUANT] calibrating at start-up on %d demonstration observations from %s",
                len(observations), calib.data)
    summary = apply_duquant(model, dq, calibration=observations, forward_fn=lambda _m, o: policy.infer([o]))
    policy.reset()  # calibration consumed the policy's sampling generator; serving starts from a clean state
    summary.update({"calibration_data": str(calib.data), "calibration_observations": len(observations)})
    return summary
