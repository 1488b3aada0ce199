"""PACKDIR cache of per-layer DuQuant packs (permutation, rotations, weight row scales): safetensors + JSON.

Why a full key: the published code keyed packs by layer name alone, so changing BLOCK, PERMUTE or LS (or loading
another checkpoint) silently reused stale packs. Our key is a SHA-256 over the layer name, weight shape, a hash of
the weight bytes (after any folded producer rotation) and every setting that changes the pack, plus a format
version. A pack is reused only when its JSON key equals the one computed now *and* the tensor file's hash matches
the one recorded in the JSON; otherwise it is recomputed and overwritten.

With ``PACKED=1`` a pack also holds ``w_codes``, the layer's packed weight (uint8, two int4 codes per byte; int8
for W5..8), so loading it builds the packed layer without computing or quantising a float weight. The codes are
not part of the key: they are a function of what the key covers, so PACKED=0 and PACKED=1 share entries. An
entry without codes (written with PACKED=0, or before packing existed) still works with PACKED=1: its rotations
and scales are reused, the codes are computed once from the float weight and the entry is updated (logged with
the key's digest, :func:`pack_key_digest`).

Writes are atomic (temporary file in the same directory, ``os.replace``): tensors first, then the JSON, which acts
as the commit record, so a crash mid-write leaves either the old valid pack or one that fails validation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quant import transforms as T

LOG = logging.getLogger("quant")

#: Bump when the pack contents or their meaning change.
PACK_FORMAT_VERSION = 2


def weight_hash(w: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes in float32 (device and storage dtype independent for fp32 weights)."""
    t = w.detach().float().contiguous().cpu()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


def pack_key(
    name: str, shape: tuple[int, ...], whash: str, *, wbits: int, block: int, block_out: int, permute: bool,
    row_rot: str, rot: str, ls: float, clip_search: bool, wgroup: int = 0,
) -> dict[str, object]:
    """Every input that determines a pack. ``abits``/``act_pct`` are not here: they do not change the pack."""
    return {
        "version": PACK_FORMAT_VERSION,
        "name": name,
        "shape": list(shape),
        "weight_sha256": whash,
        "wbits": wbits,
        "block": block,
        "block_out": block_out,
        "permute": bool(permute),
        "row_rot": row_rot,
        "rot": rot,
        "ls": float(ls),
        "clip_search": bool(clip_search),
        "wgroup": int(wgroup),
        "clip_ratios": list(T.CLIP_RATIOS),
    }


def pack_key_digest(key: dict[str, object]) -> str:
    """Short SHA-256 of a pack key, to name an entry in log messages."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class PackCache:
    """One directory of packs; counts hits/misses/stale for the start-up log line."""

    root: Path
    reused: int = 0
    computed: int = 0
    stale: int = 0
    stale_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def paths(self, name: str) -> tuple[Path, Path]:
        base = str(self.root / _safe(name))
        return Path(base + ".safetensors"), Path(base + ".json")

    def load(self, name: str, key: dict[str, object]) -> dict[str, torch.Tensor] | None:
        """The stored pack when its key matches and its tensors are intact; ``None`` (miss or stale) otherwise."""
        tpath, jpath = self.paths(name)
        if not jpath.exists() or not tpath.exists():
            return None
        try:
            meta = json.loads(jpath.read_text())
            if meta.get("key") != key:
                self.stale += 1
                self.stale_names.append(name)
                LOG.debug("[GR00T-DUQUANT] pack for %s is stale (settings or weights changed)", name)
                return None
            if meta.get("tensors_sha256") != _file_sha(tpath):
                self.stale += 1
                self.stale_names.append(name)
                LOG.warning("[GR00T-DUQUANT] pack tensors for %s do not match their JSON record; recomputing", name)
                return None
            tensors = load_file(str(tpath))
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            LOG.warning("[GR00T-DUQUANT] unreadable pack for %s (%s); recomputing", name, exc)
            self.stale += 1
            self.stale_names.append(name)
            return None
        if "r_in" in tensors and not T.is_orthogonal(tensors["r_in"], atol=1e-4):
            LOG.warning("[GR00T-DUQUANT] pack for %s has a non-orthogonal rotation; recomputing", name)
            self.stale += 1
            return None
        self.reused += 1
        return tensors

    def save(self, name: str, key: dict[str, object], tensors: dict[str, torch.Tensor]) -> None:
        """Atomically write tensors then the JSON record."""
        tpath, jpath = self.paths(name)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{tpath.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"layer": name})
            os.replace(tmp, tpath)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        meta = {"key": key, "tensors_sha256": _file_sha(tpath), "tensors": sorted(tensors)}
        _atomic_write_bytes(jpath, json.dumps(meta, indent=1, sort_keys=True).encode())
        self.computed += 1

    def summary(self) -> str:
        return (
            f"[GR00T-DUQUANT] pack cache {self.root}: {self.reused} reused, {self.computed} recomputed "
            f"({self.stale} stale)"
        )
