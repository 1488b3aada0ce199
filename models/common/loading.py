"""Meta-device construction and streaming, validated loading of sharded safetensors checkpoints.

The loader never builds a randomly initialised model first: parameters are created on the ``meta`` device
(no memory), every shard header is validated before any data is read, and each tensor is then read, cast and
assigned one at a time. So loading a 7B checkpoint needs about the weights' bytes plus one tensor, never two
copies of the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from models.common.errors import CheckpointError
from models.common.safetensors_io import checkpoint_shards, iter_shard_tensors, read_header

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def init_empty_weights() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device while keeping buffers real.

    Buffers (RoPE ``inv_freq``, position ids) are tiny and non-persistent, so they are not in checkpoints; keeping
    them real means nothing has to be recomputed after loading. Parameters go to meta as soon as they are
    registered, so initialisers that run afterwards cost nothing. It patches ``nn.Module.register_parameter``
    for the duration of the block, so do not construct unrelated modules in other threads meanwhile.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


class CheckpointModel(Protocol):
    """What the generic loader needs from a policy's top-level module."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    @staticmethod
    def to_checkpoint_key(module_key: str) -> str: ...

    @staticmethod
    def from_checkpoint_key(checkpoint_key: str) -> str: ...

    def tied_aliases(self) -> dict[str, str]: ...


def checkpoint_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Released checkpoint key -> shape that ``model`` expects (tied aliases and non-persistent buffers left out)."""
    aliases = model.tied_aliases()  # type: ignore[operator]
    out: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in aliases:
            continue
        out[model.to_checkpoint_key(key)] = tuple(tensor.shape)  # type: ignore[operator]
    return out


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save, under the released checkpoint names (tied aliases saved once)."""
    aliases = model.tied_aliases()  # type: ignore[operator]
    return {
        model.to_checkpoint_key(k): v  # type: ignore[operator]
        for k, v in model.state_dict().items()
        if k not in aliases
    }


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer ``key`` without copying it."""
    prefix, _, name = key.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:  # pragma: no cover - state_dict keys always resolve
        raise CheckpointError(f"cannot place {key!r}: no such parameter or buffer")


def stream_load(
    model: nn.Module,
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    checkpoint_aliases: dict[str, str] | None = None,
) -> None:
    """Load a sharded checkpoint into a meta-initialised ``model``, validating everything first.

    ``checkpoint_aliases`` maps alternative released names to canonical ones (for example a tied ``lm_head``
    stored instead of ``embed_tokens``). Raises ``CheckpointError`` for missing/unexpected keys, shape or dtype
    mismatches, and missing or corrupt shards, always naming the file and key.
    """
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"unsupported load dtype {dtype}; use one of {FLOAT_DTYPES}")
    checkpoint_aliases = checkpoint_aliases or {}
    expected = checkpoint_shapes(model)
    module_tensors = model.state_dict(keep_vars=True)
    shards, weight_map = checkpoint_shards(path)

    headers = [(shard, read_header(shard)) for shard in shards]
    present = {rec.key for _, records in headers for rec in records}
    plan: list[tuple[Path, list[Any]]] = []
    seen: dict[str, str] = {}
    unexpected: list[str] = []
    for shard, records in headers:
        keep = []
        for rec in records:
            key = checkpoint_aliases.get(rec.key, rec.key)
            if key != rec.key and key in present:
                continue  # the canonical tensor is stored too; the alias is a duplicate copy
            if key not in expected:
                unexpected.append(f"{rec.key} ({shard.name})")
                continue
            if weight_map and weight_map.get(rec.key) not in (None, shard.name):
                raise CheckpointError(f"{shard}: tensor {rec.key!r} is indexed under {weight_map[rec.key]}")
            if tuple(rec.shape) != expected[key]:
                raise CheckpointError(
                    f"{shard}: shape mismatch for {rec.key!r}: checkpoint {tuple(rec.shape)}, "
                    f"model expects {expected[key]}"
                )
            module_key = model.from_checkpoint_key(key)  # type: ignore[operator]
            if module_tensors[module_key].is_floating_point() and not rec.dtype.is_floating_point:
                raise CheckpointError(
                    f"{shard}: tensor {rec.key!r} has dtype {rec.dtype}, expected a floating-point dtype"
                )
            if key in seen:
                raise CheckpointError(f"{shard}: tensor {rec.key!r} also present in {seen[key]}")
            seen[key] = shard.name
            keep.append((rec, key, module_key))
        plan.append((shard, keep))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys in checkpoint: {unexpected[:10]}"
                              + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise CheckpointError(f"{path}: keys missing from checkpoint: {missing[:10]}"
                              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))

    for shard, keep in plan:
        by_key = {rec.key: module_key for rec, _, module_key in keep}
        records = [rec for rec, _, _ in keep]
        cast = {
            rec.key: dtype
            for rec in records
            if module_tensors[by_key[rec.key]].is_floating_point() and rec.dtype != dtype
        }
        for rec, tensor in iter_shard_tensors(shard, records, cast):
            if torch.device(device).type != "cpu":
                tensor = tensor.to(device)
            _assign(model, by_key[rec.key], tensor)
        logger.debug("loaded %d tensors from %s", len(records), shard.name)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file, turning every failure into a ``CheckpointError`` that names it."""
    if not path.is_file():
        raise CheckpointError(f"required file missing: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def assert_fully_loaded(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Fail if any parameter is still on the meta device (would mean a loader bug, not a user error)."""
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise CheckpointError(f"{path}: parameters left uninitialised after loading: {left[:5]}")


Builder = Callable[[dict[str, Any]], nn.Module]
