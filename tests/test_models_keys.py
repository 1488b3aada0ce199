"""Full-size architectures built on the meta device have the released checkpoints' keys and shapes.

The expected names/shapes come from ``models/fixtures/*_public_keys.json``: facts written by hand from public
material that reads or describes the released files (sources recorded in each file), expanded here, never by
project code.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from public_keys import expand as _expand
from public_keys import public_fixture as _public

from models.common.keys import key_fixture


@pytest.fixture(scope="module")
def builds() -> dict[str, dict[str, Any]]:
    return {p: key_fixture(p) for p in ("openvla", "gr00t")}


def _shape_ok(want: list[int | None], got: list[int]) -> bool:
    """``None`` entries in a public shape are dimensions the sources do not state."""
    return len(want) == len(got) and all(w is None or w == g for w, g in zip(want, got, strict=True))


def _compare(got: dict[str, list[int]], expected: dict[str, list[int] | None]) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, (missing[:8], extra[:8])
    bad = {k: (v, got[k]) for k, v in expected.items() if v is not None and not _shape_ok(v, got[k])}
    assert not bad, bad


def test_public_fixture_expansion() -> None:
    ov = _expand(_public("openvla_7b_public_keys.json"))
    gr = _expand(_public("gr00t_n15_3b_public_keys.json"))
    assert ov["vision_backbone.featurizer.blocks.0.ls1.scale_factor"] == [1024]
    assert "vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight" in ov
    assert "language_model.model.layers.31.mlp.down_proj.weight" in ov
    assert gr["action_head.model.transformer_blocks.0.attn1.to_k.weight"] == [1536, 2048]
    assert gr["action_head.model.transformer_blocks.1.attn1.to_k.weight"] == [1536, 1536]
    assert gr["action_head.model.transformer_blocks.15.ff.net.0.proj.weight"] == [6144, 1536]
    assert "backbone.eagle_model.language_model.model.layers.12.self_attn.q_norm.weight" not in gr


def test_openvla_public_total_params() -> None:
    fx = _public("openvla_7b_public_keys.json")
    assert sum(math.prod(s) for s in _expand(fx).values()) == fx["total_params"] == 7_541_237_184


def test_gr00t_public_vl_self_attention_params() -> None:
    fx = _public("gr00t_n15_3b_public_keys.json")
    vl = {k: s for k, s in _expand(fx).items() if k.startswith("action_head.vl_self_attention.")}
    assert sum(math.prod(s) for s in vl.values()) == fx["vl_self_attention_params"] == 201_433_088


def test_openvla_build_matches_public_keys(builds: dict[str, dict[str, Any]]) -> None:
    fx = _public("openvla_7b_public_keys.json")
    got = builds["openvla"]
    _compare(got["keys"], _expand(fx))
    assert got["total_params"] == fx["total_params"]


def test_gr00t_build_matches_public_keys(builds: dict[str, dict[str, Any]]) -> None:
    fx = _public("gr00t_n15_3b_public_keys.json")
    got = dict(builds["gr00t"]["keys"])
    for group in fx["exactly_one_of"]:
        present = [k for k in group if k in got]
        assert len(present) == 1, present
        shape = got.pop(present[0])
        assert _shape_ok(fx["exactly_one_of_shape"], shape), shape
    _compare(got, _expand(fx))
    vl = sum(math.prod(s) for k, s in got.items() if k.startswith("action_head.vl_self_attention."))
    assert vl == fx["vl_self_attention_params"]


def test_upstream_style_configs_parse() -> None:
    """A config.json as released (minimal text_config, HF bookkeeping keys) parses to the 7B/3B shapes."""
    from models.gr00t.config import GR00TConfig
    from models.openvla.config import OpenVLAConfig

    ov = OpenVLAConfig.from_dict({
        "architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig"}, "transformers_version": "4.40.1",
        "vision_backbone_id": "dinosiglip-vit-so-224px", "use_fused_vision_backbone": True,
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "image_sizes": [224, 224], "n_action_bins": 256, "pad_to_multiple_of": 64, "pad_token_id": 32000,
        "norm_stats": {"bridge_orig": {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7}}},
        "text_config": {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064},
    })
    assert ov.action_vocab_base == 32000
    assert [c.embed_dim for c in ov.vision_configs()] == [1024, 1152]
    assert ov.llama_config().hidden_size == 4096 and ov.extra["transformers_version"] == "4.40.1"
    g = GR00TConfig.from_dict({"architectures": ["GR00T_N1_5"], "model_type": "gr00t_n1_5",
                               "backbone_cfg": {"select_layer": 12, "project_to_dim": None},
                               "action_head_cfg": {"action_horizon": 16, "num_inference_timesteps": 4}})
    assert g.select_layer == 12 and g.action_head_cfg["max_num_embodiments"] == 32
    assert g.eagle_config["image_token_index"] == 151669
