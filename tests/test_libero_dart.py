"""Noise-injected expert demonstrations (client/libero/dart.py) on the real simulator: the expert runs closed loop
with a held perturbation on what it executes, the rendered replay reproduces the episode, and the file carries the
expert's clean actions as each frame's label chunk, which the trainers read as the target."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="needs the LIBERO simulator (.venv-libero: scripts/setup.sh libero)")

pytestmark = pytest.mark.libero
SEED = 7


def test_held_noise_perturbs_the_arm_only_and_holds_each_draw() -> None:
    from client.libero.dart import NoiseSpec, held_noise

    n = held_noise(NoiseSpec(0.1, 4), 10, np.random.default_rng(0))
    assert n.shape == (10, 7) and not n[:, 6].any()
    assert (n[0:4] == n[0]).all() and (n[4:8] == n[4]).all() and (n[8:] == n[8]).all() and (n[0, :6] != n[4, :6]).all()
    np.testing.assert_array_equal(n, held_noise(NoiseSpec(0.1, 4), 10, np.random.default_rng(0)))
    assert not held_noise(NoiseSpec(0.0, 4), 10, np.random.default_rng(0)).any()
    for bad in (NoiseSpec(-0.1, 4), NoiseSpec(0.1, 0)):
        with pytest.raises(ValueError):
            bad.validate()


def test_noisy_episode_is_labelled_with_the_clean_actions(tmp_path) -> None:
    """One libero_spatial episode at sigma 0.05: it succeeds, the executed actions are the labels plus the held
    noise (clipped) on the arm and equal on the gripper, the labels are the clean actions from each frame's step,
    ``load_samples`` takes them as targets; a rerun skips the episode; bad flags are refused by name."""
    import h5py

    from client.dataset import EXPERT_CHUNKS_KEY, load_samples
    from client.libero.dart import episode_path, main, record_task
    from client.libero.env import get_suite_tasks
    from client.libero.protocol import max_steps_for

    spec_args = ["--suite", "libero_spatial", "--out", str(tmp_path), "--tasks", "0", "--inits", "1",
                 "--sigma", "0.05", "--hold", "8", "--frame-every", "8"]
    assert main(spec_args) == 0
    task = get_suite_tasks("libero_spatial")[0]
    path = episode_path(tmp_path, task.name, 1)
    with h5py.File(path, "r") as f:
        g = f["data/demo_0"]
        executed = g["actions"][()]
        labels = g["obs"][EXPERT_CHUNKS_KEY][()]
        steps = g["obs/frame_steps"][()]
        params = json.loads(g.attrs["expert_params"])
        assert g.attrs["success_step"] == len(executed) <= max_steps_for("libero_spatial")
    assert params["dart_sigma"] == 0.05 and params["success"] is True
    np.testing.assert_array_equal(steps, np.arange(1, len(executed), 8))  # offset init mod 8, as the demos
    assert labels.shape == (len(steps), 16, 7)
    first = labels[:, 0]  # the clean action at each frame's own step
    np.testing.assert_array_equal(first[:, 6], executed[steps, 6])  # the gripper is never perturbed
    diff = executed[steps, :6] - first[:, :6]
    inside = np.abs(executed[steps, :6]) < 1.0  # where the executed action was not clipped
    assert np.abs(diff[inside]).max() > 0.01 and np.abs(diff[inside]).max() < 0.5
    samples = load_samples(path, chunk_len=8)
    np.testing.assert_array_equal(samples.chunks, labels[:, :8])
    # the clean labels continue each other: frame i's chunk from step s covers frame i+1's first label
    np.testing.assert_array_equal(labels[:-1, 8], labels[1:, 0])
    again = record_task("libero_spatial", 0, [1], str(tmp_path), None, SEED, 1, 8)  # type: ignore[arg-type]
    assert again["skipped_existing"] == 1 and again["written"] == 0
    for bad in (["--sigma", "2"], ["--hold", "0"], ["--tasks", "12"], ["--inits", "x"]):
        with pytest.raises(SystemExit):
            main([*spec_args[:4], *bad])


def test_closed_loop_rerun_in_the_rendering_env_perturbs_and_labels_like_the_physics_run() -> None:
    """The fallback for replays that diverge (the drawer task): ``replay_and_record`` with the attempt's params and
    noise runs the expert closed loop in the rendering env; the executed actions are the labels plus the noise
    (clipped), step by step, and the rerun is the same episode as the physics-only one wherever the two envs agree
    (task 0, which replays bit-identically). Noise without params (open loop) is refused."""
    from client.libero.dart import NoiseSpec, held_noise
    from client.libero.env import close_env, get_suite_tasks, make_env
    from client.libero.expert import ExpertParams, run_expert
    from client.libero.protocol import NUM_WAIT_STEPS, max_steps_for
    from client.libero.record_demos import replay_and_record

    task = get_suite_tasks("libero_spatial")[0]
    max_steps = max_steps_for("libero_spatial")
    rng = np.random.default_rng([SEED, 0, 2, 0])
    params = ExpertParams.sample(rng, 0)
    noise = held_noise(NoiseSpec(0.05, 8), max_steps, rng)
    phys = make_env(task, cameras=False)
    rend = make_env(task, 64, cameras=True)
    try:
        run = run_expert(phys, task.init_states[2], params, max_steps, seed=SEED, wait_steps=NUM_WAIT_STEPS,
                         noise=noise)
        rec = replay_and_record(rend, task, 2, run.actions, SEED, params=params, max_steps=max_steps,
                                frame_every=8, frame_offset=2, noise=noise)
        with pytest.raises(ValueError, match="noise needs params"):
            replay_and_record(rend, task, 2, run.actions, SEED, frame_every=8, noise=noise)
    finally:
        close_env(phys)
        close_env(rend)
    assert run.success and rec["success_step"] == len(rec["actions"]) == len(rec["labels"]) == len(rec["phases"])
    np.testing.assert_allclose(rec["actions"], np.clip(rec["labels"] + noise[: len(rec["labels"])], -1, 1),
                               atol=1e-6)
    np.testing.assert_array_equal(rec["actions"], run.actions)
    np.testing.assert_array_equal(rec["labels"], np.asarray(run.labels, np.float32))
    assert rec["phases"] == list(run.phases)
