"""A short content fingerprint of a checkpoint directory: which weights a server is serving.

Why: a results file keyed by a checkpoint *path* cannot tell that the checkpoint there was replaced (the shipped
GR00T was retrained in place twice; a resumed evaluation then silently mixed episodes of two models). The server
sends this digest in its metadata, the evaluation client records it, and ``--resume`` refuses a different one.

What it covers: every regular file under the directory (hidden names and the top-level :data:`SERVING_FILE` skipped), by relative path and size, and its
bytes -- whole for files up to :data:`FULL_HASH_BYTES`, else :data:`WINDOW_BYTES` windows at the start, the end and
:data:`MIDDLE_WINDOWS` evenly spaced offsets. Retraining changes every tensor, so sampled windows catch it, while a
7B checkpoint (15 GB) costs ~0.3 GB of reads instead of a full pass (the 6 MB shipped models are hashed whole,
~20 ms).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The checkpoint's serving settings are not part of the model: the settings they apply are in the metadata an
# evaluation records and compares key by key, so adding or editing the file leaves the digest -- and every results
# file recorded against these weights -- as it was.
from models.common.serving import SERVING_FILE

FULL_HASH_BYTES = 64 << 20
WINDOW_BYTES = 4 << 20
MIDDLE_WINDOWS = 4
DIGEST_CHARS = 16


def _file_windows(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` spans of a file of ``size`` bytes that the digest reads."""
    if size <= FULL_HASH_BYTES:
        return [(0, size)]
    starts = [0, size - WINDOW_BYTES]
    starts += [(size - WINDOW_BYTES) * (i + 1) // (MIDDLE_WINDOWS + 1) for i in range(MIDDLE_WINDOWS)]
    return [(s, WINDOW_BYTES) for s in sorted(set(starts))]


def checkpoint_digest(path: str | os.PathLike[str]) -> str | None:
    """Hex digest (``DIGEST_CHARS`` long) of the checkpoint at ``path``; ``None`` when it is not a directory."""
    root = Path(path)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != SERVING_FILE
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(p, "rb") as f:
            for start, length in _file_windows(size):
                f.seek(start)
                remaining = length
                while remaining:
                    chunk = f.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    h.update(chunk)
                    remaining -= len(chunk)
    return h.hexdigest()[:DIGEST_CHARS]
