"""GR00T N1.5: name mapping, Euler sampling, LIBERO data mapping, training forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.gr00t.action_head import CategorySpecificLinear
from models.gr00t.modeling import GR00TPolicyModel
from models.gr00t.tiny import build_tiny


@pytest.fixture(scope="module")
def model() -> GR00TPolicyModel:
    return build_tiny(seed=0)


def _obs(model: GR00TPolicyModel, b: int = 2, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    return model.data_config.from_libero(
        rng.randint(0, 255, (b, 80, 80, 3), dtype=np.uint8), rng.randint(0, 255, (b, 80, 80, 3), dtype=np.uint8),
        rng.randn(b, 8) * 0.1, ["pick up the cup", "put the black bowl on the plate in the basket"][:b])


def test_checkpoint_name_mapping() -> None:
    ck = "backbone.eagle_model.vision_model.vision_model.encoder.layers.3.mlp.fc1.weight"
    mod = GR00TPolicyModel.from_checkpoint_key(ck)
    assert mod == "backbone.eagle_model.vision_model.encoder.layers.3.mlp.fc1.weight"
    assert GR00TPolicyModel.to_checkpoint_key(mod) == ck
    assert GR00TPolicyModel.to_checkpoint_key("action_head.vlln.weight") == "action_head.vlln.weight"


def test_category_specific_linear_selects_rows() -> None:
    lin = CategorySpecificLinear(4, 3, 2)
    x = torch.randn(2, 5, 3)
    cat = torch.tensor([1, 3])
    out = lin(x, cat)
    assert torch.allclose(out[1], x[1] @ lin.W[3] + lin.b[3])


def test_get_action_shape_bounds_and_steps(model: GR00TPolicyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    obs = _obs(model)
    calls = []
    orig = model.action_head.model.forward

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(int(args[2][0]))
        return orig(*args, **kwargs)

    monkeypatch.setattr(model.action_head.model, "forward", counting)
    a = model.get_action(obs, denoising_steps=8, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 16, 7) and a.dtype == torch.float32
    assert calls == [int(i / 8 * 1000) for i in range(8)]  # t_disc = int(i/N * 1000)
    stats = model.metadata["new_embodiment"]["statistics"]["action"]
    lo = np.array([stats[k]["min"][0] for k in ("x", "y", "z", "roll", "pitch", "yaw", "gripper")])
    hi = np.array([stats[k]["max"][0] for k in ("x", "y", "z", "roll", "pitch", "yaw", "gripper")])
    assert (a.numpy() >= lo - 1e-6).all() and (a.numpy() <= hi + 1e-6).all()
    d = model.get_action_dict(obs, denoising_steps=1, generator=torch.Generator().manual_seed(0))
    assert set(d) == {f"action.{k}" for k in ("x", "y", "z", "roll", "pitch", "yaw", "gripper")}
    assert d["action.x"].shape == (2, 16, 1)


def test_euler_integration(model: GR00TPolicyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a constant velocity v the N Euler steps of size 1/N land exactly on noise + v."""
    head = model.action_head
    v = torch.linspace(-0.5, 0.5, head.action_dim)
    monkeypatch.setattr(head, "_velocity", lambda vl, m, s, actions, t, e: v.expand_as(actions))
    feats = torch.zeros(1, 5, int(head.cfg["backbone_embedding_dim"]))
    state = torch.zeros(1, 1, int(head.cfg["max_state_dim"]))
    out = head.get_action(feats, None, state, torch.tensor([31]), num_steps=4, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(1, head.action_horizon, head.action_dim, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out, noise + v, atol=1e-6)
    zero = head.get_action(feats, None, state, torch.tensor([31]), num_steps=4, initial_noise="zero")
    assert torch.allclose(zero, v.expand_as(zero), atol=1e-6)  # from the prior's mean: lands on 0 + v
    with pytest.raises(ValueError, match="initial_noise"):
        head.get_action(feats, None, state, torch.tensor([31]), num_steps=4, initial_noise="uniform")


def test_zero_initial_noise_is_deterministic_and_differs_from_a_sample(model: GR00TPolicyModel) -> None:
    obs = _obs(model)
    sampled = model.get_action(obs, denoising_steps=4, generator=torch.Generator().manual_seed(0))
    model.initial_noise = "zero"
    try:
        a = model.get_action(obs, denoising_steps=4, generator=torch.Generator().manual_seed(0))
        b = model.get_action(obs, denoising_steps=4, generator=torch.Generator().manual_seed(1))
    finally:
        model.initial_noise = "gaussian"
    assert torch.equal(a, b) and not torch.allclose(a, sampled)


def test_prompt_has_image_tokens(model: GR00TPolicyModel) -> None:
    inp = model.prepare_inputs(_obs(model))
    ctx = model.config.eagle_config["image_token_index"]
    n_img = (inp["input_ids"] == ctx).sum(1)
    assert (n_img == 2 * model.tokens_per_image).all()
    assert inp["pixel_values"].shape == (2, 2, 3, model.image_size, model.image_size)
    assert inp["state"].shape == (2, 1, 64) and (inp["state"][:, 0, 8:] == 0).all()
    assert (inp["embodiment_id"] == 31).all()


def test_padding_does_not_change_backbone_features(model: GR00TPolicyModel) -> None:
    both = model.prepare_inputs(_obs(model, 2))
    with torch.no_grad():
        feats, mask = model.backbone_features(both)
        single = model.prepare_inputs({k: (v[:1] if not isinstance(v, list) else v[:1]) for k, v in _obs(model, 2).items()})
        f1, _ = model.backbone_features(single)
    n = f1.shape[1]
    assert torch.allclose(feats[0, -n:], f1[0], atol=1e-5)


def test_data_config_roundtrip(model: GR00TPolicyModel) -> None:
    dc, md = model.data_config, model.metadata
    a = np.random.RandomState(0).uniform(-0.1, 0.1, (2, 16, 7))
    back = dc.unnormalize_action(dc.normalize_action(a, md), md)
    np.testing.assert_allclose(back, a, atol=1e-9)
    obs = _obs(model)
    s = dc.normalize_state(obs, md)
    assert s.shape == (2, 8) and np.abs(s).max() <= 1.0


def test_training_forward_backward(model: GR00TPolicyModel) -> None:
    torch.manual_seed(0)
    inp = model.training_inputs(_obs(model), np.random.RandomState(0).uniform(-0.5, 0.5, (2, 16, 7)))
    model.train()
    try:
        loss = model(inp)["loss"]
        loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(loss)
    assert model.action_head.action_encoder.W1.W.grad is not None
    assert model.action_head.model.proj_out_2.weight.grad is not None
    model.zero_grad(set_to_none=True)
