"""GR00T training CLI: statistics, a short training run that lowers the loss and serves, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models.gr00t.train import compute_statistics
from models.gr00t.train import main as train_main

INSTRUCTIONS = ("pick up the black bowl and place it on the plate", "put the cream cheese in the bowl")


def synthetic_actions(phase: np.ndarray, task: int) -> np.ndarray:
    """Smooth LIBERO-like ``[T, 7]`` actions as a function of the episode phase (gripper -1/+1)."""
    s = 1.0 if task == 0 else -1.0
    a = np.stack([0.8 * np.sin(2 * np.pi * phase) * s, 0.6 * np.cos(2 * np.pi * phase), 0.9 * (phase - 0.5),
                  0.1 * np.sin(4 * np.pi * phase), 0.05 * s * np.ones_like(phase), -0.1 * phase,
                  np.where(phase > 0.4, 1.0, -1.0)], axis=1)
    return a.astype(np.float32)


def write_demo_hdf5(path: Path, demos: int = 4, steps: int = 24, seed: int = 0, task: int = 0,
                    size: int = 32) -> Path:
    """A LIBERO-layout demonstration file whose images' brightness encodes the episode phase."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["language_instruction"] = INSTRUCTIONS[task % len(INSTRUCTIONS)]
        for d in range(demos):
            t = steps + int(rng.integers(-4, 5))
            phase = np.linspace(0, 1, t)
            g = data.create_group(f"demo_{d}")
            g.create_dataset("actions", data=synthetic_actions(phase, task))
            obs = g.create_group("obs")
            level = (40 + 180 * phase)[:, None, None, None]
            noise = rng.integers(0, 20, (t, size, size, 3))
            img = np.clip(level + noise, 0, 255).astype(np.uint8)
            img[:, : size // 4, :, task % 3] = 250  # a task-coloured band
            obs.create_dataset("agentview_rgb", data=img)
            obs.create_dataset("eye_in_hand_rgb", data=img[:, ::-1].copy())
            state = np.concatenate([np.stack([phase, -phase, 0.5 + 0.2 * phase, 3.1 + 0 * phase,
                                              0.1 * phase, -0.2 * phase], 1),
                                    np.stack([0.04 * (1 - phase), -0.04 * (1 - phase)], 1)], 1)
            obs.create_dataset("state_8d", data=(state + rng.normal(0, 0.01, state.shape)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("demos")
    for task in range(2):
        write_demo_hdf5(root / f"task{task}_demo.hdf5", demos=5, steps=24, seed=task, task=task)
    return str(root / "*.hdf5")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.gr00t.tiny import build_tiny, save_pretrained

    return save_pretrained(build_tiny(seed=0), tmp_path_factory.mktemp("tiny") / "gr00t")


def test_statistics_layout_and_values() -> None:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(500, 8))
    actions = rng.uniform(-1, 1, size=(500, 7))
    meta = compute_statistics(states, actions)
    stats = meta["new_embodiment"]["statistics"]
    assert set(stats["state"]) == {"x", "y", "z", "roll", "pitch", "yaw", "gripper"}
    assert set(stats["action"]) == {"x", "y", "z", "roll", "pitch", "yaw", "gripper"}
    assert len(stats["state"]["gripper"]["min"]) == 2 and len(stats["action"]["gripper"]["q99"]) == 1
    for key in ("min", "max", "mean", "std", "q01", "q99"):
        assert key in stats["state"]["x"]
    assert stats["state"]["gripper"]["max"] == pytest.approx(states[:, 6:8].max(0).tolist())
    assert stats["action"]["yaw"]["q01"][0] == pytest.approx(np.quantile(actions[:, 5], 0.01))
    assert stats["state"]["z"]["mean"][0] == pytest.approx(states[:, 2].mean())
    assert meta["new_embodiment"]["embodiment_tag"] == "new_embodiment"
    with pytest.raises(ValueError, match="8-D states"):
        compute_statistics(states[:, :7], actions)


def _args(demos: str, out: Path, init: Path, steps: int, *extra: str) -> list[str]:
    return ["--demos", demos, "--out", str(out), "--init", str(init), "--steps", str(steps), "--batch-size", "6",
            "--lr", "1e-3", "--warmup", "3", "--seed", "3", "--threads", "1", "--denoising-steps", "4",
            "--eval-samples", "8", "--heldout-frac", "0.2", "--shards", "2", *extra]


def test_train_lowers_loss_writes_stats_and_serves(demos: str, tiny_dir: Path, tmp_path: Path) -> None:
    import models

    out = tmp_path / "run"
    assert train_main(_args(demos, out, tiny_dir, 30, "--save-every", "30")) == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    curve = [v for _, v in metrics["train_loss_curve"]]
    assert all(np.isfinite(curve))
    assert np.mean(curve[-5:]) < np.mean(curve[:5])
    assert np.isfinite(metrics["heldout_action_mae"]) and metrics["denoising_steps"] == 4
    # statistics were recomputed from the (training split of the) demonstrations, not copied from --init
    meta = json.loads((out / "experiment_cfg" / "metadata.json").read_text())
    grip = meta["new_embodiment"]["statistics"]["action"]["gripper"]
    assert grip["min"] == [-1.0] and grip["max"] == [1.0]
    x = meta["new_embodiment"]["statistics"]["action"]["x"]
    assert x["max"][0] <= 0.8 + 1e-6 and x["min"][0] >= -0.8 - 1e-6
    # released layout, loaded by the same loader the server uses, produces LIBERO action chunks
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    # with how it is served: the trainer's denoising steps and the project's GR00T serving options
    from models.gr00t.train import SERVING_POLICY_OPTIONS
    from server.policies.serving_defaults import read_serving_defaults

    serving = read_serving_defaults(out)
    assert serving is not None and serving.policy == "gr00t" and serving.config["denoising_steps"] == 4
    assert serving.policy_options == SERVING_POLICY_OPTIONS == {"replan_steps": 8, "initial_noise": "zero"}
    model = models.load_pretrained("gr00t", out)
    from server.policies.model_policies import GR00TPolicy

    policy = GR00TPolicy(model, str(out), "libero", {"enabled": False})
    rng = np.random.default_rng(0)
    obs = {"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
           "wrist_image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
           "state": np.zeros(8, dtype=np.float32), "instruction": INSTRUCTIONS[0]}
    policy.validate(obs)
    (res,) = policy.infer([obs])
    assert res.actions.shape == (16, 7) and np.isfinite(res.actions).all()


def test_resume_matches_uninterrupted_run(demos: str, tiny_dir: Path, tmp_path: Path) -> None:
    # The interrupted run stops inside the warm-up (3 steps), where the learning rate does not depend on --steps.
    full, split = tmp_path / "full", tmp_path / "split"
    train_main(_args(demos, full, tiny_dir, 4, "--save-every", "2", "--eval-samples", "2"))
    train_main(_args(demos, split, tiny_dir, 2, "--save-every", "2", "--eval-samples", "2"))
    assert json.loads((split / "train_state" / "state.json").read_text())["step"] == 2
    train_main(_args(demos, split, tiny_dir, 4, "--save-every", "2", "--eval-samples", "2", "--resume"))
    assert json.loads((split / "train_metrics.json").read_text())["steps"] == 4
    a, b, init = _weights(full / "train_state"), _weights(split / "train_state"), _weights(tiny_dir)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst
    moved = max(float((a[k].float() - init[k].float()).abs().max()) for k in a if k in init)
    assert moved > 1e-4  # it trained


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_extra_demos_train_only_and_leave_the_statistics(demos: str, tiny_dir: Path, tmp_path: Path) -> None:
    """--extra-demos (DAgger episodes): their samples join the training split only; the held-out split and the
    statistics in metadata.json are those of the demonstrations alone, though the labels lie outside their range."""
    from types import SimpleNamespace

    from client.dataset import write_labelled_episode

    n, size = 6, 32
    rng = np.random.default_rng(9)
    img = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    labels = np.full((n, 16, 7), 0.95, dtype=np.float32)  # x beyond the demonstrations' +-0.8
    rec = {"agentview_rgb": img, "eye_in_hand_rgb": img, "ee_pos": np.zeros((n, 3)), "ee_ori": np.zeros((n, 3)),
           "gripper_states": np.zeros((n, 2)), "joint_states": np.zeros((n, 7)),
           "state_8d": rng.normal(size=(n, 8)).astype(np.float32), "states": np.zeros((4 * n, 9)),
           "rewards": np.zeros(4 * n), "dones": np.zeros(4 * n), "success_step": None,
           "frame_steps": np.arange(0, 4 * n, 4, dtype=np.int32), "expert_chunks": labels,
           "phases": ["approach"] * n, "executed_expert": np.zeros(n, bool)}
    task = SimpleNamespace(name="pick", instruction=INSTRUCTIONS[0], suite="libero_spatial", task_id=0,
                           problem_folder="libero_spatial", bddl_file="/x/pick.bddl", init_states=np.zeros((3, 5)))
    extra = write_labelled_episode(tmp_path / "labels" / "pick_trial010.hdf5", task, 10, 0,
                                   rng.uniform(-1, 1, (4 * n, 7)).astype(np.float32), rec, seed=7)
    plain, more = tmp_path / "plain", tmp_path / "more"
    common = ("--save-every", "2", "--eval-samples", "2")
    assert train_main(_args(demos, plain, tiny_dir, 2, *common)) == 0
    assert train_main(_args(demos, more, tiny_dir, 2, *common, "--extra-demos", str(extra))) == 0
    m_plain = json.loads((plain / "train_metrics.json").read_text())
    m_more = json.loads((more / "train_metrics.json").read_text())
    assert m_more["train_samples"] == m_plain["train_samples"] + n
    assert m_more["heldout_samples"] == m_plain["heldout_samples"]
    meta = [json.loads((d / "experiment_cfg" / "metadata.json").read_text()) for d in (plain, more)]
    assert meta[0]["new_embodiment"]["statistics"] == meta[1]["new_embodiment"]["statistics"]
    assert (m_more["extra_samples"], m_more["extra_share"]) == (n, None)
    shared = tmp_path / "shared"  # a fixed share of every batch from them (--extra-share)
    assert train_main(_args(demos, shared, tiny_dir, 2, *common, "--extra-demos", str(extra),
                            "--extra-share", "0.5")) == 0
    m_shared = json.loads((shared / "train_metrics.json").read_text())
    assert (m_shared["extra_samples"], m_shared["extra_share"], m_shared["steps"]) == (n, 0.5, 2)
    with pytest.raises(SystemExit, match="--extra-share needs --extra-demos"):
        train_main(_args(demos, tmp_path / "none", tiny_dir, 2, *common, "--extra-share", "0.5"))


def test_presets_grow_within_the_size_limit_and_load_through_the_released_loader(tmp_path: Path) -> None:
    import models
    from models.gr00t.data_config import make_metadata
    from models.gr00t.tiny import libero_stats, save_pretrained
    from models.gr00t.train import PRESETS, build_fresh, preset_config

    assert PRESETS == ("tiny", "tiny_wide_vision", "small")
    built = {p: build_fresh(p, 0) for p in PRESETS}
    counts = {p: sum(t.numel() for t in m.parameters()) for p, m in built.items()}
    assert counts["tiny"] < counts["tiny_wide_vision"] < counts["small"]
    assert 2 * counts["tiny_wide_vision"] <= 30e6  # the shipped-checkpoint limit, float16
    wide = built["tiny_wide_vision"]
    wide.metadata = make_metadata(wide.data_config, *libero_stats())
    vision = wide.config.eagle_config["vision_config"]
    assert vision["hidden_size"] == 128 and vision["num_hidden_layers"] == 3
    # the action head (run once per denoising step) is the tiny one: this preset spends its parameters on perception
    tiny_head = preset_config("tiny", 576, 517, 512, 514).action_head_cfg
    assert wide.config.action_head_cfg["diffusion_model_cfg"] == tiny_head["diffusion_model_cfg"]
    wide.eval()
    save_pretrained(wide, tmp_path, num_shards=2)
    loaded = models.load_pretrained("gr00t", tmp_path)
    for (name, a), (_, b) in zip(wide.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="--preset"):
        preset_config("huge", 576, 517, 512, 514)
