"""The quantised-evaluation workflow: calibration observations from demonstrations, start-up calibration through
the policy, ``run_libero_quant_w4a8.sh`` (configuration, dry-run listing, quantised server) and
``test_duquant_dryrun.sh``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_gr00t_train import write_demo_hdf5

from client.testing import REPO, free_port
from server.config import ConfigError
from server.policies.calibration import calibration_observations, read_observations, sample_frames
from server.policies.options import CalibrationOptions, parse_options
from server.policies.quantize import quantize_policy

LAYER_LINE = re.compile(r"^\[GR00T-DUQUANT\]\[DRYRUN\] (\S+): Linear\((\d+)->(\d+)\) W(\d+) A(\d+|off)\b")
TOTAL_LINE = re.compile(r"^\[GR00T-DUQUANT\] Dry-run total layers listed: (\d+)$", re.M)
TINY_GR00T_LAYERS = 26  # 2 LLM layers x 7 + 4 DiT + 2 VL-SA feed-forwards x 2 (quant/ defaults)


@pytest.fixture(scope="module")
def demos(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("calib_demos")
    for task in range(2):
        write_demo_hdf5(root / f"task{task}_demo.hdf5", demos=3, steps=12, seed=10 + task, task=task)
    return str(root / "*.hdf5")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.gr00t.tiny import build_tiny, save_pretrained

    return save_pretrained(build_tiny(seed=0), tmp_path_factory.mktemp("tinyq") / "gr00t")


def _script_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GR00T_DUQUANT_")}
    env.update({"GR00T_DUQUANT_PACKDIR": str(tmp / "packs"), "PYTHONUNBUFFERED": "1", **extra})
    return env


# ---------------------------------------------------------------------------------------------- calibration data
def test_calibration_observations_are_demonstration_frames(demos: str) -> None:
    refs = sample_frames(demos, 7, seed=1)
    assert len(refs) == len(set(refs)) == 7
    obs = read_observations(refs)
    for r, o in zip(refs, obs, strict=True):
        with h5py.File(r.path, "r") as f:
            g = f["data"][r.demo]
            np.testing.assert_array_equal(o["image"], g["obs/agentview_rgb"][r.step])
            np.testing.assert_array_equal(o["wrist_image"], g["obs/eye_in_hand_rgb"][r.step])
            np.testing.assert_array_equal(o["state"], g["obs/state_8d"][r.step])
            assert o["instruction"] == f["data"].attrs["language_instruction"]
        assert o["image"].dtype == np.uint8 and o["state"].dtype == np.float32 and o["state"].shape == (8,)
    same = calibration_observations(demos, 7, seed=1)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(obs, same, strict=True))
    assert {(r.path, r.demo, r.step) for r in sample_frames(demos, 7, seed=2)} != {(r.path, r.demo, r.step) for r in refs}
    only0 = sample_frames(demos, 5, seed=0, demo_filter=lambda _p, d: d == "demo_0")
    assert {r.demo for r in only0} == {"demo_0"}
    everything = sample_frames(demos, 10_000, seed=0)
    assert len(everything) < 10_000  # capped at the number of demonstration steps, all distinct
    assert len(set(everything)) == len(everything)


def test_calibration_errors_and_options(tmp_path: Path, demos: str) -> None:
    with pytest.raises(FileNotFoundError):
        calibration_observations(str(tmp_path / "none*.hdf5"), 4)
    bogus = tmp_path / "results.hdf5"
    with h5py.File(bogus, "w") as f:
        f.create_dataset("success", data=np.ones(3))
    with pytest.raises(ValueError, match="not a LIBERO demonstration file"):
        calibration_observations(str(bogus), 4)
    c = parse_options(CalibrationOptions, {"calib_data": demos, "calib_n": "5"}, "gr00t")
    assert (c.calib_data, c.calib_n) == (demos, 5)
    assert parse_options(CalibrationOptions, {}, "gr00t").calib_data is None
    assert parse_options(CalibrationOptions, {}, "gr00t").calib_n == 32
    with pytest.raises(ConfigError, match="other"):
        parse_options(CalibrationOptions, {"calib_data": demos, "other": "x"}, "gr00t")
    with pytest.raises(ValueError, match="calib_n"):
        parse_options(CalibrationOptions, {"calib_n": "many"}, "gr00t")
    with pytest.raises(ValueError, match="no files match"):
        parse_options(CalibrationOptions, {"calib_data": str(tmp_path / "missing*.hdf5")}, "gr00t")


def test_startup_calibration_through_policy(tiny_dir: Path, demos: str) -> None:
    import models
    from quant import DuQuantConfig, quantized_layers
    from server.policies.model_policies import GR00TPolicy

    model = models.load_pretrained("gr00t", tiny_dir)
    model.denoising_steps = 2
    policy = GR00TPolicy(model, str(tiny_dir), "libero", {})
    dq = DuQuantConfig(enabled=True, calib_steps=3)
    summary = quantize_policy(policy, model, dq, CalibrationOptions(calib_data=demos, calib_n=3))
    assert summary["enabled"] and summary["calibrated_at_startup"] and summary["calibration_observations"] == 3
    layers = quantized_layers(model)
    assert len(layers) == summary["layers"] == TINY_GR00T_LAYERS
    assert all(m.calib_state == "frozen" for m in layers.values())
    llm = [m for n, m in layers.items() if ".language_model." in n]
    dit = [m for n, m in layers.items() if n.startswith("action_head.model.")]
    assert {m.calibration_calls for m in llm} == {3}  # one backbone pass per observation
    assert {m.calibration_calls for m in dit} == {6}  # every Euler step of the DiT was seen
    obs = calibration_observations(demos, 1, seed=5)[0]
    (out,) = policy.infer([obs])
    assert out.actions.shape == (16, 7) and np.isfinite(out.actions).all()


def test_startup_calibration_openvla(demos: str) -> None:
    from models.openvla.tiny import build_tiny
    from quant import DuQuantConfig, quantized_layers
    from server.policies.model_policies import OpenVLAPolicy

    model = build_tiny("tiny", seed=0).eval()
    policy = OpenVLAPolicy(model, "tiny-openvla", None, False, None, {})
    summary = quantize_policy(policy, model, DuQuantConfig(enabled=True, calib_steps=2),
                              CalibrationOptions(calib_data=demos, calib_n=2))
    assert summary["calibrated_at_startup"] and summary["calibration_observations"] == 2
    layers = quantized_layers(model)
    assert layers and all(m.calib_state == "frozen" for m in layers.values())
    assert min(m.calibration_calls for m in layers.values()) >= 2  # both observations reached every layer


# ---------------------------------------------------------------------------------------------- scripts
def test_quant_script_missing_model_dir(tmp_path: Path) -> None:
    r = subprocess.run([str(REPO / "run_libero_quant_w4a8.sh"), "libero_spatial", str(tmp_path / "nope"), "--yes"],
                       cwd=REPO, env=_script_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr and "models.gr00t.train" in r.stderr
    r = subprocess.run([str(REPO / "run_libero_quant_w4a8.sh"), "libero_nine", str(tmp_path)], cwd=REPO,
                       env=_script_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown suite" in r.stderr


@pytest.mark.slow
def test_quant_script_starts_calibrated_server(tiny_dir: Path, demos: str, tmp_path: Path) -> None:
    from client.policy_client import PolicyClient, PolicyTimeoutError

    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(REPO / "run_libero_quant_w4a8.sh"), "libero_spatial", str(tiny_dir), "--yes", "--port", str(port),
             "--denoising-steps", "2", "--calib-data", demos],
            cwd=REPO, env=_script_env(tmp_path, GR00T_DUQUANT_CALIB_STEPS="3"), stdout=fh, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True)
    try:
        client = PolicyClient(port=port, timeout_s=0.5)
        deadline = time.monotonic() + 240  # calibration on a loaded 2-core machine can take a minute or more
        meta = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                client.ping()
                meta = client.metadata()
            except PolicyTimeoutError:
                continue
            if meta.get("status", "ready") == "ready":  # the server binds first and answers "loading" meanwhile
                break
            meta = None
            time.sleep(0.2)
        assert meta is not None, log.read_text()[-3000:]
        q = meta["quantization"]
        assert q["enabled"] and q["layers"] == TINY_GR00T_LAYERS and q["calibrated_at_startup"]
        assert q["calibration_observations"] == 3 and (q["wbits_default"], q["abits"]) == (4, 8)
        assert meta["denoising_steps"] == 2 and meta["embodiment_tag"] == "new_embodiment"
        obs = calibration_observations(demos, 1, seed=9)[0]
        client.close()
        with PolicyClient(port=port, timeout_s=30.0) as worker:  # a forward pass on a loaded 2-core box can take >0.5 s
            assert worker.infer(obs).shape == (16, 7)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = log.read_text()
    # the effective configuration: recipe defaults, except what the environment set (CALIB_STEPS)
    for line in ("WBITS_DEFAULT=4", "ABITS=8", "BLOCK=16", "PERMUTE=1", "ROW_ROT=restore", "ACT_PCT=99.9",
                 "CALIB_STEPS=3", "LS=0.15", f"PACKDIR={tmp_path / 'packs'}"):
        assert re.search(rf"^\s+{re.escape(line)}$", out, re.M), line
    # the dry-run listing before start-up, then the real replacement of the same layers
    layers = [m.group(1) for m in map(LAYER_LINE.match, out.splitlines()) if m]
    assert len(layers) == TINY_GR00T_LAYERS and int(TOTAL_LINE.search(out).group(1)) == TINY_GR00T_LAYERS
    assert not any("vision_model" in n or ".attn1." in n for n in layers)
    assert out.index("Dry-run total layers listed") < out.index("starting: ./run_inference_server.sh")
    assert f"Total layers replaced: {TINY_GR00T_LAYERS}" in out
    assert list((tmp_path / "packs").iterdir())  # the pack cache was written where PACKDIR said


def test_duquant_dryrun_script_format(tiny_dir: Path, tmp_path: Path) -> None:
    r = subprocess.run([str(REPO / "test_duquant_dryrun.sh"), "--policy", "gr00t", "--model-path", str(tiny_dir)],
                       cwd=REPO, env=_script_env(tmp_path, GR00T_DUQUANT_WBITS_DEFAULT="4"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert all(LAYER_LINE.match(line) for line in lines[:-1]), lines[:3]
    assert TOTAL_LINE.match(lines[-1]) and int(TOTAL_LINE.match(lines[-1]).group(1)) == len(lines) - 1
