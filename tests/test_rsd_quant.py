"""Per-pattern DuQuant overrides (WBITS_RE / ABITS_RE / ACT_PCT_RE) and OpenVLA-RSD's policy default, on the
embedded model: the overrides reach the layers they name, and fix what benchmarks/bench_rsd_quant.py measured."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.bench_rsd_quant import (
    base_config,
    clip_profile,
    fp_reference,
    load_data,
    policy_config,
    quantise,
    teacher_forced_logits,
)
from quant import DuQuantConfig, DuQuantConfigError, quantized_layers
from quant.patterns import POLICY_DEFAULTS
from quant.selection import select_layers
from quant.testing import openvla_like

DOWN = r"\.down_proj$"
COARSE = 4  # RFSQ layers whose codes move the action (rsd.layer_head.RFSQLayerHeadModel.forward)


# ---------------------------------------------------------------------------------------------- configuration
def test_pattern_overrides_parse_and_resolve_per_layer() -> None:
    cfg = DuQuantConfig.from_env({
        "GR00T_DUQUANT_WBITS_RE": r"\.layers\.1\.:6, \.mlp\.:8",
        "GR00T_DUQUANT_ABITS_RE": r"\.o_proj$:0",
        "GR00T_DUQUANT_ACT_PCT_RE": r"\.down_proj$:100",
    })
    assert cfg.wbits_re == {r"\.layers\.1\.": 6, r"\.mlp\.": 8} and cfg.act_pct_re == {DOWN: 100.0}
    # first matching pattern wins, in the order given; an exact WBITS entry wins over every pattern
    assert cfg.bits_for("m.layers.1.mlp.up_proj") == 6 and cfg.bits_for("m.layers.0.mlp.up_proj") == 8
    assert cfg.bits_for("m.layers.0.self_attn.q_proj") == 4
    exact = cfg.replace(wbits={"m.layers.1.mlp.up_proj": 3})
    assert exact.bits_for("m.layers.1.mlp.up_proj") == 3
    assert cfg.abits_for("m.layers.0.self_attn.o_proj") == 0 and cfg.abits_for("m.layers.0.mlp.up_proj") == 8
    assert cfg.act_pct_for("m.layers.0.mlp.down_proj") == 100.0 and cfg.act_pct_for("m.layers.0.mlp.up_proj") == 99.9


@pytest.mark.parametrize(("var", "value", "needle"), [
    ("WBITS_RE", r"\.mlp\.:1", "[2, 16]"),
    ("WBITS_RE", r"\.mlp\.", "regex:bits"),
    ("WBITS_RE", r"(\.mlp:8", "regular expression"),
    ("ABITS_RE", r"\.mlp\.:1", "<= 0 (off)"),
    ("ACT_PCT_RE", r"\.mlp\.:101", "(0, 100]"),
    ("ACT_PCT_RE", r"\.mlp\.:high", "not a number"),
])
def test_bad_pattern_overrides_name_the_variable(var: str, value: str, needle: str) -> None:
    with pytest.raises(DuQuantConfigError) as err:
        DuQuantConfig.from_env({f"GR00T_DUQUANT_{var}": value})
    assert f"GR00T_DUQUANT_{var}" in str(err.value) and needle in str(err.value)


def test_a_pattern_that_matches_no_selected_layer_is_refused() -> None:
    model = openvla_like()
    cfg = base_config(wbits_re={r"\.lm_head$": 8})  # a Linear, but never selected
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_WBITS_RE pattern"):
        select_layers(model, cfg)
    sel = {s.name: s for s in select_layers(model, base_config(wbits_re={DOWN: 8}, abits_re={DOWN: 16}))}
    assert {n for n, s in sel.items() if s.wbits == 8} == {n for n in sel if n.endswith("down_proj")} != set()
    assert all((s.abits == 16) == n.endswith("down_proj") for n, s in sel.items())


def test_policy_defaults_apply_under_the_environment_only_when_enabled() -> None:
    on = {"GR00T_DUQUANT_WBITS_DEFAULT": "4"}
    rsd = DuQuantConfig.from_env(on, policy="openvla-rsd")
    assert rsd.act_pct_re == {DOWN: 100.0} and rsd.wbits_re == {DOWN: 8}
    assert POLICY_DEFAULTS["openvla-rsd"] == {"ACT_PCT_RE": DOWN + ":100", "WBITS_RE": DOWN + ":8"}
    assert DuQuantConfig.from_env(on, policy="gr00t").act_pct_re == {}
    assert DuQuantConfig.from_env(on).act_pct_re == DuQuantConfig.from_env(on).wbits_re == {}
    assert not DuQuantConfig.from_env({}, policy="openvla-rsd").enabled  # a default never turns DuQuant on
    # the environment wins; the empty string gives the generic default (no override)
    assert DuQuantConfig.from_env({**on, "GR00T_DUQUANT_ACT_PCT_RE": r"\.up_proj$:99"},
                                  policy="openvla-rsd").act_pct_re == {r"\.up_proj$": 99.0}
    assert DuQuantConfig.from_env({**on, "GR00T_DUQUANT_ACT_PCT_RE": ""}, policy="openvla-rsd").act_pct_re == {}


def test_the_server_factory_reads_the_policy_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.policies.quantize import duquant_config_from_env

    for key in [k for k in os.environ if k.startswith("GR00T_DUQUANT_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("GR00T_DUQUANT_WBITS_DEFAULT", "4")
    assert duquant_config_from_env("openvla-rsd").act_pct_re == {DOWN: 100.0}
    assert duquant_config_from_env("openvla").act_pct_re == {}


# ---------------------------------------------------------------------------------------------- embedded model
@pytest.fixture(scope="module")
def bench() -> tuple:
    torch.manual_seed(0)
    data = load_data(n_calib=4, n_eval=4)  # the bench's --quick frames: 4 demos calibrate, 4 others evaluated
    return data, fp_reference(data)


def _tf_flips(model: torch.nn.Module, data, fp) -> torch.Tensor:
    """Teacher-forced flip rate per RFSQ layer against FP (the flips each layer makes itself)."""
    tf = teacher_forced_logits(model, data.evals, fp["layers"]).argmax(-1)
    return (tf != fp["tf_argmax"]).float().mean((0, 2))


def test_rsd_default_unclips_the_layer0_token_and_lowers_its_flips(bench) -> None:
    data, fp = bench
    plain, _ = quantise(data.model, base_config(), data.calib)
    fixed, report = quantise(data.model, policy_config(), data.calib)
    layers = quantized_layers(fixed)
    down = [n for n in layers if n.endswith("down_proj")]
    assert len(down) == 2 and report["layers"] == len(layers) == 14
    assert report["act_pct_re"] == {DOWN: 100.0} and report["wbits_re"] == {DOWN: 8}  # in the server's metadata
    assert all(layers[n].act_pct == (100.0 if n in down else 99.9) for n in layers)
    assert all(m.wbits == (8 if n in down else 4) and m.abits == 8 for n, m in layers.items())
    clip_plain, clip_fixed = clip_profile(plain, data.evals), clip_profile(fixed, data.evals)
    for n in down:
        # The tokens the RFSQ head reads -- the last prefix token (layer 0) and the layer tokens (layers 1-7) -- get
        # down_proj inputs clipped by a 99.9th-percentile scale (the previous `tiny` checkpoint: 3-10 % on the last
        # prefix token; the `small` one: 2-3 % on the layer tokens); the max-based scale clips almost none.
        worst_plain = max(clip_plain[n]["last"], clip_plain[n]["layers"])
        assert worst_plain > 0.01 and max(clip_fixed[n]["last"], clip_fixed[n]["layers"]) < worst_plain / 5
    flips_plain, flips_fixed = _tf_flips(plain, data, fp), _tf_flips(fixed, data, fp)
    assert flips_fixed.mean() < 0.75 * flips_plain.mean()
    assert flips_fixed[:COARSE].mean() < flips_plain[:COARSE].mean()


def test_wbits_re_keeps_the_mlp_at_8_bits_and_lowers_the_flip_rate(bench) -> None:
    data, fp = bench
    plain, _ = quantise(data.model, base_config(), data.calib)
    w8, _ = quantise(data.model, base_config(wbits_re={r"\.mlp\.": 8}), data.calib)
    layers = quantized_layers(w8)
    assert {n for n, m in layers.items() if m.wbits == 8} == {n for n in layers if ".mlp." in n}
    assert {m.wbits for n, m in layers.items() if ".mlp." not in n} == {4}
    # the 8-bit weights really are 8-bit: integer codes up to +-127 per row scale (W4: +-7), on one layer
    name = next(n for n in layers if n.endswith("up_proj"))
    for model, qmax in ((w8, 127), (plain, 7)):
        lay = quantized_layers(model)[name]
        w = lay.w_q if lay.w_q is not None else lay.quantized_weight()
        codes = w.float() / lay.w_scale.float().unsqueeze(1)
        assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the grid
        assert qmax // 2 < int(codes.round().abs().max()) <= qmax
    # fewer flips where they move the robot: a wrong code in layers 0-3 moves the action 0.043-0.006, in 4-7 < 0.002
    assert _tf_flips(w8, data, fp)[:COARSE].mean() < 0.8 * _tf_flips(plain, data, fp)[:COARSE].mean()
