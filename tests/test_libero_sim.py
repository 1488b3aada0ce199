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


def test_pinned_fixtures_make_an_episode_independent_of_the_envs_history(spatial_tasks):
    """LIBERO's reset re-places fixtures (model body_pos, not part of an init state) differently at every reset of
    the same env, even after env.seed: task 4's cabinet moves ~1 cm. Pinned (the default), every reset restores the
    first reset's layout, so the same init state and actions give the same trajectory whatever ran before."""
    from client.libero.env import pin_fixture_layout

    task = spatial_tasks[4]
    env = make_env(task, cameras=False)
    try:
        layouts = {}
        for mode in ("per-reset", "pinned"):
            env.__dict__.pop("_vla_fixture_layouts", None)
            seen = []
            for _ in range(3):
                reset_to_init(env, task, 0, seed=7, fixtures=mode)
                seen.append(np.array(env.sim.model.body_pos, copy=True))
            layouts[mode] = seen
        drift = max(np.abs(b - layouts["per-reset"][0]).max() for b in layouts["per-reset"][1:])
        assert drift > 1e-3, "LIBERO no longer moves task 4's fixtures between resets: pinning may be obsolete"
        assert all(np.array_equal(b, layouts["pinned"][0]) for b in layouts["pinned"][1:])

        def episode(init_index):
            reset_to_init(env, task, init_index, seed=7)
            raw = None
            for t in range(30):
                raw, _, _, _ = env.step(np.array([0.3, -0.2, -0.4, 0, 0, 0, 1.0 if t > 15 else -1.0]))
            return np.array(raw["robot0_eef_pos"]), env.sim.get_state().flatten()

        first = episode(0)
        episode(1)
        again = episode(0)
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
        with pytest.raises(ValueError, match="fixtures"):
            reset_to_init(env, task, 0, seed=7, fixtures="sometimes")
        assert pin_fixture_layout(env, 7) is True
    finally:
        close_env(env)


def test_resets_that_keep_the_model_give_bit_identical_episodes(spatial_tasks):
    """After an env's first reset with a seed, pinned resets keep the model (no XML rebuild, no new GL context):
    the same episodes as hard resets, states and rendered images bit for bit, on the task whose fixtures LIBERO
    places -- and the gripper's integrated command does not leak from one episode into the next."""
    from client.libero.env import CameraGate

    task = spatial_tasks[4]
    rng = np.random.default_rng(3)
    actions = rng.uniform(-1.0, 1.0, (36, 7))
    actions[:, 6] = np.where(np.arange(36) % 12 < 6, 1.0, -1.0)  # the gripper closes and opens: its command integrates

    def run(reuse_model):
        env = make_env(task, 64, cameras=True)
        gate = CameraGate(env)
        steps, sims = [], []
        try:
            for trial in (0, 1, 0):
                reset_to_init(env, task, trial, seed=7, gate=gate, reuse_model=reuse_model)
                sims.append(env.sim)
                for t, a in enumerate(actions):
                    gate.open = t % 9 == 0
                    raw, _, _, _ = env.step(a)
                    steps.append((env.sim.get_state().flatten(), raw["agentview_image"].copy() if gate.open else None,
                                  raw["robot0_eye_in_hand_image"].copy() if gate.open else None))
        finally:
            close_env(env)
        return steps, sims

    hard, hard_sims = run(reuse_model=False)
    kept, kept_sims = run(reuse_model=True)
    assert len({id(s) for s in hard_sims}) == 3 and len({id(s) for s in kept_sims}) == 1
    assert len(hard) == len(kept) == 3 * len(actions)
    for i, (h, k) in enumerate(zip(hard, kept, strict=True)):
        np.testing.assert_array_equal(h[0], k[0], err_msg=f"state differs at step {i}")
        for j in (1, 2):
            if h[j] is not None:
                assert h[j].std() > 5.0
                np.testing.assert_array_equal(h[j], k[j], err_msg=f"image {j} differs at step {i}")
    # the third episode repeats the first: the kept model carries nothing over
    n = len(actions)
    np.testing.assert_array_equal(kept[n - 1][0], kept[3 * n - 1][0])


def test_sparse_rendering_records_the_same_frames(spatial_tasks):
    """``replay_and_record(frame_every=3)`` renders only every third step, and the frames it keeps (images,
    state) are bit-identical to an every-step recording's at those steps; actions and sim states stay per step."""
    from client.dataset import read_actions_file
    from client.libero.record_demos import RENDER_RES, replay_and_record
    from client.testing import REPO

    task = spatial_tasks[0]
    _, by_task = read_actions_file(REPO / "data" / "libero_spatial_actions_50.hdf5")
    init, actions = by_task[0][0]
    actions = actions[:10]
    env = make_env(task, RENDER_RES, cameras=True)
    try:
        full = replay_and_record(env, task, init, actions, seed=7)
        sparse = replay_and_record(env, task, init, actions, seed=7, frame_every=3, frame_offset=1)
    finally:
        close_env(env)
    assert "frame_steps" not in full and len(full["agentview_rgb"]) == 10
    np.testing.assert_array_equal(sparse["frame_steps"], [1, 4, 7])
    for key in ("agentview_rgb", "eye_in_hand_rgb", "state_8d", "joint_states"):
        np.testing.assert_array_equal(sparse[key], full[key][[1, 4, 7]])
    np.testing.assert_array_equal(sparse["actions"], full["actions"])
    np.testing.assert_array_equal(sparse["states"], full["states"])
    assert sparse["agentview_rgb"][0].std() > 10.0
    with pytest.raises(ValueError, match="frame_offset"):
        replay_and_record(None, task, init, actions, seed=7, frame_every=2, frame_offset=2)


def test_render_records_a_failed_replay_and_a_resume_skips_it(tmp_path, spatial_tasks, monkeypatch):
    """A replay that does not succeed (here: the expert's first 10 actions only) is dropped and recorded beside the
    task's file; re-running skips it without building a simulator (replays are deterministic)."""
    import json

    import client.libero.env as libero_env
    from client.dataset import read_actions_file
    from client.libero.render_demos import render_task
    from client.testing import REPO

    _, by_task = read_actions_file(REPO / "data" / "libero_spatial_actions_50.hdf5")
    init, actions = by_task[0][0]
    counts = render_task("libero_spatial", 0, [(init, actions[:10])], str(tmp_path), seed=7, frame_every=8)
    assert counts["replay_failures"] == 1 and counts["rendered"] == 0
    record = json.loads((tmp_path / f"{spatial_tasks[0].name}_replay_failures.json").read_text())
    assert record == {"frame_every": 8, "frame_phase": 0, "seed": 7, "init_indices": [init]}

    def no_env(*a, **k):
        raise AssertionError("a recorded failure was replayed again")

    monkeypatch.setattr(libero_env, "make_env", no_env)
    again = render_task("libero_spatial", 0, [(init, actions[:10])], str(tmp_path), seed=7, frame_every=8)
    assert again["skipped_failed_before"] == 1 and again["replay_failures"] == 0 and again["rendered"] == 0
    with pytest.raises(AssertionError, match="replayed again"):  # another seed's replay is not the same replay
        render_task("libero_spatial", 0, [(init, actions[:10])], str(tmp_path), seed=8, frame_every=8)


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


class _RecordingClient:
    """Stands in for the server in this unit test: records what it is sent, returns a fixed motion."""

    def __init__(self, chunk_len: int) -> None:
        self.chunk_len = chunk_len
        self.sent: list[dict] = []

    def metadata(self) -> dict:
        return {"action_horizon": self.chunk_len, "replan_steps": self.chunk_len, "gripper_convention": "libero"}

    def reset(self) -> None:
        pass

    def infer(self, obs: dict) -> np.ndarray:
        self.sent.append({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in obs.items()})
        k = len(self.sent)
        t = np.arange(self.chunk_len)[:, None]
        motion = 0.6 * np.sin(0.7 * (t + k * self.chunk_len) + np.arange(7)[None, :])
        motion[:, 6] = -1.0
        return motion.astype(np.float32)


def test_camera_gate_sends_the_same_images_while_skipping_unused_renders(spatial_tasks, tmp_path):
    """The gated episode sends bit-identical observations and renders only the frames that are sent."""
    from client.libero.config import EvalConfig
    from client.libero.env import CameraGate
    from client.libero.evaluate import run_episode

    task = spatial_tasks[0]
    cfg = EvalConfig(suite="libero_spatial", trials=1, max_steps=12, num_wait_steps=3, resolution=96,
                     save_video=False, results=str(tmp_path / "r.json"))
    env = make_env(task, 96, cameras=True)
    try:
        always, gated = _RecordingClient(4), _RecordingClient(4)
        ep_always, _ = run_episode(env, task, 0, cfg, always, {})
        gate = CameraGate(env)
        ep_gated, _ = run_episode(env, task, 0, cfg, gated, {}, gate)
    finally:
        close_env(env)
    assert ep_always.steps == ep_gated.steps == 12 and not ep_always.errored and not ep_gated.errored
    assert len(always.sent) == len(gated.sent) == 3  # 12 steps / chunks of 4
    for a, g in zip(always.sent, gated.sent, strict=True):
        for key in ("image", "wrist_image", "state"):
            np.testing.assert_array_equal(a[key], g[key])
        assert a["image"].std() > 10.0
    # distinct frames were sent (the arm moved), so the gate did not serve a stale image
    assert np.abs(gated.sent[0]["wrist_image"].astype(int) - gated.sent[2]["wrist_image"].astype(int)).max() > 0
    # 2 cameras x (reset + 3 wait + 12 steps) sensor calls; rendered only for the 3 sent observations
    assert gate.rendered == 2 * 3
    assert gate.skipped >= 2 * (3 + 12 - 3)


def test_camera_gate_keeps_the_video_camera_rendering(spatial_tasks, tmp_path):
    """With videos on, the agent view renders every step (a fresh frame per step), the wrist camera does not."""
    from client.libero.config import EvalConfig
    from client.libero.env import CameraGate
    from client.libero.evaluate import run_episode

    task = spatial_tasks[0]
    cfg = EvalConfig(suite="libero_spatial", trials=1, max_steps=6, num_wait_steps=1, resolution=64,
                     save_video=True, results=str(tmp_path / "r.json"))
    env = make_env(task, 64, cameras=True)
    try:
        gate = CameraGate(env, always_render=("agentview",))
        ep, frames = run_episode(env, task, 0, cfg, _RecordingClient(3), {}, gate)
    finally:
        close_env(env)
    assert ep.steps == 6 and len(frames) == 6
    assert any(np.abs(frames[i].astype(int) - frames[i + 1].astype(int)).max() > 0 for i in range(5))
    # agent view: reset + 1 wait + 6 steps = 8 renders; wrist: only the 2 sent observations
    assert gate.rendered == 8 + 2


def _run_recorded(task, cfg, client) -> tuple:
    """One ``run_episode`` on a real env, recording what it executed: ``(result, actions, positions, chunks)`` --
    the actions after the wait no-ops, the end-effector position after each, and every chunk the client returned."""
    from client.libero.evaluate import run_episode

    env = make_env(task, cfg.resolution, cameras=True)
    executed: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    step = env.step

    def recording_step(action):
        raw = step(action)
        executed.append(np.array(action))
        positions.append(np.array(raw[0]["robot0_eef_pos"]))
        return raw

    env.step = recording_step
    chunks: list[np.ndarray] = []
    infer = client.infer
    client.infer = lambda obs: chunks.append(infer(obs)) or chunks[-1]
    try:
        ep, _ = run_episode(env, task, 0, cfg, client, {})
    finally:
        close_env(env)
    w = cfg.num_wait_steps
    return ep, executed[w:], positions[w:], chunks


def test_ensemble_executes_the_mean_of_the_overlapping_chunks(spatial_tasks, tmp_path):
    """--ensemble 0 with --replan 2 and 4-step chunks: every executed action is the mean of the (up to 2) chunks
    that predicted it, and the policy is still asked every 2 steps."""
    from client.libero.config import EvalConfig

    cfg = EvalConfig(suite="libero_spatial", trials=1, max_steps=8, num_wait_steps=1, resolution=64,
                     save_video=False, results=str(tmp_path / "r.json"), replan=2, ensemble=0.0)
    ep, moves, _, chunks = _run_recorded(spatial_tasks[0], cfg, _RecordingClient(4))
    assert ep.steps == 8 and ep.num_queries == 4 and not ep.errored
    assert len(moves) == 8
    for t, a in enumerate(moves):
        preds = [c[t - 2 * k] for k, c in enumerate(chunks) if 0 <= t - 2 * k < 4]
        assert len(preds) == (1 if t < 2 else 2)
        np.testing.assert_allclose(a, np.mean(preds, axis=0), rtol=1e-5, atol=1e-6)
    # and it is not what the plain loop executes (the newest chunk alone)
    assert not np.allclose(moves[2], chunks[1][0])


class _GraspingClient(_RecordingClient):
    """Every chunk plans a grasp at its index 3 (open before, closed from there)."""

    def infer(self, obs: dict) -> np.ndarray:
        chunk = super().infer(obs)
        chunk[:, 6] = np.where(np.arange(self.chunk_len) < 3, -1.0, 1.0)
        return chunk


def test_trajectory_records_what_was_executed_and_where_the_arm_went(spatial_tasks, tmp_path):
    """--trajectory-dir: one npz per episode, named like its video, whose actions are the ones executed, whose
    positions are the env's after each of them, and whose queries are the chunks the policy returned."""
    from client.libero.config import EvalConfig
    from client.libero.trajectory import load_trajectory

    cfg = EvalConfig(suite="libero_spatial", trials=1, max_steps=10, num_wait_steps=1, resolution=64,
                     save_video=False, results=str(tmp_path / "r.json"), trajectory_dir=str(tmp_path / "traj"))
    ep, executed, positions, _ = _run_recorded(spatial_tasks[0], cfg, _RecordingClient(4))
    files = sorted((tmp_path / "traj").glob("*.npz"))
    assert [f.name for f in files] == ["task00_" + files[0].name.split("_", 1)[1]]
    assert files[0].name.endswith("__trial000__failure.npz")
    t = load_trajectory(files[0])
    assert ep.steps == 10 and t["actions"].shape == (10, 7) and t["eef_pos"].shape == (10, 3)
    np.testing.assert_allclose(t["actions"], np.array(executed), rtol=1e-6)  # the wait no-op is not in it
    np.testing.assert_allclose(t["eef_pos"], np.array(positions), rtol=1e-6)
    assert t["query_steps"].tolist() == [0, 4, 8] and t["chunks"].shape == (3, 4, 7)
    np.testing.assert_allclose(t["chunks"][1], t["actions"][4:8], rtol=1e-6)
    assert not bool(t["success"]) and t["gripper_qpos"].shape == (10, 2)


def test_gripper_confirm_asks_again_before_the_flip_and_executes_the_next_chunk_whole(spatial_tasks, tmp_path):
    """--gripper-confirm with 8-step chunks that close at index 3: the first chunk runs 3 actions (open), the
    re-query's chunk runs whole (its flip included), and the gripper is then closed, so no later flip is cut."""
    from client.libero.config import EvalConfig

    cfg = EvalConfig(suite="libero_spatial", trials=1, max_steps=19, num_wait_steps=1, resolution=64,
                     save_video=False, results=str(tmp_path / "r.json"), gripper_confirm=True)
    ep, moves, _, chunks = _run_recorded(spatial_tasks[0], cfg, _GraspingClient(8))
    # queries at steps 0 (cut at 3), 3 (whole: 3..10), 11 (closed already: its open prefix is a flip at 0 -> whole)
    assert ep.steps == 19 and ep.num_queries == 3 and len(chunks) == 3
    np.testing.assert_allclose(np.array(moves[:3]), chunks[0][:3], rtol=1e-6)
    np.testing.assert_allclose(np.array(moves[3:11]), chunks[1], rtol=1e-6)
    np.testing.assert_allclose(np.array(moves[11:19]), chunks[2], rtol=1e-6)
    assert [m[6] for m in moves[:6]] == [-1, -1, -1, -1, -1, -1] and moves[6][6] == 1
