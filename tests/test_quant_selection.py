"""Layer selection on trees with the real GR00T N1.5 / OpenVLA module names."""

from __future__ import annotations

import re

import pytest
import torch

from quant import DuQuantConfig, DuQuantConfigError, replace_linear_layers
from quant.patterns import SEED_EXCLUDE, SEED_INCLUDE
from quant.selection import select_layers
from quant.testing import expected_default_selection, gr00t_like, openvla_like

NEVER = re.compile(r"vision_model|vision_backbone|featurizer|attn1|proj_out|action_decoder|lm_head|embed|norm|mlp1|projector")


def _names(model: torch.nn.Module, cfg: DuQuantConfig) -> list[str]:
    return [s.name for s in select_layers(model, cfg)]


def test_gr00t_defaults_select_llm_and_action_head_ff_only() -> None:
    model = gr00t_like(llm_layers=2, dit_layers=3, vl_layers=1)
    names = _names(model, DuQuantConfig(enabled=True))
    assert names == expected_default_selection(model)
    assert len(names) == 2 * 7 + 3 * 2 + 1 * 2
    assert "backbone.eagle_model.language_model.model.layers.1.self_attn.q_proj" in names
    assert "backbone.eagle_model.language_model.model.layers.0.mlp.down_proj" in names
    assert "action_head.model.transformer_blocks.2.ff.net.0.proj" in names
    assert "action_head.model.transformer_blocks.2.ff.net.2" in names
    assert "action_head.vl_self_attention.transformer_blocks.0.ff.net.2" in names
    assert not [n for n in names if NEVER.search(n)]


def test_openvla_defaults_select_llama_projections_only() -> None:
    model = openvla_like(llm_layers=3)
    names = _names(model, DuQuantConfig(enabled=True))
    assert len(names) == 3 * 7 and all(n.startswith("language_model.model.layers.") for n in names)
    assert not [n for n in names if NEVER.search(n)]


def test_seed_regexes_miss_the_real_action_head_and_hit_the_vision_tower() -> None:
    """Documents why the defaults differ from the published recipe's regexes (see quant.patterns)."""
    names = _names(gr00t_like(), DuQuantConfig(enabled=True, include=SEED_INCLUDE, exclude=SEED_EXCLUDE))
    assert not [n for n in names if n.startswith("action_head.")]
    assert [n for n in names if ".vision_model." in n]


def test_exclude_is_a_safety_net_for_user_include() -> None:
    names = _names(gr00t_like(), DuQuantConfig(enabled=True, include=r".*"))
    assert names and not [n for n in names if re.search(r"vision_model|attn1|proj_out|lm_head|norm1", n)]
    assert "backbone.eagle_model.mlp1.0" in names  # the projector is opt-in through INCLUDE


def test_scope_and_layers_override() -> None:
    model = gr00t_like()
    scoped = _names(model, DuQuantConfig(enabled=True, scope="action_head."))
    assert scoped and all(n.startswith("action_head.") for n in scoped)
    pick = ("action_head.model.proj_out_1", "backbone.eagle_model.mlp1.0")  # LAYERS ignores INCLUDE/EXCLUDE
    assert _names(model, DuQuantConfig(enabled=True, layers=pick)) == ["backbone.eagle_model.mlp1.0",
                                                                      "action_head.model.proj_out_1"]
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_LAYERS"):
        select_layers(model, DuQuantConfig(enabled=True, layers=("action_head.model.nope",)))
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_LAYERS"):
        select_layers(model, DuQuantConfig(enabled=True, layers=("backbone.eagle_model.mlp1.0",), scope="action_head"))


def test_per_layer_wbits_applied_and_validated_at_replacement() -> None:
    model = gr00t_like()
    name = "action_head.model.transformer_blocks.0.ff.net.2"
    report = replace_linear_layers(model, DuQuantConfig(enabled=True, wbits={name: 8}))
    bits = {r.name: r.wbits for r in report}
    assert bits[name] == 8 and bits["action_head.model.transformer_blocks.1.ff.net.2"] == 4
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_WBITS.*not_a_layer"):
        replace_linear_layers(gr00t_like(), DuQuantConfig(enabled=True, wbits={"not_a_layer": 8}))
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_WBITS.*not selected"):
        replace_linear_layers(gr00t_like(), DuQuantConfig(enabled=True, wbits={"action_head.model.proj_out_1": 8}))
