"""LIBERO client logic that needs no simulator: gripper conversion, state, results file, Wilson CI, config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from client.libero.config import EvalConfig, config_from_args
from client.libero.protocol import (
    SUITE_MAX_STEPS,
    WAIT_ACTION,
    actions_before_gripper_flip,
    convert_gripper,
    max_steps_for,
    quat2axisangle,
    rotate_180,
    state_8d,
)
from client.libero.results import EpisodeResult, ResultsFile, ResultsFileError, wilson_ci
from client.libero.video import episode_video_name

pytestmark = pytest.mark.libero


# ----------------------------------------------------------------------------- gripper convention
def test_libero_convention_passes_gripper_through_and_clips():
    a = np.array([[0.5, -2.0, 0.1, 0, 0, 3.0, 1.0], [0, 0, 0, 0, 0, 0, -1.0]], np.float32)
    out = convert_gripper(a, "libero")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:, 6], [1.0, -1.0])
    np.testing.assert_allclose(out[0, :6], [0.5, -1.0, 0.1, 0, 0, 1.0], rtol=1e-6)
    assert a[0, 1] == -2.0  # input untouched


@pytest.mark.parametrize(
    ("policy_gripper", "env_gripper"),
    [(1.0, -1.0), (0.9, -1.0), (0.51, -1.0), (0.5, 1.0), (0.49, 1.0), (0.0, 1.0)],
)
def test_openvla_convention_inverts_and_binarises(policy_gripper, env_gripper):
    """OpenVLA data: 1 = open, 0 = closed; env: -1 = open, +1 = close. 0.5 is not > 0.5, so it closes."""
    a = np.zeros((1, 7), np.float32)
    a[0, 6] = policy_gripper
    assert convert_gripper(a, "openvla")[0, 6] == env_gripper


def test_openvla_convention_keeps_motion_dims():
    a = np.array([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 1.0], np.float32)
    np.testing.assert_allclose(convert_gripper(a, "openvla")[:6], a[:6])


def test_convert_gripper_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown gripper convention"):
        convert_gripper(np.zeros((1, 7)), "ros")
    with pytest.raises(ValueError, match="last dimension 7"):
        convert_gripper(np.zeros((2, 6)), "libero")
    with pytest.raises(ValueError, match="NaN"):
        convert_gripper(np.full((1, 7), np.nan), "libero")


def test_wait_action_is_noop_with_open_gripper():
    np.testing.assert_array_equal(WAIT_ACTION, [0, 0, 0, 0, 0, 0, -1])


# ----------------------------------------------------------------------------- state and images
def test_quat2axisangle_matches_known_rotations():
    np.testing.assert_allclose(quat2axisangle([0, 0, 0, 1]), [0, 0, 0])
    # 180 degrees about x (the gripper pointing down)
    np.testing.assert_allclose(quat2axisangle([1, 0, 0, 0]), [math.pi, 0, 0], atol=1e-9)
    s = math.sin(math.pi / 4)
    np.testing.assert_allclose(quat2axisangle([0, 0, s, math.cos(math.pi / 4)]), [0, 0, math.pi / 2], atol=1e-9)


def test_state_8d_layout():
    st = state_8d([0.1, 0.2, 0.3], [1, 0, 0, 0], [0.04, -0.04])
    assert st.shape == (8,) and st.dtype == np.float32
    np.testing.assert_allclose(st, [0.1, 0.2, 0.3, math.pi, 0, 0, 0.04, -0.04], rtol=1e-6)


def test_rotate_180_is_both_flips_and_contiguous():
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    r = rotate_180(img)
    assert r.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(r, np.rot90(img, 2))
    np.testing.assert_array_equal(rotate_180(r), img)


def test_suite_step_limits_follow_the_standard_protocol():
    assert SUITE_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                               "libero_10": 520, "libero_90": 400}
    with pytest.raises(ValueError, match="unknown suite"):
        max_steps_for("libero_100")


# ----------------------------------------------------------------------------- Wilson CI
def test_wilson_ci_known_values():
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_ci(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_ci(45, 50)  # 90% of 50
    assert lo == pytest.approx(0.7864, abs=1e-3) and hi == pytest.approx(0.9565, abs=1e-3)
    assert wilson_ci(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_ci(5, 4)


def test_wilson_ci_contains_the_estimate_and_narrows_with_n():
    for k, n in [(1, 3), (7, 20), (33, 50), (480, 500)]:
        lo, hi = wilson_ci(k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    assert (wilson_ci(40, 50)[1] - wilson_ci(40, 50)[0]) < (wilson_ci(8, 10)[1] - wilson_ci(8, 10)[0])


# ----------------------------------------------------------------------------- results file
def _ep(task_id: int, trial: int, success: bool, errored: bool = False) -> EpisodeResult:
    return EpisodeResult(task_id=task_id, task_name=f"task_{task_id}", instruction="do it", trial=trial,
                         init_state_index=trial, success=success, errored=errored, steps=12, wall_time_s=1.5,
                         latency_ms_p50=1.0, latency_ms_p95=2.0, num_queries=2,
                         error="PolicyTimeoutError: no reply" if errored else None)


def test_results_file_schema_and_aggregates(tmp_path):
    path = tmp_path / "r" / "results.json"
    rf = ResultsFile(path, "libero_spatial", {"seed": 7}, {"mujoco": "3.17.0", "robosuite": "1.4.0"})
    rf.add(_ep(0, 0, True))
    rf.add(_ep(0, 1, False))
    rf.add(_ep(1, 0, True))
    rf.add(_ep(1, 1, False, errored=True))
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and doc["suite"] == "libero_spatial"
    assert doc["versions"]["mujoco"] == "3.17.0" and doc["config"] == {"seed": 7}
    ep = doc["episodes"][0]
    for key in ("task_id", "task_name", "trial", "success", "errored", "steps", "wall_time_s",
                "latency_ms_p50", "latency_ms_p95", "error"):
        assert key in ep
    s = doc["summary"]
    assert (s["episodes"], s["valid_episodes"], s["errored"], s["successes"]) == (4, 3, 1, 2)
    assert s["success_rate"] == pytest.approx(2 / 3)
    assert (s["ci95_low"], s["ci95_high"]) == pytest.approx(wilson_ci(2, 3))
    t1 = doc["per_task"]["1"]
    assert t1["valid_episodes"] == 1 and t1["success_rate"] == 1.0 and t1["errored"] == 1
    table = rf.summary_table()
    assert "libero_spatial" in table and "2/3" in table
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp files


def test_results_file_resume_skips_done_and_retries_errored(tmp_path):
    path = tmp_path / "results.json"
    rf = ResultsFile(path, "libero_goal", {}, {})
    rf.add(_ep(2, 0, True))
    rf.add(_ep(2, 1, False, errored=True))
    with pytest.raises(FileExistsError, match="--resume"):
        ResultsFile(path, "libero_goal", {}, {})
    with pytest.raises(ValueError, match="suite"):
        ResultsFile(path, "libero_10", {}, {}, resume=True)
    again = ResultsFile(path, "libero_goal", {}, {}, resume=True)
    assert again.done_keys() == {(2, 0)}
    again.add(_ep(2, 1, True))  # the retried episode replaces the errored one
    doc = json.loads(path.read_text())
    assert len(doc["episodes"]) == 2 and doc["summary"]["successes"] == 2 and doc["summary"]["errored"] == 0


def test_resume_refuses_another_model_or_episode_setting(tmp_path, caplog):
    """A checkpoint replaced in place keeps its path: the recorded digest, not the path, says which weights ran."""
    ident = {"policy": "gr00t", "model_id": "models/checkpoints/g", "checkpoint_digest": "aaaa",
             "quantization": {"enabled": False}, "denoising_steps": 8}
    path = tmp_path / "results.json"
    ResultsFile(path, "libero_spatial", {"replan": None, "server": ident}, {}).add(_ep(0, 0, True))
    moved = {**ident, "model_id": "/copy/of/g"}
    assert ResultsFile(path, "libero_spatial", {"replan": None, "server": moved}, {}, resume=True).done_keys() == {
        (0, 0)}
    for key, value in (("checkpoint_digest", "bbbb"), ("quantization", {"enabled": True}), ("denoising_steps", 4)):
        with pytest.raises(ResultsFileError, match=f"another model than the server now serves.*{key}"):
            ResultsFile(path, "libero_spatial", {"replan": None, "server": {**ident, key: value}}, {}, resume=True)
    with pytest.raises(ResultsFileError, match="--replan"):
        ResultsFile(path, "libero_spatial", {"replan": 8, "server": ident}, {}, resume=True)
    # a file written before results recorded the checkpoint: continued, with a warning that it cannot be checked
    old = tmp_path / "old.json"
    ResultsFile(old, "libero_spatial", {}, {}).add(_ep(0, 0, True))
    with caplog.at_level("WARNING"):
        ResultsFile(old, "libero_spatial", {"server": ident}, {}, resume=True)
    assert "cannot check that the server still serves the same weights" in caplog.text


# ----------------------------------------------------------------------------- config / naming
def test_config_defaults_and_validation(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    cfg = config_from_args(["libero_spatial", "--headless"])
    assert (cfg.seed, cfg.trials, cfg.replan, cfg.effective_max_steps) == (7, 50, None, 220)
    cfg = config_from_args(["libero_10", "--headless", "--tasks", "0,3", "--max-steps", "20", "--replan", "4"])
    assert cfg.tasks == [0, 3] and cfg.effective_max_steps == 20 and cfg.replan == 4
    with pytest.raises(ValueError, match="--headless"):
        config_from_args(["libero_spatial"])  # no DISPLAY and not headless: refused with a clear message
    with pytest.raises(ValueError, match="SUITE"):
        config_from_args(["libero_100", "--headless"])
    with pytest.raises(ValueError, match="--replan"):
        EvalConfig("libero_goal", replan=0).validate()


def test_video_name_carries_task_trial_and_outcome():
    name = episode_video_name(3, "pick up the black bowl / on the plate", 7, "success")
    assert name == "task03_pick_up_the_black_bowl_on_the_plate__trial007__success.mp4"


def test_demo_schema_modules_import_without_torch_or_h5py() -> None:
    """In the LIBERO environment (this suite's interpreter) the demo writer/readers import without torch and load
    h5py only when a file is touched."""
    import subprocess
    import sys

    code = ("import sys, client.dataset, client.libero.record_demos, client.libero.render_demos; "
            "assert 'torch' not in sys.modules and 'h5py' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------- temporal ensembling
def test_temporal_ensemble_weighs_predictions_oldest_first():
    from client.libero.ensemble import TemporalEnsemble

    rng = np.random.default_rng(0)
    c0, c1, c2 = (rng.normal(size=(4, 7)).astype(np.float32) for _ in range(3))
    ens = TemporalEnsemble(0.5)
    ens.add(0, c0)
    np.testing.assert_allclose(ens.action(1), c0[1], rtol=1e-6)  # one prediction: itself
    ens.add(2, c1)
    w = np.exp(-0.5 * np.arange(2))
    np.testing.assert_allclose(ens.action(3), (w[0] * c0[3] + w[1] * c1[1]) / w.sum(), rtol=1e-5)
    ens.add(4, c2)  # c0 covers steps 0-3 only: dropped
    assert len(ens._chunks) == 2
    np.testing.assert_allclose(ens.actions(4, 2), [(w[0] * c1[2] + w[1] * c2[0]) / w.sum(),
                                                   (w[0] * c1[3] + w[1] * c2[1]) / w.sum()], rtol=1e-5)
    with pytest.raises(ValueError, match="covers step 9"):
        ens.action(9)
    with pytest.raises(ValueError, match="step order"):
        ens.add(3, c0)
    ens.reset()
    with pytest.raises(ValueError, match="no recorded chunk"):
        ens.action(4)
    uniform = TemporalEnsemble(0.0)
    uniform.add(0, c0)
    uniform.add(1, c1)
    np.testing.assert_allclose(uniform.action(2), (c0[2] + c1[1]) / 2, rtol=1e-5)


def test_ensemble_flag_is_parsed_checked_and_recorded():
    cfg = config_from_args(["libero_spatial", "--headless", "--replan", "4", "--ensemble", "0.1"])
    assert cfg.ensemble == pytest.approx(0.1) and cfg.to_dict()["ensemble"] == pytest.approx(0.1)
    assert config_from_args(["libero_spatial", "--headless"]).ensemble is None
    with pytest.raises(ValueError, match="--ensemble"):
        config_from_args(["libero_spatial", "--headless", "--ensemble", "50"])


def _chunk(gripper: list[float]) -> np.ndarray:
    c = np.zeros((len(gripper), 7), np.float32)
    c[:, 6] = gripper
    return c


def test_actions_before_gripper_flip_counts_up_to_the_first_flip_against_the_command_in_force():
    assert actions_before_gripper_flip(_chunk([-1, -1, -1, 1, 1, 1, 1, 1]), -1.0) == 3  # grasp at index 3
    assert actions_before_gripper_flip(_chunk([1, 1, -1, -1]), 1.0) == 2  # release at index 2
    assert actions_before_gripper_flip(_chunk([-1, -1, -1, -1]), -1.0) == 4  # no flip: the whole chunk
    assert actions_before_gripper_flip(_chunk([1, 1, 1, -1]), -1.0) == 4  # flips at its first action: executed
    assert actions_before_gripper_flip(_chunk([-0.2, -0.9, 0.3, 1]), -1.0) == 2  # the sign is what the env uses
    assert actions_before_gripper_flip(_chunk([-1, 0, 0, -1]), -1.0) == 4  # 0 leaves the gripper as it is


def test_gripper_confirm_flag_is_parsed_recorded_and_refused_with_an_ensemble():
    cfg = config_from_args(["libero_spatial", "--headless", "--gripper-confirm"])
    assert cfg.gripper_confirm and cfg.to_dict()["gripper_confirm"] is True
    assert not config_from_args(["libero_spatial", "--headless"]).gripper_confirm
    with pytest.raises(ValueError, match="--gripper-confirm and --ensemble"):
        config_from_args(["libero_spatial", "--headless", "--gripper-confirm", "--replan", "4", "--ensemble", "0"])


def test_load_trajectory_reads_a_written_file_and_refuses_other_npz_and_oversized_ones(tmp_path, monkeypatch):
    from client.libero import trajectory as tr

    rec = tr.TrajectoryRecorder()
    rec.query(0, np.zeros((2, 7), np.float32))
    for i in range(2):
        rec.step(np.full(7, i, np.float32), {"robot0_eef_pos": np.ones(3) * i, "robot0_gripper_qpos": np.zeros(2)})
    path = rec.write(tmp_path / "a.npz", {"robot0_eef_pos": np.zeros(3), "robot0_gripper_qpos": np.zeros(2)}, True)
    t = tr.load_trajectory(path)
    assert t["actions"].shape == (2, 7) and t["eef_pos"][1].tolist() == [1, 1, 1] and bool(t["success"])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="missing actions"):
        tr.load_trajectory(tmp_path / "other.npz")
    monkeypatch.setattr(tr, "MAX_TRAJECTORY_BYTES", 100)
    with pytest.raises(ValueError, match="not a trajectory file"):
        tr.load_trajectory(path)
