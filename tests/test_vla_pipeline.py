"""The OpenVLA-RSD training pipeline end to end on a small synthetic LIBERO-layout dataset.

demos (HDF5 with images) -> RFSQ tokenizer -> main model (tiny OpenVLA + RFSQ layer head) -> draft ->
served by the real server process with ``--policy openvla-rsd``. Sizes are tiny: this checks the plumbing
and the invariants (resume, exact RSD == main-only greedy through the whole stack), not policy quality.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from client.policy_client import PolicyClient
from client.testing import REPO, ServerProcess, libero_observation, server_python

PY = server_python()
INSTRUCTIONS = ["pick up the black bowl and place it on the plate", "put the bowl on the cookie box"]


def write_demos(path: Path, n_demos: int = 6, steps: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for d in range(n_demos):
            g = data.create_group(f"demo_{d}")
            t = np.linspace(0, 1, steps)[:, None]
            actions = np.concatenate([np.sin(2 * np.pi * (t + d / n_demos)) * 0.5 * np.ones((1, 3)),
                                      0.05 * rng.standard_normal((steps, 3)),
                                      np.where(t > 0.5, 1.0, -1.0)], axis=1).astype(np.float32)
            g.create_dataset("actions", data=actions)
            g.attrs["language_instruction"] = INSTRUCTIONS[d % 2]
            obs = g.create_group("obs")
            phase = (t[:, 0] * 255).astype(np.uint8)
            img = np.zeros((steps, 128, 128, 3), np.uint8)
            img[..., 0] = phase[:, None, None]
            img[..., 1] = rng.integers(0, 40, (steps, 128, 128), dtype=np.uint8)
            obs.create_dataset("agentview_rgb", data=img)
            obs.create_dataset("eye_in_hand_rgb", data=img[:, ::-1])
            obs.create_dataset("state_8d", data=rng.standard_normal((steps, 8)).astype(np.float32))


def run(args: list[str]) -> dict:
    result = subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vla")
    demos = root / "demos.hdf5"
    write_demos(demos)
    run(["-m", "rsd.train_rfsq", "--data", str(demos), "--mode", "robust", "--steps", "60", "--out",
         str(root / "rfsq")])
    first = run(["-m", "rsd.train_vla", "main", "--demos", str(demos), "--rfsq", str(root / "rfsq"), "--out",
                 str(root / "model"), "--steps", "6", "--batch-size", "8", "--save-every", "3",
                 "--heldout-frac", "0.34"])
    assert first["steps"] == 6
    resumed = run(["-m", "rsd.train_vla", "main", "--demos", str(demos), "--rfsq", str(root / "rfsq"), "--out",
                   str(root / "model"), "--steps", "9", "--batch-size", "8", "--save-every", "3",
                   "--heldout-frac", "0.34", "--resume"])
    assert resumed["steps"] == 9
    state = json.loads((root / "model" / "train_state" / "state.json").read_text())
    assert state["step"] == 9
    draft = run(["-m", "rsd.train_vla", "draft", "--model", str(root / "model"), "--demos", str(demos),
                 "--steps", "20", "--max-samples", "64", "--heldout-frac", "0.34"])
    assert draft["kind"] == "deep" and len(draft["round1_code_accuracy"]) == 7  # layers 1..7 given layer 0
    return root / "model"


def obs(seed: int) -> dict:
    return libero_observation(seed, instruction=INSTRUCTIONS[seed % 2])


def test_checkpoint_layout(trained: Path) -> None:
    for name in ("config.json", "model.safetensors.index.json", "dataset_statistics.json", "tokenizer.json",
                 "rsd/rsd_config.json", "rsd/rsd_head.safetensors", "rsd/rfsq/config.json", "rsd/draft"):
        assert (trained / name).exists(), name


@pytest.mark.parametrize("decode", ["greedy", "expected"])
def test_served_exact_rsd_equals_main_only(trained: Path, decode: str) -> None:
    observations = [obs(i) for i in range(4)]
    replies = {}
    for enabled in ("1", "0"):
        args = ["--policy", "openvla-rsd", "--model-path", str(trained), "--rsd-mode", "exact",
                "--rsd-enabled", enabled, "--rsd-action-decode", decode]
        with ServerProcess(args=args) as proc, PolicyClient(port=proc.port, timeout_s=60) as client:
            replies[enabled] = [client.infer(o) for o in observations]
            rsd = client.last_reply["rsd"]
            meta = client.metadata()
        assert meta["policy"] == "openvla-rsd" and meta["action_horizon"] == 8
        assert meta["rsd_totals"]["chunks"] == len(observations)
        assert "per_layer_acceptance" in rsd and rsd["main_passes"] >= 1
    for with_rsd, main_only in zip(replies["1"], replies["0"], strict=True):
        assert with_rsd.shape == (8, 7)
        if decode == "greedy":  # the same codes -> the same chunk, bit for bit
            np.testing.assert_array_equal(with_rsd, main_only)
        else:  # the same codes and main's distributions from n-token vs 1-token passes: equal to float rounding
            np.testing.assert_allclose(with_rsd, main_only, rtol=1e-5, atol=1e-6)
