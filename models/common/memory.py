"""How much device memory a training run needs, checked before it starts (every trainer calls :func:`preflight`).

The estimate is the usual accounting for AdamW training of a decoder transformer:

* weights in their stored dtype (frozen ones bf16 in a bf16 LoRA run, else fp32), trainable weights fp32;
* per trainable parameter: its fp32 gradient and AdamW's two fp32 moments (4 + 8 bytes);
* activations kept for the backward pass, per token and LLM layer about ``10 h + 4 I`` values in the compute dtype
  (attention input/q/k/v/output, the residual stream and norms, and the SwiGLU gate/up/product/down inputs; SDPA
  stores no ``seq x seq`` scores), plus ``2 r`` per LoRA target; with gradient checkpointing only each layer's
  input (``h`` values) plus one layer's recompute;
* the head's fp32 logits and their gradient, and a 10 % allocator/workspace margin;
* under FSDP over ``N`` ranks (``--data-parallel fsdp``; :mod:`models.common.fsdp`) each rank stores ``1/N`` of the
  weights, gradients and AdamW moments, plus what it all-gathers at a time: the root group (embeddings,
  ``lm_head``, vision towers, projector, heads -- whole during the forward and backward) and two decoder layers
  (the one running and the next), their weights and gradients.

It is an estimate (about +-20 % against measured peaks); it exists to refuse, with the numbers, a run that cannot
fit, before minutes of loading. ``python -m models.common.memory`` prints the 7B OpenVLA-RSD tables
(:func:`openvla_rsd_7b_estimate`; per GPU, a batch of 16 x 300 tokens on each GPU):

======================================================  ========
LoRA r=32, bf16, one GPU (or DDP: each GPU holds all)    46.8 GB
LoRA r=32, bf16, one GPU, gradient checkpointing         20.2 GB
full fine-tune, fp32, one GPU                           188.0 GB
full fine-tune, bf16, one GPU (or DDP)                  159.3 GB
full fine-tune, bf16, FSDP over 8 GPUs                   56.9 GB
full fine-tune, bf16, FSDP over 8 GPUs, checkpointing    30.5 GB
======================================================  ========

So a full 7B fine-tune needs FSDP: 8 x 80 GB holds it (sharded weights + gradients + moments 14.8 GB, the
all-gathered root group + 2 layers 10.8 GB, activations 26.1 GB at batch 16 a GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

GB = 1e9


@dataclass
class MemoryEstimate:
    """Rows of ``(what, bytes)``; ``total`` is their sum."""

    rows: list[tuple[str, float]] = field(default_factory=list)
    what: str = "training run"

    @property
    def total(self) -> float:
        return float(sum(b for _, b in self.rows))

    def table(self) -> str:
        w = max(len(n) for n, _ in self.rows + [("total", 0)])
        lines = [f"memory estimate: {self.what}"]
        lines += [f"  {n:<{w}}  {b / GB:8.2f} GB" for n, b in self.rows]
        lines.append(f"  {'total':<{w}}  {self.total / GB:8.2f} GB")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, float]:
        return {**{n: round(b / GB, 3) for n, b in self.rows}, "total_gb": round(self.total / GB, 3)}


def estimate_training_memory(*, frozen_params: float, trainable_params: float, frozen_bytes: float = 2.0,
                             batch: int, seq: int, hidden: int, layers: int, intermediate: int,
                             checkpointing: bool = False, act_bytes: float = 2.0, lora_r: int = 0,
                             lora_targets: int = 7, logits_dim: int = 0, extra_bytes: float = 0.0,
                             shards: int = 1, gathered_params: float = 0.0,
                             what: str = "training run") -> MemoryEstimate:
    """The estimate from sizes (see the module docstring); ``frozen_bytes``/``act_bytes`` per value. ``shards``:
    FSDP ranks (1: every rank holds everything); ``gathered_params``: what one FSDP rank all-gathers at a time."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    tokens = batch * seq
    per_layer_token = 10 * hidden + 4 * intermediate + 2 * lora_r * lora_targets
    if checkpointing:
        acts = tokens * layers * hidden * act_bytes + tokens * per_layer_token * act_bytes
        act_name = "activations (checkpointed: layer inputs + 1 layer)"
    else:
        acts = tokens * layers * per_layer_token * act_bytes
        act_name = "activations (all layers)"
    part = f", 1/{shards} shard" if shards > 1 else ""
    rows = [
        (f"weights, frozen ({'bf16' if frozen_bytes == 2 else 'fp32'}){part}", frozen_params * frozen_bytes / shards),
        (f"weights, trainable (fp32){part}", trainable_params * 4.0 / shards),
        (f"gradients (fp32){part}", trainable_params * 4.0 / shards),
        (f"AdamW moments (2 x fp32){part}", trainable_params * 8.0 / shards),
    ]
    if shards > 1:
        rows.append(("FSDP all-gathered (root group + 2 layers, weights + grads)",
                     gathered_params * _gathered_bytes(frozen_params, trainable_params, frozen_bytes)))
    rows.append((act_name, float(acts)))
    if logits_dim:
        rows.append(("head logits + grad (fp32)", float(tokens * logits_dim * 8)))
    if extra_bytes:
        rows.append(("other (vision activations, buffers)", float(extra_bytes)))
    rows.append(("allocator / workspace margin (10%)", 0.1 * sum(b for _, b in rows)))
    return MemoryEstimate(rows, what)


def _gathered_bytes(frozen: float, trainable: float, frozen_bytes: float) -> float:
    """Bytes per all-gathered parameter: its stored weight, and an fp32 gradient for the trainable share."""
    t = trainable / max(frozen + trainable, 1.0)
    return (1 - t) * frozen_bytes + t * (4.0 + 4.0)


def estimate_from_model(model: nn.Module, *, batch: int, seq: int, hidden: int, layers: int, intermediate: int,
                        checkpointing: bool, precision: str, lora_r: int = 0, lora_targets: int = 7,
                        logits_dim: int = 0, shards: int = 1, what: str = "training run") -> MemoryEstimate:
    """The estimate for ``model`` as it stands (frozen/trainable split and stored dtypes read from it); with
    ``shards`` > 1 as FSDP shards it (:func:`models.common.fsdp.group_sizes`: its root group + decoder layers)."""
    gathered = 0.0
    if shards > 1:
        from models.common.fsdp import group_sizes

        root, per_layer = group_sizes(model)
        gathered = float(root + 2 * max(per_layer, default=0))
        what = f"{what}, FSDP over {shards} ranks"
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in frozen)
    frozen_bytes = (sum(p.numel() * p.element_size() for p in frozen) / n_frozen) if n_frozen else 4.0
    return estimate_training_memory(
        frozen_params=n_frozen, trainable_params=trainable, frozen_bytes=frozen_bytes, batch=batch, seq=seq,
        hidden=hidden, layers=layers, intermediate=intermediate, checkpointing=checkpointing,
        act_bytes=2.0 if precision == "bf16" else 4.0, lora_r=lora_r, lora_targets=lora_targets,
        logits_dim=logits_dim, shards=shards, gathered_params=gathered, what=what)


def available_memory(device: str | torch.device) -> tuple[float, str]:
    """Free bytes on ``device`` and a label: CUDA ``mem_get_info``; CPU the available RAM."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return float(free), f"{dev} (free of {torch.cuda.get_device_name(dev)})"
    try:
        import psutil

        return float(psutil.virtual_memory().available), "CPU RAM (available)"
    except ImportError:  # pragma: no cover - psutil is a server dependency
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "CPU RAM (available)"


def check_fits(est: MemoryEstimate, device: str | torch.device, available: float | None = None) -> None:
    """Raise ``SystemExit`` naming the numbers when ``est`` exceeds what ``device`` has free (``available``
    given: ``device`` is only its label)."""
    label = str(device)
    if available is None:
        available, label = available_memory(device)
    if est.total > available:
        raise SystemExit(
            f"refusing to start: the {est.what} needs about {est.total / GB:.2f} GB but {label} has "
            f"{available / GB:.2f} GB available.\n{est.table()}\n"
            "Options: --lora-r 32 --precision bf16 (frozen weights in bf16, only adapters + head in AdamW), "
            "--grad-checkpointing, a smaller per-device batch (--grad-accum or more ranks via torchrun), "
            "--data-parallel fsdp with torchrun (weights, gradients and AdamW states sharded over the ranks), "
            "or --memory-check off to try anyway.")


def resident_bytes(model: nn.Module, device: str | torch.device) -> float:
    """Bytes ``model``'s parameters and buffers already occupy on ``device`` (each storage once)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.device != dev or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return float(total)


def preflight(model: nn.Module, device: str | torch.device, *, log=print, enabled: bool = True,
              available: float | None = None, **sizes) -> MemoryEstimate:
    """Estimate (``sizes`` as :func:`estimate_from_model`), print the table, refuse if it cannot fit.

    The model is already loaded when this runs and the estimate counts its weights, so what it holds on the
    device is added back to the free memory: otherwise the weights would count twice -- and under FSDP the whole
    model every rank loads before sharding (30 GB for a full fp32 7B) would refuse a run that fits once sharded."""
    est = estimate_from_model(model, **sizes)
    log(est.table())
    if enabled:
        if available is None:
            free, label = available_memory(device)
            held = resident_bytes(model, device)
            check_fits(est, f"{label} + {held / GB:.2f} GB this model holds", free + held)
        else:
            check_fits(est, device, available)
    return est


# ---------------------------------------------------------------------------------------------- 7B figures
LLAMA2_7B = {"hidden": 4096, "layers": 32, "intermediate": 11008, "vocab": 32064}
VISION_7B = 0.6e9  # DINOv2 ViT-L + SigLIP So400m towers (fused, frozen in a LoRA run)
PROJECTOR_7B = 2176 * 8704 + 8704 * 4096 + 4096 * 4096  # OpenVLA's fused 3-layer MLP projector
OPENVLA_SEQ = 300  # BOS + 256 patches + ~30 prompt tokens + 7 RFSQ layer tokens


def llama_layer_params(hidden: int, intermediate: int) -> int:
    return 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden


def llama_params(hidden: int, layers: int, intermediate: int, vocab: int) -> int:
    return layers * llama_layer_params(hidden, intermediate) + 2 * vocab * hidden + hidden


def lora_params(hidden: int, layers: int, intermediate: int, r: int, kv_hidden: int | None = None) -> int:
    """LoRA on q,k,v,o,gate,up,down: ``r (in + out)`` per adapted Linear."""
    kv = kv_hidden or hidden
    per = r * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + intermediate) * 3)
    return layers * per


def openvla_rsd_7b_estimate(batch: int = 16, lora_r: int = 32, checkpointing: bool = False,
                            precision: str = "bf16", seq: int = OPENVLA_SEQ, shards: int = 1) -> MemoryEstimate:
    """Llama-2-7B OpenVLA backbone (+0.6B vision, projector) + RFSQ layer head, LoRA on the LLM (``lora_r`` 0:
    full fine-tune), per device: ``batch`` is the device's, ``shards`` the FSDP ranks (1: no FSDP)."""
    h, n, i, v = (LLAMA2_7B[k] for k in ("hidden", "layers", "intermediate", "vocab"))
    head = 128 * 7 * h + 8 * h + h * 128 * 7 + 128 * 7  # code embedding, layer embedding, head Linear
    base = llama_params(h, n, i, v) + VISION_7B + PROJECTOR_7B
    if lora_r:
        trainable, frozen = lora_params(h, n, i, lora_r) + head, base
    else:
        trainable, frozen = base + head, 0
    kind = f"LoRA r={lora_r}" if lora_r else "full"
    layer = llama_layer_params(h, i) + (lora_params(h, 1, i, lora_r) if lora_r else 0)
    gathered = (frozen + trainable - n * layer) + 2 * layer  # the root group + two decoder layers
    return estimate_training_memory(
        frozen_params=frozen, trainable_params=trainable, frozen_bytes=2.0 if precision == "bf16" else 4.0,
        batch=batch, seq=seq, hidden=h, layers=n, intermediate=i, checkpointing=checkpointing,
        act_bytes=2.0 if precision == "bf16" else 4.0, lora_r=lora_r, logits_dim=128 * 7, shards=shards,
        gathered_params=gathered if shards > 1 else 0.0,
        what=(f"OpenVLA-RSD 7B {kind} {precision}, batch {batch} x {seq} "
              f"tokens{', grad checkpointing' if checkpointing else ''}"
              f"{f', FSDP over {shards} ranks (per rank)' if shards > 1 else ''}"))


def main() -> None:
    for ckpt in (False, True):
        print(openvla_rsd_7b_estimate(checkpointing=ckpt).table())
    print(openvla_rsd_7b_estimate(lora_r=0, precision="fp32").table())
    for ckpt in (False, True):
        print(openvla_rsd_7b_estimate(lora_r=0, precision="bf16", shards=8, checkpointing=ckpt).table())


if __name__ == "__main__":
    main()
