"""DuQuantConfig: defaults, enabling rule, and errors that name the variable."""

from __future__ import annotations

import logging

import pytest

from quant import DuQuantConfig, DuQuantConfigError
from quant.patterns import DEFAULT_EXCLUDE, DEFAULT_INCLUDE


def test_defaults_and_not_enabled(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="quant"):
        cfg = DuQuantConfig.from_env({"PATH": "/bin"})
    assert not cfg.enabled
    assert "DuQuant not enabled" in caplog.text
    assert (cfg.wbits_default, cfg.abits, cfg.block, cfg.block_out) == (4, 8, 16, 16)
    assert cfg.permute and cfg.row_rot == "restore" and cfg.precache_weights
    assert (cfg.act_pct, cfg.calib_steps, cfg.ls) == (99.9, 32, 0.15)
    assert cfg.include == DEFAULT_INCLUDE and cfg.exclude == DEFAULT_EXCLUDE
    assert cfg.packdir is None and cfg.scope == "" and cfg.layers == () and cfg.wbits == {}
    assert not (cfg.dryrun or cfg.debug or cfg.profile or cfg.profile_sync)


def test_packdir_alone_does_not_enable() -> None:
    cfg = DuQuantConfig.from_env({"GR00T_DUQUANT_PACKDIR": "/tmp/x"})
    assert not cfg.enabled and cfg.packdir == "/tmp/x"


def test_empty_scope_enables_like_the_seed_scripts() -> None:
    assert DuQuantConfig.from_env({"GR00T_DUQUANT_SCOPE": ""}).enabled


def test_every_variable_parsed() -> None:
    env = {
        "GR00T_DUQUANT_WBITS_DEFAULT": "6", "GR00T_DUQUANT_WBITS": "a.b:8, c.d:3", "GR00T_DUQUANT_ABITS": "0",
        "GR00T_DUQUANT_BLOCK": "32", "GR00T_DUQUANT_PERMUTE": "0", "GR00T_DUQUANT_ROW_ROT": "propagate",
        "GR00T_DUQUANT_ACT_PCT": "99.5", "GR00T_DUQUANT_CALIB_STEPS": "8", "GR00T_DUQUANT_LS": "0.3",
        "GR00T_DUQUANT_PACKDIR": "/p", "GR00T_DUQUANT_SCOPE": "backbone.", "GR00T_DUQUANT_INCLUDE": "proj$",
        "GR00T_DUQUANT_EXCLUDE": "vision", "GR00T_DUQUANT_LAYERS": "x.y, z", "GR00T_DUQUANT_DRYRUN": "1",
        "GR00T_DUQUANT_DEBUG": "true", "GR00T_DUQUANT_PROFILE": "yes", "GR00T_DUQUANT_PROFILE_SYNC": "on",
        "GR00T_DUQUANT_PRECACHE_WEIGHTS": "0", "GR00T_DUQUANT_ROT": "svd", "GR00T_DUQUANT_WOPT": "gptq",
        "GR00T_DUQUANT_ACT_GRAN": "token",
    }
    cfg = DuQuantConfig.from_env(env)
    assert cfg.enabled and cfg.wbits_default == 6 and cfg.wbits == {"a.b": 8, "c.d": 3}
    assert cfg.abits == 0 and not cfg.act_quant
    assert cfg.block == 32 and cfg.block_out == 32  # BLOCK_OUT follows BLOCK
    assert not cfg.permute and cfg.row_rot == "propagate" and cfg.rot == "svd" and cfg.wopt == "gptq"
    assert cfg.act_gran == "token"
    assert (cfg.act_pct, cfg.calib_steps, cfg.ls) == (99.5, 8, 0.3)
    assert cfg.packdir == "/p" and cfg.scope == "backbone." and cfg.include == "proj$" and cfg.exclude == "vision"
    assert cfg.layers == ("x.y", "z")
    assert cfg.dryrun and cfg.debug and cfg.profile and cfg.profile_sync and not cfg.precache_weights
    assert cfg.bits_for("a.b") == 8 and cfg.bits_for("other") == 6
    assert DuQuantConfig.from_env({"GR00T_DUQUANT_BLOCK": "8", "GR00T_DUQUANT_BLOCK_OUT": "4"}).block_out == 4
    assert DuQuantConfig.from_env({"GR00T_DUQUANT_ROW_ROT": "0"}).row_rot == "0"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ABITS", "abc"), ("ROW_ROT", "sideways"), ("INCLUDE", "(unclosed"), ("EXCLUDE", "[a-"), ("BLOCK", "0"),
        ("LS", "1.5"), ("PERMUTE", "maybe"), ("WBITS_DEFAULT", "1"), ("WBITS", "layer_without_bits"),
        ("WBITS", "a.b:x"), ("ACT_PCT", "101"), ("CALIB_STEPS", "-1"), ("ROT", "random"), ("WOPT", "awq"),
        ("ABITS", "1"), ("PRECACHE_WEIGHTS", "2"), ("ACT_GRAN", "channel"),
    ],
)
def test_bad_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(DuQuantConfigError, match=f"GR00T_DUQUANT_{var}"):
        DuQuantConfig.from_env({f"GR00T_DUQUANT_{var}": value})


def test_unknown_variable_is_refused() -> None:
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_BLOKC"):
        DuQuantConfig.from_env({"GR00T_DUQUANT_BLOKC": "16"})


def test_direct_construction_is_validated() -> None:
    with pytest.raises(DuQuantConfigError, match="ROW_ROT"):
        DuQuantConfig(row_rot="sideways")
    with pytest.raises(DuQuantConfigError, match="INCLUDE"):
        DuQuantConfig(include="(")


def test_act_gran_auto_is_per_token_at_four_bits_only() -> None:
    cfg = DuQuantConfig.from_env({"GR00T_DUQUANT_ABITS": "8", "GR00T_DUQUANT_ABITS_RE": r"\.down_proj$:4"})
    assert cfg.act_gran == "auto"  # the default
    assert cfg.act_gran_for("model.layers.0.mlp.down_proj") == "token"
    assert cfg.act_gran_for("model.layers.0.mlp.up_proj") == "tensor"
    a4 = DuQuantConfig.from_env({"GR00T_DUQUANT_ABITS": "4"})
    assert a4.act_gran_for("x") == "token" and a4.step_scales_on  # step scales stay for any layer left static
    for gran in ("tensor", "token"):
        explicit = DuQuantConfig.from_env({"GR00T_DUQUANT_ABITS": "4", "GR00T_DUQUANT_ACT_GRAN": gran})
        assert explicit.act_gran_for("x") == gran
    assert not DuQuantConfig.from_env({"GR00T_DUQUANT_ABITS": "4", "GR00T_DUQUANT_ACT_GRAN": "token"}).step_scales_on
    assert DuQuantConfig.from_env({"GR00T_DUQUANT_ABITS": "0"}).act_gran_for("x") == "tensor"


def test_act_gran_auto_reaches_each_replaced_layer() -> None:
    import torch.nn as nn

    from quant import replace_linear_layers

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    cfg = DuQuantConfig.from_env({"GR00T_DUQUANT_ABITS": "8", "GR00T_DUQUANT_ABITS_RE": "^2$:4",
                                  "GR00T_DUQUANT_INCLUDE": ".", "GR00T_DUQUANT_EXCLUDE": "^$"})
    replace_linear_layers(model, cfg)
    assert (model[0].abits, model[0].act_gran) == (8, "tensor")
    assert (model[2].abits, model[2].act_gran) == (4, "token")
