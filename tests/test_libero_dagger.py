"""DAgger labels (client/libero/dagger.py) on the real simulator: the expert takes over mid-episode from the state the
policy left (phase inferred, the evaluated env untouched), recovers from a missed grasp, and the evaluation client
records the labels against the real server process."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="needs the LIBERO simulator (.venv-libero: scripts/setup.sh libero)")

from client.testing import REPO, ServerProcess  # noqa: E402

pytestmark = pytest.mark.libero
SEED = 7


@pytest.fixture(scope="module")
def spatial():
    from client.libero.env import get_suite_tasks, setup_headless_gl, write_libero_config

    setup_headless_gl()
    write_libero_config()
    return get_suite_tasks("libero_spatial")


def _settled(task, init_index: int = 0):
    """A physics-only env of ``task`` after the protocol's reset and wait steps, and its observation."""
    from client.libero.env import make_env, reset_to_init
    from client.libero.protocol import NUM_WAIT_STEPS, WAIT_ACTION

    env = make_env(task, cameras=False)
    obs = reset_to_init(env, task, init_index, SEED)
    for _ in range(NUM_WAIT_STEPS):
        obs, _, _, _ = env.step(WAIT_ACTION.astype(np.float64))
    return env, obs


def _labeler(tmp_path, task):
    from client.libero.dagger import ExpertLabeler

    lab = ExpertLabeler(tmp_path / "labels")
    assert lab.begin(task, 0, 0, SEED)
    return lab


def test_take_over_continues_an_expert_episode_and_leaves_the_env_alone(spatial, tmp_path):
    """Labels taken along the expert's own episode name the expert's phase and continue its motion; computing one
    leaves the evaluated env's simulator state exactly as it was."""
    from client.libero.env import close_env
    from client.libero.expert import ScriptedExpert, parse_goal

    task = spatial[0]
    env, obs = _settled(task)
    lab = _labeler(tmp_path, task)
    expert = ScriptedExpert(env, parse_goal(env))
    actions, labels = [], {}
    try:
        for t in range(220):
            if t % 8 == 0:
                before = np.array(env.get_sim_state(), copy=True)
                labels[t] = (expert.phase.name, *lab.label(env))
                np.testing.assert_array_equal(env.get_sim_state(), before)
            a = expert.act(obs)
            actions.append(a)
            obs, _, done, _ = env.step(a.astype(np.float64))
            if done:
                break
        assert done, "the expert solves task 0 from init state 0"
    finally:
        lab.close()
        close_env(env)
    actions = np.asarray(actions)
    same_phase, errors = 0, []
    for t, (phase, chunk, label_phase) in labels.items():
        assert chunk is not None and chunk.shape == (16, 7)
        # deliberate differences: the label closes at the descent's stall, and lets go once the object is down
        # where the expert keeps lowering until its 50-step timeout
        same_phase += phase == label_phase or (phase, label_phase) in {("descend", "grasp"), ("lower", "release")}
        ref = actions[t:t + 16]
        errors.append(float(np.abs(chunk[:len(ref), :6] - ref[:, :6]).mean()))
    assert same_phase == len(labels)
    assert float(np.median(errors)) < 0.05, errors  # the label continues the expert's own motion


def test_take_over_recovers_from_a_missed_grasp(spatial, tmp_path):
    """A policy that closes its gripper 4 cm outside the bowl's rim and lifts has missed: the expert's labels, executed
    chunk by chunk as a policy would execute them, reopen, grasp and place the bowl (DAgger's correction)."""
    from client.libero.env import close_env
    from client.libero.expert import POS_SCALE, ScriptedExpert, parse_goal

    task = spatial[2]
    env, obs = _settled(task)
    lab = _labeler(tmp_path, task)
    try:
        lab.label(env)  # the first label plans the carry height from the untouched scene
        goal = parse_goal(env)
        miss = ScriptedExpert(env, goal).grasp_pos + np.array([-0.04, 0.0, 0.0])  # outside the rim
        for target, grip, n in ((miss + [0, 0, 0.08], -1.0, 40), (miss, -1.0, 30), (miss, 1.0, 12),
                                (miss + [0, 0, 0.06], 1.0, 20)):
            for _ in range(n):
                step = np.clip((target - obs["robot0_eef_pos"]) / POS_SCALE * 1.5, -1, 1)
                obs, _, _, _ = env.step(np.r_[step, 0, 0, 0, grip])
        assert not ScriptedExpert.take_over(env, goal, obs).phase.name.startswith(("lift", "carry", "lower"))
        done, phases = False, []
        for _ in range(14):  # 14 chunks of 16 steps: the suite's 220-step budget
            chunk, phase = lab.label(env)
            assert chunk is not None
            phases.append(phase)
            for a in chunk:
                obs, _, done, _ = env.step(a.astype(np.float64))
                if done:
                    break
            if done:
                break
        assert done, phases
        assert phases[0] == "approach" and {"grasp", "lower"} <= set(phases)
    finally:
        lab.close()
        close_env(env)


def test_take_over_beside_the_rim_crosses_over_low(spatial, tmp_path):
    """A hand that came down 3 cm beside the grasp point with the gripper open (the policy's commonest miss) is
    labelled ``align``: it crosses over just above the rim instead of rising back to the approach height (what the
    first DAgger labels did, teaching the policy to oscillate), and the labels executed chunk by chunk then grasp and
    place the bowl."""
    from client.libero.env import close_env
    from client.libero.expert import ALIGN_CLEARANCE, POS_SCALE, ScriptedExpert, parse_goal

    task = spatial[0]
    env, obs = _settled(task)
    lab = _labeler(tmp_path, task)
    try:
        lab.label(env)
        goal = parse_goal(env)
        grasp = ScriptedExpert(env, goal).grasp_pos
        beside = grasp + np.array([0.0, 0.03, 0.04])
        for target in (beside + [0, 0, 0.06], beside):
            for _ in range(40):
                step = np.clip((target - obs["robot0_eef_pos"]) / POS_SCALE * 1.5, -1, 1)
                obs, _, _, _ = env.step(np.r_[step, 0, 0, 0, -1.0])
        z0 = float(obs["robot0_eef_pos"][2])
        assert ScriptedExpert.take_over(env, goal, obs).phase.name == "align"
        done, phases, peak = False, [], z0
        for _ in range(12):
            chunk, phase = lab.label(env)
            assert chunk is not None
            phases.append(phase)
            for a in chunk:
                obs, _, done, _ = env.step(a.astype(np.float64))
                if phases == ["align"]:
                    peak = max(peak, float(obs["robot0_eef_pos"][2]))
                if done:
                    break
            if done:
                break
        assert phases[0] == "align" and "approach" not in phases, phases
        assert peak < max(z0, grasp[2] + ALIGN_CLEARANCE) + 0.01  # never back up to the approach height (+8 cm)
        assert done, phases
    finally:
        lab.close()
        close_env(env)


def _evaluate(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.libero.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=400)


def test_evaluation_records_expert_labels_against_the_real_server(tmp_path):
    """``--expert-labels DIR --expert-mix 1``: every query's label chunk is recorded and, at mix 1, executed -- and
    executed chunk by chunk, re-taken over at every query, the labels solve the task (a label that never lets go of
    the bowl once it is down failed exactly this); the file reads back as training samples whose targets are the
    labels; ``relabel`` recomputes them from the recorded simulator states."""
    import h5py

    from client.dataset import load_samples
    from client.libero.dagger import main as dagger_main

    labels = tmp_path / "labels"
    with ServerProcess() as server:
        r = _evaluate(["libero_spatial", "--headless", "--port", str(server.port), "--tasks", "2", "--trials", "1",
                       "--first-trial", "13", "--no-video", "--no-progress",
                       "--results", str(tmp_path / "results.json"), "--expert-labels", str(labels),
                       "--expert-mix", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    (ep,) = json.loads((tmp_path / "results.json").read_text())["episodes"]
    assert ep["trial"] == 13 and ep["init_state_index"] == 13 and not ep["errored"]
    assert ep["success"], ep
    (path,) = labels.glob("*.hdf5")
    assert path.name.endswith("_trial013.hdf5")
    with h5py.File(path) as f:
        g = f["data/demo_0"]
        steps = g["obs/frame_steps"][()]
        chunks = g["obs/expert_chunks"][()]
        phases = list(g["obs/expert_phases"].asstr()[()])
        executed = g["actions"][()]
        assert len(executed) == ep["steps"] and list(g["obs/executed_expert"][()]) == [1] * len(steps)
        assert int(g.attrs["init_state_index"]) == 13 and g["obs/sim_states"].shape[0] == len(steps)
    assert steps[0] == 0 and len(steps) == ep["num_queries"] and np.all(np.diff(steps) > 0)
    assert phases[0] == "approach" and {"grasp", "lift", "lower"} <= set(phases)
    for k, s in enumerate(steps):  # mix 1: the executed actions are each label's first (chunk length) actions
        n = min((steps[k + 1] if k + 1 < len(steps) else len(executed)) - s, len(executed) - s)
        np.testing.assert_allclose(executed[s:s + n], chunks[k, :n], atol=1e-6)
    samples = load_samples(str(labels / "*.hdf5"), chunk_len=16)
    np.testing.assert_array_equal(samples.chunks, chunks)
    assert samples.images.shape == (len(steps), 128, 128, 3) and samples.states.shape == (len(steps), 8)

    assert dagger_main(["relabel", str(labels), str(labels)]) == 2  # never in place
    assert dagger_main(["relabel", str(labels), str(tmp_path / "relabelled")]) == 0
    with h5py.File(tmp_path / "relabelled" / path.name) as f:
        g = f["data/demo_0"]
        assert list(g["obs/expert_phases"].asstr()[()]) == phases
        np.testing.assert_array_equal(g["obs/frame_steps"][()], steps)
        np.testing.assert_array_equal(g["actions"][()], executed)
        again = g["obs/expert_chunks"][()]
    # the same states give the same labels (MuJoCo's solver warm start is not in the flattened state: ~1e-3)
    assert float(np.median(np.abs(again - chunks))) < 1e-3


def test_expert_mix_without_labels_is_refused_at_start(tmp_path):
    r = _evaluate(["libero_spatial", "--headless", "--expert-mix", "0.5", "--results", str(tmp_path / "r.json")])
    assert r.returncode == 2 and "--expert-labels" in r.stderr and "--expert-mix" in r.stderr
    r = _evaluate(["libero_spatial", "--headless", "--expert-labels", str(tmp_path), "--expert-mix", "1.5",
                   "--results", str(tmp_path / "r.json")])
    assert r.returncode == 2 and "--expert-mix" in r.stderr
