"""Full-size architectures built on the meta device have exactly the released checkpoints' keys and shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from models.common.keys import key_fixture

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures"


@pytest.mark.parametrize(("policy", "fixture"), [("openvla", "openvla_7b_keys.json"), ("gr00t", "gr00t_n15_3b_keys.json")])
def test_meta_build_matches_fixture(policy: str, fixture: str) -> None:
    expected = json.loads((FIXTURES / fixture).read_text())
    got = key_fixture(policy)
    missing = sorted(set(expected["keys"]) - set(got["keys"]))
    extra = sorted(set(got["keys"]) - set(expected["keys"]))
    assert not missing and not extra, (missing[:5], extra[:5])
    bad = {k: (v, got["keys"][k]) for k, v in expected["keys"].items() if list(got["keys"][k]) != v}
    assert not bad
    assert got["total_params"] == expected["total_params"] == sum(math.prod(v) for v in expected["keys"].values())


def test_openvla_fixture_public_facts() -> None:
    fx = json.loads((FIXTURES / "openvla_7b_keys.json").read_text())
    keys = fx["keys"]
    assert fx["total_params"] == 7_541_237_184  # 15,082,474,368 bytes in bf16
    assert keys["vision_backbone.featurizer.blocks.0.ls1.scale_factor"] == [1024]
    assert keys["vision_backbone.featurizer.reg_token"] == [1, 4, 1024]
    assert keys["vision_backbone.fused_featurizer.blocks.26.mlp.fc1.weight"] == [4304, 1152]
    assert keys["projector.fc1.weight"] == [8704, 2176]
    assert keys["projector.fc3.weight"] == [4096, 4096]
    assert keys["language_model.model.embed_tokens.weight"] == [32064, 4096]
    assert "language_model.model.layers.31.mlp.down_proj.weight" in keys


def test_gr00t_fixture_public_facts() -> None:
    keys = json.loads((FIXTURES / "gr00t_n15_3b_keys.json").read_text())["keys"]
    assert keys["action_head.state_encoder.layer1.W"] == [32, 64, 1024]
    assert keys["action_head.action_encoder.W2.W"] == [32, 3072, 1536]
    assert keys["action_head.action_decoder.layer2.W"] == [32, 1024, 32]
    assert keys["action_head.model.transformer_blocks.0.attn1.to_k.weight"] == [1536, 2048]  # cross
    assert keys["action_head.model.transformer_blocks.1.attn1.to_k.weight"] == [1536, 1536]  # self
    assert keys["action_head.model.transformer_blocks.15.ff.net.0.proj.weight"] == [6144, 1536]
    assert keys["action_head.vl_self_attention.transformer_blocks.3.ff.net.2.weight"] == [2048, 8192]
    assert keys["backbone.eagle_model.mlp1.0.weight"] == [2048, 1152]
    assert "backbone.eagle_model.language_model.model.layers.11.self_attn.q_norm.weight" in keys
    assert "backbone.eagle_model.language_model.model.layers.12.self_attn.q_norm.weight" not in keys
    assert keys["backbone.eagle_model.vision_model.vision_model.encoder.layers.26.mlp.fc1.weight"] == [4304, 1152]


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
