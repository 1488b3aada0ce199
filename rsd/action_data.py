"""Reading LIBERO-layout HDF5 demonstrations and cutting them into action chunks.

Layout (robomimic / LIBERO): ``data/demo_<N>/actions`` is a float array (T, 7): Δpos (3), Δrot (3), gripper
(-1 open, +1 close). Only the actions are read here, so the same code serves full demonstration files
(``artifacts/demos/libero_spatial/*.hdf5``) and the small actions-only file shipped in ``data/``.

Chunks: every step starts one chunk (stride 1) of ``chunk_len`` actions; a chunk running past the end of its
demonstration is padded by repeating the last action — the same convention a chunked policy is trained with, so
the tokenizer sees the "hold still at the end" chunks it will have to encode. Train/held-out splits are by whole
demonstration, because neighbouring stride-1 chunks overlap in 7 of 8 steps and a per-chunk split would leak.
"""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demo:
    """One demonstration's actions and where they came from (for logging and reproducible splits)."""

    source: str
    name: str
    actions: np.ndarray  # (T, A) float32


def _natural_key(name: str) -> tuple:
    """Sorts demo_2 before demo_10 (HDF5 lists keys lexicographically)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def resolve_paths(data: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expands a glob (or a list of paths/globs) into a sorted list of existing files; fails loudly if empty."""
    patterns = [data] if isinstance(data, (str, Path)) else list(data)
    paths: list[Path] = []
    for pat in patterns:
        matches = sorted(glob.glob(str(pat), recursive=True))
        paths.extend(Path(m) for m in matches if Path(m).is_file())
    if not paths:
        raise FileNotFoundError(f"no HDF5 files match {data!r}")
    return sorted(set(paths))


def load_demos(data: str | Path | Sequence[str | Path], action_dim: int = 7) -> list[Demo]:
    """Reads every ``data/demo_*/actions`` array from the matching HDF5 files.

    Raises:
        FileNotFoundError: nothing matches.
        ValueError: a file has no ``data`` group, an actions array has the wrong shape or non-finite values.
    """
    import h5py  # local import: keeps the module importable for code that only chunks arrays

    demos: list[Demo] = []
    for path in resolve_paths(data):
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ValueError(f"{path}: no 'data' group (expected LIBERO/robomimic layout)")
            # Full demonstration files hold data/demo_N; the compact shipped actions file groups them per
            # task as data/task_KK/demo_N (see client/libero/record_demos.py): read both.
            names = []
            for key in sorted(f["data"].keys(), key=_natural_key):
                if key.startswith("demo"):
                    names.append(key)
                elif key.startswith("task_"):
                    names.extend(f"{key}/{d}" for d in sorted(f["data"][key].keys(), key=_natural_key)
                                 if d.startswith("demo"))
            for name in names:
                grp = f["data"][name]
                if "actions" not in grp:
                    raise ValueError(f"{path}:data/{name} has no 'actions' dataset")
                acts = np.asarray(grp["actions"][()], dtype=np.float32)
                if acts.ndim != 2 or acts.shape[1] != action_dim:
                    raise ValueError(f"{path}:data/{name}/actions has shape {acts.shape}, expected (T, {action_dim})")
                if acts.shape[0] == 0:
                    logger.warning("%s:data/%s is empty; skipped", path, name)
                    continue
                if not np.all(np.isfinite(acts)):
                    raise ValueError(f"{path}:data/{name}/actions contains NaN or infinite values")
                demos.append(Demo(source=str(path), name=name, actions=acts))
    if not demos:
        raise ValueError(f"no demonstrations found in {data!r}")
    logger.info("loaded %d demonstrations, %d actions", len(demos), sum(d.actions.shape[0] for d in demos))
    return demos


def chunk_actions(actions: np.ndarray, chunk_len: int = 8, stride: int = 1) -> np.ndarray:
    """Cuts one (T, A) sequence into (N, chunk_len, A) chunks starting every ``stride`` steps, end-padded."""
    if actions.ndim != 2:
        raise ValueError(f"actions must be (T, A); got {actions.shape}")
    if chunk_len < 1 or stride < 1:
        raise ValueError("chunk_len and stride must be >= 1")
    t = actions.shape[0]
    padded = np.concatenate([actions, np.repeat(actions[-1:], chunk_len - 1, axis=0)], axis=0)
    starts = np.arange(0, t, stride)
    idx = starts[:, None] + np.arange(chunk_len)[None, :]
    return padded[idx]


def chunk_demos(demos: Sequence[Demo], chunk_len: int = 8, stride: int = 1) -> np.ndarray:
    """Chunks every demonstration and concatenates: (N, chunk_len, A) float32."""
    if not demos:
        raise ValueError("no demonstrations to chunk")
    return np.concatenate([chunk_actions(d.actions, chunk_len, stride) for d in demos], axis=0).astype(np.float32)


def split_demos(demos: Sequence[Demo], heldout_frac: float = 0.1, seed: int = 0) -> tuple[list[Demo], list[Demo]]:
    """Seeded split by whole demonstration; at least one demo on each side when there are two or more."""
    if not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1); got {heldout_frac}")
    n = len(demos)
    if n < 2 or heldout_frac == 0.0:
        return list(demos), []
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(n - 1, max(1, int(round(heldout_frac * n))))
    held_idx = set(order[:n_held].tolist())
    train = [d for i, d in enumerate(demos) if i not in held_idx]
    held = [d for i, d in enumerate(demos) if i in held_idx]
    return train, held
