"""The demonstration schema (client/dataset.py): both layouts, natural sort, writer -> reader, chunks, frames."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from client import dataset
from client.testing import REPO

COMPACT = REPO / "data" / "libero_spatial_actions.hdf5"
COMPACT_50 = REPO / "data" / "libero_spatial_actions_50.hdf5"
INSTRUCTION = "pick up the black bowl and place it on the plate"


def _task(n_inits: int = 20) -> SimpleNamespace:
    return SimpleNamespace(name="pick_bowl", instruction=INSTRUCTION, suite="libero_spatial", task_id=3,
                           problem_folder="libero_spatial", bddl_file="/x/pick_bowl.bddl",
                           init_states=np.arange(n_inits * 5, dtype=np.float64).reshape(n_inits, 5))


def _recording(t: int, seed: int, res: int = dataset.STORE_RES) -> dict:
    """What ``replay_and_record`` returns, for ``t`` steps (images encode (seed, step) in their first pixel)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (t, res, res, 3), dtype=np.uint8)
    img[:, 0, 0, 0] = seed
    img[:, 0, 0, 1] = np.arange(t)
    return {"agentview_rgb": img, "eye_in_hand_rgb": img[:, ::-1].copy(),
            "ee_pos": rng.normal(size=(t, 3)), "ee_ori": rng.normal(size=(t, 3)),
            "gripper_states": rng.normal(size=(t, 2)), "joint_states": rng.normal(size=(t, 7)),
            "state_8d": rng.normal(size=(t, 8)).astype(np.float32), "states": rng.normal(size=(t, 9)),
            "rewards": np.zeros(t), "dones": np.r_[np.zeros(t - 1), 1], "success_step": t,
            "actions": rng.uniform(-1, 1, (t, 7)).astype(np.float32), "open_loop_match": True}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A rendered-layout file with 12 demos written by the writer (so demo_10/demo_11 sort after demo_9)."""
    path = tmp_path_factory.mktemp("rendered") / "pick_bowl_demo.hdf5"
    recs = []
    for i in range(12):
        rec = _recording(5 + i, seed=i, res=16)
        dataset.write_demo(path, _task(), i, init_index=i + 1, actions=rec["actions"], rec=rec,
                           env_args={"env_name": "OffScreenRenderEnv"}, params={"rim_angle": 0.5}, seed=7)
        recs.append(rec)
    return path, recs


def test_natural_sort_key() -> None:
    names = ["demo_10", "demo_2", "demo_1", "task_10", "task_02", "demo_0"]
    assert sorted(names, key=dataset.natural_key) == ["demo_0", "demo_1", "demo_2", "demo_10", "task_02", "task_10"]
    assert sorted(["a/task_10.hdf5", "a/task_9.hdf5"], key=dataset.natural_key) == ["a/task_9.hdf5", "a/task_10.hdf5"]


@pytest.mark.parametrize("compact", [COMPACT, COMPACT_50], ids=["actions", "actions_50"])
def test_reads_shipped_compact_layout(compact: Path) -> None:
    demos = dataset.load_demos(compact)
    with h5py.File(compact, "r") as f:
        assert len(demos) == int(f.attrs["num_demos"])
        expected = [f"{t}/{d}" for t in sorted(f["data"], key=dataset.natural_key)
                    for d in sorted(f["data"][t], key=lambda s: int(s.split("_")[1]))]
        assert [d.name for d in demos] == expected
        first_task = [d.name for d in demos if d.name.startswith("task_00/")]
        assert first_task[:3] == ["task_00/demo_0", "task_00/demo_1", "task_00/demo_2"]  # not demo_10 after 1
        np.testing.assert_array_equal(demos[0].actions, f["data/task_00/demo_0/actions"][()])
        assert dataset.instruction_of(f, "task_00/demo_0") == f["data/task_00"].attrs["language_instruction"]
    suite, by_task = dataset.read_actions_file(compact)
    assert suite == "libero_spatial" and sorted(by_task) == list(range(10))
    assert sum(len(v) for v in by_task.values()) == len(demos)
    # the same order as load_demos, with the init-state index of each episode
    np.testing.assert_array_equal(by_task[0][0][1], demos[0].actions)
    assert all(a.dtype == np.float64 for _, a in by_task[0])
    # the compact layout has no images: frame and sample readers refuse it by name
    with pytest.raises(ValueError, match="not a demonstration with images"):
        dataset.sample_frames(compact, 4)
    with pytest.raises(ValueError, match="not a demonstration with images"):
        dataset.load_samples(compact)


def test_rendered_layout_round_trip(rendered: tuple[Path, list[dict]]) -> None:
    path, recs = rendered
    with h5py.File(path, "r") as f:
        assert dataset.demo_groups(f) == [f"demo_{i}" for i in range(12)]
        data = f["data"]
        assert data.attrs["num_demos"] == 12 and data.attrs["language_instruction"] == INSTRUCTION
        assert data.attrs["macros_image_convention"] == dataset.IMAGE_CONVENTION
        g = data["demo_10"]
        assert g.attrs["init_state_index"] == 11 and g.attrs["num_samples"] == 15
        np.testing.assert_array_equal(g["obs/agentview_rgb"][()], recs[10]["agentview_rgb"])
        np.testing.assert_array_equal(g["init_state"][()], _task().init_states[11])
    assert dataset.recorded_init_states(path) == set(range(1, 13))
    assert dataset.recorded_init_states(path.with_name("missing.hdf5")) == set()
    demos = dataset.load_demos(path)
    assert [d.name for d in demos] == [f"demo_{i}" for i in range(12)]
    for d, rec in zip(demos, recs, strict=True):
        np.testing.assert_array_equal(d.actions, rec["actions"])


def test_training_samples(rendered: tuple[Path, list[dict]]) -> None:
    path, recs = rendered
    s = dataset.load_samples(path, chunk_len=4)
    assert s.sources == [f"{path.name}:demo_{i}" for i in range(12)]
    assert len(s) == sum(len(r["actions"]) for r in recs) and s.instructions == [INSTRUCTION] * 12
    assert s.images.shape[1:] == (16, 16, 3) and s.wrist_images is not None and s.states.shape[1] == 8
    first = np.flatnonzero(s.demo_of == 10)
    np.testing.assert_array_equal(s.images[first], recs[10]["agentview_rgb"])
    np.testing.assert_array_equal(s.chunks[first], dataset.chunk_actions(recs[10]["actions"], 4))
    assert s.instruction(int(first[0])) == INSTRUCTION
    train, held = s.split_by_demo(0.25, seed=0)
    assert len(train) + len(held) == len(s) and not set(train.demo_of) & set(held.demo_of)
    assert len(set(held.demo_of)) == 3
    capped = dataset.load_samples(path, max_demos_per_task=3)
    assert capped.sources == [f"{path.name}:demo_{i}" for i in range(3)]
    crops = dataset.random_crop(s.images[:5], 0.81, np.random.default_rng(0))
    assert crops.shape == (5, 14, 14, 3)


def test_sparse_frame_demos(tmp_path: Path) -> None:
    """A demo rendered every k-th step (``obs/frame_steps``): one sample per frame, each with the chunk that
    starts at the frame's own step; frame readers index frames; a bad index is refused by name."""
    path = tmp_path / "pick_bowl_demo.hdf5"
    full = _recording(13, seed=3, res=16)
    steps = np.arange(2, 13, 4)  # frame_every=4, offset 2
    sparse = {k: (v[steps] if k in ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states",
                                    "joint_states", "state_8d") else v) for k, v in full.items()}
    sparse["frame_steps"] = steps.astype(np.int32)
    dataset.write_demo(path, _task(), 0, init_index=2, actions=full["actions"], rec=sparse,
                       env_args={"frame_every": 4}, params={}, seed=7)
    s = dataset.load_samples(path, chunk_len=4)
    assert len(s) == len(steps) == 3
    np.testing.assert_array_equal(s.images, full["agentview_rgb"][steps])
    np.testing.assert_array_equal(s.states, full["state_8d"][steps])
    np.testing.assert_array_equal(s.chunks, dataset.chunk_actions(full["actions"], 4)[steps])
    assert list(s.images[:, 0, 0, 1]) == [2, 6, 10]  # the first pixel encodes the step
    frames = dataset.read_frames(dataset.sample_frames(path, 3, seed=0))
    assert sorted(int(fr["image"][0, 0, 1]) for fr in frames) == [2, 6, 10]
    with h5py.File(path, "a") as f:
        f["data/demo_0/obs/frame_steps"][-1] = 13  # past the last action
    with pytest.raises(ValueError, match="frame_steps"):
        dataset.load_samples(path)


def _sparse(full: dict, every: int, offset: int) -> dict:
    steps = np.arange(offset, len(full["actions"]), every)
    rec = {k: (v[steps] if k in dataset.FRAME_OBS_KEYS else v) for k, v in full.items()}
    rec["frame_steps"] = steps.astype(np.int32)
    return rec


def _render_dir(root: Path, phase: int, fulls: dict[int, dict], every: int = 8) -> Path:
    """A ``render_demos --frame-every 8 --frame-phase P`` directory of one task file (offset = init + P mod k)."""
    d = root / f"p{phase}"
    d.mkdir()
    for n, (init, full) in enumerate(fulls.items()):
        dataset.write_demo(d / "pick_bowl_demo.hdf5", _task(), n, init_index=init, actions=full["actions"],
                           rec=_sparse(full, every, (init + phase) % every),
                           env_args={"frame_every": every, "frame_phase": phase}, params={}, seed=7)
    return d


def test_merge_frame_renders_equals_a_render_at_half_the_spacing(tmp_path: Path) -> None:
    """Renders at phases 0 and 4 of 8 join into what a render every 4th step holds: every frame once, in step
    order, each sample with its own step's chunk; a phase whose replay differs (states) or is missing keeps the
    first render's frames and is counted; a rerun skips finished files; mismatched settings are refused."""
    fulls = {init: _recording(30 + init, seed=init, res=16) for init in (3, 6, 9)}
    a = _render_dir(tmp_path, 0, fulls)
    drifted = {**fulls, 6: {**fulls[6], "states": fulls[6]["states"] + 1e-3}}  # a replay that went elsewhere
    b = _render_dir(tmp_path, 4, {k: v for k, v in drifted.items() if k != 9})  # init 9's replay failed there
    out = tmp_path / "k4"
    counts = dataset.merge_frame_renders([a, b], out)
    assert counts["episodes"] == 3 and counts["mismatched"] == 1 and counts["missing_phase"] == 1
    s = dataset.load_samples(out / "pick_bowl_demo.hdf5", chunk_len=4)
    want = {3: np.arange(3, 33, 4), 6: np.arange(6, 36, 8), 9: np.arange(1, 39, 8)}  # merged / first render's only
    assert counts["frames"] == len(s) == sum(len(v) for v in want.values())
    for d, init in enumerate((3, 6, 9)):
        rows = s.demo_of == d
        np.testing.assert_array_equal(s.images[rows, 0, 0, 1], want[init])  # the first pixel encodes the step
        np.testing.assert_array_equal(s.states[rows], fulls[init]["state_8d"][want[init]])
        np.testing.assert_array_equal(s.chunks[rows], dataset.chunk_actions(fulls[init]["actions"], 4)[want[init]])
        np.testing.assert_array_equal(s.wrist_images[rows], fulls[init]["eye_in_hand_rgb"][want[init]])
    env_args = json.loads(dataset.dataset_attrs(out / "pick_bowl_demo.hdf5")["env_args"])
    assert (env_args["frame_every"], env_args["frame_phase"]) == (4, 0) and len(env_args["merged_from"]) == 2
    assert dataset.merge_frame_renders([a, b], out)["skipped_files"] == 1
    # the command line: the same join, or a usage error
    from client.libero.render_demos import main as render_main

    assert render_main(["--merge", str(a), str(b), "--out", str(tmp_path / "cli")]) == 0
    np.testing.assert_array_equal(dataset.load_samples(tmp_path / "cli" / "pick_bowl_demo.hdf5", chunk_len=4).images,
                                  s.images)
    with pytest.raises(SystemExit):
        render_main(["--merge", str(a), "--out", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="evenly"):
        dataset.merge_frame_renders([a, _render_dir(tmp_path, 2, fulls)], tmp_path / "bad")
    with pytest.raises(ValueError, match="at least two"):
        dataset.merge_frame_renders([a], tmp_path / "bad")


def test_actions_file_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    progress = {
        tid: SimpleNamespace(name=f"task{tid}", instruction=f"do {tid}",
                             solved_actions={str(k): rng.uniform(-1, 1, (4 + k, 7)).tolist() for k in range(12)})
        for tid in (0, 11, 2)
    }
    path = tmp_path / "actions.hdf5"
    dataset.write_actions_file(path, "libero_spatial", progress)
    suite, by_task = dataset.read_actions_file(path)
    assert suite == "libero_spatial" and sorted(by_task) == [0, 2, 11]
    assert [k for k, _ in by_task[11]] == list(range(12))
    for k, actions in by_task[2]:
        np.testing.assert_allclose(actions, np.asarray(progress[2].solved_actions[str(k)], np.float32))
    demos = dataset.load_demos(path)
    assert [d.name for d in demos][:13] == [f"task_00/demo_{i}" for i in range(12)] + ["task_02/demo_0"]
    assert demos[-1].name == "task_11/demo_11"
    with h5py.File(path, "r") as f:
        assert dataset.instruction_of(f, "task_11/demo_3") == "do 11"


def test_action_demos_and_chunks(tmp_path: Path) -> None:
    acts = [np.arange(14, dtype=np.float64).reshape(2, 7), np.ones((3, 7))]
    path = dataset.write_action_demos(tmp_path / "a.hdf5", acts, {"synthetic": True})
    demos = dataset.load_demos(path)
    assert [d.actions.shape for d in demos] == [(2, 7), (3, 7)]
    chunks = dataset.chunk_demos(demos, chunk_len=3)
    assert chunks.shape == (5, 3, 7) and chunks.dtype == np.float32
    np.testing.assert_array_equal(chunks[1], acts[0][[1, 1, 1]])  # padded by repeating the last action
    np.testing.assert_array_equal(dataset.chunk_actions(acts[0], 2, stride=2), acts[0][None])
    train, held = dataset.split_demos(demos, 0.5, seed=0)
    assert len(train) == len(held) == 1
    with pytest.raises(FileNotFoundError):
        dataset.load_demos(tmp_path / "none*.hdf5")
    bogus = tmp_path / "bogus.hdf5"
    with h5py.File(bogus, "w") as f:
        f.create_dataset("x", data=np.ones(2))
    with pytest.raises(ValueError, match="not a LIBERO demonstration file"):
        dataset.load_demos(bogus)


def test_frames(rendered: tuple[Path, list[dict]]) -> None:
    path, recs = rendered
    index = dataset.demo_index(path)
    assert [(d, t) for _, d, t in index] == [(f"demo_{i}", 5 + i) for i in range(12)]
    refs = dataset.sample_frames(str(path), 9, seed=3)
    assert refs == dataset.sample_frames(str(path), 9, seed=3) and len(set(refs)) == 9
    obs = dataset.read_frames(refs)
    for r, o in zip(refs, obs, strict=True):
        rec = recs[int(r.demo.split("_")[1])]
        np.testing.assert_array_equal(o["image"], rec["agentview_rgb"][r.step])
        np.testing.assert_array_equal(o["wrist_image"], rec["eye_in_hand_rgb"][r.step])
        np.testing.assert_array_equal(o["state"], rec["state_8d"][r.step])
        assert o["instruction"] == INSTRUCTION and o["state"].dtype == np.float32
    same = dataset.sample_observations(path, 9, seed=3)
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(obs, same, strict=True))
    only = dataset.sample_frames(path, 4, demo_filter=lambda _p, d: d == "demo_11")
    assert {r.demo for r in only} == {"demo_11"}
    assert len(dataset.sample_frames(path, 10_000)) == sum(5 + i for i in range(12))


def test_dataset_attrs_reads_the_file_level_attributes(tmp_path) -> None:
    import numpy as np

    from client.dataset import dataset_attrs, write_action_demos

    path = write_action_demos(tmp_path / "s.hdf5", [np.zeros((5, 7))], {"synthetic": True, "seed": 3})
    attrs = dataset_attrs(path)
    assert bool(attrs["synthetic"]) and int(attrs["seed"]) == 3 and int(attrs["total"]) == 5


def _labelled(path: Path, seed: int, horizon: int = 16) -> tuple[dict, np.ndarray]:
    """A DAgger episode as client.libero.dagger writes it: 13 executed policy steps, queried at steps 0, 4, 8."""
    full = _recording(13, seed=seed, res=16)
    steps = np.array([0, 4, 8])
    rec = {k: (v[steps] if k in ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states",
                                 "joint_states", "state_8d") else v) for k, v in full.items()}
    labels = np.random.default_rng(seed + 100).uniform(-1, 1, (3, horizon, 7)).astype(np.float32)
    rec.update(frame_steps=steps.astype(np.int32), expert_chunks=labels, phases=["approach", "descend", "grasp"],
               executed_expert=np.array([False, True, False]))
    dataset.write_labelled_episode(path, _task(), 4, 4, full["actions"], rec, seed=7, success=False, mix=0.3)
    return full, labels


def test_labelled_episodes_train_on_the_expert_chunks(tmp_path: Path, rendered: tuple[Path, list[dict]]) -> None:
    """A DAgger episode's samples take the expert's chunk from each queried state as their target (not the policy's
    executed actions); action-only readers skip it; --extra-demos adds it to the training split only."""
    path = tmp_path / "labels" / "pick_bowl_trial004.hdf5"
    full, labels = _labelled(path, seed=5)
    assert not path.with_name(path.name + ".tmp").exists()
    s = dataset.load_samples(path, chunk_len=8)
    assert len(s) == 3 and s.sources == [f"{path.name}:demo_0"]
    np.testing.assert_array_equal(s.chunks, labels[:, :8])
    assert not np.allclose(s.chunks, dataset.chunk_actions(full["actions"], 8)[[0, 4, 8]])
    np.testing.assert_array_equal(s.states, full["state_8d"][[0, 4, 8]])
    with h5py.File(path) as f:
        g = f["data/demo_0"]
        assert dataset.is_labelled(g) and list(g["obs/expert_phases"].asstr()[()]) == ["approach", "descend", "grasp"]
        assert list(g["obs/executed_expert"][()]) == [0, 1, 0] and "dagger" in f["data"].attrs["source"]
    with pytest.raises(ValueError, match="no demonstrations"):
        dataset.load_demos(path)  # its actions are the policy's: never a demonstration for RFSQ or statistics
    demo_path, _ = rendered
    assert len(dataset.load_demos([demo_path, path])) == 12
    with pytest.raises(ValueError, match="expert_chunks"):
        dataset.load_samples(path, chunk_len=17)  # labels shorter than the chunk asked for

    demos = dataset.load_samples(demo_path, chunk_len=8)
    train, held = demos.split_by_demo(0.25, seed=0)
    both = dataset.add_extra_samples(train, str(tmp_path / "labels" / "*.hdf5"), 8)
    assert len(both) == len(train) + 3 and both.instructions[-1] == INSTRUCTION
    np.testing.assert_array_equal(both.chunks[-3:], labels[:, :8])
    assert set(both.demo_of[-3:]) == {len(train.instructions)}  # renumbered after the demonstrations
    assert dataset.add_extra_samples(train, None, 8) is train
    no_state = dataclasses.replace(train, states=None)
    with pytest.raises(ValueError, match="states"):
        no_state.concat(dataset.load_samples(path, chunk_len=8))
