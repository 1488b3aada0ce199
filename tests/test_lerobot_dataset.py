"""LeRobot datasets (parquet + mp4) read through client/dataset.py: v2.1 and v3.0 layouts, written here."""

from __future__ import annotations

import io
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from client import dataset  # noqa: E402

FPS = 10
H, W = 24, 40  # not square: a height/width mix-up shows
LENGTHS = (10, 7, 12)
TASKS = ("put the bowl on the plate", "open the drawer")
EPISODE_TASK = (0, 1, 0)
IMAGE, WRIST = "observation.images.image", "observation.images.wrist_image"
# Lossless RGB H.264 when the build has it; otherwise 4:4:4 at qp 0 (only the RGB <-> YUV rounding is lost).
LOSSLESS_RGB = "libx264rgb" in av.codecs_available
TOL = 0.01 if LOSSLESS_RGB else 2.0  # mean absolute error per pixel


def _episode(ep: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + ep)
    t = LENGTHS[ep]
    return {"image": rng.integers(0, 256, (t, H, W, 3), dtype=np.uint8),
            "wrist": rng.integers(0, 256, (t, H, W, 3), dtype=np.uint8),
            "state": rng.normal(size=(t, 8)).astype(np.float32),
            "action": rng.uniform(-1, 1, (t, 7)).astype(np.float32)}


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        if LOSSLESS_RGB:
            stream = out.add_stream("libx264rgb", rate=FPS, options={"qp": "0"})
            stream.pix_fmt = "rgb24"
        else:
            stream = out.add_stream("libx264", rate=FPS, options={"qp": "0"})
            stream.pix_fmt = "yuv444p"
        stream.width, stream.height = W, H
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _vec(a: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _frame_table(ep: int, data: dict[str, np.ndarray], start: int, images_in_parquet: bool) -> pa.Table:
    t = LENGTHS[ep]
    cols = {"observation.state": _vec(data["state"]), "action": _vec(data["action"]),
            "timestamp": pa.array(np.arange(t, dtype=np.float32) / FPS),
            "frame_index": pa.array(np.arange(t, dtype=np.int64)),
            "episode_index": pa.array(np.full(t, ep, dtype=np.int64)),
            "index": pa.array(np.arange(start, start + t, dtype=np.int64)),
            "task_index": pa.array(np.full(t, EPISODE_TASK[ep], dtype=np.int64))}
    if images_in_parquet:
        for key, name in ((IMAGE, "image"), (WRIST, "wrist")):
            cols[key] = pa.array([{"bytes": _png(img), "path": None} for img in data[name]],
                                 type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    return pa.table(cols)


def _info(version: str, camera_dtype: str) -> dict:
    cam = {"dtype": camera_dtype, "shape": [H, W, 3], "names": ["height", "width", "channel"]}
    if camera_dtype == "video":
        cam["info"] = {"video.height": H, "video.width": W, "video.codec": "h264", "video.fps": FPS,
                       "video.channels": 3, "has_audio": False}
    v3 = version == "v3.0"
    return {
        "codebase_version": version, "robot_type": "panda", "total_episodes": len(LENGTHS),
        "total_frames": sum(LENGTHS), "total_tasks": len(TASKS), "total_videos": 2 * len(LENGTHS),
        "total_chunks": 1, "chunks_size": 1000, "fps": FPS, "splits": {"train": f"0:{len(LENGTHS)}"},
        "data_path": ("data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet" if v3
                      else "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"),
        "video_path": None if camera_dtype != "video" else (
            "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if v3
            else "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"),
        "features": {
            IMAGE: cam, WRIST: dict(cam),
            "observation.state": {"dtype": "float32", "shape": [8], "names": {"motors": [f"s{i}" for i in range(8)]}},
            "action": {"dtype": "float32", "shape": [7], "names": {"motors": [f"a{i}" for i in range(7)]}},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }


def write_v21(root: Path, images_in_parquet: bool = False) -> Path:
    """A LeRobot v2.1 dataset: per-episode parquet, per-episode per-camera mp4, jsonl metadata."""
    (root / "meta").mkdir(parents=True)
    info = _info("v2.1", "image" if images_in_parquet else "video")
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(TASKS)))
    (root / "meta" / "episodes.jsonl").write_text("".join(
        json.dumps({"episode_index": ep, "tasks": [TASKS[EPISODE_TASK[ep]]], "length": n}) + "\n"
        for ep, n in enumerate(LENGTHS)))
    start = 0
    for ep in range(len(LENGTHS)):
        data = _episode(ep)
        path = root / f"data/chunk-000/episode_{ep:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(_frame_table(ep, data, start, images_in_parquet), path)
        if not images_in_parquet:
            _write_mp4(root / f"videos/chunk-000/{IMAGE}/episode_{ep:06d}.mp4", data["image"])
            _write_mp4(root / f"videos/chunk-000/{WRIST}/episode_{ep:06d}.mp4", data["wrist"])
        start += LENGTHS[ep]
    return root


def write_v30(root: Path) -> Path:
    """A LeRobot v3.0 dataset: one data file and one mp4 per camera holding every episode, parquet metadata."""
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(_info("v3.0", "video"), indent=4))
    # pandas writes the task strings as its index column
    pq.write_table(pa.table({"task_index": pa.array(range(len(TASKS)), pa.int64()),
                             "__index_level_0__": pa.array(TASKS)}), root / "meta" / "tasks.parquet")
    eps = [_episode(ep) for ep in range(len(LENGTHS))]
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]]).astype(int)
    (root / "data" / "chunk-000").mkdir(parents=True)
    pq.write_table(pa.concat_tables([_frame_table(ep, eps[ep], int(starts[ep]), False) for ep in range(len(LENGTHS))]),
                   root / "data/chunk-000/file-000.parquet")
    for key, name in ((IMAGE, "image"), (WRIST, "wrist")):
        _write_mp4(root / f"videos/{key}/chunk-000/file-000.mp4", np.concatenate([e[name] for e in eps]))
    meta = {"episode_index": list(range(len(LENGTHS))), "tasks": [[TASKS[EPISODE_TASK[e]]] for e in range(3)],
            "length": list(LENGTHS), "data/chunk_index": [0] * 3, "data/file_index": [0] * 3,
            "dataset_from_index": starts.tolist(), "dataset_to_index": (starts + LENGTHS).tolist()}
    for key in (IMAGE, WRIST):
        meta[f"videos/{key}/chunk_index"] = [0] * 3
        meta[f"videos/{key}/file_index"] = [0] * 3
        meta[f"videos/{key}/from_timestamp"] = (starts / FPS).tolist()
        meta[f"videos/{key}/to_timestamp"] = ((starts + LENGTHS) / FPS).tolist()
    pq.write_table(pa.table(meta), root / "meta/episodes/chunk-000/file-000.parquet")
    return root


@pytest.fixture(scope="module")
def v21(tmp_path_factory) -> Path:
    return write_v21(tmp_path_factory.mktemp("lerobot") / "libero_v21")


def _expected_chunks(actions: np.ndarray, h: int) -> np.ndarray:
    t = len(actions)
    return np.stack([actions[np.minimum(np.arange(s, s + h), t - 1)] for s in range(t)])


def _check_samples(s: dataset.DemoSamples, chunk_len: int, exact: bool = False) -> None:
    n = sum(LENGTHS)
    assert len(s) == n and s.images.shape == (n, H, W, 3) and s.images.dtype == np.uint8
    assert s.wrist_images.shape == (n, H, W, 3) and s.states.shape == (n, 8) and s.chunks.shape == (n, chunk_len, 7)
    assert s.instructions == [TASKS[t] for t in EPISODE_TASK]
    assert s.demo_of.tolist() == [d for d, t in enumerate(LENGTHS) for _ in range(t)]
    for d in range(len(LENGTHS)):
        want, idx = _episode(d), np.flatnonzero(s.demo_of == d)
        np.testing.assert_array_equal(s.states[idx], want["state"])
        np.testing.assert_array_equal(s.chunks[idx], _expected_chunks(want["action"], chunk_len))
        for got, ref in ((s.images[idx], want["image"]), (s.wrist_images[idx], want["wrist"])):
            if exact:
                np.testing.assert_array_equal(got, ref)
            err = np.abs(got.astype(np.int16) - ref).mean(axis=(1, 2, 3))
            assert err.max() < TOL, err
            # every frame is the right one, not a neighbour
            if len(ref) > 1:
                assert np.abs(got[1:].astype(np.int16) - ref[:-1]).mean() > 20 * max(TOL, 1)


def test_v21_load_samples_through_the_pattern_argument(v21):
    s = dataset.load_samples(str(v21), chunk_len=4)
    _check_samples(s, 4)
    assert s.sources == [f"libero_v21:episode_{e:06d}" for e in range(3)]
    # chunk semantics: the chunk at step t holds actions t..t+H-1, the last action repeated past the end
    last = _episode(1)["action"]
    np.testing.assert_array_equal(s.chunks[np.flatnonzero(s.demo_of == 1)[-1]], np.repeat(last[-1:], 4, axis=0))
    # split by whole episode and per-task caps work as for HDF5 sets
    capped = dataset.load_samples(v21, max_demos_per_task=1)
    assert capped.instructions == [TASKS[0], TASKS[1]] and len(capped) == LENGTHS[0] + LENGTHS[1]


def test_v21_load_demos_reads_actions_only(v21):
    demos = dataset.load_demos(str(v21))
    assert [d.name for d in demos] == [f"episode_{e:06d}" for e in range(3)]
    for e, d in enumerate(demos):
        np.testing.assert_array_equal(d.actions, _episode(e)["action"])
        assert d.actions.dtype == np.float32 and d.source == str(v21)


def test_v21_rotate_and_explicit_keys(v21):
    s = dataset.load_lerobot_samples(v21, chunk_len=2, image_key=WRIST, wrist_key=None, state_key="observation.state",
                                     rotate_180=True)
    ref = _episode(0)["wrist"][:, ::-1, ::-1]
    assert s.wrist_images is not None  # the default wrist key is still found
    assert np.abs(s.images[:LENGTHS[0]].astype(np.int16) - ref).mean() < TOL


def test_images_stored_in_parquet(tmp_path):
    root = write_v21(tmp_path / "png_set", images_in_parquet=True)
    _check_samples(dataset.load_samples(root, chunk_len=3), 3, exact=True)


def test_v30_layout(tmp_path):
    root = write_v30(tmp_path / "libero_v30")
    _check_samples(dataset.load_samples(root, chunk_len=5), 5)
    assert [d.actions.shape[0] for d in dataset.load_demos(root)] == list(LENGTHS)


def _edit_info(root: Path, **changes) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    for key, value in changes.items():
        if key == "features":
            info["features"].update(value)
        else:
            info[key] = value
    (root / "meta/info.json").write_text(json.dumps(info))


def test_missing_key_is_a_clear_error(v21, tmp_path):
    with pytest.raises(ValueError, match="no feature 'observation.images.front'"):
        dataset.load_lerobot_samples(v21, image_key="observation.images.front")
    with pytest.raises(ValueError, match="no feature 'act'"):
        dataset.load_lerobot_demos(v21, action_key="act")
    with pytest.raises(ValueError, match="expected \\(T, 6\\)"):
        dataset.load_lerobot_demos(v21, action_dim=6)
    root = write_v21(tmp_path / "other_names")
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.images.front"] = info["features"].pop(IMAGE)
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="pass its key explicitly"):
        dataset.load_samples(root)


@pytest.mark.parametrize("version", ["v1.6", "v4.0", None])
def test_unsupported_version(tmp_path, version):
    root = write_v21(tmp_path / "old")
    _edit_info(root, codebase_version=version)
    with pytest.raises(ValueError, match=f"codebase_version {version!r} is not supported"):
        dataset.load_demos(root)


def test_truncated_or_missing_video(tmp_path):
    root = write_v21(tmp_path / "truncated")
    video = root / f"videos/chunk-000/{WRIST}/episode_000002.mp4"
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    with pytest.raises(ValueError, match="episode_000002"):
        dataset.load_samples(root)
    _write_mp4(video, _episode(2)["wrist"][:-3])  # a video shorter than its episode
    with pytest.raises(ValueError, match="no frame for 3 of 12 timestamps"):
        dataset.load_samples(root)
    video.unlink()
    with pytest.raises(FileNotFoundError, match="episode_000002.mp4 is missing"):
        dataset.load_samples(root)
    dataset.load_demos(root)  # actions need no video


def test_corrupt_or_huge_info_is_a_value_error(tmp_path):
    root = write_v21(tmp_path / "huge")
    _edit_info(root, features={IMAGE: {"dtype": "video", "shape": [10**9, 10**9, 3]}})
    with pytest.raises(ValueError, match="shape"):
        dataset.load_samples(root)
    _edit_info(root, features={IMAGE: {"dtype": "video", "shape": [H, W, 3]}}, total_episodes=10**15)
    with pytest.raises(ValueError, match="total_episodes"):
        dataset.load_samples(root)
    _edit_info(root, total_episodes=3, data_path="../../{episode_index}.parquet")
    with pytest.raises(ValueError, match="outside the dataset"):
        dataset.load_demos(root)
    _edit_info(root, data_path="data/{episode_index.__class__}.parquet")
    with pytest.raises(ValueError, match="unknown field"):
        dataset.load_demos(root)
    (root / "meta/info.json").write_text('{"codebase_version": "v2.1", ')
    with pytest.raises(ValueError, match="not JSON"):
        dataset.load_demos(root)


def test_frame_sampling_names_the_format(v21):
    with pytest.raises(ValueError, match="LeRobot dataset"):
        dataset.sample_frames(v21, 3)


def test_memory_is_checked_before_allocating(v21):
    with pytest.raises(ValueError, match="max_bytes"):
        dataset.load_lerobot_samples(v21, max_bytes=1000)


def test_mismatched_frame_size(tmp_path):
    root = write_v21(tmp_path / "size")
    _edit_info(root, features={WRIST: {"dtype": "video", "shape": [H * 2, W, 3], "names": ["height", "width", "c"]}})
    with pytest.raises(ValueError, match="info.json says"):
        dataset.load_samples(root)
