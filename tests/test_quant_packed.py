"""GR00T_DUQUANT_PACKED: int4 packing, packed vs fake outputs, real memory savings, pack cache with codes."""

from __future__ import annotations

import copy
import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from quant import (
    DuQuantConfig,
    DuQuantConfigError,
    DuQuantLinear,
    RTNLinear,
    SmoothQuantLinear,
    quantized_layers,
    replace_linear_layers,
)
from quant import linear as qlinear
from quant import transforms as T
from quant.testing import gr00t_like


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def _layer(out_f: int, in_f: int, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    x = torch.randn(64, in_f, generator=g)
    x[:, 1] *= 20.0  # one outlier channel
    return lin, x


def _calibrated(m: nn.Module, x: torch.Tensor) -> nn.Module:
    m.start_calibration()
    with torch.no_grad():
        m(x[:32])
    m.freeze()
    return m


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_pack_unpack_int4_round_trip() -> None:
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, :31]  # every value, odd width
    codes[1] = codes[1].flip(0)
    p = T.pack_int4(codes)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert int(p[0, -1]) >> 4 == 8  # the padding column holds code 0
    assert torch.equal(T.unpack_int4(p, 31), codes)
    assert torch.equal(T.unpack_int4(p, 31, torch.float32), codes.float())
    even = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    assert torch.equal(T.unpack_int4(T.pack_int4(even), 4), even)
    assert T.pack_int4(even).tolist() == [[0 | (15 << 4), 8 | (7 << 4)]]
    with pytest.raises(ValueError, match="-8, 7"):
        T.pack_int4(torch.tensor([8]))


@pytest.mark.parametrize(("abits", "row_rot", "wbits"),
                         [(8, "restore", 4), (0, "restore", 4), (8, "0", 4), (8, "propagate", 4), (8, "restore", 8)])
def test_packed_matches_fake(abits: int, row_rot: str, wbits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qlinear, "PACKED_BLOCK_ELEMS", 40 * 96)  # several row blocks
    lin, x = _layer(96 if row_rot == "propagate" else 100, 96)  # 100: padded output rows
    kw = dict(row_rot=row_rot, consumer_ok=row_rot == "propagate")
    fake = _calibrated(DuQuantLinear(copy.deepcopy(lin), "l", wbits, abits, **kw), x)
    packed = _calibrated(DuQuantLinear(copy.deepcopy(lin), "l", wbits, abits, packed=True, **kw), x)
    assert packed.weight is None and packed.w_q is None and fake.w_packed is None
    assert packed.w_packed.dtype == (torch.uint8 if wbits <= 4 else torch.int8)
    assert torch.equal(packed.quantized_weight(), fake.quantized_weight())  # same levels, same fp32 scales
    with torch.no_grad():
        _close(packed(x[32:]), fake(x[32:]))


@pytest.mark.parametrize("wopt", ["act", "gptq"])
def test_packed_after_weight_refinement(wopt: str) -> None:
    lin, x = _layer(48, 64)
    fake = DuQuantLinear(copy.deepcopy(lin), "l", 4, 8, wopt=wopt)
    packed = DuQuantLinear(copy.deepcopy(lin), "l", 4, 8, wopt=wopt, packed=True)
    assert packed.weight is not None  # weights depend on calibration: packed when it ends
    _calibrated(fake, x)
    _calibrated(packed, x)
    assert packed.weight is None and packed.w_packed is not None
    with torch.no_grad():
        _close(packed(x[32:]), fake(x[32:]))
    with pytest.raises(RuntimeError, match="PACKED"):
        packed.start_calibration()


def test_packed_baselines_and_odd_width() -> None:
    lin, x = _layer(20, 33)  # odd in-features: the last byte of each row is half padding
    for cls in (RTNLinear, SmoothQuantLinear):
        fake = _calibrated(cls(copy.deepcopy(lin), "l", 4, 8), x)
        packed = _calibrated(cls(copy.deepcopy(lin), "l", 4, 8, packed=True), x)
        assert packed.w_packed.shape == (20, 17) and packed.weight is None
        with torch.no_grad():
            _close(packed(x[32:]), fake(x[32:]))


def test_packed_layer_bytes_and_no_float_weight_left() -> None:
    lin, x = _layer(512, 512)
    fp16_bytes = sum(p.numel() * 2 for p in lin.parameters())
    fake = DuQuantLinear(copy.deepcopy(lin), "l", 4, 8)
    packed = DuQuantLinear(copy.deepcopy(lin), "l", 4, 8, packed=True)
    assert _module_bytes(packed) <= 0.3 * fp16_bytes, _module_bytes(packed) / fp16_bytes
    assert _module_bytes(fake) > fp16_bytes  # fake quantisation keeps float weights (twice, with PRECACHE)
    assert packed.r_in is None and packed.r_in_sign is not None  # Hadamard kept as its signs
    assert torch.equal(packed.rotation_in(), fake.r_in) and torch.equal(packed.rotation_out(), fake.r_out)
    assert "w_packed" in packed.state_dict() and "weight" not in packed.state_dict()
    # Through replace_linear_layers: the model's float weights are really freed.
    torch.manual_seed(0)
    model = gr00t_like()
    cfg = DuQuantConfig(enabled=True, scope="action_head", packed=True)
    refs = {n: weakref.ref(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = [r.name for r in replace_linear_layers(model, cfg)]
    gc.collect()
    assert names and all(refs[n]() is None for n in names)
    assert all(m.weight is None and m.w_packed is not None for m in quantized_layers(model).values())


def _run_cache(tmp: Path, caplog: pytest.LogCaptureFixture, packed: bool) -> tuple[dict[str, torch.Tensor], str]:
    torch.manual_seed(0)
    model = gr00t_like()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quant"):
        replace_linear_layers(model, DuQuantConfig(enabled=True, packdir=str(tmp), scope="action_head",
                                                   packed=packed))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        outs = {n: m(torch.randn(3, m.in_features, generator=g)) for n, m in quantized_layers(model).items()}
    return outs, caplog.text


def test_pack_cache_round_trip_packed(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fake, _ = _run_cache(tmp_path / "fake", caplog, packed=False)
    first, log = _run_cache(tmp_path / "p", caplog, packed=True)
    n = len(first)
    assert f"0 reused, {n} recomputed" in log

    def no_float(self: DuQuantLinear) -> torch.Tensor:
        raise AssertionError("a cached packed layer must not build its float quantised weight")

    monkeypatch.setattr(DuQuantLinear, "qspace_weight", no_float)
    second, log = _run_cache(tmp_path / "p", caplog, packed=True)
    assert f"{n} reused, 0 recomputed" in log
    for k in first:
        assert torch.equal(first[k], second[k])
        _close(second[k], fake[k])
    monkeypatch.undo()
    # An entry written with PACKED=0 has no codes: it still works, and is upgraded once.
    third, log = _run_cache(tmp_path / "fake", caplog, packed=True)
    assert "has no packed codes" in log and "key sha" in log
    for k in first:
        assert torch.equal(first[k], third[k])
    monkeypatch.setattr(DuQuantLinear, "qspace_weight", no_float)
    _, log = _run_cache(tmp_path / "fake", caplog, packed=True)
    assert "has no packed codes" not in log and f"{n} reused, 0 recomputed" in log


def test_packed_variable() -> None:
    assert DuQuantConfig.from_env({"GR00T_DUQUANT_PACKED": "1"}).packed
    assert not DuQuantConfig.from_env({"GR00T_DUQUANT_WBITS_DEFAULT": "4"}).packed
    for bad in ("2", "maybe"):
        with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_PACKED"):
            DuQuantConfig.from_env({"GR00T_DUQUANT_PACKED": bad})


# ---------------------------------------------------------------------------------------------- WGROUP
def test_group_scales_cover_each_group_of_columns() -> None:
    w = torch.zeros(2, 10)
    w[0, :4], w[0, 4:8], w[0, 8:] = 7.0, 0.7, 0.07  # three groups of 4 (the last one short) at three magnitudes
    w[1] = 1.4
    s = T.weight_row_scales(w, 4, clip_search=False, group=4)
    assert s.shape == (2, 3)
    torch.testing.assert_close(s[0], torch.tensor([1.0, 0.1, 0.01]))
    torch.testing.assert_close(s[1], torch.full((3,), 0.2))
    full = T.expand_scales(s, 10, 4)
    assert full.shape == (2, 10) and float(full[0, 9]) == pytest.approx(0.01)
    assert torch.equal(T.fake_quant(w, full, 7), w)  # every group exactly representable with its own scale
    per_row = T.weight_row_scales(w, 4, clip_search=False)
    assert float((T.fake_quant(w, T.expand_scales(per_row, 10), 7) - w).abs()[0, 4:].max()) > 0.06  # lost
    assert T.weight_row_scales(w, 4, clip_search=False, group=16).shape == (2,)  # a group >= the row: per row


@pytest.mark.parametrize("wopt", ["clip", "gptq"])
def test_grouped_weights_have_less_error_and_pack_the_same(wopt: str) -> None:
    lin, x = _layer(48, 96)
    with torch.no_grad():
        lin.weight[:, :8] *= 12.0  # large weights in a few input columns set a per-row scale for everyone
    outs = {}
    for group in (0, 32):
        fake = _calibrated(DuQuantLinear(copy.deepcopy(lin), "l", 4, 0 if wopt == "clip" else 8, wopt=wopt,
                                         wgroup=group), x)
        packed = _calibrated(DuQuantLinear(copy.deepcopy(lin), "l", 4, 0 if wopt == "clip" else 8, wopt=wopt,
                                           wgroup=group, packed=True), x)
        with torch.no_grad():
            ref = lin(x[32:])
            y = fake(x[32:])
            _close(packed(x[32:]), y)
        if wopt == "clip":  # (a fake GPTQ layer serves its refined w_q; quantized_weight() is its RTN start)
            assert torch.equal(packed.quantized_weight(), fake.quantized_weight())
        outs[group] = float((y - ref).pow(2).mean() / ref.pow(2).mean())
        if group:
            assert packed.w_scale.shape == (48, 3)  # 96 rotated input columns / 32
    assert outs[32] < 0.7 * outs[0], outs


def test_wgroup_variable_and_pack_cache_key(tmp_path: Path) -> None:
    cfg = DuQuantConfig.from_env({"GR00T_DUQUANT_WGROUP": "64"})
    assert cfg.enabled and cfg.wgroup == 64 and "wgroup=64" in cfg.summary()
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_WGROUP"):
        DuQuantConfig.from_env({"GR00T_DUQUANT_WGROUP": "-1"})
    model = gr00t_like()
    replace_linear_layers(model, DuQuantConfig(enabled=True, wgroup=16, packdir=str(tmp_path)))
    layers = quantized_layers(model)
    assert layers and all(m.wgroup == 16 for m in layers.values())
    assert all(m.w_scale.shape == (m.perm.numel() and m.w_scale.shape[0], -(-m.perm.numel() // 16))
               for m in layers.values() if m.perm.numel() > 16)  # a row of 16 rotated columns is one group
    again = gr00t_like()
    replace_linear_layers(again, DuQuantConfig(enabled=True, wgroup=0, packdir=str(tmp_path)))
    assert all(not m.pack_reused and m.w_scale.dim() == 1 for m in quantized_layers(again).values())
