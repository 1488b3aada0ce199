"""Sharded safetensors writing and streaming, low-memory reading.

Why not ``safetensors.torch.load_file``: it materialises a whole shard (and, for a cast, a second copy) before
we could drop anything. We validate each shard with ``safe_open`` (header, dtypes, shapes) and then read each
tensor's bytes straight into a freshly allocated tensor with ``readinto``. No mmap pages are touched, so peak
RSS stays near "weights already loaded + one tensor", whatever the shard size.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.common.errors import CheckpointError

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def shard_name(k: int, n: int) -> str:
    """HF naming (``model-00001-of-00003.safetensors``), so released and tiny checkpoints look alike."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def save_sharded(
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    num_shards: int = 2,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``state_dict`` as ``num_shards`` byte-balanced shards plus ``model.safetensors.index.json``.

    Keys keep their order, so each shard holds a contiguous run of layers, as HF's sharding does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(state_dict)
    if not keys:
        raise ValueError("empty state dict")
    num_shards = max(1, min(num_shards, len(keys)))
    sizes = [state_dict[k].numel() * state_dict[k].element_size() for k in keys]
    total = sum(sizes)
    groups: list[list[str]] = [[] for _ in range(num_shards)]
    acc = 0
    for key, size in zip(keys, sizes, strict=True):
        slot = min(num_shards - 1, int((acc + size / 2) / max(total, 1) * num_shards))
        groups[slot].append(key)
        acc += size
    groups = [g for g in groups if g]
    n = len(groups)
    weight_map: dict[str, str] = {}
    paths = []
    for i, group in enumerate(groups, start=1):
        name = shard_name(i, n)
        tensors = {k: state_dict[k].detach().contiguous().cpu() for k in group}
        save_file(tensors, str(out / name), metadata={"format": "pt", **(metadata or {})})
        weight_map.update(dict.fromkeys(group, name))
        paths.append(out / name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    logger.info("wrote %d tensors (%.1f MB) in %d shards to %s", len(keys), total / 1e6, n, out)
    return paths


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives in a shard file (from the safetensors header)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int


def checkpoint_shards(path: str | os.PathLike[str]) -> tuple[list[Path], dict[str, str]]:
    """The shard files of a checkpoint directory and its key->file map; fails clearly when they are missing."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    index_path = root / INDEX_NAME
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: unreadable index ({exc})") from exc
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise CheckpointError(f"{root}: shard file(s) listed in {INDEX_NAME} are missing: {missing}")
        return [root / f for f in files], weight_map
    single = root / SINGLE_NAME
    if single.is_file():
        return [single], {}
    raise CheckpointError(f"{root}: neither {INDEX_NAME} nor {SINGLE_NAME} found")


def read_header(shard: Path) -> list[TensorRecord]:
    """Validate a shard with ``safe_open`` and return its tensor records, checking the data fits in the file.

    A truncated download or a garbled header raises ``CheckpointError`` naming the file.
    """
    try:
        with safe_open(str(shard), framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError types
        raise CheckpointError(f"{shard}: corrupt or unreadable safetensors file ({exc})") from exc
    file_size = shard.stat().st_size
    with open(shard, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{shard}: truncated header")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{shard}: corrupt header ({exc})") from exc
    base = 8 + n
    records = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype", ""))
        if dtype is None:
            raise CheckpointError(f"{shard}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = (int(v) for v in info["data_offsets"])
        shape = tuple(int(s) for s in info["shape"])
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or base + end > file_size:
            raise CheckpointError(f"{shard}: tensor {key!r} data is truncated or inconsistent with its header")
        records.append(TensorRecord(key, dtype, shape, base + begin, base + end))
    if {r.key for r in records} != keys:
        raise CheckpointError(f"{shard}: header keys disagree with safe_open")
    return records


def _readinto(fh: Any, view: memoryview, shard: Path, key: str) -> None:
    got = 0
    while got < len(view):
        k = fh.readinto(view[got:])
        if not k:
            raise CheckpointError(f"{shard}: unexpected end of file while reading {key!r}")
        got += k


CAST_CHUNK_BYTES = 16 << 20


def iter_shard_tensors(
    shard: Path, records: list[TensorRecord], cast_to: dict[str, torch.dtype] | None = None
) -> Iterator[tuple[TensorRecord, torch.Tensor]]:
    """Yield each tensor of one shard, read with ``readinto`` into its own freshly allocated storage.

    For keys in ``cast_to`` the tensor is allocated in the target dtype and filled through a 16 MB scratch
    buffer, so a cast never holds a full-size copy in the file's dtype.
    """
    cast_to = cast_to or {}
    scratch: torch.Tensor | None = None
    with open(shard, "rb", buffering=0) as fh:
        for rec in sorted(records, key=lambda r: r.begin):
            target = cast_to.get(rec.key, rec.dtype)
            t = torch.empty(rec.shape, dtype=target)
            if rec.end > rec.begin:
                fh.seek(rec.begin)
                if target == rec.dtype:
                    _readinto(fh, memoryview(t.view(-1).view(torch.uint8).numpy()), shard, rec.key)
                else:
                    itemsize = torch.empty((), dtype=rec.dtype).element_size()
                    per = max(1, CAST_CHUNK_BYTES // itemsize)
                    if scratch is None or scratch.dtype != rec.dtype:
                        scratch = torch.empty(per, dtype=rec.dtype)
                    flat = t.view(-1)
                    for i in range(0, flat.numel(), per):
                        n = min(per, flat.numel() - i)
                        _readinto(fh, memoryview(scratch[:n].view(torch.uint8).numpy()), shard, rec.key)
                        flat[i : i + n].copy_(scratch[:n])
            yield rec, t
