"""FSDP (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``) for the one training loop.

Why FSDP: data parallel (DDP) keeps the whole model, its gradients and AdamW's two moments on every rank -- 16
bytes a trainable parameter, about 120 GB for a full 7B fine-tune, more than one 80 GB GPU. FSDP shards those
across the ``N`` ranks (each holds ``1/N``) and all-gathers one transformer decoder layer's weights just before
it runs, so a full 7B fine-tune fits 8 x 80 GB (``python -m models.common.memory`` prints the estimate).

What :func:`models.common.training.fit` does with it (``TrainConfig.data_parallel="fsdp"`` and more than one
rank; the trainers' ``--data-parallel fsdp``):

* :func:`shard` -- ``fully_shard`` on every LLM decoder layer (:func:`units`: the modules whose class name ends
  in ``DecoderLayer``: Llama's, Qwen3's), then on the root, which owns everything else (embeddings, ``lm_head``,
  vision towers, projector, action heads) as one group. Mixed dtypes inside a group are fine (FSDP2 only wants
  one dtype among the *trainable* parameters), so peft LoRA with bf16 frozen weights shards as it is;
* the loss and the validation run through :func:`call`, the root's FSDP forward hooks around an arbitrary
  function: a trainer's loss calls model methods (``training_loss``, ``loss``), not ``forward``, and without the
  root's hooks its parameters would stay sharded;
* checkpoints keep the plain single-process format (so a run may be resumed with any number of ranks, DDP or
  FSDP): :func:`gather_state_dict` / :func:`gather_optimizer_state` all-gather one tensor at a time and rank 0
  keeps the full tensors on the CPU; on resume :func:`load_full_into` and :func:`shard_optimizer_state` cut every
  rank's own shard out of the file's full tensors (no communication);
* :func:`to_plain` at the end all-gathers the trained weights and turns the model back into a plain module on
  every rank, as DDP leaves it, so a trainer's ``scale.finish_model`` (merge LoRA, fp32) and rank 0's
  released-format save run unchanged.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

UNIT_SUFFIX = "DecoderLayer"  # HF's transformer block class names (LlamaDecoderLayer, Qwen3DecoderLayer, ...)
_CALL = "_fsdp_fit_call"  # the root method registered as an FSDP forward (see :func:`call`)


def units(model: nn.Module) -> list[nn.Module]:
    """The LLM decoder layers of ``model`` (outermost ones only): each becomes its own FSDP group."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if not name or not type(m).__name__.endswith(UNIT_SUFFIX):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, m))
    return [m for _, m in found]


def group_sizes(model: nn.Module) -> tuple[int, list[int]]:
    """``(root-group parameters, parameters of each decoder layer)``: what one rank all-gathers at a time."""
    per_unit = [sum(p.numel() for p in u.parameters()) for u in units(model)]
    return sum(p.numel() for p in model.parameters()) - sum(per_unit), per_unit


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module) -> int:
    """``fully_shard`` every decoder layer, then the root (in place), on a 1-D mesh over all ranks. Returns the
    number of layer groups. Every rank must hold the same weights (the loop broadcasts rank 0's first)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    _check_trainable_dtypes(model)
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = units(model)
    if not layers:
        logger.warning("FSDP: %s has no decoder layers (*%s): one group, the whole model gathered at once",
                       type(model).__name__, UNIT_SUFFIX)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # a parameter no micro-batch of this rank used still joins the reduce-scatter with a zero gradient (as the
    # DDP path's all-reduce does); otherwise ranks would issue different collectives and hang
    model.set_reduce_scatter_unused_params(True)
    setattr(model, _CALL, _run.__get__(model))
    register_fsdp_forward_method(model, _CALL)
    return len(layers)


def _check_trainable_dtypes(model: nn.Module) -> None:
    """FSDP2 reduce-scatters each group's gradients in one dtype: refuse, naming the flags, trainable parameters
    stored in several (the loop keeps them fp32 -- ``--precision bf16`` autocasts -- so only a model that stores
    some trainable weights in bf16 itself gets here)."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
    if len(dtypes) > 1:
        raise SystemExit(f"--data-parallel fsdp: the trainable parameters are stored in {', '.join(dtypes)}; FSDP "
                         "needs one dtype (fp32 with --precision bf16 autocast); use --data-parallel ddp")


def _run(self: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def call(model: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` inside the root's FSDP forward (its parameters all-gathered, the backward hooks armed); a
    plain call when ``model`` is not sharded."""
    if not is_sharded(model):
        return fn(*args)
    return getattr(model, _CALL)(fn, *args)


def reshard_all(model: nn.Module) -> None:
    """Free every all-gathered group (after a forward with no backward, e.g. validation): the registered
    parameters are the sharded ones again, as the optimiser and the checkpoint code expect."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ---------------------------------------------------------------------------------------------- full <-> shards
def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """The whole of ``t`` (an all-gather when it is a DTensor: every rank must call), on the CPU if ``keep``."""
    full = t.full_tensor() if is_dtensor(t) else t
    return full.detach().cpu() if keep else None


def gather_state_dict(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every tensor whole, on the CPU where ``keep`` (rank 0); ``{}`` elsewhere."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        full = full_tensor(v, keep)
        if full is not None:
            out[k] = full
    return out


def gather_optimizer_state(opt: torch.optim.Optimizer, keep: bool) -> dict[str, Any] | None:
    """``opt.state_dict()`` with whole tensors (the single-process format), where ``keep``; else None."""
    sd = opt.state_dict()  # its per-parameter dicts are the optimiser's own: build new ones
    state = {i: {k: full_tensor(v, keep) if is_dtensor(v) else v for k, v in st.items()}
             for i, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else None


@torch.no_grad()
def _local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` as laid out in the DTensor ``like`` (cut locally, no communication)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.to(like.device, like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """``target.copy_(full)`` where ``target`` may be a sharded DTensor (then only this rank's shard is copied)."""
    if is_dtensor(target):
        target.to_local().copy_(_local_shard(full, target))
    else:
        target.copy_(full.to(target.device, target.dtype))


def load_full_into(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], keys: set[str]) -> None:
    """Load a full (single-process) state dict into the sharded ``model``, one tensor at a time (a 7B file is
    never whole in memory); strict: ``keys`` (the file's) must equal the model's."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - keys), sorted(keys - set(own))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, full in tensors:
        copy_full_into(own[k], full)


def shard_optimizer_state(sd: dict[str, Any], params: list[torch.Tensor]) -> dict[str, Any]:
    """A full optimiser state dict (from :func:`gather_optimizer_state` or a plain run) cut to this rank's shards
    of ``params`` (the optimiser's parameters, in order), ready for ``opt.load_state_dict``."""
    for i, st in sd["state"].items():
        p = params[int(i)]
        if not is_dtensor(p):
            continue
        for k, v in list(st.items()):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape:  # not AdamW's scalar step
                out = torch.empty_like(p.detach())
                out.to_local().copy_(_local_shard(v, out))
                st[k] = out
    return sd


# ---------------------------------------------------------------------------------------------- the end of a run
@torch.no_grad()
def to_plain(model: nn.Module) -> None:
    """Turn the sharded ``model`` back into a plain module holding the whole trained weights, on every rank.

    Every rank must call it (the weights are all-gathered one tensor at a time). FSDP2 has no public inverse of
    ``fully_shard``; this removes exactly what it added -- the forward and state-dict hooks (through the handles
    FSDP keeps), the ``FSDP<Class>`` class in front of the module's own, the registered forward method -- and
    puts plain ``nn.Parameter`` s in place of the DTensors. Checked at the end: nothing sharded remains.
    """
    from torch.distributed.fsdp import FSDPModule

    reshard_all(model)  # the registered parameters must be the sharded DTensors
    whole: dict[int, nn.Parameter] = {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is None or not is_dtensor(p):
                continue
            if id(p) not in whole:  # a tied parameter stays one tensor
                whole[id(p)] = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
            m._parameters[name] = whole[id(p)]
    for m in model.modules():
        if isinstance(m, FSDPModule):
            _strip(m)
        for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):  # markers on every managed module
            m.__dict__.pop(attr, None)
    model.__dict__.pop(_CALL, None)
    left = [n for n, p in model.named_parameters() if is_dtensor(p)]
    left += [n or "<root>" for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    if left:
        raise RuntimeError(f"FSDP could not be removed from {left[:5]} (torch {torch.__version__})")
    logger.info("FSDP: gathered %d parameters; the model is a plain module again", len(whole))


def _strip(module: nn.Module) -> None:
    """Remove FSDP2's hooks and class from one ``fully_shard`` ed module (private attributes; checked on torch 2.13)."""
    try:
        state = module._get_fsdp_state()
        handles = [state._pre_forward_hook_handle, state._post_forward_hook_handle]
        for group in state._fsdp_param_groups:
            handles += list(group._module_to_pre_save_state_dict_hook_handle.values())
            handles += list(group._module_to_pre_load_state_dict_hook_handle.values())
            handles += [fp._post_load_hook_handle for fp in group.fsdp_params]
        cls = type(module)
        orig = cls.__mro__[cls._orig_cls_mro_index]
    except AttributeError as e:  # a torch whose FSDP2 internals moved
        raise RuntimeError(f"cannot remove FSDP from {type(module).__name__} with torch {torch.__version__}: {e}") \
            from e
    for h in handles:
        h.remove()
    module.__class__ = orig
    # the FSDP state (kept in the module's __dict__ by torch's composable-API contract) holds this rank's shards
    contract = importlib.import_module("torch.distributed._composable.contract")
    for key in (getattr(contract, "STATE_KEY", None), getattr(contract, "REGISTRY_KEY", None)):
        if key is not None:
            module.__dict__.pop(key, None)
