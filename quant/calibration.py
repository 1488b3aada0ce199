"""``calibrate``: run calibration forward passes through a quantised model, then freeze activation scales.

Every fake-quant layer observes *every* call during calibration (a uniform sample of all values, see
:class:`quant.linear.AbsObserver`), over up to ``CALIB_STEPS`` batches; the published code only ever used the first
batch. Layers that saw no call (a branch the calibration data never reached) stay uncalibrated and calibrate lazily
from their first ``CALIB_STEPS`` calls at serving time, which is logged per layer.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from quant.linear import FakeQuantLinear

LOG = logging.getLogger("quant")


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for mappings, ``model(*batch)`` for tuples/lists, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def plan_passes(layers: list[FakeQuantLinear], budget_bytes: int) -> list[list[FakeQuantLinear]]:
    """Calibration passes: layers with no second-moment statistic all go in the first pass; layers that hold a
    Hessian (GPTQ) are grouped in model order so that one pass holds at most ``budget_bytes`` of Hessians (a layer
    larger than the budget, or any layer with a budget of 0, gets a pass of its own)."""
    light = [m for m in layers if m.hessian_bytes == 0]
    heavy = [m for m in layers if m.hessian_bytes > 0]
    passes: list[list[FakeQuantLinear]] = []
    group: list[FakeQuantLinear] = []
    used = 0
    for m in heavy:
        if group and used + m.hessian_bytes > budget_bytes:
            passes.append(group)
            group, used = [], 0
        group.append(m)
        used += m.hessian_bytes
    if group:
        passes.append(group)
    if not passes:
        return [light]
    passes[0] = light + passes[0]
    return passes


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    steps: int | None = None,
    gptq_mem_mb: int | None = None,
) -> int:
    """Calibrate all fake-quant layers of ``model``; return the number of batches used.

    ``steps`` defaults to the layers' ``CALIB_STEPS`` (the largest, if they differ); the iterable may be longer
    (the rest is not consumed) or shorter (a warning says so).

    A calibration set is given, so ``WOPT=auto`` layers refine their weights with GPTQ. GPTQ needs an
    ``in x in`` fp32 Hessian per layer (a 4096->11008 Linear: 4096^2 * 4 B = 64 MiB; 11008->4096: 11008^2 * 4 B =
    462 MiB); all of a 7B's at once would be ~27 GiB, so Hessian layers are calibrated in sequential passes over
    the same batches, each holding at most ``gptq_mem_mb`` MiB (``GPTQ_MEM_MB``; default the layers' setting)
    of Hessians, freed when the pass ends. Layers of later passes quantise weights only and observe nothing until
    their pass; they see the earlier passes' layers fully quantised, as in sequential GPTQ.
    """
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    if not layers:
        LOG.info("[GR00T-DUQUANT] calibrate: no quantised layers; nothing to do")
        return 0
    steps = steps or max(m.calib_steps for m in layers)
    fwd = forward_fn or default_forward
    data = list(itertools.islice(iter(batches), steps))
    used = len(data)
    if used < steps:
        LOG.warning("[GR00T-DUQUANT] calibrate: only %d of CALIB_STEPS=%d batches were available", used, steps)
    for m in layers:
        m.plan_weights(calibrated=used > 0)
    if gptq_mem_mb is None:
        gptq_mem_mb = min((getattr(m, "gptq_mem_mb", 0) for m in layers), default=0)
    passes = plan_passes(layers, int(gptq_mem_mb) << 20)
    peak = max(sum(m.hessian_bytes for m in p) for p in passes)
    for m in layers:
        m.hold()
    with torch.no_grad():
        for group in passes:
            for m in group:
                m.start_calibration(calibrated=used > 0)
            for batch in data:
                fwd(model, batch)
            for m in group:
                m.freeze()
    unseen = sum(m.calib_state != "frozen" for m in layers)
    LOG.info(
        "[GR00T-DUQUANT] calibrated %d layers from %d batches%s", len(layers) - unseen, used,
        f"; {unseen} saw no data and will calibrate lazily" if unseen else "",
    )
    kinds: dict[str, int] = {}
    for m in layers:
        desc = getattr(m, "weights_desc", None)
        if desc is not None:
            kinds[desc] = kinds.get(desc, 0) + 1
    for desc, n in kinds.items():
        LOG.info("[GR00T-DUQUANT] weights: %s: %d layers", desc, n)
    if len(passes) > 1 or peak:
        LOG.info("[GR00T-DUQUANT] GPTQ: %d sequential calibration passes, at most %.1f MiB of Hessians at once "
                 "(GPTQ_MEM_MB=%d)", len(passes), peak / 2**20, gptq_mem_mb)
    return used
