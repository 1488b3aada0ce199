"""Issue 18: GPTQ by default only with calibration data (layer by layer), W4A4, per-denoising-step DiT scales."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from quant import DuQuantConfig, DuQuantLinear, calibrate, quantized_layers, replace_linear_layers
from quant.calibration import plan_passes
from quant.config import DuQuantConfigError
from server.policies.quantize import apply_duquant


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 32, generator=g) for _ in range(n)]


def _cfg(**kw: object) -> DuQuantConfig:
    return DuQuantConfig(enabled=True, include=r"^[02]$", calib_steps=4, **kw)


def test_default_is_gptq_only_with_calibration_data(caplog: pytest.LogCaptureFixture) -> None:
    assert DuQuantConfig().wopt == "auto"
    m = _mlp()
    with caplog.at_level(logging.INFO, logger="quant"):
        summary = apply_duquant(m, _cfg(), calibration=_batches(), forward_fn=lambda mm, b: mm(b))
    layers = quantized_layers(m)
    assert all(lay.wopt_run == "gptq" and lay.wopt_samples == 4 for lay in layers.values())
    assert "weights: GPTQ (calibrated, 4 samples)" in caplog.text
    assert summary["wopt"] == "gptq" and "GPTQ" in summary["weights"]
    # No calibration set: data-free weights, said so; lazy activation calibration does not turn GPTQ on.
    caplog.clear()
    m2 = _mlp()
    with caplog.at_level(logging.INFO):
        summary = apply_duquant(m2, _cfg())
    assert "weights: RTN (data-free" in caplog.text and summary["wopt"] == "clip"
    for x in _batches():
        m2(x)
    assert all(lay.wopt_run == "clip" and lay.weights_desc == "RTN (data-free)"
               for lay in quantized_layers(m2).values())
    # The layer API alone (no apply_duquant): auto resolves at calibrate (gptq) vs lazily (clip).
    m3, m4 = _mlp(), _mlp()
    replace_linear_layers(m3, _cfg())
    replace_linear_layers(m4, _cfg())
    calibrate(m3, _batches(), lambda mm, b: mm(b))
    for x in _batches():
        m4(x)
    assert {lay.wopt_run for lay in quantized_layers(m3).values()} == {"gptq"}
    assert {lay.wopt_run for lay in quantized_layers(m4).values()} == {"clip"}


def test_explicit_wopt_wins(caplog: pytest.LogCaptureFixture) -> None:
    cfg = DuQuantConfig.from_env({"GR00T_DUQUANT_WOPT": "clip", "GR00T_DUQUANT_INCLUDE": r"^[02]$",
                                  "GR00T_DUQUANT_CALIB_STEPS": "4"})
    m = _mlp()
    with caplog.at_level(logging.INFO, logger="quant"):
        apply_duquant(m, cfg, calibration=_batches(), forward_fn=lambda mm, b: mm(b))
    assert {lay.wopt_run for lay in quantized_layers(m).values()} == {"clip"}
    assert "weights: RTN (data-free): 2 layers" in caplog.text
    env = {"GR00T_DUQUANT_DIT_STEP_SCALES": "0", "GR00T_DUQUANT_GPTQ_MEM_MB": "0", "GR00T_DUQUANT_GPTQ_DAMP": "0.05",
           "GR00T_DUQUANT_GPTQ_ACT_ORDER": "0"}
    c = DuQuantConfig.from_env(env)
    assert (c.dit_step_scales, c.gptq_mem_mb, c.gptq_damp, c.gptq_act_order) == ("0", 0, 0.05, False)
    assert not c.step_scales_on and DuQuantConfig(enabled=True).step_scales_on


@pytest.mark.parametrize(("var", "value"), [("DIT_STEP_SCALES", "maybe"), ("GPTQ_MEM_MB", "-1"),
                                            ("GPTQ_DAMP", "2"), ("GPTQ_ACT_ORDER", "perhaps"), ("WOPT", "awq")])
def test_bad_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_" + var):
        DuQuantConfig.from_env({"GR00T_DUQUANT_" + var: value})


def test_gptq_layer_by_layer_passes(caplog: pytest.LogCaptureFixture) -> None:
    m = _mlp()
    replace_linear_layers(m, _cfg(gptq_mem_mb=0))
    layers = list(quantized_layers(m).values())
    for lay in layers:
        lay.plan_weights(calibrated=True)
    # one Hessian in x in fp32 per layer (a 4096->11008 Linear: 4096^2 * 4 B = 64 MiB)
    assert [lay.hessian_bytes for lay in layers] == [32 * 32 * 4, 64 * 64 * 4]
    assert [len(p) for p in plan_passes(layers, 0)] == [1, 1]
    assert [len(p) for p in plan_passes(layers, 1 << 20)] == [2]
    with caplog.at_level(logging.INFO, logger="quant"):
        calibrate(m, _batches(), lambda mm, b: mm(b))
    assert "2 sequential calibration passes" in caplog.text
    assert all(lay.calib_state == "frozen" and lay.calibration_calls == 4 and lay._h is None for lay in layers)


def _rel(layer: nn.Module, lin: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(x) - lin(x)).norm() / lin(x).norm())


def test_w4a4_runs_and_costs_more_than_w4a8() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    cal = [torch.randn(16, 128) for _ in range(4)]
    test = torch.randn(32, 128)
    errs = {}
    for abits in (8, 4):
        for gran in ("tensor", "token"):
            layer = DuQuantLinear(lin, "l", 4, abits, act_gran=gran)
            layer.start_calibration()
            with torch.no_grad():
                for x in cal:
                    layer(x)
            layer.freeze()
            errs[abits, gran] = _rel(layer, lin, test)
    assert all(torch.isfinite(torch.tensor(e)) for e in errs.values())
    assert errs[4, "token"] > errs[8, "token"] and errs[4, "tensor"] > errs[8, "tensor"]
    cfg = DuQuantConfig.from_env({"GR00T_DUQUANT_ABITS": "4"})
    assert cfg.abits == 4 and cfg.act_quant


class _Dit(nn.Module):
    """A timestep-conditioned module like GR00T's DiT (``forward(x, context, timestep)``): input scale grows with t."""

    def __init__(self) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(16, 16))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, timestep: torch.Tensor) -> torch.Tensor:
        return self.ff(x * (1.0 + timestep.float()[:, None, None]))


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Dit()

    def forward(self, x: torch.Tensor, steps: int = 4) -> torch.Tensor:
        for i in range(steps):  # an Euler loop passing the step's discretised time, as GR00T's get_action does
            t = torch.full((x.shape[0],), int(i / steps * 1000), dtype=torch.long)
            x = x + self.model(x, None, t) / steps
        return x


def test_per_step_scales_are_calibrated_and_used_at_step_k() -> None:
    torch.manual_seed(0)
    head = _Head()
    replace_linear_layers(head, DuQuantConfig(enabled=True, include=r"ff\.0$", calib_steps=3))
    layer = quantized_layers(head)["model.ff.0"]
    assert layer.step_scales
    calibrate(head, [torch.randn(2, 5, 16) for _ in range(3)])
    keys = sorted(layer.step_act_scales)
    assert keys == [0, 250, 500, 750]
    scales = [float(layer.step_act_scales[k]) for k in keys]
    assert len(set(scales)) == 4 and scales == sorted(scales)  # larger inputs at later steps, larger scales
    assert float(layer.act_scale) == pytest.approx(max(scales), rel=0.2)  # the single scale ~ the widest step
    # At step k the layer uses step k's scale: same output as a single-scale copy whose scale is set to it.
    x = torch.randn(2, 5, 16)
    seen = {}
    single = DuQuantLinear(nn.Linear(16, 16), "model.ff.0", 4, 8)
    single.load_state_dict(layer.state_dict(), strict=False)
    for attr in ("perm", "r_in", "r_out", "w_q", "w_scale"):
        setattr(single, attr, getattr(layer, attr))
    single.calib_state = "frozen"
    def record(m: nn.Module, i: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
        seen[m.step_key] = (i[0].clone(), o.clone())

    hook = layer.register_forward_hook(record)
    with torch.no_grad():
        head(x)
    hook.remove()
    assert sorted(seen) == keys and layer.step_key is None  # the key is cleared after each DiT call
    for k in keys:
        single.act_scale = layer.step_act_scales[k]
        inp, out = seen[k]
        with torch.no_grad():
            assert torch.allclose(single(inp), out, atol=1e-6)
    # A step never seen in calibration (other num_steps) falls back to the single scale; DIT_STEP_SCALES=0: none.
    layer.step_key = 999
    single.act_scale = layer.act_scale
    with torch.no_grad():
        assert torch.allclose(layer(x), single(x), atol=1e-6)
    layer.step_key = None
    head2 = _Head()
    replace_linear_layers(head2, DuQuantConfig(enabled=True, include=r"ff\.0$", dit_step_scales="0"))
    assert not quantized_layers(head2)["model.ff.0"].step_scales
