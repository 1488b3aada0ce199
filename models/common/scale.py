"""Fine-tuning at 7B scale: LoRA (peft), bf16, gradient checkpointing and data parallelism, for every trainer.

The loop itself (:func:`models.common.training.fit`) owns gradient accumulation, bf16 autocast, gradient
checkpointing and the data-parallel gradient all-reduce (``TrainConfig.grad_accum / precision /
grad_checkpointing``; the process group comes from :func:`init_distributed`). This module holds what a trainer
does to its model before and after the loop:

* :func:`apply_lora` injects peft LoRA adapters into the LLM's projection Linears (in place, so every module that
  holds the LLM by reference -- the RFSQ layer head, the GR00T backbone -- trains through them) and freezes
  everything except the adapters and the modules the trainer keeps fully trainable (the RFSQ layer head, the
  proprio projector, the GR00T action head);
* :func:`merge_lora` folds the adapters back into the base weights and puts the plain ``nn.Linear`` modules back,
  so the released-format save functions write a directory the server loads with no peft and no ``lora_`` keys;
* :func:`enable_gradient_checkpointing` calls ``gradient_checkpointing_enable()`` on the HF submodules that support
  it (OpenVLA: the Llama ``LlamaForCausalLM``; GR00T: the Qwen3 ``Qwen3ForCausalLM`` and the SigLIP vision model);
* :func:`add_scale_arguments` / :func:`scale_options` give every trainer the same flags.

Data parallel: launch with ``torchrun --nproc-per-node N -m rsd.train_vla main ...``; :func:`init_distributed`
reads torchrun's environment (gloo on CPU, nccl on CUDA, one GPU per local rank). ``--data-parallel`` picks how the
ranks share the work: ``ddp`` (default) keeps a whole replica on every rank and all-reduces the gradients -- right
for LoRA, whose 7B run fits one 80 GB GPU; ``fsdp`` shards weights, gradients and AdamW states over the ranks
(PyTorch FSDP2, one group per LLM decoder layer + the root; :mod:`models.common.fsdp`) -- what a full 7B fine-tune
needs (about 57 GB a GPU on 8 GPUs against 159 GB unsharded; see :mod:`models.common.memory`). FSDP composes with
LoRA (bf16 frozen weights included), bf16 autocast, gradient accumulation and checkpointing; checkpoints keep the
single-process format, and the released model is saved by rank 0 exactly as under DDP.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from models.common.training import DATA_PARALLEL

logger = logging.getLogger(__name__)

LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("fp32", "bf16")


@dataclass
class LoraOptions:
    """peft LoRA on the LLM: rank ``r`` (0 = off: full fine-tune), ``alpha`` (None: = r), dropout, module names."""

    r: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_DEFAULT_TARGETS

    @property
    def enabled(self) -> bool:
        return self.r > 0


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every trainer shares: LoRA, precision, accumulation, checkpointing."""
    g = p.add_argument_group("scale (LoRA / bf16 / accumulation / checkpointing; data parallel via torchrun)")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the LLM (0 = full fine-tune; OpenVLA: 32)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default=",".join(LORA_DEFAULT_TARGETS),
                   help="comma-separated Linear names inside the LLM that get adapters")
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: autocast (fp32 master weights; with LoRA the frozen weights are stored in bf16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (--batch-size is "
                   "the whole step's batch over all micro-batches and ranks)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute the LLM's (and HF vision towers') activations in the backward pass")
    g.add_argument("--data-parallel", default="ddp", choices=DATA_PARALLEL,
                   help="with several ranks (torchrun): ddp = a whole model per rank + gradient all-reduce; fsdp = "
                   "weights, gradients and AdamW states sharded over the ranks (FSDP2, per LLM decoder layer): a "
                   "full 7B fine-tune on 8 x 80 GB. Ignored in one process")
    g.add_argument("--memory-check", default="on", choices=["on", "off"],
                   help="refuse a run whose memory estimate exceeds the device (on by default)")


def lora_options(args: argparse.Namespace) -> LoraOptions:
    targets = tuple(t.strip() for t in str(args.lora_targets).split(",") if t.strip())
    return LoraOptions(r=int(args.lora_r), alpha=args.lora_alpha, dropout=float(args.lora_dropout), targets=targets)


# ---------------------------------------------------------------------------------------------- LoRA
def apply_lora(llm: nn.Module, opts: LoraOptions, model: nn.Module | None = None,
               keep_trainable: Iterable[nn.Module] = ()) -> int:
    """Inject LoRA adapters into ``llm`` in place; freeze ``model`` (default ``llm``) except adapters and
    ``keep_trainable``. Returns the number of trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    if not opts.enabled:
        raise ValueError("apply_lora needs r > 0")
    present = {n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in opts.targets if t not in present]
    if missing or not opts.targets:
        raise ValueError(f"--lora-targets {list(opts.targets)}: no Linear named {missing} in the LLM "
                         f"(its Linears: {sorted(present)})")
    cfg = LoraConfig(r=opts.r, lora_alpha=opts.alpha if opts.alpha is not None else opts.r,
                     lora_dropout=opts.dropout, target_modules=list(opts.targets), bias="none")
    inject_adapter_in_model(cfg, llm)
    root = model if model is not None else llm
    for p in root.parameters():
        p.requires_grad_(False)
    for n, p in root.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    for m in keep_trainable:
        if m is not None:
            for p in m.parameters():
                p.requires_grad_(True)
    n = sum(p.numel() for p in root.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%s on %s: %.2fM trainable of %.2fM parameters", opts.r, cfg.lora_alpha,
                ",".join(opts.targets), n / 1e6, sum(p.numel() for p in root.parameters()) / 1e6)
    return n


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base Linear and put the base module back (in place). Returns how many."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: there can be no adapters
        return 0
    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = module.get_base_layer()
        # merge in fp32, whatever the stored dtype (bf16 frozen weights), then store back in the base dtype
        w = base.weight
        delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters if a in module.lora_A)
        w.data = (w.data.float() + delta).to(w.dtype)
        setattr(parent, child, base)
        merged += 1
    if merged:
        logger.info("merged %d LoRA adapters into the base weights", merged)
    return merged


def cast_frozen_(model: nn.Module, dtype: torch.dtype) -> int:
    """Store frozen floating parameters in ``dtype`` (bf16 LoRA: no fp32 copy of the 7B base). Returns how many."""
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- checkpointing
def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """``gradient_checkpointing_enable(use_reentrant=False)`` (transformers 5: ``activation_checkpointing_enable``) on every outermost HF submodule supporting it; returns
    their names (OpenVLA: the Llama LLM; GR00T: the Qwen3 LLM and the SigLIP vision model)."""
    done: list[str] = []
    for name, m in model.named_modules():
        if any(d == "" or name.startswith(d + ".") for d in done):
            continue
        if not getattr(m, "supports_gradient_checkpointing", False):
            continue
        kwargs = {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name warns)
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            done.append(name)
        elif hasattr(m, "gradient_checkpointing_enable"):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            done.append(name)
    return done


# ---------------------------------------------------------------------------------------------- distributed
def init_distributed(device: str) -> tuple[int, int, str]:
    """From torchrun's environment (``WORLD_SIZE`` > 1): init the process group (nccl on CUDA, else gloo) and
    return ``(rank, world_size, device)`` with one GPU per local rank. Single process: ``(0, 1, device)``."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, dist.get_world_size(), device


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


# ---------------------------------------------------------------------------------------------- trainer glue
def prepare_model(model: nn.Module, llm: nn.Module, args: argparse.Namespace,
                  keep_trainable: Iterable[nn.Module] = ()) -> LoraOptions:
    """What a trainer does after building ``model`` from the shared flags: LoRA on ``llm`` (``model`` frozen
    except adapters + ``keep_trainable``) and, for bf16 LoRA, the frozen weights stored in bf16."""
    opts = lora_options(args)
    if opts.enabled:
        apply_lora(llm, opts, model=model, keep_trainable=keep_trainable)
        if args.precision == "bf16":
            cast_frozen_(model, torch.bfloat16)
    return opts


def finish_model(model: nn.Module) -> None:
    """After training: merge LoRA into the base weights and put every weight back in fp32 (the released format
    the save functions write and the server loads)."""
    merge_lora(model)
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        model.float()


def train_config_kwargs(args: argparse.Namespace) -> dict:
    """The :class:`~models.common.training.TrainConfig` fields the shared flags set."""
    if args.grad_accum < 1:
        raise SystemExit("--grad-accum must be >= 1")
    return {"grad_accum": int(args.grad_accum), "precision": args.precision,
            "grad_checkpointing": bool(args.grad_checkpointing), "data_parallel": args.data_parallel}


def fsdp_shards(args: argparse.Namespace, world: int) -> int:
    """How many ranks the weights are sharded over (the memory estimate divides by it): ``world`` under
    ``--data-parallel fsdp``, else 1."""
    return world if args.data_parallel == "fsdp" and world > 1 else 1
