"""RSD draft model (seed shape, persistence, distillation) and RSDConfig (env/CLI parsing, errors)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from rsd_helpers import tiny_main

from rsd.config import RSDConfig, RSDConfigError, parse_cli
from rsd.draft import (
    DraftTrainConfig,
    RFSQDraftModel,
    collect_distillation_data,
    evaluate_draft,
    train_draft,
)

torch.set_num_threads(1)


def test_draft_seed_shapes():
    draft = RFSQDraftModel(input_dim=4096).eval()
    assert draft.input_projection.weight.shape == (512, 4096)
    assert len(draft.classification_heads) == 3
    head = draft.classification_heads[0]
    assert [type(m).__name__ for m in head] == ["Linear", "GELU", "LayerNorm", "Linear"]
    assert head[0].weight.shape == (256, 512) and head[3].weight.shape == (896, 256)
    assert draft.decoder.layers[0].self_attn.num_heads == 8
    assert draft.decoder.layers[0].linear1.out_features == 2048
    out = draft(torch.randn(2, 4096))
    assert out.shape == (2, 3, 128, 7)


def test_draft_save_load_roundtrip(tmp_path):
    draft = RFSQDraftModel(input_dim=32, hidden_dim=64, feedforward_dim=128, num_heads=4).eval()
    draft.save(tmp_path)
    assert (tmp_path / "draft.safetensors").exists()
    cfg = json.loads((tmp_path / "draft_config.json").read_text())
    assert cfg["input_dim"] == 32 and cfg["num_decoder_layers"] == 2
    loaded = RFSQDraftModel.load(tmp_path)
    h = torch.randn(3, 32)
    torch.testing.assert_close(draft(h), loaded(h))


def test_distillation_improves_agreement():
    """A short distillation run on main's own greedy tokens raises per-code agreement well above chance."""
    main = tiny_main(seed=2, hidden=32, num_layers=4, codes=16, sharpen=10.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 4, 32, generator=g)
    hidden, tokens, logits = collect_distillation_data(main, x, batch_size=512)
    assert hidden.shape == (1024, 32) and tokens.shape == (1024, 4, 16) and logits.shape == (1024, 4, 16, 7)
    draft = RFSQDraftModel(
        input_dim=32, hidden_dim=64, feedforward_dim=128, num_heads=4, chunk_len=4, action_hidden_dim=4
    )
    train, val = slice(0, 896), slice(896, 1024)
    before = evaluate_draft(draft, hidden[val], tokens[val, :3])
    cfg = DraftTrainConfig(steps=300, batch_size=64, lr=3e-3, warmup_steps=20, log_every=150, kl_weight=0.1)
    hist = train_draft(
        draft, hidden[train], tokens[train, :3], cfg, teacher_logits=logits[train, :3], val=(hidden[val], tokens[val, :3])
    )
    after = evaluate_draft(draft, hidden[val], tokens[val, :3])
    assert len(hist) == 2 and "val_layer0_agree" in hist[-1]
    assert len(after.code_accuracy) == 3 and len(after.layer_agreement) == 3
    assert after.mean_code_accuracy > before.mean_code_accuracy + 0.2
    # layer 0 is a linear function of h (main's head): the easiest to imitate
    assert after.code_accuracy[0] > 0.55
    assert after.code_accuracy[0] >= max(after.code_accuracy[1:])


def test_config_defaults_and_env():
    cfg = RSDConfig.from_env_and_args(env={})
    assert cfg.mode == "exact" and cfg.draft_layers == 0  # 0 = as deep as the draft proposes
    cfg = RSDConfig.from_env_and_args(env={"RSD_MODE": "Relaxed", "RSD_RELAXED_R": "2", "RSD_RELAXED_TAU": "0.9"})
    assert (cfg.mode, cfg.relaxed_r, cfg.relaxed_tau) == ("relaxed", 2, 0.9)


def test_config_cli_overrides_env():
    parser = argparse.ArgumentParser()
    RSDConfig.add_cli_args(parser)
    ns = parser.parse_args(["--rsd-mode", "sampling", "--rsd-temperature", "0.7"])
    cfg = RSDConfig.from_env_and_args(ns, env={"RSD_MODE": "relaxed", "RSD_SEED": "5"})
    assert (cfg.mode, cfg.temperature, cfg.seed) == ("sampling", 0.7, 5)
    assert parse_cli(["--rsd-enabled", "0"], env={}).enabled is False


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"RSD_MODE": "greedy"}, "RSD_MODE"),
        ({"RSD_RELAXED_R": "x"}, "RSD_RELAXED_R"),
        ({"RSD_RELAXED_R": "-1"}, "RSD_RELAXED_R"),
        ({"RSD_RELAXED_TAU": "0"}, "RSD_RELAXED_TAU"),
        ({"RSD_RELAXED_TAU": "1.5"}, "RSD_RELAXED_TAU"),
        ({"RSD_DRAFT_LAYERS": "-1"}, "RSD_DRAFT_LAYERS"),
        ({"RSD_DECODE_LAYERS": "-2"}, "RSD_DECODE_LAYERS"),
        ({"RSD_ACTION_EPS_MM": "wide"}, "RSD_ACTION_EPS_MM"),
        ({"RSD_ACTION_EPS_DEG": "-1"}, "RSD_ACTION_EPS_DEG"),
        ({"RSD_ADAPTIVE": "sometimes"}, "RSD_ADAPTIVE"),
        ({"RSD_TEMPERATURE": "0"}, "RSD_TEMPERATURE"),
        ({"RSD_ENABLED": "maybe"}, "RSD_ENABLED"),
    ],
)
def test_config_errors_name_the_variable(env, needle):
    with pytest.raises(RSDConfigError, match=needle):
        RSDConfig.from_env_and_args(env=env)


def test_config_error_names_flag():
    with pytest.raises(RSDConfigError, match="--rsd-relaxed-tau"):
        RSDConfig.from_env_and_args({"rsd_relaxed_tau": "2"}, env={})


def test_layer0_conditioned_draft_roundtrip_and_training(tmp_path):
    """Layer-0-conditioned variant (docs/rsd.md): proposes layers 1..3 given layer 0; persists its flag; trains on layer0 input."""
    draft = RFSQDraftModel(
        input_dim=16, hidden_dim=32, feedforward_dim=64, num_heads=4, chunk_len=2, action_hidden_dim=2,
        condition_on_layer0=True,
    )
    assert draft.first_layer == 1
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(256, 16, generator=g)
    layer0 = torch.randint(0, 7, (256, 4), generator=g)
    targets = torch.stack([layer0, (layer0 + 1) % 7, (layer0 + 2) % 7], dim=1)  # a function of layer 0 only
    cfg = DraftTrainConfig(steps=150, batch_size=64, lr=3e-3, warmup_steps=10, log_every=150)
    train_draft(draft, hidden, targets, cfg, layer0=layer0)
    m = evaluate_draft(draft, hidden, targets, layer0=layer0)
    assert m.mean_code_accuracy > 0.9  # impossible without the layer-0 input (chance ~ 1/7)
    draft.save(tmp_path)
    loaded = RFSQDraftModel.load(tmp_path)
    assert loaded.first_layer == 1
    torch.testing.assert_close(draft(hidden[:4], layer0[:4]), loaded(hidden[:4], layer0[:4]))
