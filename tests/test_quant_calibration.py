"""Calibration uses every CALIB_STEPS batch (not just the first), and lazy calibration."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from quant import DuQuantConfig, DuQuantLinear, calibrate, quantized_layers, replace_linear_layers
from quant.linear import AbsObserver


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _batches(n: int, big_at: int | None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(16, 32, generator=g) for _ in range(n)]
    if big_at is not None:
        out[big_at] = out[big_at] * 50.0
    return out


def _scale(big_at: int | None, steps: int = 8) -> float:
    m = _model()
    replace_linear_layers(m, DuQuantConfig(enabled=True, include=r"^0$", calib_steps=steps))
    used = calibrate(m, _batches(12, big_at), lambda mm, b: mm(b))
    assert used == steps  # stops at CALIB_STEPS although more batches were given
    layer = quantized_layers(m)["0"]
    assert layer.calibration_calls == steps and layer.calib_state == "frozen"
    return float(layer.act_scale)


def test_every_calibration_batch_counts() -> None:
    base = _scale(None)
    # a batch with 50x larger activations late in calibration must move the scale (first-batch-only would not)
    assert _scale(6) > 5 * base
    # ... but one beyond CALIB_STEPS must not
    assert _scale(10) == pytest.approx(base)


def test_observer_is_a_uniform_sample_of_all_calls() -> None:
    obs = AbsObserver(capacity=4096, seed=0)
    for i in range(32):
        obs.observe(torch.full((1000,), float(i)))
    assert obs.calls == 32 and obs.seen == 32000 and obs.max == 31.0
    vals = obs.values
    assert vals.numel() == 4096
    # every call is represented roughly equally (~128 each)
    counts = torch.bincount(vals.long(), minlength=32)
    assert int(counts.min()) > 60
    assert obs.percentile(50.0) == pytest.approx(15.5, abs=1.5)


def test_lazy_calibration_from_first_calls(caplog: pytest.LogCaptureFixture) -> None:
    lin = nn.Linear(16, 4)
    m = DuQuantLinear(lin, "lazy.layer", 4, 8, calib_steps=3)
    x = torch.randn(5, 16)
    with caplog.at_level(logging.INFO, logger="quant"):
        for _ in range(3):
            assert m.calib_state != "frozen"
            m(x)
    assert m.calib_state == "frozen" and m.calibration_calls == 3
    assert "calibrating lazily" in caplog.text and "lazily calibrated from 3 calls" in caplog.text
    with torch.no_grad():
        y, ref = m(x), lin(x)
    assert float((y - ref).norm() / ref.norm()) < 0.3


def test_uncalibrated_branch_stays_lazy(caplog: pytest.LogCaptureFixture) -> None:
    m = _model()
    replace_linear_layers(m, DuQuantConfig(enabled=True, include=r"^\d$", calib_steps=2))
    with caplog.at_level(logging.INFO, logger="quant"):
        calibrate(m, [], lambda mm, b: mm(b))
    assert "saw no data" in caplog.text
    assert all(q.calib_state == "uncalibrated" for q in quantized_layers(m).values())
