"""The demonstration-data schema: the one place that writes and reads the project's LIBERO HDF5 files.

Two layouts exist, and every reader here accepts both:

* rendered (LIBERO / robomimic): ``data/demo_N/{actions, obs/agentview_rgb, obs/eye_in_hand_rgb, obs/state_8d,
  ...}``, one file per task, the instruction on the demo group and on ``data`` (``record_demos``,
  ``render_demos``, the files training reads);
* compact (shipped in ``data/``): ``data/task_KK/demo_N/actions`` with ``init_state_index`` per demo and the
  instruction on the task group -- the expert's physics-only result, a few hundred KB.

A demonstration is named by its group path under ``data`` (``demo_3`` or ``task_00/demo_3``). HDF5 lists keys
lexicographically (``demo_10`` before ``demo_2``), so every listing is sorted naturally here; a reader that
sorted by ``int(key.split("_")[1])`` or kept only ``demo_*`` keys could not read the compact layout.

Why in ``client/``: the recorder and renderer run in the LIBERO environment (numpy + h5py, never torch), and
training (``rsd/``, ``models/``) and calibration (``server/``) sit above ``client/``, so all of them can import
it. ``h5py`` is imported inside the functions that open files.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_KEY = "agentview_rgb"
WRIST_KEY = "eye_in_hand_rgb"
STATE_KEY = "state_8d"
STORE_RES = 128  # stored image side of rendered demonstrations
IMAGE_CONVENTION = "rotated_180"  # images as the evaluation client sends them (LIBERO's raw render is upside down)

PathLike = str | Path
Pattern = PathLike | Sequence[PathLike]


# ---------------------------------------------------------------------------------------------- files and groups
def natural_key(name: str) -> tuple:
    """Sort key putting ``demo_2`` before ``demo_10`` and ``task_02`` before ``task_10``."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name) if t)


def resolve_demo_files(pattern: Pattern) -> list[Path]:
    """Expands a glob (or a list of paths/globs) into sorted existing files; raises FileNotFoundError if none."""
    patterns = [pattern] if isinstance(pattern, (str, Path)) else list(pattern)
    paths: set[Path] = set()
    for pat in patterns:
        paths.update(Path(m) for m in glob.glob(str(pat), recursive=True) if Path(m).is_file())
    if not paths:
        raise FileNotFoundError(f"no HDF5 files match {pattern!r}")
    return sorted(paths, key=lambda p: natural_key(str(p)))


def demo_groups(f: Any) -> list[str]:
    """Group paths under ``data`` of every demonstration in an open file, both layouts, in natural order."""
    if "data" not in f:
        raise ValueError(f"{f.filename}: not a LIBERO demonstration file (no 'data' group)")
    data = f["data"]
    names: list[str] = []
    for key in sorted(data.keys(), key=natural_key):
        if key.startswith("demo"):
            names.append(key)
        elif key.startswith("task_"):
            names.extend(f"{key}/{d}" for d in sorted(data[key].keys(), key=natural_key) if d.startswith("demo"))
    return names


def instruction_of(f: Any, group: str) -> str | None:
    """The ``language_instruction`` of demonstration ``group``: demo, task group, ``data`` or file attrs."""
    holders = [f["data"][group]]
    if "/" in group:
        holders.append(f["data"][group.rsplit("/", 1)[0]])
    holders += [f["data"], f]
    for holder in holders:
        value = holder.attrs.get("language_instruction")
        if value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _require_instruction(f: Any, group: str) -> str:
    value = instruction_of(f, group)
    if value is None:
        raise ValueError(f"{f.filename}: no 'language_instruction' attribute on the demo, data group or file")
    return value


def iter_demo_groups(pattern: Pattern, max_per_task: int | None = None) -> Iterator[tuple[Path, Any, str]]:
    """``(path, open file, group path)`` of every demonstration of the matching files, in natural order.

    ``max_per_task`` keeps the first demonstrations of each task: per file in the rendered layout (one file
    per task), per ``task_KK`` group in the compact one.
    """
    import h5py

    for path in resolve_demo_files(pattern):
        with h5py.File(path, "r") as f:
            seen: dict[str, int] = {}
            for name in demo_groups(f):
                task = name.rsplit("/", 1)[0] if "/" in name else ""
                seen[task] = seen.get(task, 0) + 1
                if max_per_task is not None and seen[task] > max_per_task:
                    continue
                yield path, f, name


# ---------------------------------------------------------------------------------------------- action chunks
@dataclass(frozen=True)
class Demo:
    """One demonstration's actions and where they came from (for logging and reproducible splits)."""

    source: str
    name: str
    actions: np.ndarray  # (T, A) float32


def load_demos(pattern: Pattern, action_dim: int = 7) -> list[Demo]:
    """Every demonstration's ``actions`` from the matching files (either layout).

    Raises:
        FileNotFoundError: nothing matches.
        ValueError: a file has no ``data`` group, an actions array has the wrong shape or non-finite values.
    """
    demos: list[Demo] = []
    for path, f, name in iter_demo_groups(pattern):
        grp = f["data"][name]
        if "actions" not in grp:
            raise ValueError(f"{path}:data/{name} has no 'actions' dataset")
        acts = np.asarray(grp["actions"][()], dtype=np.float32)
        if acts.ndim != 2 or acts.shape[1] != action_dim:
            raise ValueError(f"{path}:data/{name}/actions has shape {acts.shape}, expected (T, {action_dim})")
        if acts.shape[0] == 0:
            logger.warning("%s:data/%s is empty; skipped", path, name)
            continue
        if not np.all(np.isfinite(acts)):
            raise ValueError(f"{path}:data/{name}/actions contains NaN or infinite values")
        demos.append(Demo(source=str(path), name=name, actions=acts))
    if not demos:
        raise ValueError(f"no demonstrations found in {pattern!r}")
    logger.info("loaded %d demonstrations, %d actions", len(demos), sum(d.actions.shape[0] for d in demos))
    return demos


def chunk_actions(actions: np.ndarray, chunk_len: int = 8, stride: int = 1) -> np.ndarray:
    """Cuts one (T, A) sequence into (N, chunk_len, A) chunks starting every ``stride`` steps.

    A chunk running past the end is padded by repeating the last action: the "hold still at the end" chunks
    a chunked policy is trained with.
    """
    if actions.ndim != 2:
        raise ValueError(f"actions must be (T, A); got {actions.shape}")
    if chunk_len < 1 or stride < 1:
        raise ValueError("chunk_len and stride must be >= 1")
    t = actions.shape[0]
    padded = np.concatenate([actions, np.repeat(actions[-1:], chunk_len - 1, axis=0)], axis=0)
    starts = np.arange(0, t, stride)
    return padded[starts[:, None] + np.arange(chunk_len)[None, :]]


def chunk_demos(demos: Sequence[Demo], chunk_len: int = 8, stride: int = 1) -> np.ndarray:
    """Chunks every demonstration and concatenates: (N, chunk_len, A) float32."""
    if not demos:
        raise ValueError("no demonstrations to chunk")
    return np.concatenate([chunk_actions(d.actions, chunk_len, stride) for d in demos], axis=0).astype(np.float32)


def split_demos(demos: Sequence[Demo], heldout_frac: float = 0.1, seed: int = 0) -> tuple[list[Demo], list[Demo]]:
    """Seeded split by whole demonstration (neighbouring stride-1 chunks overlap, so a per-chunk split would
    leak); at least one demo on each side when there are two or more."""
    if not 0.0 <= heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in [0, 1); got {heldout_frac}")
    n = len(demos)
    if n < 2 or heldout_frac == 0.0:
        return list(demos), []
    order = np.random.default_rng(seed).permutation(n)
    n_held = min(n - 1, max(1, int(round(heldout_frac * n))))
    held_idx = set(order[:n_held].tolist())
    return ([d for i, d in enumerate(demos) if i not in held_idx], [d for i, d in enumerate(demos) if i in held_idx])


# ---------------------------------------------------------------------------------------------- training samples
@dataclass
class DemoSamples:
    """One sample per demonstration step: images as the evaluation client sends them, the chunk that starts there.

    Images stay uint8 in memory; splits are by whole demonstration so neighbouring steps never straddle them.
    """

    images: np.ndarray  # [N, S, S, 3] uint8 agent view
    wrist_images: np.ndarray | None  # [N, S, S, 3] uint8 or None
    states: np.ndarray | None  # [N, 8] float32 or None
    chunks: np.ndarray  # [N, H, 7] float32 raw env actions
    instructions: list[str]  # one per demonstration
    demo_of: np.ndarray  # [N] int: index into instructions / demonstrations
    sources: list[str]  # one per demonstration: "file.hdf5:demo_3"

    def __len__(self) -> int:
        return int(self.chunks.shape[0])

    def instruction(self, i: int) -> str:
        return self.instructions[int(self.demo_of[i])]

    def subset(self, index: np.ndarray) -> DemoSamples:
        return DemoSamples(
            images=self.images[index],
            wrist_images=None if self.wrist_images is None else self.wrist_images[index],
            states=None if self.states is None else self.states[index],
            chunks=self.chunks[index],
            instructions=self.instructions,
            demo_of=self.demo_of[index],
            sources=self.sources,
        )

    def split_by_demo(self, heldout_frac: float, seed: int) -> tuple[DemoSamples, DemoSamples]:
        """Hold out whole demonstrations, stratified by instruction (every task keeps training data)."""
        rng = np.random.default_rng(seed)
        held: list[int] = []
        by_task: dict[str, list[int]] = {}
        for d, instr in enumerate(self.instructions):
            by_task.setdefault(instr, []).append(d)
        for demos in by_task.values():
            n = int(round(len(demos) * heldout_frac))
            if len(demos) > 1 and n > 0:
                held.extend(rng.choice(demos, size=n, replace=False).tolist())
        mask = np.isin(self.demo_of, np.asarray(held, dtype=np.int64))
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))


def load_samples(pattern: Pattern, chunk_len: int = 8, image_key: str = IMAGE_KEY, wrist_key: str = WRIST_KEY,
                 state_key: str = STATE_KEY, max_demos_per_task: int | None = None) -> DemoSamples:
    """Every demonstration with images (rendered layout) of the matching files, in memory."""
    images, wrists, states, chunks, demo_of = [], [], [], [], []
    instructions: list[str] = []
    sources: list[str] = []
    have_wrist = have_state = True
    files: set[Path] = set()
    for path, f, name in iter_demo_groups(pattern, max_demos_per_task):
        files.add(path)
        g = f["data"][name]
        if "obs" not in g or image_key not in g["obs"]:
            raise ValueError(f"{path}:{name} has no obs/{image_key}: not a demonstration with images")
        actions = np.asarray(g["actions"], dtype=np.float32)
        obs = g["obs"]
        img = np.asarray(obs[image_key], dtype=np.uint8)
        if abs(len(img) - len(actions)) > 1:
            raise ValueError(f"{path}:{name}: {len(img)} images for {len(actions)} actions")
        # A recorder that stops at success may keep one trailing action without an observation.
        n_steps = min(len(img), len(actions))
        img, actions = img[:n_steps], actions[:n_steps]
        d = len(instructions)
        instructions.append(_require_instruction(f, name))
        sources.append(f"{Path(path).name}:{name}")
        images.append(img)
        chunks.append(chunk_actions(actions, chunk_len))
        demo_of.append(np.full(len(actions), d, dtype=np.int64))
        have_wrist = have_wrist and wrist_key in obs
        have_state = have_state and state_key in obs
        if have_wrist:
            wrists.append(np.asarray(obs[wrist_key], dtype=np.uint8)[:n_steps])
        if have_state:
            states.append(np.asarray(obs[state_key], dtype=np.float32)[:n_steps])
    if not instructions:
        raise ValueError(f"no demonstrations found in {pattern}")
    samples = DemoSamples(
        images=np.concatenate(images),
        wrist_images=np.concatenate(wrists) if have_wrist else None,
        states=np.concatenate(states) if have_state else None,
        chunks=np.concatenate(chunks).astype(np.float32),
        instructions=instructions,
        demo_of=np.concatenate(demo_of),
        sources=sources,
    )
    logger.info("loaded %d samples from %d demonstrations in %d files (%d tasks)", len(samples),
                len(instructions), len(files), len(set(instructions)))
    return samples


def random_crop(images: np.ndarray, area: float, rng: np.random.Generator) -> np.ndarray:
    """Random square crops covering ``area`` of each image (OpenVLA's and GR00T's training augmentation)."""
    n, h, w, _ = images.shape
    side_h, side_w = int(round(h * area**0.5)), int(round(w * area**0.5))
    out = np.empty((n, side_h, side_w, 3), dtype=images.dtype)
    ys = rng.integers(0, h - side_h + 1, size=n)
    xs = rng.integers(0, w - side_w + 1, size=n)
    for i in range(n):
        out[i] = images[i, ys[i]:ys[i] + side_h, xs[i]:xs[i] + side_w]
    return out


# ---------------------------------------------------------------------------------------------- single frames
@dataclass(frozen=True)
class FrameRef:
    """Where one observation frame lives (file, demonstration group path under ``data``, step)."""

    path: str
    demo: str
    step: int


def demo_index(pattern: Pattern, demo_filter: Callable[[str, str], bool] | None = None) -> list[tuple[str, str, int]]:
    """``(path, demo group, num_steps)`` of every demonstration with images (that passes ``demo_filter``)."""
    out: list[tuple[str, str, int]] = []
    for path, f, name in iter_demo_groups(pattern):
        if demo_filter is not None and not demo_filter(str(path), name):
            continue
        obs = f["data"][name].get("obs")
        if obs is None or IMAGE_KEY not in obs:
            raise ValueError(f"{path}:{name} has no obs/{IMAGE_KEY}: not a demonstration with images")
        out.append((str(path), name, int(obs[IMAGE_KEY].shape[0])))
    if not out:
        raise ValueError(f"no demonstrations in {pattern!r}")
    return out


def sample_frames(pattern: Pattern, n: int, seed: int = 0,
                  demo_filter: Callable[[str, str], bool] | None = None) -> list[FrameRef]:
    """``n`` distinct demonstration steps drawn uniformly over all steps (seeded; fewer if there are fewer)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    index = demo_index(pattern, demo_filter)
    lengths = np.array([t for _, _, t in index], dtype=np.int64)
    total = int(lengths.sum())
    flat = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    refs = []
    for k in flat:
        d = int(np.searchsorted(starts, k, side="right") - 1)
        path, demo, _ = index[d]
        refs.append(FrameRef(path, demo, int(k - starts[d])))
    if len(refs) < n:
        logger.warning("only %d demonstration steps available (asked for %d)", len(refs), n)
    return refs


def read_frames(refs: Sequence[FrameRef]) -> list[dict[str, Any]]:
    """The LIBERO observation (``image``, ``wrist_image``, ``state``, ``instruction``) at each reference, one
    frame at a time (h5py slicing, never a whole demonstration), in the order of ``refs``."""
    import h5py

    by_file: dict[str, list[int]] = {}
    for i, r in enumerate(refs):
        by_file.setdefault(r.path, []).append(i)
    slots: list[dict[str, Any] | None] = [None] * len(refs)
    for path, members in by_file.items():
        with h5py.File(path, "r") as f:
            for i in members:
                r = refs[i]
                obs = f["data"][r.demo]["obs"]
                item: dict[str, Any] = {
                    "image": np.ascontiguousarray(obs[IMAGE_KEY][r.step], dtype=np.uint8),
                    "instruction": _require_instruction(f, r.demo),
                }
                if WRIST_KEY in obs:
                    item["wrist_image"] = np.ascontiguousarray(obs[WRIST_KEY][r.step], dtype=np.uint8)
                if STATE_KEY in obs:
                    item["state"] = np.asarray(obs[STATE_KEY][r.step], dtype=np.float32)
                slots[i] = item
    return [s for s in slots if s is not None]


def sample_observations(pattern: Pattern, n: int, seed: int = 0,
                        demo_filter: Callable[[str, str], bool] | None = None) -> list[dict[str, Any]]:
    """``n`` LIBERO observations drawn (seeded, uniformly over steps) from demonstration files."""
    return read_frames(sample_frames(pattern, n, seed, demo_filter))


# ---------------------------------------------------------------------------------------------- writers
def open_for_append(path: PathLike, attempts: int = 60, wait_s: float = 5.0) -> Any:
    """``h5py.File(path, "a")``, retried while a reader holds HDF5's file lock (training reads between demos)."""
    import h5py

    for attempt in range(attempts):
        try:
            return h5py.File(path, "a")
        except OSError as e:  # "unable to lock file": a reader has it open
            if attempt == attempts - 1:
                raise
            logger.warning("cannot open %s for writing (%s); retrying in %.0f s", path, e, wait_s)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def write_demo(path: PathLike, task: Any, demo_index: int, init_index: int, actions: np.ndarray,
               rec: dict[str, Any], env_args: dict[str, Any], params: dict[str, Any], seed: int) -> None:
    """Append ``data/demo_<demo_index>`` (rendered layout) to a task's file, created with LIBERO's attrs if new.

    ``task`` needs ``name, instruction, suite, task_id, problem_folder, bddl_file, init_states``; ``rec`` is a
    recording (``client.libero.record_demos.replay_and_record``). The file is opened per demo and closed again,
    so readers can open it between demos.
    """
    write_demo_group(open_for_append(path), task, demo_index, init_index, actions, rec, env_args, params, seed)


def write_demo_group(f: Any, task: Any, demo_index: int, init_index: int, actions: np.ndarray,
                     rec: dict[str, Any], env_args: dict[str, Any], params: dict[str, Any], seed: int) -> None:
    """Writes one rendered demonstration into the open file ``f`` and closes it (see :func:`write_demo`)."""
    from client.libero.protocol import NUM_WAIT_STEPS

    gz = {"compression": "gzip", "compression_opts": 4}
    with f:
        data = f.require_group("data")
        if "problem_info" not in data.attrs:
            data.attrs["env_name"] = task.name
            data.attrs["problem_info"] = json.dumps({
                "problem_name": "libero_tabletop_manipulation", "domain_name": "robosuite",
                "language_instruction": task.instruction, "suite": task.suite, "task_id": task.task_id})
            data.attrs["language_instruction"] = task.instruction
            data.attrs["bddl_file_name"] = os.path.join(task.problem_folder, os.path.basename(task.bddl_file))
            data.attrs["env_args"] = json.dumps(env_args)
            data.attrs["macros_image_convention"] = IMAGE_CONVENTION
            data.attrs["source"] = "client.libero.expert scripted expert (privileged object poses)"
        name = f"demo_{demo_index}"
        if name in data:
            del data[name]
        g = data.create_group(name)
        g.create_dataset("actions", data=np.asarray(actions, np.float32), **gz)
        g.create_dataset("states", data=rec["states"], **gz)
        g.create_dataset("rewards", data=rec["rewards"].astype(np.float32), **gz)
        g.create_dataset("dones", data=rec["dones"].astype(np.uint8), **gz)
        o = g.create_group("obs")
        for k in (IMAGE_KEY, WRIST_KEY):
            img = rec[k].astype(np.uint8)  # one chunk per frame: readers slice single frames
            o.create_dataset(k, data=img, chunks=(1, *img.shape[1:]), **gz)
        for k in ("ee_pos", "ee_ori", "gripper_states", "joint_states", STATE_KEY):
            o.create_dataset(k, data=rec[k].astype(np.float32), **gz)
        o.create_dataset("ee_states", data=np.concatenate([rec["ee_pos"], rec["ee_ori"]], 1).astype(np.float32), **gz)
        g.attrs["num_samples"] = int(len(actions))
        g.attrs["init_state_index"] = int(init_index)
        g.attrs["seed"] = int(seed)
        g.attrs["num_wait_steps"] = NUM_WAIT_STEPS
        g.attrs["success_step"] = int(rec["success_step"] or -1)
        g.attrs["expert_params"] = json.dumps(params)
        g.attrs["open_loop_match"] = bool(rec.get("open_loop_match", True))
        g.attrs["language_instruction"] = task.instruction
        g.create_dataset("init_state", data=task.init_states[init_index])
        demos = [k for k in data if k.startswith("demo_")]
        data.attrs["num_demos"] = len(demos)
        data.attrs["total"] = int(sum(data[k].attrs["num_samples"] for k in demos))


def recorded_init_states(path: PathLike) -> set[int]:
    """Init-state indices of the demonstrations already in a rendered file (empty if it does not exist)."""
    import h5py

    if not Path(path).exists():
        return set()
    with h5py.File(path, "r") as f:
        if "data" not in f:
            return set()
        return {int(f["data"][k].attrs["init_state_index"]) for k in demo_groups(f)}


def write_actions_file(path: PathLike, suite: str, progress: dict[int, Any]) -> None:
    """Compact file ``data/task_KK/demo_N/actions`` for every init state the expert solved (physics only).

    ``progress[task_id]`` needs ``name``, ``instruction`` and ``solved_actions`` (``{init_index: actions}``).
    Written to a temporary file and renamed, so a reader never sees half of it.
    """
    import h5py

    from client.libero.protocol import NUM_WAIT_STEPS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["suite"] = suite
        f.attrs["source"] = "client.libero.expert scripted expert; actions in env convention (gripper -1 open, +1 close)"
        f.attrs["num_wait_steps_before_actions"] = NUM_WAIT_STEPS
        root = f.create_group("data")
        total = 0
        for tid in sorted(progress):
            p = progress[tid]
            tg = root.create_group(f"task_{tid:02d}")
            tg.attrs["task_name"] = p.name
            tg.attrs["language_instruction"] = p.instruction
            for j, (init_s, acts) in enumerate(sorted(p.solved_actions.items(), key=lambda kv: int(kv[0]))):
                g = tg.create_group(f"demo_{j}")
                g.create_dataset("actions", data=np.asarray(acts, np.float32), compression="gzip", compression_opts=9)
                g.attrs["init_state_index"] = int(init_s)
                g.attrs["num_samples"] = len(acts)
                total += 1
            tg.attrs["num_demos"] = len(p.solved_actions)
        f.attrs["num_demos"] = total
    os.replace(tmp, path)


def read_actions_file(path: PathLike) -> tuple[str, dict[int, list[tuple[int, np.ndarray]]]]:
    """``(suite, {task_id: [(init_index, actions float64), ...]})`` from a compact actions file."""
    import h5py

    out: dict[int, list[tuple[int, np.ndarray]]] = {}
    with h5py.File(path, "r") as f:
        suite = str(f.attrs["suite"])
        for name in demo_groups(f):
            g = f["data"][name]
            out.setdefault(int(name.split("/")[0].split("_")[1]), []).append(
                (int(g.attrs["init_state_index"]), np.asarray(g["actions"], np.float64)))
    return suite, out


def write_action_demos(path: PathLike, demos: Sequence[np.ndarray], attrs: dict[str, Any] | None = None) -> Path:
    """Actions-only file in the rendered layout (``data/demo_i/actions``, ``num_samples``; ``data`` gets
    ``total`` and ``attrs``), e.g. synthetic demonstrations for tokenizer tests."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        grp = f.create_group("data")
        for i, acts in enumerate(demos):
            d = grp.create_group(f"demo_{i}")
            d.create_dataset("actions", data=acts)
            d.attrs["num_samples"] = int(acts.shape[0])
        grp.attrs["total"] = int(sum(a.shape[0] for a in demos))
        for k, v in (attrs or {}).items():
            grp.attrs[k] = v
    return path


def dataset_attrs(path: PathLike) -> dict[str, Any]:
    """The file-level attributes of a demonstration file (the ``data`` group's: ``env_args``, ``total``,
    ``synthetic``, ...); ``{}`` for a file without a ``data`` group."""
    import h5py

    with h5py.File(path, "r") as f:
        return dict(f["data"].attrs) if "data" in f else {}
