"""OpenVLA-OFT: released head-file layout, weights-only loading, one-pass chunk decoding, the served policy."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from client.policy_client import PolicyClient
from client.testing import REPO, ServerProcess, server_python
from client.testing import libero_observation as libero_obs
from models.common.errors import CheckpointError
from models.openvla import oft

PY = server_python()

# Released key names, a fact fixture (not generated from our modules): moojink/openvla-oft @ 213c5ff8d6e9
# prismatic/models/action_heads.py (L1RegressionActionHead.model = MLPResNet(num_blocks=2): layer_norm1, fc1,
# mlp_resnet_blocks.N.ffn = Sequential(LayerNorm, Linear, ReLU), layer_norm2, fc2) and
# prismatic/models/projectors.py (ProprioProjector: fc1, fc2, act_fn1 = GELU), saved from DDP-wrapped modules
# (vla-scripts/finetune.py), hence the ``module.`` prefix stripped by experiments/robot/openvla_utils.py.
RELEASED_ACTION_HEAD_KEYS = {
    f"module.model.{k}.{p}"
    for k in ("layer_norm1", "fc1", "mlp_resnet_blocks.0.ffn.0", "mlp_resnet_blocks.0.ffn.1",
              "mlp_resnet_blocks.1.ffn.0", "mlp_resnet_blocks.1.ffn.1", "layer_norm2", "fc2")
    for p in ("weight", "bias")
}
RELEASED_PROPRIO_KEYS = {f"module.{k}.{p}" for k in ("fc1", "fc2") for p in ("weight", "bias")}


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return oft.build_tiny_dir(tmp_path_factory.mktemp("oft") / "openvla-7b-oft-tiny")


@pytest.fixture(scope="module")
def model(oft_dir):
    return oft.load(oft_dir)


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    wrist = rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)
    state = np.array([[-0.05, 0.05, 1.1, 3.0, 0.1, -0.1, 0.02, -0.02]])
    return img, wrist, state


def test_head_files_have_released_names_and_keys(oft_dir) -> None:
    head = torch.load(oft_dir / "action_head--150000_checkpoint.pt", weights_only=True)
    proprio = torch.load(oft_dir / "proprio_projector--150000_checkpoint.pt", weights_only=True)
    assert set(head) == RELEASED_ACTION_HEAD_KEYS
    assert set(proprio) == RELEASED_PROPRIO_KEYS
    d = 128  # tiny llm_dim; released: 4096
    assert tuple(head["module.model.fc1.weight"].shape) == (d, d * oft.ACTION_DIM)
    assert tuple(head["module.model.fc2.weight"].shape) == (oft.ACTION_DIM, d)
    assert tuple(proprio["module.fc1.weight"].shape) == (d, oft.PROPRIO_DIM)
    for name in ("config.json", "dataset_statistics.json", "model.safetensors.index.json"):
        assert (oft_dir / name).is_file()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_object_is_refused_by_weights_only_loading(oft_dir, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(oft_dir, bad)
    target = bad / "action_head--150000_checkpoint.pt"
    with open(target, "wb") as f:
        pickle.dump({"module.model.fc1.weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="action_head--150000_checkpoint.pt.*weights-only"):
        oft.load(bad)


def test_wrong_keys_and_safetensors_twins(oft_dir, tmp_path) -> None:
    sd = oft.read_component(oft_dir / "proprio_projector--150000_checkpoint.pt")
    assert set(sd) == {k.removeprefix("module.") for k in RELEASED_PROPRIO_KEYS}
    bad = tmp_path / "renamed"
    bad.mkdir()
    torch.save({"module.linear.weight": torch.zeros(2, 2)}, bad / "proprio_projector--1_checkpoint.pt")
    with pytest.raises(CheckpointError, match="proprio_projector--1_checkpoint.pt"):
        oft.load_component(oft.ProprioProjector(128), oft.read_component(bad / "proprio_projector--1_checkpoint.pt"),
                           bad / "proprio_projector--1_checkpoint.pt")
    st = oft.build_tiny_dir(tmp_path / "st", fmt="safetensors")
    assert (st / "action_head--150000_checkpoint.safetensors").is_file()
    img, wrist, state = _inputs()
    a = oft.load(st).predict_action([img, wrist], "pick up the bowl", state)
    b = oft.load(oft_dir).predict_action([img, wrist], "pick up the bowl", state)
    np.testing.assert_allclose(a, b, atol=1e-6)  # same seed, same weights in either format


def test_parallel_decode_is_one_forward_pass(model) -> None:
    calls = []
    hook = model.vla.language_model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        img, wrist, state = _inputs()
        actions = model.predict_action([img, wrist], "put the bowl on the plate", state)
    finally:
        hook.remove()
    assert actions.shape == (8, 7) and np.isfinite(actions).all()
    assert len(calls) == 1


def test_attention_is_bidirectional(model, monkeypatch) -> None:
    img, wrist, state = _inputs()
    bidir = model.predict_action([img, wrist], "put the bowl on the plate", state)
    monkeypatch.setattr(oft.OpenVLAOFT, "bidirectional_mask", staticmethod(lambda mask, dtype: None))  # causal
    causal = model.predict_action([img, wrist], "put the bowl on the plate", state)
    assert not np.allclose(bidir, causal, atol=1e-6)


def test_state_and_wrist_image_change_actions(model) -> None:
    img, wrist, state = _inputs()
    base = model.predict_action([img, wrist], "pick up the bowl", state)
    moved = model.predict_action([img, wrist], "pick up the bowl", state + np.array([0.1, 0, 0, 0, 0, 0, 0, 0]))
    other_wrist = model.predict_action([img, 255 - wrist], "pick up the bowl", state)
    assert not np.allclose(base, moved, atol=1e-7)
    assert not np.allclose(base, other_wrist, atol=1e-7)


def test_batch_with_padding_matches_single(model) -> None:
    img, wrist, state = _inputs()
    single = model.predict_action([img, wrist], "pick up the bowl", state)
    both = model.predict_action([np.concatenate([img, img]), np.concatenate([wrist, wrist])],
                                ["pick up the bowl", "put the black bowl on the plate please"],
                                np.concatenate([state, state]))
    np.testing.assert_allclose(both[0], single, atol=1e-5)


def test_unnormalisation_matches_hand_computation(model, oft_dir) -> None:
    stats = json.loads((oft_dir / "dataset_statistics.json").read_text())["libero_spatial_no_noops"]
    img, wrist, state = _inputs()
    s = stats["proprio"]
    proprio = [np.clip(2 * (x - lo) / (hi - lo + 1e-8) - 1, -1, 1)
               for x, lo, hi in zip(state[0], s["q01"], s["q99"], strict=True)]
    pv = [model.processor.preprocess_images(x, True) for x in (img, wrist)]
    ids, mask = model.processor.tokenize(["In: What action should the robot take to pick up the bowl?\nOut:"])
    norm = model.predict_normalized(pv, ids, mask, torch.tensor([proprio], dtype=torch.float32))[0].numpy()
    a = stats["action"]
    expect = np.array([[0.5 * (v + 1) * (a["q99"][j] - a["q01"][j] + 1e-8) + a["q01"][j] if a["mask"][j] else v
                        for j, v in enumerate(row)] for row in norm])
    got = model.predict_action([img, wrist], "Pick up the bowl", state, unnorm_key="libero_spatial")
    np.testing.assert_allclose(got, expect, atol=1e-6)
    np.testing.assert_array_equal(got[:, 6], norm[:, 6])  # gripper: mask false, passes through


def test_served_by_a_real_server(oft_dir) -> None:
    with ServerProcess(args=["--policy", "openvla-oft", "--model-path", str(oft_dir)]) as proc:
        with PolicyClient(port=proc.port, timeout_s=60) as client:
            actions = client.infer(libero_obs())
            meta = client.metadata()
    assert actions.shape == (8, 7) and actions.dtype == np.float32 and np.isfinite(actions).all()
    assert meta["policy"] == "openvla-oft" and meta["action_horizon"] == 8 and meta["action_dim"] == 7
    assert meta["inputs"] == ["image", "wrist_image", "state", "instruction"]
    assert meta["gripper_convention"] == "libero"  # the tiny stats' gripper q01 is -1 (as the openvla policy reads)


def test_duquant_dry_run_lists_oft_layers(oft_dir) -> None:
    env = {**os.environ, "GR00T_DUQUANT_DRYRUN": "1"}
    result = subprocess.run([PY, "-m", "server", "--policy", "openvla-oft", "--model-path", str(oft_dir)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    listed = [ln.split()[1].rstrip(":") for ln in out.splitlines() if ln.startswith("[GR00T-DUQUANT][DRYRUN] ")]
    kept = [ln.split()[1].rstrip(":") for ln in out.splitlines() if ln.startswith("[GR00T-DUQUANT][DRYRUN][KEPT] ")]
    assert any(n.startswith("vla.language_model.") and n.endswith("q_proj") for n in listed)
    assert set(kept) == {"action_head.model.fc1", "action_head.model.mlp_resnet_blocks.0.ffn.1",
                         "action_head.model.mlp_resnet_blocks.1.ffn.1", "action_head.model.fc2",
                         "proprio_projector.fc1", "proprio_projector.fc2"}
    assert "Dry-run total layers listed" in out
