"""The real LIBERO simulator, headless: env creation, observations, the scripted expert, determinism.

Runs under .venv-libero (skipped elsewhere). Kept to a few hundred physics-only steps and a few dozen
rendered ones: rendering is ~0.3 s/step on two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="needs the LIBERO simulator (.venv-libero: scripts/setup.sh libero)")

from client.libero.env import (  # noqa: E402
    close_env,
    extract_obs,
    get_suite_tasks,
    make_env,
    reset_to_init,
    setup_headless_gl,
    write_libero_config,
)
from client.libero.protocol import WAIT_ACTION  # noqa: E402

pytestmark = pytest.mark.libero


@pytest.fixture(scope="module")
def spatial_tasks(tmp_path_factory):
    setup_headless_gl()
    write_libero_config(tmp_path_factory.mktemp("libero_cfg"))
    return get_suite_tasks("libero_spatial")


def test_suite_has_ten_tasks_with_fifty_init_states(spatial_tasks):
    assert len(spatial_tasks) == 10
    t = spatial_tasks[0]
    assert t.num_init_states == 50
    assert "black bowl" in t.instruction and t.bddl_file.endswith(".bddl")


def test_rendered_env_steps_and_images_are_real(spatial_tasks):
    task = spatial_tasks[0]
    env = make_env(task, 256, cameras=True)
    try:
        raw = reset_to_init(env, task, 0, seed=7)
        for _ in range(5):
            raw, reward, done, _ = env.step(WAIT_ACTION.astype(np.float64))
        assert not done
        obs = extract_obs(raw, task.instruction)
        for key in ("image", "wrist_image"):
            img = obs[key]
            assert img.shape == (256, 256, 3) and img.dtype == np.uint8
            assert img.std() > 10.0, f"{key} looks blank"
        np.testing.assert_array_equal(obs["image"], raw["agentview_image"][::-1, ::-1])
        # rotated agent view: the table (bottom of the scene) is in the lower half, the backdrop above
        assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
        np.testing.assert_allclose(obs["state"][:3], raw["robot0_eef_pos"], rtol=1e-6)
        np.testing.assert_allclose(obs["state"][6:], raw["robot0_gripper_qpos"], rtol=1e-6)
        before = raw["robot0_eef_pos"].copy()
        for _ in range(5):
            raw, _, _, _ = env.step(np.array([0, 0, 1.0, 0, 0, 0, -1.0]))  # move up
        assert raw["robot0_eef_pos"][2] > before[2] + 0.01
    finally:
        close_env(env)


def test_expert_solves_a_spatial_task_and_replay_is_deterministic(spatial_tasks):
    """Physics only: the expert succeeds within 220 steps; replaying its actions succeeds at the same step."""
    from client.libero.expert import ExpertParams, parse_goal, run_expert

    task = spatial_tasks[0]
    env = make_env(task, cameras=False)
    try:
        env.seed(7)
        env.reset()
        goal = parse_goal(env)
        assert (goal.obj, goal.target, goal.relation) == ("akita_black_bowl_1", "plate_1", "on")
        r = run_expert(env, task.init_states[0], ExpertParams(), max_steps=220)
        assert r.success, "scripted expert failed task 0 / init state 0"
        assert r.steps <= 220 and r.actions.shape == (r.steps, 7)
        assert np.all(np.abs(r.actions) <= 1.0)
        # replay open loop from the same init state
        reset_to_init(env, task, 0, seed=7)
        for _ in range(10):
            env.step(WAIT_ACTION.astype(np.float64))
        done_at = None
        for t, a in enumerate(r.actions):
            _, _, done, _ = env.step(a.astype(np.float64))
            if done:
                done_at = t + 1
                break
        assert done_at == r.success_step
    finally:
        close_env(env)


def test_demo_file_layout(tmp_path, spatial_tasks):
    """``write_demo`` produces LIBERO's layout (checked on a short synthetic recording, no rendering)."""
    h5py = pytest.importorskip("h5py")
    from client.libero.record_demos import area_resize_half, write_demo

    task = spatial_tasks[0]
    T = 4
    rng = np.random.default_rng(0)
    rec = {
        "agentview_rgb": rng.integers(0, 255, (T, 128, 128, 3), dtype=np.uint8),
        "eye_in_hand_rgb": rng.integers(0, 255, (T, 128, 128, 3), dtype=np.uint8),
        "ee_pos": rng.random((T, 3)), "ee_ori": rng.random((T, 3)), "gripper_states": rng.random((T, 2)),
        "joint_states": rng.random((T, 7)), "state_8d": rng.random((T, 8)).astype(np.float32),
        "states": rng.random((T, 92)), "rewards": np.array([0, 0, 0, 1.0]), "dones": np.array([0, 0, 0, 1]),
        "success_step": T,
    }
    actions = rng.uniform(-1, 1, (T, 7)).astype(np.float32)
    path = tmp_path / f"{task.name}_demo.hdf5"
    write_demo(path, task, 0, 3, actions, rec, {"env_name": "OffScreenRenderEnv"}, {"rim_angle": 1.0}, 7)
    with h5py.File(path, "r") as f:
        d = f["data"]
        assert d.attrs["language_instruction"] == task.instruction
        assert "problem_info" in d.attrs and "env_args" in d.attrs and d.attrs["num_demos"] == 1
        g = d["demo_0"]
        np.testing.assert_array_equal(g["actions"][()], actions)
        assert g["obs/agentview_rgb"].shape == (T, 128, 128, 3) and g["obs/agentview_rgb"].dtype == np.uint8
        assert g["obs/eye_in_hand_rgb"].compression == "gzip"
        for k, dim in (("ee_pos", 3), ("ee_ori", 3), ("gripper_states", 2), ("joint_states", 7), ("state_8d", 8)):
            assert g[f"obs/{k}"].shape == (T, dim)
        assert g["dones"][-1] == 1 and g.attrs["init_state_index"] == 3
    img = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    small = area_resize_half(img)
    assert small.shape == (128, 128, 3)
    assert abs(int(small[0, 0, 0]) - img[:2, :2, 0].mean()) <= 0.5
