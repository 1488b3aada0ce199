"""PACKDIR cache: hit, miss, stale keys (settings or weights changed), corrupted files, atomic writes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from quant import DuQuantConfig, quantized_layers, replace_linear_layers
from quant.testing import gr00t_like


def _run(tmp: Path, caplog: pytest.LogCaptureFixture, **kw: object) -> tuple[dict[str, torch.Tensor], str]:
    torch.manual_seed(0)
    model = gr00t_like()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quant"):
        replace_linear_layers(model, DuQuantConfig(enabled=True, packdir=str(tmp), scope="action_head", **kw))
    q = quantized_layers(model)
    return {n: m.w_q.clone() for n, m in q.items()}, caplog.text


def test_hit_miss_and_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w1, log = _run(tmp_path, caplog)
    n = len(w1)
    assert f"0 reused, {n} recomputed (0 stale)" in log
    assert len(list(tmp_path.glob("*.json"))) == n and len(list(tmp_path.glob("*.safetensors"))) == n
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries
    w2, log = _run(tmp_path, caplog)
    assert f"{n} reused, 0 recomputed" in log
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # a setting that changes the pack makes every pack stale -> recomputed
    _, log = _run(tmp_path, caplog, block=8)
    assert f"0 reused, {n} recomputed ({n} stale)" in log
    _, log = _run(tmp_path, caplog, block=8)
    assert f"{n} reused" in log
    for change in ({"permute": False}, {"ls": 0.3}, {"rot": "svd"}, {"block_out": 4}, {"wbits_default": 3}):
        _, log = _run(tmp_path, caplog, block=8, **change)
        assert f"0 reused, {n} recomputed ({n} stale)" in log, change


def test_weight_change_and_corruption_are_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _run(tmp_path, caplog)
    # different weights under the same names (e.g. another checkpoint) -> stale
    torch.manual_seed(1)
    model = gr00t_like()
    with caplog.at_level(logging.INFO, logger="quant"):
        caplog.clear()
        replace_linear_layers(model, DuQuantConfig(enabled=True, packdir=str(tmp_path), scope="action_head"))
    assert "0 reused" in caplog.text
    n = len(list(tmp_path.glob("*.json")))
    # a truncated tensor file -> detected by its recorded hash and recomputed, the others reused
    victim = sorted(tmp_path.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:40])
    torch.manual_seed(1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quant"):
        replace_linear_layers(gr00t_like(), DuQuantConfig(enabled=True, packdir=str(tmp_path), scope="action_head"))
    assert "do not match their JSON record" in caplog.text
    assert f"{n - 1} reused, 1 recomputed (1 stale)" in caplog.text
