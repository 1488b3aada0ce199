"""``calibrate``: run calibration forward passes through a quantised model, then freeze activation scales.

Every fake-quant layer observes *every* call during calibration (a uniform sample of all values, see
:class:`quant.linear.AbsObserver`), over up to ``CALIB_STEPS`` batches; the published code only ever used the first
batch. Layers that saw no call (a branch the calibration data never reached) stay uncalibrated and calibrate lazily
from their first ``CALIB_STEPS`` calls at serving time, which is logged per layer.
"""

from __future__ import annotations

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


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    steps: int | None = None,
) -> int:
    """Calibrate all fake-quant layers of ``model``; return the number of batches used.

    ``steps`` defaults to the layers' ``CALIB_STEPS`` (the largest, if they differ); the iterable may be longer
    (the rest is not consumed) or shorter (a warning says so).
    """
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    if not layers:
        LOG.info("[GR00T-DUQUANT] calibrate: no quantised layers; nothing to do")
        return 0
    steps = steps or max(m.calib_steps for m in layers)
    fwd = forward_fn or default_forward
    for m in layers:
        m.start_calibration()
    used = 0
    with torch.no_grad():
        for batch in batches:
            if used >= steps:
                break
            fwd(model, batch)
            used += 1
    if used < steps:
        LOG.warning("[GR00T-DUQUANT] calibrate: only %d of CALIB_STEPS=%d batches were available", used, steps)
    unseen = 0
    for m in layers:
        m.freeze()
        unseen += m.calib_state != "frozen"
    LOG.info(
        "[GR00T-DUQUANT] calibrated %d layers from %d batches%s", len(layers) - unseen, used,
        f"; {unseen} saw no data and will calibrate lazily" if unseen else "",
    )
    return used
