"""The one training loop every trainer in the project uses (RFSQ tokenizer, OpenVLA-RSD, both drafts, GR00T).

A trainer supplies only what is its own: a loss (``loss_fn(batch) -> loss`` or ``(loss, stats)``; by default
the model's ``loss(batch)`` method) and, optionally, a validation function. This module owns everything else,
so every trainer schedules, clips, checkpoints, resumes and reports the same way:

* AdamW over the trainable parameters, linear warm-up then cosine decay to ``min_lr_frac`` x ``lr``,
  optional gradient-norm clipping;
* a batch schedule that is a pure function of ``(seed, step)``: the sample indices, a numpy generator for the
  trainer's own augmentation, a torch generator, and the global torch seed are all derived from it, so a run
  resumed at step k continues exactly as an uninterrupted one (no RNG state needs saving);
* checkpoints in ``checkpoint_dir``: ``model.safetensors`` (the ``state_dict``), ``optimizer.pt`` (tensors
  only, read back with ``weights_only=True``) and ``state.json`` (step, history, the trainer's ``meta``),
  written into a temporary directory that then replaces the old one, so an interruption never leaves a half
  checkpoint that a resume would trust;
* history (loss, learning rate, the loss function's stats, validation metrics), a tqdm bar, and a log line
  every ``log_every`` steps so the log file of a background job shows progress too;
* ``stop_at``: checkpoint and return at that step as if interrupted (time-boxed runs, resume tests);
* ``ema_decay``: an exponential moving average of the trainable weights (``ema.safetensors`` in the
  checkpoint), used for validation and left in the model at the end -- the weights a trainer then saves.
  Why: a policy is judged by closed-loop rollouts, where the last iterate's step-to-step jitter costs
  episodes; Diffusion Policy and most LIBERO-scale recipes ship EMA weights.
* scale (see :mod:`models.common.scale` for LoRA and the launch side): ``grad_accum`` micro-batches per optimiser
  step; ``precision="bf16"`` runs the loss under ``torch.autocast(bfloat16)`` (CUDA and CPU; the trainable weights,
  their gradients and AdamW's states stay fp32); ``grad_checkpointing`` enables HF gradient checkpointing on the
  submodules that support it; data parallel across ``torch.distributed`` processes (torchrun): every rank builds
  the same model (rank 0's weights are broadcast), takes its own shard of each step's batch, and the gradients are
  averaged with one all-reduce per optimiser step (after the accumulation), so the result equals one process with
  the whole batch up to float rounding. Only rank 0 logs, validates and writes checkpoints; every rank resumes
  from the same checkpoint. ``batch_size`` is always the whole step's batch: the sample indices of a step do not
  depend on ``grad_accum`` or the number of ranks, and micro-batch ``m`` of rank ``r`` is the slice
  ``(m * world + r)`` of it (its augmentation generator is seeded by ``(seed, step, m * world + r)``).
  ``data_parallel="fsdp"`` shards instead (see :mod:`models.common.fsdp`): each rank holds ``1/world`` of the
  weights, gradients and AdamW states (one FSDP group per LLM decoder layer + the root), FSDP reduce-scatters the
  gradients after every micro-batch's backward (no full-size gradient is ever held, which is the point), validation
  runs on every rank in lockstep (a forward needs every rank's shards; only rank 0 records it), checkpoints are
  all-gathered into the same single-process files (rank 0 writes; resumable with any number of ranks or with DDP),
  and at the end every rank holds the plain, whole trained model, exactly as after DDP.

    cfg = TrainConfig(steps=1000, batch_size=64, lr=3e-4, warmup_steps=100, grad_clip=1.0)
    result = fit(model, len(dataset), cfg, loss_fn=lambda b: model(x[b.index]).loss, checkpoint_dir=out / "ckpt")
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.common import fsdp

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
EMA_FILE = "ema.safetensors"
DATA_PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Optimiser, schedule and bookkeeping of one run (``steps`` counts optimiser steps)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    min_lr_frac: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps (0: only at the end / at stop_at)
    eval_every: int = 0  # call validate every N steps (0: never during training)
    log_every: int = 50  # history record + log line every N steps
    stop_at: int | None = None
    ema_decay: float = 0.0  # 0: no EMA; else e.g. 0.999 (warmed up as min(decay, (1 + step) / (10 + step)))
    progress: bool = True
    desc: str = "train"
    grad_accum: int = 1  # micro-batches per optimiser step (batch_size is split over micro-batches and ranks)
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; fp32 master weights)
    grad_checkpointing: bool = False  # gradient_checkpointing_enable() on HF submodules that support it
    data_parallel: str = "ddp"  # with several ranks: "ddp" (replicas + all-reduce) | "fsdp" (sharded; see above)
    # A fixed share of every batch from samples extra_start.. (the trainers' --extra-share, e.g. DAgger episodes
    # after the demonstrations); None: every sample equally likely.
    extra_start: int | None = None
    extra_share: float | None = None


@dataclass
class Batch:
    """What the loss function gets for one step: which samples, and generators seeded by ``(seed, step)``."""

    step: int
    index: np.ndarray  # [batch_size] int64 sample indices
    rng: np.random.Generator  # for the trainer's own augmentation (crops, ...)
    seed: int  # derived from (seed, step); seeds ``generator``
    micro: int = 0  # which shard of the step's batch (micro-batch m of rank r: m * world + r)

    @property
    def generator(self) -> torch.Generator:
        """A CPU torch generator for this step (e.g. random prefix depths)."""
        return torch.Generator().manual_seed(self.seed)


@dataclass
class FitResult:
    """How the run ended: steps done, whether ``stop_at`` cut it, history, and every loss of this process."""

    step: int
    stopped: bool
    history: list[dict[str, float]] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step done, loss) of this process only
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_frac * lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def make_batch(seed: int, step: int, num_samples: int, batch_size: int, micro: int = 0,
               num_micro: int = 1, extra: tuple[int, float] | None = None) -> Batch:
    """The batch of ``step`` (or its shard ``micro`` of ``num_micro`` equal ones): a pure function of
    ``(seed, step, micro)``, which is what makes resuming exact. With one shard it is the whole step's batch.
    ``extra = (start, share)``: ``round(share * batch_size)`` of the samples come from ``start..num_samples-1``, the
    rest from ``0..start-1``, in a shuffled order (so every micro-batch gets its share)."""
    rng = np.random.default_rng([seed, step])
    if extra is None:
        index = rng.integers(0, num_samples, size=batch_size)
    else:
        start, share = extra
        if not 0 < start < num_samples:
            raise ValueError(f"extra samples start at {start}, outside 1..{num_samples - 1}")
        k = int(round(share * batch_size))
        index = rng.permutation(np.concatenate([rng.integers(0, start, size=batch_size - k),
                                                rng.integers(start, num_samples, size=k)]))
    if num_micro == 1:
        return Batch(step=step, index=index, rng=rng, seed=int(rng.integers(0, 2**62)))
    if batch_size % num_micro:
        raise ValueError(f"batch_size {batch_size} is not divisible into {num_micro} micro-batches "
                         "(grad_accum x world size)")
    per = batch_size // num_micro
    sub = np.random.default_rng([seed, step, micro])
    return Batch(step=step, index=index[micro * per:(micro + 1) * per], rng=sub, seed=int(sub.integers(0, 2**62)),
                 micro=micro)


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def _allreduce_mean(tensors: list[torch.Tensor], world: int, bucket_bytes: int = 256 << 20) -> None:
    """Average ``tensors`` over the ranks in place, in flat buckets (one collective per ~256 MB)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if bucket:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world
            for t, s in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                t.copy_(s)
            bucket.clear()

    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size >= bucket_bytes):
            flush()
            size = 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    flush()


class EMA:
    """Exponential moving average of named trainable parameters (shadow copies, same device and dtype)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, [p.detach() for p in self.params], alpha=1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights and the averages (call twice to undo)."""
        for s, p in zip(self.shadow, self.params, strict=True):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Whole averages on the CPU. Under FSDP every rank must call it (all-gathers); only ``keep`` ranks get
        the tensors (``{}`` elsewhere)."""
        out = {}
        for n, s in zip(self.names, self.shadow, strict=True):
            full = fsdp.full_tensor(s, keep)
            if full is not None:
                out[n] = full.contiguous().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise ValueError(f"EMA checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for n, s in zip(self.names, self.shadow, strict=True):
            fsdp.copy_full_into(s, sd[n])  # a sharded average takes only this rank's piece


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: str | Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                    ema: EMA | None = None) -> None:
    """Writes weights, optimizer, ``state`` (and the EMA) into ``directory`` atomically (temporary directory +
    rename). An FSDP-sharded ``model`` is written whole, in the same format: then every rank must call this (the
    tensors are all-gathered one at a time) and rank 0 writes."""
    from safetensors.torch import save_file

    sharded = fsdp.is_sharded(model)
    keep = not sharded or _dist()[0] == 0
    full = fsdp.gather_state_dict(model, keep)
    opt_state = fsdp.gather_optimizer_state(opt, keep) if sharded else opt.state_dict()
    ema_state = ema.state_dict(keep) if ema is not None else None
    if not keep:
        return
    d = Path(directory)
    tmp, old = d.with_name(d.name + ".tmp"), d.with_name(d.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights, storages = {}, set()
    for k, v in full.items():
        t = v.contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied embeddings): the second one gets its own copy
        weights[k] = t.clone() if ptr in storages else t
        storages.add(ptr)
    save_file(weights, str(tmp / WEIGHTS_FILE))
    torch.save(opt_state, tmp / OPTIMIZER_FILE)
    if ema_state is not None:
        save_file(ema_state, str(tmp / EMA_FILE))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if d.exists():
        d.replace(old)
    tmp.replace(d)
    shutil.rmtree(old, ignore_errors=True)


def _complete(d: Path) -> bool:
    return all((d / name).is_file() for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE))


def find_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint at ``directory`` (or the previous one, if a save was cut between its renames)."""
    d = Path(directory)
    for candidate in (d, d.with_name(d.name + ".old")):
        if _complete(candidate):
            return candidate
    return None


def read_checkpoint_state(directory: str | Path) -> dict[str, Any] | None:
    """``state.json`` of the checkpoint at ``directory``, or None (lets a trainer check ``meta`` first)."""
    d = find_checkpoint(directory)
    return None if d is None else json.loads((d / STATE_FILE).read_text())


def load_checkpoint(directory: str | Path, model: nn.Module, opt: torch.optim.Optimizer,
                    ema: EMA | None = None) -> dict[str, Any] | None:
    """Loads weights and optimizer (and the EMA, when the checkpoint has one) from ``directory``; returns the
    state (None if there is no checkpoint). An FSDP-sharded ``model``/``opt`` take each rank's own shards of the
    (whole, single-process format) files."""
    from safetensors.torch import load_file

    d = find_checkpoint(directory)
    if d is None:
        return None
    if fsdp.is_sharded(model):
        _load_sharded(d, model, opt)
    else:
        # read on the CPU and copied into the model's own tensors: no second copy of a large model on the GPU
        model.load_state_dict(load_file(str(d / WEIGHTS_FILE), device="cpu"), strict=True)
        opt.load_state_dict(torch.load(d / OPTIMIZER_FILE, weights_only=True, map_location="cpu"))
    if ema is not None:
        if (d / EMA_FILE).is_file():
            ema.load_state_dict(load_file(str(d / EMA_FILE), device="cpu"))
        else:
            logger.warning("%s has no %s: the EMA restarts from the resumed weights", d, EMA_FILE)
            ema.shadow = [p.detach().clone() for p in ema.params]
    return json.loads((d / STATE_FILE).read_text())


def _load_sharded(d: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every rank reads the whole files lazily (safetensors one tensor at a time, the optimizer ``mmap`` ed) and
    keeps its own shards: no rank holds a whole 7B state at once, and no communication is needed."""
    from safetensors import safe_open

    with safe_open(str(d / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        fsdp.load_full_into(model, ((k, f.get_tensor(k)) for k in keys), set(keys))
    full = torch.load(d / OPTIMIZER_FILE, weights_only=True, map_location="cpu", mmap=True)
    opt.load_state_dict(fsdp.shard_optimizer_state(full, [p for g in opt.param_groups for p in g["params"]]))


def _broadcast_from_rank0(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights (a rank's own random init would diverge)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, 0)


def _use_fsdp(cfg: TrainConfig, world: int) -> bool:
    if cfg.data_parallel not in DATA_PARALLEL:
        raise ValueError(f"data_parallel must be one of {DATA_PARALLEL}, got {cfg.data_parallel!r}")
    if cfg.data_parallel == "fsdp" and world == 1:
        logger.info("%s: data_parallel='fsdp' in one process: nothing to shard, training unsharded", cfg.desc)
    return cfg.data_parallel == "fsdp" and world > 1


# ---------------------------------------------------------------------------------------------- the loop
def _enable_checkpointing(model: nn.Module, desc: str) -> None:
    from models.common.scale import enable_gradient_checkpointing

    done = enable_gradient_checkpointing(model)
    if done:
        logger.info("%s: gradient checkpointing on %s", desc, ", ".join(n or "<model>" for n in done))
    else:
        logger.warning("%s: grad_checkpointing asked for, but no submodule supports it", desc)


LossFn = Callable[[Batch], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


def fit(model: nn.Module, num_samples: int, cfg: TrainConfig, loss_fn: LossFn | None = None, *,
        validate: Callable[[], dict[str, float]] | None = None, checkpoint_dir: str | Path | None = None,
        resume: bool = False, meta: dict[str, Any] | None = None) -> FitResult:
    """Trains ``model`` for ``cfg.steps`` steps over ``num_samples`` samples; see the module docstring.

    ``loss_fn(batch)`` (default ``model.loss``) returns the loss, or ``(loss, stats)`` with float stats for the
    history. ``validate()`` runs every ``eval_every`` steps and at the last one (the model is put back in train
mode after it).
    With ``resume`` the checkpoint in ``checkpoint_dir`` (if any) restores weights, optimizer, step and
    history; ``meta`` is saved with every checkpoint and comes back in ``FitResult.meta``. Leaves the model in
    eval mode.
    """
    if num_samples < 1:
        raise ValueError("no training samples")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {cfg.precision!r}")
    if cfg.grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {cfg.grad_accum}")
    rank, world = _dist()
    sharded = _use_fsdp(cfg, world)
    num_micro = cfg.grad_accum * world
    extra = None if cfg.extra_share is None else (int(cfg.extra_start or 0), float(cfg.extra_share))
    if cfg.batch_size % num_micro:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by grad_accum x world size = {num_micro}")
    loss_fn = loss_fn or model.loss  # type: ignore[assignment]
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    if cfg.grad_checkpointing:
        _enable_checkpointing(model, cfg.desc)
    if world > 1:
        _broadcast_from_rank0(model)
    if sharded:
        layers = fsdp.shard(model)
        logger.info("%s: FSDP over %d ranks: %d decoder-layer groups + the root", cfg.desc, world, layers)
    # after sharding: the parameters are then the DTensor shards the optimiser and the EMA must hold
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    low = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if low:
        logger.warning("%s: trainable parameters in %s (AdamW states follow them); bf16 training keeps fp32 master "
                       "weights and autocasts instead", cfg.desc, ", ".join(low))
    device_type = params[0].device.type
    amp = ((lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16)) if cfg.precision == "bf16"
           else contextlib.nullcontext)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    ema = EMA(named, cfg.ema_decay) if cfg.ema_decay else None
    step, history, meta = 0, [], dict(meta or {})
    if resume and checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir, model, opt, ema)
        if state is None:
            logger.warning("resume: no checkpoint in %s; starting from scratch", checkpoint_dir)
        else:
            step, history = int(state["step"]), list(state.get("history", []))
            meta = {**state.get("meta", {}), **meta}
            logger.info("resumed from %s at step %d", checkpoint_dir, step)

    def save(at: int) -> None:
        if checkpoint_dir is not None and (rank == 0 or sharded):  # FSDP: every rank gathers, rank 0 writes
            save_checkpoint(checkpoint_dir, model, opt, {"step": at, "history": history, "meta": meta}, ema)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.desc, dynamic_ncols=True,
               disable=None if cfg.progress and rank == 0 else True)
    losses: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    t_log, step_log = t0, step
    model.train()
    stopped = False
    while step < cfg.steps:
        if cfg.stop_at is not None and step >= cfg.stop_at:
            save(step)
            logger.info("%s: stopping at step %d (stop_at); resume to continue", cfg.desc, step)
            stopped = True
            break
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum, stats_sum = 0.0, {}
        for m in range(cfg.grad_accum):
            batch = make_batch(cfg.seed, step, num_samples, cfg.batch_size, m * world + rank, num_micro, extra)
            torch.manual_seed(batch.seed)  # noise drawn inside the model (dropout, flow matching) is per step too
            with amp():
                out = fsdp.call(model, loss_fn, batch)  # FSDP: inside the root's forward hooks
            loss, stats = out if isinstance(out, tuple) else (out, {})
            (loss / cfg.grad_accum if cfg.grad_accum > 1 else loss).backward()
            loss_sum += float(loss.detach())
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
        value = loss_sum / cfg.grad_accum
        stats = {k: v / cfg.grad_accum for k, v in stats_sum.items()}
        if world > 1 and not sharded:  # FSDP reduce-scattered the gradients in the backward already
            for p in params:
                if p.grad is None:  # unused on this rank's micro-batches: a zero gradient joins the average
                    p.grad = torch.zeros_like(p)
            _allreduce_mean([p.grad for p in params], world)
        if world > 1:
            logged = torch.tensor([value, *stats.values()], dtype=torch.float64)
            _allreduce_mean([logged], world)
            value, stats = float(logged[0]), dict(zip(stats, logged[1:].tolist(), strict=True))
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(step)
        step += 1
        losses.append((step, value))
        bar.update(1)
        record: dict[str, float] | None = None
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "loss": value, "lr": lr, **stats}
            bar.set_postfix(loss=f"{value:.4g}")
        if (validate is not None and (rank == 0 or sharded) and cfg.eval_every
                and (step % cfg.eval_every == 0 or step == cfg.steps)):
            if ema is not None:
                ema.swap()
            with amp():  # bf16 runs may hold frozen bf16 weights: validation computes as training does
                metrics = fsdp.call(model, validate)  # FSDP: every rank runs it (forwards need all shards)
            if sharded:
                fsdp.reshard_all(model)
            if ema is not None:
                ema.swap()
            model.train()
            record = {"step": step, "loss": value, "lr": lr, **stats, **(record or {}), **metrics}
        if record is not None and rank == 0:
            history.append(record)
            now = time.perf_counter()
            rate = (step - step_log) / max(now - t_log, 1e-9)
            t_log, step_log = now, step
            logger.info("%s step %d/%d: %s (%.2f steps/s)", cfg.desc, step, cfg.steps,
                        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in record.items() if k != "step"), rate)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save(step)
    bar.close()
    if ema is not None:
        ema.swap()  # the averaged weights are the result (the checkpoint keeps the raw ones for resuming)
        logger.info("%s: model holds the EMA weights (decay %g)", cfg.desc, cfg.ema_decay)
    if sharded:
        opt.state.clear()  # the AdamW moments are not needed any more: room for the whole weights
        fsdp.to_plain(model)
    model.eval()
    return FitResult(step=step, stopped=stopped, history=history, losses=losses, meta=meta,
                     seconds=time.perf_counter() - t0)
