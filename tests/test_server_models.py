"""The real server process serving the project's tiny OpenVLA and GR00T N1.5 checkpoints.

The checkpoints are built in released format by the same builders a user would run
(``python -m models.openvla.tiny``), then loaded through ``--model-path`` like a 7B/3B checkpoint.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from client.policy_client import PolicyClient
from client.testing import REPO, ServerProcess, server_python
from client.testing import libero_observation as libero_obs

PY = server_python()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {"openvla": root / "openvla", "gr00t": root / "gr00t"}
    for family, out in dirs.items():
        subprocess.run([PY, "-m", f"models.{family}.tiny", "--out", str(out)], cwd=REPO, check=True,
                       capture_output=True, timeout=300)
    return dirs


def test_openvla_policy_serves_actions(tiny_dirs) -> None:
    with ServerProcess(args=["--policy", "openvla", "--model-path", str(tiny_dirs["openvla"])]) as proc:
        with PolicyClient(port=proc.port, timeout_s=60) as client:
            actions = client.infer(libero_obs())
            again = client.infer(libero_obs())
            meta = client.metadata()
    assert actions.shape == (1, 7) and np.isfinite(actions).all()
    np.testing.assert_array_equal(actions, again)  # greedy decoding is deterministic
    assert meta["policy"] == "openvla" and meta["action_horizon"] == 1


def test_metadata_names_the_checkpoint_by_content(tiny_dirs, tmp_path) -> None:
    """``checkpoint_digest``: the same weights under another path give the same digest, other weights another
    (an evaluation records it; ``--resume`` and ``compare_libero`` refuse to mix two)."""
    import shutil

    from models.common.digest import checkpoint_digest

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dirs["gr00t"], copy)
    (copy / ".cache-note").write_text("hidden files are not the checkpoint")
    with ServerProcess(args=["--policy", "gr00t", "--model-path", str(copy)]) as proc:
        with PolicyClient(port=proc.port, timeout_s=60) as client:
            meta = client.metadata()
    assert meta["checkpoint_digest"] == checkpoint_digest(tiny_dirs["gr00t"]) and len(meta["checkpoint_digest"]) == 16
    shard = sorted(copy.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    shard.write_bytes(bytes(data))
    assert checkpoint_digest(copy) != meta["checkpoint_digest"]


def test_gr00t_policy_serves_16_step_chunks_with_seed_flags(tiny_dirs) -> None:
    args = ["--policy", "gr00t", "--model_path", str(tiny_dirs["gr00t"]), "--denoising-steps", "8",
            "--embodiment-tag", "new_embodiment", "--data_config",
            "examples.Libero.custom_data_config:LiberoDataConfig", "--server"]
    with ServerProcess(args=args) as proc, PolicyClient(port=proc.port, timeout_s=60) as client:
        actions = client.infer(libero_obs())
        meta = client.metadata()
        assert meta["initial_noise"] == "gaussian"  # upstream's sampler unless asked otherwise
        # GR00T-style keys are accepted too.
        obs = libero_obs(1)
        gr00t_obs = {"video.image": obs["image"][None], "video.wrist_image": obs["wrist_image"][None],
                     "annotation.human.action.task_description": [obs["instruction"]]}
        for i, key in enumerate(["x", "y", "z", "roll", "pitch", "yaw"]):
            gr00t_obs[f"state.{key}"] = obs["state"][None, i:i + 1].astype(np.float64)
        gr00t_obs["state.gripper"] = obs["state"][None, 6:8].astype(np.float64)
        chunk = client.infer(gr00t_obs)
    assert actions.shape == (16, 7) and chunk.shape == (16, 7) and np.isfinite(actions).all()
    assert meta["denoising_steps"] == 8 and meta["embodiment_tag"] == "new_embodiment"
    with ServerProcess(args=[*args, "--policy-option", "initial_noise=zero"]) as proc, \
            PolicyClient(port=proc.port, timeout_s=60) as client:
        first, again = client.infer(libero_obs()), client.infer(libero_obs())
        assert client.metadata()["initial_noise"] == "zero"
    np.testing.assert_array_equal(first, again)  # one deterministic chunk per observation


def test_duquant_dry_run_lists_layers_and_exits_zero(tiny_dirs) -> None:
    env = {**os.environ, "GR00T_DUQUANT_DRYRUN": "1"}
    result = subprocess.run([PY, "-m", "server", "--policy", "gr00t", "--model-path", str(tiny_dirs["gr00t"])],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("[GR00T-DUQUANT][DRYRUN] ")]
    assert lines and "Dry-run total layers listed" in result.stdout
    names = [ln.split()[1].rstrip(":") for ln in lines]
    assert any(".language_model." in n and n.endswith("q_proj") for n in names)
    assert any(n.endswith("ff.net.0.proj") for n in names)
    assert not any("vision" in n or "attn1" in n or "proj_out" in n for n in names)


def test_duquant_w4a8_server_reports_quantisation(tiny_dirs) -> None:
    env = {"GR00T_DUQUANT_WBITS_DEFAULT": "4", "GR00T_DUQUANT_ABITS": "8"}
    with ServerProcess(args=["--policy", "openvla", "--model-path", str(tiny_dirs["openvla"])], env=env) as proc:
        with PolicyClient(port=proc.port, timeout_s=60) as client:
            actions = client.infer(libero_obs())
            quant = client.metadata()["quantization"]
    assert actions.shape == (1, 7)
    assert quant["enabled"] and quant["layers"] > 0 and quant["wbits_default"] == 4


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--policy", "gr00t"], {}, "--model-path"),
        (["--policy", "gr00t", "--embodiment-tag", "mars_rover"], {}, "--embodiment-tag"),
        (["--policy", "gr00t", "--data-config", "nope"], {}, "--data-config"),
        (["--policy", "gr00t", "--policy-option", "initial_noise=uniform"], {}, "initial_noise"),
        (["--policy", "gr00t"], {"GR00T_DUQUANT_ROW_ROT": "sideways"}, "GR00T_DUQUANT_ROW_ROT"),
        (["--policy", "openvla"], {"GR00T_DUQUANT_ABITS": "abc"}, "GR00T_DUQUANT_ABITS"),
    ],
)
def test_bad_model_settings_fail_at_startup(tiny_dirs, args, env, needle) -> None:
    if "--model-path" not in " ".join(args) and needle != "--model-path":
        args = [*args, "--model-path", str(tiny_dirs[args[1]])]
    result = subprocess.run([PY, "-m", "server", *args], cwd=REPO, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_corrupt_checkpoint_fails_with_clear_error(tiny_dirs, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dirs["openvla"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    result = subprocess.run([PY, "-m", "server", "--policy", "openvla", "--model-path", str(bad)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and shard.name in result.stderr and "Traceback" not in result.stderr


def test_embedded_default_model_is_served_without_arguments() -> None:
    """`./run_inference_server.sh` with no flags serves the shipped OpenVLA-RSD checkpoint with RSD."""
    from server.config import EMBEDDED_MODEL_DIR

    assert (EMBEDDED_MODEL_DIR / "config.json").is_file(), "the embedded default checkpoint is missing"
    with ServerProcess(default_policy=True) as proc, PolicyClient(port=proc.port, timeout_s=60) as client:
        meta = client.metadata()
        actions = client.infer(libero_obs())
        rsd = client.last_reply["rsd"]
    assert meta["policy"] == "openvla-rsd" and meta["has_draft"] and meta["action_horizon"] == 8
    assert actions.shape == (8, 7) and np.isfinite(actions).all()
    assert set(np.unique(actions[:, -1])) <= {-1.0, 1.0}  # the RFSQ decoder keeps the gripper binary
    assert 0 < rsd["main_passes_incl_prefill"] - 1 <= 7  # a deep draft can decide the chunk in one pass
    assert meta["draft_kind"] == "deep" and meta["pass_costs_ms"]["pass1_ms"] > 0


@pytest.mark.parametrize(
    "args",
    [
        ["--rsd-mode", "relaxed-action", "--rsd-action-eps-mm", "0.5", "--rsd-action-eps-deg", "0.5"],
        ["--rsd-enabled", "0", "--rsd-decode-layers", "3"],
        ["--rsd-action-decode", "greedy"],
    ],
    ids=["relaxed-action", "truncated-main-only", "greedy-action-decode"],
)
def test_embedded_model_decoder_modes_over_the_wire(args) -> None:
    """The new decoders are reachable from the command line and report what they did in every reply."""
    with ServerProcess(args=["--policy", "openvla-rsd", *args]) as proc, \
            PolicyClient(port=proc.port, timeout_s=60) as client:
        actions = [client.infer(libero_obs(seed=s)) for s in range(3)]
        rsd = client.last_reply["rsd"]
        meta = client.metadata()
        totals = meta["rsd_totals"]
    assert all(a.shape == (8, 7) and np.isfinite(a).all() for a in actions)
    assert all(set(np.unique(a[:, -1])) <= {-1.0, 1.0} for a in actions)  # gripper binary in every decode
    assert totals["chunks"] == 3 and sum(totals["chosen_k_counts"].values()) >= 1
    if "relaxed-action" in args:
        assert rsd["mode"] == "relaxed-action" and rsd["action_dev_mm"] >= 0.0 and rsd["decoded_layers"] == 8
    elif "greedy" in args:
        assert meta["rsd_config"]["action_decode"] == "greedy" and rsd["decoded_layers"] == 8
    else:
        assert rsd["decoded_layers"] == 3 and rsd["main_passes"] == 2 and rsd["rounds"] == 0


SHIPPED_GR00T = REPO / "models" / "checkpoints" / "gr00t-n1.5-tiny-libero-spatial"


def test_shipped_trained_gr00t_serves_actions_inside_its_training_range() -> None:
    """The trained tiny GR00T N1.5 (scripts/train_gr00t_model.sh) loads through --model-path like a 3B one and
    its unnormalised actions stay inside the per-embodiment statistics it was trained with. Served with nothing but
    its path, it is served as its serving.json says (8 Euler steps from zero initial noise, 8 of 16 actions per
    query): the same observation gives the same chunk."""
    import json

    stats = json.loads((SHIPPED_GR00T / "experiment_cfg" / "metadata.json").read_text())
    action_stats = stats["new_embodiment"]["statistics"]["action"]
    lo = np.concatenate([np.asarray(action_stats[k]["min"]) for k in action_stats])
    hi = np.concatenate([np.asarray(action_stats[k]["max"]) for k in action_stats])
    args = ["--policy", "gr00t", "--model-path", str(SHIPPED_GR00T)]
    with ServerProcess(args=args) as proc, PolicyClient(port=proc.port, timeout_s=60) as client:
        meta = client.metadata()
        chunks = [client.infer(libero_obs(seed)) for seed in range(3)]
        again = client.infer(libero_obs(0))
    assert meta["policy"] == "gr00t" and meta["action_horizon"] == 16
    assert (meta["denoising_steps"], meta["initial_noise"], meta["replan_steps"]) == (8, "zero", 8)
    assert meta["serving_defaults"] == {"denoising_steps": 8, "embodiment_tag": "new_embodiment",
                                        "policy_option.replan_steps": 8, "policy_option.initial_noise": "zero"}
    np.testing.assert_array_equal(chunks[0], again)  # zero initial noise: one deterministic chunk per observation
    for chunk in chunks:
        assert chunk.shape == (16, 7) and np.isfinite(chunk).all()
        span = hi - lo
        assert (chunk >= lo - 0.05 * span).all() and (chunk <= hi + 0.05 * span).all()
    # Different observations give different chunks (the policy reads its inputs).
    assert not np.allclose(chunks[0], chunks[1])
