"""DuQuantLinear behaviour: outliers, precache, propagate, baselines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant import (
    DuQuantConfig,
    DuQuantConfigError,
    DuQuantLinear,
    RTNLinear,
    SmoothQuantLinear,
    calibrate,
    quantized_layers,
    replace_linear_layers,
)
from quant.testing import gr00t_like


def _outlier_layer(small_outlier_weights: bool = False) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(512, 256)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 512, generator=g) * 0.02)
    x = torch.randn(2048, 512, generator=g)
    out = [3, 77, 200]
    x[:, out] *= 40.0  # planted outlier input channels, as in LLM residual streams
    if small_outlier_weights:
        with torch.no_grad():
            lin.weight[:, out] /= 20.0
    return lin, x[:1024], x[1024:]


def _rel_err(m: nn.Module, lin: nn.Linear, cal: torch.Tensor, test: torch.Tensor) -> float:
    m.start_calibration()
    m(cal)
    m.freeze()
    with torch.no_grad():
        y, ref = m(test), lin(test)
    return float((y - ref).norm() / ref.norm())


def test_w4a8_with_outliers_well_below_rtn() -> None:
    lin, cal, test = _outlier_layer()
    rtn = _rel_err(RTNLinear(lin, "l", 4, 8), lin, cal, test)
    du = _rel_err(DuQuantLinear(lin, "l", 4, 8), lin, cal, test)
    assert du < 0.55 * rtn, (du, rtn)
    # the rotation is what helps: without it DuQuant is just RTN with a clipping search
    assert _rel_err(DuQuantLinear(lin, "l", 4, 8, rot="none", permute=False), lin, cal, test) > 0.8 * rtn


def test_outliers_meeting_small_weights_need_gptq() -> None:
    """Known limit of data-free rotations: if outlier channels meet near-zero weights, RTN's weight error there is
    tiny, and a rotation spreads full-size weight error onto the outliers. WOPT=gptq (activation-aware) fixes it."""
    lin, cal, test = _outlier_layer(small_outlier_weights=True)
    rtn = _rel_err(RTNLinear(lin, "l", 4, 8), lin, cal, test)
    gptq = _rel_err(DuQuantLinear(lin, "l", 4, 8, wopt="gptq"), lin, cal, test)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_smoothquant_baseline_moves_outliers_into_weights() -> None:
    lin, cal, test = _outlier_layer()
    m = SmoothQuantLinear(lin, "l", 4, 8)
    err = _rel_err(m, lin, cal, test)
    s = m.smooth
    assert float(s[[3, 77, 200]].min()) > 3 * float(s.median())
    assert 0.0 < err < 1.0
    with torch.no_grad():  # quantisation off: smoothing alone is exact
        sq = SmoothQuantLinear(lin, "l", 16, 0)
        sq.smooth = s
        sq.prepare_weights()
        assert torch.allclose(sq(test), lin(test), atol=1e-3)


def test_precache_off_gives_same_output() -> None:
    lin, cal, test = _outlier_layer()
    a = DuQuantLinear(lin, "l", 4, 8, precache=True)
    b = DuQuantLinear(lin, "l", 4, 8, precache=False)
    assert a.w_q is not None and b.w_q is None
    for m in (a, b):
        m.start_calibration()
        m(cal)
        m.freeze()
    with torch.no_grad():
        assert torch.allclose(a(test), b(test), atol=1e-5)


def test_bf16_inputs() -> None:
    lin = nn.Linear(32, 16).to(torch.bfloat16)
    m = DuQuantLinear(lin, "l", 4, 8)
    m.start_calibration()
    m(torch.randn(4, 32, dtype=torch.bfloat16))
    m.freeze()
    y = m(torch.randn(4, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_state_dict_keys_unchanged() -> None:
    model = gr00t_like()
    before = set(model.state_dict())
    replace_linear_layers(model, DuQuantConfig(enabled=True))
    assert set(model.state_dict()) == before


def test_propagate_refused_without_absorbing_consumer() -> None:
    with pytest.raises(ValueError, match="propagate"):
        DuQuantLinear(nn.Linear(16, 16), "mlp.up_proj", 4, 8, row_rot="propagate")
    # a tree whose attention is not a known transformers class: nothing can absorb, so the config is refused
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_ROW_ROT"):
        replace_linear_layers(gr00t_like(), DuQuantConfig(enabled=True, row_rot="propagate"))


def _tiny_qwen3() -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval()


def test_propagate_v_to_o_is_exact_in_full_precision() -> None:
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = _tiny_qwen3()
    with torch.no_grad():
        y_ref = ref(ids).logits
    include = r"self_attn\.[qkvo]_proj$|mlp\.(gate|up|down)_proj$"
    outs = {}
    for mode in ("restore", "propagate"):
        m = _tiny_qwen3()
        replace_linear_layers(m, DuQuantConfig(enabled=True, include=include, wbits_default=16, abits=0,
                                               row_rot=mode, block=16, block_out=8))
        layers = quantized_layers(m)
        if mode == "propagate":
            assert layers["model.layers.0.self_attn.v_proj"].row_rot == "propagate"
            assert layers["model.layers.0.mlp.up_proj"].row_rot == "restore"
            assert layers["model.layers.0.self_attn.o_proj"].pre_rot is not None
        with torch.no_grad():
            outs[mode] = m(ids).logits
    assert torch.allclose(outs["restore"], y_ref, atol=1e-4)
    assert torch.allclose(outs["propagate"], y_ref, atol=1e-4)
    # and quantised: propagate stays close to restore
    m = _tiny_qwen3()
    replace_linear_layers(m, DuQuantConfig(enabled=True, include=include, row_rot="propagate", block_out=8,
                                           calib_steps=2))
    calibrate(m, [ids, ids], lambda mm, b: mm(b))
    with torch.no_grad():
        y = m(ids).logits
    assert float((y - y_ref).norm() / y_ref.norm()) < 0.5


def test_profile_table() -> None:
    from quant.profile import PROFILER

    PROFILER.reset()
    model = torch.nn.Sequential(nn.Linear(16, 16))
    replace_linear_layers(model, DuQuantConfig(enabled=True, include=r"^0$", profile=True, calib_steps=1))
    for _ in range(3):
        model(torch.randn(2, 16))
    table = PROFILER.report()
    assert "transform_in" in table and "matmul" in table and "slowest 0" in table
    assert PROFILER.totals()["total"][0] == 3
    PROFILER.reset()


def test_per_token_activations_isolate_massive_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(256, 64, generator=g)
    x[::64] *= 200.0  # a few tokens with massive activations (attention-sink style)
    errs = {}
    for gran in ("tensor", "token"):
        m = DuQuantLinear(lin, "l", 16, 8, act_gran=gran)
        errs[gran] = _rel_err(m, lin, x[:128], x[128:])
    assert errs["token"] < 0.5 * errs["tensor"], errs
