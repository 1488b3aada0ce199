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

import argparse
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
# Optional obs dataset: the step index of each stored observation when only every k-th step was rendered
# (``obs/*`` then has one row per frame, ``actions``/``states`` one per step). Absent = one obs per step.
FRAME_STEPS_KEY = "frame_steps"
# Optional obs dataset of a DAgger episode (client.libero.dagger): the scripted expert's action chunk from each stored
# observation, [frames, H, 7]. It is the sample's target there (``actions`` holds what the *policy* executed), and
# the group carries ``attrs[LABELS_ATTR] == EXPERT_CHUNKS_KEY``, so action-only readers skip it.
EXPERT_CHUNKS_KEY = "expert_chunks"
LABELS_ATTR = "labels"
IMAGE_CONVENTION = "rotated_180"  # images as the evaluation client sends them (LIBERO's raw render is upside down)

PathLike = str | Path
Pattern = PathLike | Sequence[PathLike]


# ---------------------------------------------------------------------------------------------- files and groups
def natural_key(name: str) -> tuple:
    """Sort key putting ``demo_2`` before ``demo_10`` and ``task_02`` before ``task_10``."""
    return tuple((0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name) if t)


def resolve_demo_files(pattern: Pattern) -> list[Path]:
    """Expands a glob (or a list of paths/globs) into sorted existing files; raises FileNotFoundError if none."""
    if lerobot_root(pattern) is not None:
        raise ValueError(f"{pattern}: a LeRobot dataset; load_samples and load_demos read it, frame sampling "
                         "(calibration) reads the HDF5 layouts only")
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

    A LeRobot dataset directory is read by :func:`load_lerobot_demos`.
    """
    if (root := lerobot_root(pattern)) is not None:
        return load_lerobot_demos(root, action_dim=action_dim)
    demos: list[Demo] = []
    labelled = 0
    for path, f, name in iter_demo_groups(pattern):
        grp = f["data"][name]
        if is_labelled(grp):  # a DAgger episode: its actions are the policy's, not a demonstration
            labelled += 1
            continue
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
    if labelled:
        logger.info("skipped %d expert-labelled policy episodes (their actions are the policy's)", labelled)
    if not demos:
        raise ValueError(f"no demonstrations found in {pattern!r}")
    logger.info("loaded %d demonstrations, %d actions", len(demos), sum(d.actions.shape[0] for d in demos))
    return demos


def is_labelled(group: Any) -> bool:
    """True for a DAgger episode (the expert's chunks in ``obs/expert_chunks`` are its targets)."""
    value = group.attrs.get(LABELS_ATTR)
    return (value.decode() if isinstance(value, bytes) else value) == EXPERT_CHUNKS_KEY


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

    def concat(self, other: DemoSamples) -> DemoSamples:
        """This set followed by ``other`` (its demonstrations renumbered after this set's); both must carry the same
        inputs (wrist images, states) at the same image size."""
        for what, a, b in (("wrist images", self.wrist_images, other.wrist_images), ("states", self.states, other.states)):
            if (a is None) != (b is None):
                raise ValueError(f"cannot concatenate demonstrations with and without {what}")
        if self.images.shape[1:] != other.images.shape[1:] or self.chunks.shape[1:] != other.chunks.shape[1:]:
            raise ValueError(f"cannot concatenate images {self.images.shape[1:]} / chunks {self.chunks.shape[1:]} "
                             f"with {other.images.shape[1:]} / {other.chunks.shape[1:]}")

        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])

        return DemoSamples(images=np.concatenate([self.images, other.images]),
                           wrist_images=cat(self.wrist_images, other.wrist_images), states=cat(self.states, other.states),
                           chunks=np.concatenate([self.chunks, other.chunks]),
                           instructions=[*self.instructions, *other.instructions],
                           demo_of=np.concatenate([self.demo_of, other.demo_of + len(self.instructions)]),
                           sources=[*self.sources, *other.sources])

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
    """Every demonstration with images (rendered layout) of the matching files, in memory.

    A LeRobot dataset directory is read by :func:`load_lerobot_samples` (its own key defaults unless a key is
    given here).
    """
    if (root := lerobot_root(pattern)) is not None:
        return load_lerobot_samples(root, chunk_len, image_key=None if image_key == IMAGE_KEY else image_key,
                                    wrist_key=None if wrist_key == WRIST_KEY else wrist_key,
                                    state_key=None if state_key == STATE_KEY else state_key,
                                    max_demos_per_task=max_demos_per_task)
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
        if FRAME_STEPS_KEY in obs:  # sparse frames: one observation every k-th step
            steps = np.asarray(obs[FRAME_STEPS_KEY], dtype=np.int64)
            if len(steps) != len(img) or (len(steps) and (steps.min() < 0 or steps.max() >= len(actions))):
                raise ValueError(f"{path}:{name}: {FRAME_STEPS_KEY} does not index {len(img)} frames into "
                                 f"{len(actions)} actions")
            n_steps = len(steps)
        else:
            if abs(len(img) - len(actions)) > 1:
                raise ValueError(f"{path}:{name}: {len(img)} images for {len(actions)} actions")
            # A recorder that stops at success may keep one trailing action without an observation.
            n_steps = min(len(img), len(actions))
            actions = actions[:n_steps]
            steps = np.arange(n_steps)
        img = img[:n_steps]
        if is_labelled(g):  # DAgger: the expert's chunk from each stored state is the target
            labels = np.asarray(obs[EXPERT_CHUNKS_KEY], dtype=np.float32)
            if labels.ndim != 3 or len(labels) != len(img) or labels.shape[1] < chunk_len or labels.shape[2] != 7:
                raise ValueError(f"{path}:{name}: {EXPERT_CHUNKS_KEY} has shape {labels.shape}, need "
                                 f"({len(img)}, >= {chunk_len}, 7)")
            chunk = labels[:, :chunk_len]
        else:
            chunk = chunk_actions(actions, chunk_len)[steps]
        d = len(instructions)
        instructions.append(_require_instruction(f, name))
        sources.append(f"{Path(path).name}:{name}")
        images.append(img)
        chunks.append(chunk)
        demo_of.append(np.full(n_steps, d, dtype=np.int64))
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


def add_extra_samples(train: DemoSamples, pattern: Pattern | None, chunk_len: int) -> DemoSamples:
    """``train`` followed by every sample of ``pattern`` (the trainers' ``--extra-demos``): DAgger episodes
    (:mod:`client.libero.dagger`) or any other data that trains but is never held out and never changes the
    statistics, so a run with them keeps the held-out split and normalisation of the run without them."""
    if not pattern:
        return train
    extra = load_samples(pattern, chunk_len=chunk_len)
    logger.info("--extra-demos: %d samples from %d episodes added to the %d training samples", len(extra),
                len(extra.instructions), len(train))
    return train.concat(extra)


def add_extra_share_argument(p: argparse.ArgumentParser) -> None:
    """``--extra-share F``: the trainers' fixed share of every batch drawn from the ``--extra-demos`` samples."""
    p.add_argument("--extra-share", type=float, default=None, metavar="F",
                   help="with --extra-demos: draw this fraction of every batch from those episodes and the rest from "
                        "the demonstrations (default: uniform over all samples, i.e. their share of the samples -- "
                        "DAgger round 1 was ~35%% labels and taught the policy the labels' detours)")


def extra_share_kwargs(share: float | None, num_base: int, num_total: int) -> dict[str, Any]:
    """The :class:`models.common.training.TrainConfig` fields for ``--extra-share`` (samples ``num_base`` ..
    ``num_total - 1`` are the extra ones); ``SystemExit`` naming the flag when it cannot apply."""
    if share is None:
        return {}
    if not 0.0 < share < 1.0:
        raise SystemExit(f"--extra-share must be between 0 and 1 (exclusive), got {share}")
    if num_total <= num_base:
        raise SystemExit("--extra-share needs --extra-demos with at least one sample")
    logger.info("--extra-share %.2f: %.0f%% of every batch from the %d extra samples (their plain share: %.0f%%)",
                share, 100 * share, num_total - num_base, 100 * (num_total - num_base) / num_total)
    return {"extra_start": num_base, "extra_share": share}


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
        if "frame_steps" in rec:  # observations at these steps only (render_demos --frame-every)
            o.create_dataset(FRAME_STEPS_KEY, data=np.asarray(rec["frame_steps"], np.int32))
        if EXPERT_CHUNKS_KEY in rec:  # a DAgger episode (write_labelled_episode)
            o.create_dataset(EXPERT_CHUNKS_KEY, data=np.asarray(rec[EXPERT_CHUNKS_KEY], np.float32), **gz)
            o.create_dataset("expert_phases", data=np.asarray(rec["phases"], dtype="S16"))
            o.create_dataset("executed_expert", data=np.asarray(rec["executed_expert"], np.uint8))
            if "sim_states" in rec:  # each query's simulator state: relabelling needs no policy run
                o.create_dataset("sim_states", data=np.asarray(rec["sim_states"], np.float64), **gz)
            g.attrs[LABELS_ATTR] = EXPERT_CHUNKS_KEY
            data.attrs["source"] = "client.libero.dagger: policy episode, scripted-expert chunk per query"
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


def write_labelled_episode(path: PathLike, task: Any, trial: int, init_index: int, actions: np.ndarray,
                           rec: dict[str, Any], seed: int, **info: Any) -> Path:
    """One DAgger episode (:mod:`client.libero.dagger`) as its own file, ``data/demo_0``: the policy's executed
    ``actions``, the queried observations and ``rec[EXPERT_CHUNKS_KEY]``. Written to a temporary name and renamed,
    so a worker killed mid-write leaves no half file; ``info`` (success, mix, ...) goes to ``expert_params``."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write_demo_group(h5py.File(tmp, "w"), task, 0, init_index, actions, rec, env_args={},
                     params={"trial": int(trial), **info}, seed=seed)
    os.replace(tmp, path)
    return path


# Per-frame obs datasets of a rendered demonstration (one row per recorded step, ``frame_steps`` names the steps).
FRAME_OBS_KEYS = (IMAGE_KEY, WRIST_KEY, "ee_pos", "ee_ori", "gripper_states", "joint_states", STATE_KEY, "ee_states")


def merge_frame_renders(sources: Sequence[PathLike], out: PathLike) -> dict[str, Any]:
    """Join renders of the same demonstrations at different frame phases into one render with all their frames.

    ``render_demos --frame-every k --frame-phase P`` records steps ``t = init_index + P (mod k)``; renders at
    phases ``0, k/n, 2k/n, ...`` hold disjoint frames of the same replayed episodes, so their union is the render
    at every ``(k/n)``-th step (phase 0) -- what ``--frame-every k/n`` would give, for the cost of the missing
    phases only (a render is ~45 min on 2 cores at k = 8). Per task file (``*_demo.hdf5`` in the first source)
    and init state: every source's episode must have the same actions and simulator states (a replay is
    deterministic from its init state, but the fixture layout is not pinned, so this is checked, not assumed);
    a mismatching or missing phase leaves that episode with the frames that agree, and is counted (an episode
    only a later render has -- its replay failed in the first -- is left out and counted). Each output
    file is written to a temporary name and renamed; files already in ``out`` are skipped (re-run to resume).
    """
    import h5py

    dirs = [Path(d) for d in sources]
    if len(dirs) < 2:
        raise ValueError("merge needs at least two renders")
    setting = []
    for d in dirs:
        files = sorted(d.glob("*_demo.hdf5"))
        if not files:
            raise FileNotFoundError(f"{d}: no *_demo.hdf5 render files")
        env_args = json.loads(dataset_attrs(files[0]).get("env_args", "{}"))
        setting.append((int(env_args.get("frame_every", 1)), int(env_args.get("frame_phase", 0))))
    every = {k for k, _ in setting}
    phases = sorted(p for _, p in setting)
    if len(every) != 1 or (k := every.pop()) % len(dirs) or phases != list(range(0, k, k // len(dirs))):
        raise ValueError(f"renders at (frame_every, frame_phase) {setting}: need one frame_every k that the "
                         f"{len(dirs)} renders split evenly, at phases 0, k/{len(dirs)}, 2k/{len(dirs)}, ...")
    merged_every = k // len(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"files": 0, "episodes": 0, "frames": 0, "skipped_files": 0, "missing_phase": 0, "mismatched": 0,
              "only_in_later_renders": 0}
    for first in sorted(dirs[0].glob("*_demo.hdf5")):
        target = out / first.name
        if target.exists():
            counts["skipped_files"] += 1
            continue
        others = [h5py.File(d / first.name, "r") if (d / first.name).exists() else None for d in dirs[1:]]
        tmp = target.with_name(target.name + ".tmp")
        try:
            with h5py.File(first, "r") as src, h5py.File(tmp, "w") as dst:
                src.copy(src["data"], dst, name="data")
                by_init = [{int(f["data"][n].attrs["init_state_index"]): f["data"][n] for n in demo_groups(f)}
                           if f is not None else {} for f in others]
                inits: set[int] = set()
                for name in demo_groups(dst):
                    g = dst["data"][name]
                    init = int(g.attrs["init_state_index"])
                    parts = [g]
                    for table in by_init:
                        o = table.get(init)
                        if o is None:
                            counts["missing_phase"] += 1
                        elif (o["actions"].shape != g["actions"].shape
                              or not np.array_equal(o["actions"][()], g["actions"][()])
                              or not np.allclose(o["states"][()], g["states"][()], atol=1e-6)):
                            counts["mismatched"] += 1
                            logger.warning("%s init %d: phases differ (actions or states); kept the first's frames",
                                           first.name, init)
                        else:
                            parts.append(o)
                    counts["frames"] += _merge_obs(g["obs"], [p["obs"] for p in parts])
                    counts["episodes"] += 1
                    inits.add(init)
                counts["only_in_later_renders"] += len(set().union(*by_init) - inits)
                env_args = json.loads(dst["data"].attrs.get("env_args", "{}"))
                env_args.update(frame_every=merged_every, frame_phase=0,
                                merged_from=[{"frame_every": k, "frame_phase": p} for _, p in setting])
                dst["data"].attrs["env_args"] = json.dumps(env_args)
            os.replace(tmp, target)
        finally:
            for f in others:
                if f is not None:
                    f.close()
        counts["files"] += 1
        logger.info("%s: merged %d renders", first.name, len(dirs))
    return counts


def _merge_obs(obs: Any, parts: Sequence[Any]) -> int:
    """Rewrites the per-frame datasets of ``obs`` as the step-sorted union of ``parts``' frames; returns the count."""
    steps = np.concatenate([np.asarray(p[FRAME_STEPS_KEY], np.int64) for p in parts])
    order = np.argsort(steps, kind="stable")
    if len(np.unique(steps)) != len(steps):
        raise ValueError(f"{obs.name}: the renders share frame steps (not disjoint phases)")
    gz = {"compression": "gzip", "compression_opts": 4}
    for key in FRAME_OBS_KEYS:
        if key not in obs:
            continue
        data = np.concatenate([np.asarray(p[key]) for p in parts])[order]
        del obs[key]
        chunks = (1, *data.shape[1:]) if key in (IMAGE_KEY, WRIST_KEY) else None
        obs.create_dataset(key, data=data, chunks=chunks, **gz)
    del obs[FRAME_STEPS_KEY]
    obs.create_dataset(FRAME_STEPS_KEY, data=steps[order].astype(np.int32))
    return len(steps)


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


# ---------------------------------------------------------------------------------------------- LeRobot datasets
# A LeRobot dataset is a directory (``meta/info.json`` marks it) passed where a pattern goes: ``load_samples``
# and ``load_demos`` read it through the functions below, so callers need not know which format they were given.
#
# Layout (codebase_version v2.0 / v2.1): ``meta/info.json`` (fps, chunks_size, total_episodes, ``features``
# with dtype/shape/names, ``data_path`` / ``video_path`` templates), ``meta/episodes.jsonl`` (episode_index,
# tasks, length), ``meta/tasks.jsonl`` (task_index, task), one parquet file per episode
# (``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``) and one mp4 per camera per episode
# (``videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4``), episode_chunk =
# episode_index // chunks_size. Layout v3.0: ``meta/episodes/chunk-*/file-*.parquet`` (one row per episode:
# ``tasks``, ``length``, ``data/chunk_index``, ``data/file_index``, ``videos/{key}/chunk_index|file_index|
# from_timestamp|to_timestamp``), ``meta/tasks.parquet`` (task string as the pandas index, ``task_index``), and
# parquet / mp4 files that each hold several episodes (``data/chunk-{chunk_index:03d}/file-{file_index:03d}
# .parquet``, ``videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4``; an episode's frames
# are those from ``from_timestamp`` on). Every frame row has ``episode_index``, ``frame_index``, ``timestamp``
# (seconds from the episode's start), ``index`` and ``task_index`` besides the feature columns; a feature of
# dtype ``video`` lives in the mp4s, one of dtype ``image`` in the parquet as a ``{bytes: PNG, path}`` struct.
#
# Image convention: ``IMAGE_CONVENTION = "rotated_180"`` means the stored frames are LIBERO's raw render turned
# by 180 degrees (``img[::-1, ::-1]``), i.e. upright, exactly what the evaluation client sends. LIBERO's LeRobot
# sets (``IPEC-COMMUNITY/libero_*_lerobot``, ``lerobot/libero_*``, converted from OpenVLA's regenerated
# ``*_no_noops`` RLDS, which applies the same flip) are expected to be upright already, so they are read as
# stored; ``rotate_180=True`` turns a set kept in the raw, upside-down orientation. Sizes are kept as stored
# (LIBERO's LeRobot sets are 256x256, the project's renders 128x128): both paths give uint8 [N, H, W, 3].
# Their 8-D ``observation.state`` (eef pos, eef axis-angle, 2 gripper joints) is the client's ``state_8d``.
LEROBOT_INFO = "meta/info.json"
LEROBOT_VERSIONS = ("v2.0", "v2.1", "v3.0")
LEROBOT_IMAGE_KEYS = ("observation.images.image", "image", "observation.images.agentview_rgb", "agentview_rgb")
LEROBOT_WRIST_KEYS = ("observation.images.wrist_image", "wrist_image", "observation.images.eye_in_hand_rgb",
                      "eye_in_hand_rgb")
LEROBOT_STATE_KEYS = ("observation.state", "state")
LEROBOT_ACTION_KEYS = ("action", "actions")
LEROBOT_MAX_BYTES = 64 << 30  # images held in memory by one load_lerobot_samples call (override: max_bytes=)
_LEROBOT_MAX_META_BYTES = 256 << 20  # info.json / episodes.jsonl / tasks.jsonl
_LEROBOT_MAX_SIDE = 8192
_LEROBOT_MAX_EPISODES = 10_000_000
_LEROBOT_TEMPLATE_FIELDS = {"episode_chunk", "episode_index", "total_episodes", "video_key", "chunk_index",
                            "file_index"}


def lerobot_root(pattern: Pattern) -> Path | None:
    """The dataset directory when ``pattern`` names a LeRobot dataset (a directory with ``meta/info.json``)."""
    if isinstance(pattern, (str, Path)) and (Path(pattern) / LEROBOT_INFO).is_file():
        return Path(pattern)
    return None


def _read_meta_text(path: Path) -> str:
    size = path.stat().st_size
    if size > _LEROBOT_MAX_META_BYTES:
        raise ValueError(f"{path}: {size} bytes, larger than the {_LEROBOT_MAX_META_BYTES} a metadata file may be")
    return path.read_text(encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(_read_meta_text(path).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    return rows


def _int_in(info: dict[str, Any], key: str, lo: int, hi: int, where: Path, default: int | None = None) -> int:
    value = info.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{where}: {key} = {value!r}; expected an integer in [{lo}, {hi}]")
    return value


def _check_template(template: Any, key: str, where: Path) -> str:
    import string

    if not isinstance(template, str) or not template:
        raise ValueError(f"{where}: {key} = {template!r}; expected a path template")
    parts = Path(template).parts
    if Path(template).is_absolute() or ".." in parts:
        raise ValueError(f"{where}: {key} = {template!r} points outside the dataset")
    for _, field, spec, conv in string.Formatter().parse(template):
        if field is not None and (field not in _LEROBOT_TEMPLATE_FIELDS or conv):
            raise ValueError(f"{where}: {key} = {template!r} uses an unknown field {field!r}")
        if spec and not re.fullmatch(r"0?\d{0,2}d?", spec):
            raise ValueError(f"{where}: {key} = {template!r} has an unsupported format {spec!r}")
    return template


def read_lerobot_info(root: PathLike) -> dict[str, Any]:
    """``meta/info.json`` of a LeRobot dataset, checked: supported version, sane counts, sizes and templates.

    Raises:
        ValueError: not JSON, an unsupported ``codebase_version`` (v2.0, v2.1 and v3.0 are read), a count or a
            feature shape out of range, a path template with unknown fields or pointing outside the dataset.
    """
    path = Path(root) / LEROBOT_INFO
    try:
        info = json.loads(_read_meta_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object")
    version = info.get("codebase_version")
    if version not in LEROBOT_VERSIONS:
        raise ValueError(f"{path}: LeRobot codebase_version {version!r} is not supported; this reader handles "
                         f"{', '.join(LEROBOT_VERSIONS)} (convert older sets with LeRobot's conversion scripts)")
    fps = info.get("fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= 10_000:
        raise ValueError(f"{path}: fps = {fps!r}; expected a positive number")
    _int_in(info, "total_episodes", 0, _LEROBOT_MAX_EPISODES, path)
    _int_in(info, "chunks_size", 1, _LEROBOT_MAX_EPISODES, path, default=1000)
    _check_template(info.get("data_path"), "data_path", path)
    features = info.get("features")
    if not isinstance(features, dict) or not features:
        raise ValueError(f"{path}: no 'features' object")
    has_video = False
    for key, ft in features.items():
        if not isinstance(ft, dict) or not isinstance(ft.get("dtype"), str):
            raise ValueError(f"{path}: feature {key!r} has no dtype")
        shape = ft.get("shape")
        if (not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 3
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= _LEROBOT_MAX_SIDE
                           for s in shape)):
            raise ValueError(f"{path}: feature {key!r} has shape {shape!r}; expected 1-3 sizes in "
                             f"[1, {_LEROBOT_MAX_SIDE}]")
        has_video = has_video or ft["dtype"] == "video"
    if has_video:
        _check_template(info.get("video_path"), "video_path", path)
    return info


def _image_shape(ft: dict[str, Any], key: str, where: Path) -> tuple[int, int]:
    """(H, W) of an image/video feature; ``shape`` is (H, W, 3), or (3, H, W) when ``names`` says so."""
    shape, names = list(ft["shape"]), ft.get("names")
    if len(shape) != 3:
        raise ValueError(f"{where}: image feature {key!r} has shape {shape}; expected (H, W, 3)")
    if isinstance(names, list) and names and str(names[0]).startswith("channel"):
        shape = shape[1:] + shape[:1]
    if shape[2] != 3:
        raise ValueError(f"{where}: image feature {key!r} has {shape[2]} channels; expected RGB (3)")
    return int(shape[0]), int(shape[1])


def _pick_key(features: dict[str, Any], key: str | None, defaults: Sequence[str], what: str, where: Path,
              required: bool, kinds: Sequence[str] | None = None) -> str | None:
    if key is not None:
        if key not in features:
            raise ValueError(f"{where}: no feature {key!r} for the {what}; features: {', '.join(features)}")
        found = key
    else:
        found = next((k for k in defaults if k in features), None)
        if found is None:
            if required:
                raise ValueError(f"{where}: none of {', '.join(defaults)} is a feature (the {what}); pass its key "
                                 f"explicitly; features: {', '.join(features)}")
            return None
    if kinds is not None and features[found]["dtype"] not in kinds:
        raise ValueError(f"{where}: feature {found!r} ({what}) has dtype {features[found]['dtype']!r}; "
                         f"expected one of {', '.join(kinds)}")
    return found


@dataclass
class _LeRobotEpisode:
    index: int
    task: str
    rows: Any  # pyarrow.Table of the episode's frames, in frame order
    files: dict[str, tuple[Path, float]]  # video key -> (mp4, timestamp of the episode's first frame in it)


def _column(table: Any, key: str, dim: int | None, where: str) -> np.ndarray:
    """A numeric feature column as float32 [N, D] (list / fixed-size-list or scalar column)."""
    import pyarrow as pa

    col = table.column(key).combine_chunks()
    n = len(col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        if col.null_count:
            raise ValueError(f"{where}: column {key!r} has missing values")
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if n == 0 or flat.size % n:
            raise ValueError(f"{where}: column {key!r} has ragged rows")
        arr = np.asarray(flat, dtype=np.float32).reshape(n, flat.size // n)
    else:
        arr = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, 1)
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{where}: column {key!r} has shape {arr.shape}, expected (T, {dim})")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: column {key!r} contains NaN or infinite values")
    return arr


def _read_parquet(path: Path, columns: Sequence[str]) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file of the LeRobot dataset is missing")
    try:
        schema = pq.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; columns: {', '.join(schema.names)}")
        return pq.read_table(path, columns=list(columns))
    except (OSError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


def _sorted_rows(table: Any) -> Any:
    if "frame_index" in table.column_names and table.num_rows:
        order = np.argsort(np.asarray(table.column("frame_index").to_numpy(zero_copy_only=False)), kind="stable")
        table = table.take(order)
    return table


def _lerobot_tasks(root: Path, version: str) -> dict[int, str]:
    if version == "v3.0":
        path = root / "meta" / "tasks.parquet"
        if not path.is_file():
            return {}
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        names = table.column_names
        text_col = "task" if "task" in names else next((c for c in names if c.startswith("__index_level")), None)
        if "task_index" not in names or text_col is None:
            raise ValueError(f"{path}: expected a task_index column and the task strings; columns: {names}")
        return {int(i): str(t) for i, t in zip(table.column("task_index").to_pylist(),
                                              table.column(text_col).to_pylist(), strict=True)}
    path = root / "meta" / "tasks.jsonl"
    if not path.is_file():
        return {}
    return {int(r["task_index"]): str(r["task"]) for r in _read_jsonl(path) if "task_index" in r and "task" in r}


def _episode_task(rows: Any, tasks: dict[int, str], listed: Sequence[str] | None, where: str) -> str:
    if "task_index" in rows.column_names and rows.num_rows and tasks:
        idx = np.unique(np.asarray(rows.column("task_index").to_numpy(zero_copy_only=False)))
        if len(idx) > 1:
            logger.warning("%s has %d tasks; its first one is the instruction", where, len(idx))
        first = int(rows.column("task_index")[0].as_py())
        if first in tasks:
            return tasks[first]
    if listed:
        return str(listed[0])
    raise ValueError(f"{where}: no task (no task_index in meta/tasks and no 'tasks' in the episode's metadata)")


def _iter_lerobot_episodes(root: Path, info: dict[str, Any], columns: Sequence[str],
                           video_keys: Sequence[str]) -> Iterator[_LeRobotEpisode]:
    """Every episode of the dataset (sorted by episode index) with the given parquet columns."""
    version = info["codebase_version"]
    tasks = _lerobot_tasks(root, version)
    want = list(dict.fromkeys(["episode_index", "frame_index", "timestamp", "task_index", *columns]))
    if version == "v3.0":
        yield from _iter_v3_episodes(root, info, want, video_keys, tasks)
        return
    chunks_size = int(info.get("chunks_size", 1000))
    ep_path = root / "meta" / "episodes.jsonl"
    if ep_path.is_file():
        listed = {int(r["episode_index"]): r.get("tasks") for r in _read_jsonl(ep_path) if "episode_index" in r}
    else:
        listed = dict.fromkeys(range(int(info["total_episodes"])))
    if len(listed) > _LEROBOT_MAX_EPISODES:
        raise ValueError(f"{ep_path}: {len(listed)} episodes, more than {_LEROBOT_MAX_EPISODES}")
    for ep in sorted(listed):
        fields = {"episode_chunk": ep // chunks_size, "episode_index": ep,
                  "total_episodes": int(info["total_episodes"])}
        path = root / info["data_path"].format(**fields)
        rows = _sorted_rows(_read_parquet(path, _present(path, want)))
        where = f"{root.name}:episode_{ep:06d}"
        files = {k: (root / info["video_path"].format(video_key=k, **fields), 0.0) for k in video_keys}
        yield _LeRobotEpisode(ep, _episode_task(rows, tasks, listed[ep], where), rows, files)


def _present(path: Path, want: Sequence[str]) -> list[str]:
    """``want`` less the optional bookkeeping columns the file does not have (the rest must be there)."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file of the LeRobot dataset is missing")
    try:
        names = set(pq.read_schema(path).names)
    except OSError as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    optional = {"episode_index", "frame_index", "timestamp", "task_index"}
    return list(dict.fromkeys(c for c in want if c in names or c not in optional))


def _iter_v3_episodes(root: Path, info: dict[str, Any], want: Sequence[str], video_keys: Sequence[str],
                      tasks: dict[int, str]) -> Iterator[_LeRobotEpisode]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    meta_files = sorted((root / "meta" / "episodes").glob("*/*.parquet"), key=lambda p: natural_key(str(p)))
    if not meta_files:
        raise FileNotFoundError(f"{root}: no meta/episodes/*/*.parquet (LeRobot v3.0 episode metadata)")
    need = ["episode_index", "data/chunk_index", "data/file_index"]
    for k in video_keys:
        need += [f"videos/{k}/chunk_index", f"videos/{k}/file_index", f"videos/{k}/from_timestamp"]
    parts = []
    for p in meta_files:
        names = pq.read_schema(p).names
        missing = [c for c in need if c not in names]
        if missing:
            raise ValueError(f"{p}: no column {', '.join(map(repr, missing))} (LeRobot v3.0 episode metadata)")
        parts.append(pq.read_table(p, columns=need + (["tasks"] if "tasks" in names else [])))
    meta = pa.concat_tables(parts, promote_options="default").to_pylist()
    if len(meta) > _LEROBOT_MAX_EPISODES:
        raise ValueError(f"{root}: {len(meta)} episodes, more than {_LEROBOT_MAX_EPISODES}")
    cache: dict[Path, Any] = {}
    for m in sorted(meta, key=lambda r: int(r["episode_index"])):
        ep = int(m["episode_index"])
        path = root / info["data_path"].format(chunk_index=int(m["data/chunk_index"]),
                                               file_index=int(m["data/file_index"]))
        if path not in cache:
            cache = {path: _read_parquet(path, _present(path, ["episode_index", *want]))}  # one file at a time
        table = cache[path]
        if "episode_index" not in table.column_names:
            raise ValueError(f"{path}: no episode_index column (LeRobot v3.0 files hold several episodes)")
        rows = _sorted_rows(table.filter(pc.equal(table.column("episode_index"), ep)))
        files = {k: (root / info["video_path"].format(video_key=k, chunk_index=int(m[f"videos/{k}/chunk_index"]),
                                                      file_index=int(m[f"videos/{k}/file_index"])),
                     float(m[f"videos/{k}/from_timestamp"])) for k in video_keys}
        yield _LeRobotEpisode(ep, _episode_task(rows, tasks, m.get("tasks"), f"{root.name}:episode_{ep:06d}"),
                              rows, files)


def _timestamps(rows: Any, fps: float) -> np.ndarray:
    if "timestamp" in rows.column_names:
        return np.asarray(rows.column("timestamp").to_numpy(zero_copy_only=False), dtype=np.float64)
    return np.asarray(rows.column("frame_index").to_numpy(zero_copy_only=False), dtype=np.float64) / fps


def _decode_video(path: Path, times: np.ndarray, fps: float, out: np.ndarray, where: str) -> None:
    """Writes the frame of ``path`` nearest each of ``times`` (seconds, ascending) into ``out`` [len(times),H,W,3];
    every time needs a frame within half a frame period, else ValueError (missing frames, a truncated file)."""
    import av

    if not path.is_file():
        raise FileNotFoundError(f"{where}: video {path} is missing")
    tol = 0.5 / fps
    best = np.full(len(times), np.inf)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            tb = float(stream.time_base)
            if times.size and times[0] > tol:
                container.seek(max(0, int((times[0] - tol) / tb)), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = frame.pts * tb
                if t > times[-1] + tol:
                    break
                j = int(np.clip(np.searchsorted(times, t), 1, len(times) - 1)) if len(times) > 1 else 0
                if len(times) > 1 and abs(times[j - 1] - t) <= abs(times[j] - t):
                    j -= 1
                d = abs(times[j] - t)
                if d <= tol and d < best[j]:
                    img = frame.to_ndarray(format="rgb24")
                    if img.shape != out.shape[1:]:
                        raise ValueError(f"{where}: {path} has {img.shape[1]}x{img.shape[0]} frames; info.json "
                                         f"says {out.shape[2]}x{out.shape[1]}")
                    out[j] = img
                    best[j] = d
    except av.error.FFmpegError as e:
        raise ValueError(f"{where}: cannot decode {path} ({e})") from None
    missing = np.flatnonzero(~np.isfinite(best))
    if missing.size:
        raise ValueError(f"{where}: {path} has no frame for {missing.size} of {len(times)} timestamps (first "
                         f"{times[missing[0]]:.3f} s): a truncated or mismatched video")


def _decode_image_column(rows: Any, key: str, out: np.ndarray, where: str) -> None:
    """Images stored in the parquet (feature dtype ``image``: ``{bytes, path}`` structs of PNG/JPEG bytes)."""
    import io

    from PIL import Image

    for i, cell in enumerate(rows.column(key).to_pylist()):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, bytes):
            raise ValueError(f"{where}: row {i} of {key!r} holds no embedded image bytes")
        with Image.open(io.BytesIO(data)) as im:
            img = np.asarray(im.convert("RGB"), dtype=np.uint8)
        if img.shape != out.shape[1:]:
            raise ValueError(f"{where}: {key!r} row {i} is {img.shape}; info.json says {out.shape[1:]}")
        out[i] = img


def load_lerobot_demos(root: PathLike, action_dim: int = 7, action_key: str | None = None) -> list[Demo]:
    """Every episode's actions of a LeRobot dataset (parquet only, no video decoded), as :func:`load_demos`."""
    root = Path(root)
    info = read_lerobot_info(root)
    where = root / LEROBOT_INFO
    akey = _pick_key(info["features"], action_key, LEROBOT_ACTION_KEYS, "actions", where, True)
    demos = []
    for ep in _iter_lerobot_episodes(root, info, [akey], []):
        name = f"episode_{ep.index:06d}"
        if ep.rows.num_rows == 0:
            logger.warning("%s:%s is empty; skipped", root, name)
            continue
        acts = _column(ep.rows, akey, action_dim, f"{root}:{name}")
        demos.append(Demo(source=str(root), name=name, actions=acts))
    if not demos:
        raise ValueError(f"no episodes found in {root}")
    logger.info("loaded %d LeRobot episodes, %d actions", len(demos), sum(d.actions.shape[0] for d in demos))
    return demos


def load_lerobot_samples(root: PathLike, chunk_len: int = 8, image_key: str | None = None,
                         wrist_key: str | None = None, state_key: str | None = None,
                         action_key: str | None = None, max_demos_per_task: int | None = None,
                         action_dim: int = 7, state_dim: int | None = 8, rotate_180: bool = False,
                         max_bytes: int = LEROBOT_MAX_BYTES) -> DemoSamples:
    """A LeRobot dataset (v2.0/v2.1/v3.0) as :class:`DemoSamples`, the same conventions as the HDF5 path.

    Keys default to LIBERO's LeRobot names (``LEROBOT_*_KEYS``, first present wins); the wrist camera and the
    state are optional unless named. ``max_demos_per_task`` keeps the first episodes of each instruction.
    Images are uint8 [N, H, W, 3] at the stored size; ``rotate_180`` turns them by 180 degrees (see the section
    comment on ``IMAGE_CONVENTION``). The image memory is checked against ``max_bytes`` before allocating.
    """
    root = Path(root)
    info = read_lerobot_info(root)
    where = root / LEROBOT_INFO
    feats = info["features"]
    cams = ("video", "image")
    ikey = _pick_key(feats, image_key, LEROBOT_IMAGE_KEYS, "camera image", where, True, cams)
    wkey = _pick_key(feats, wrist_key, LEROBOT_WRIST_KEYS, "wrist image", where, wrist_key is not None, cams)
    skey = _pick_key(feats, state_key, LEROBOT_STATE_KEYS, "state", where, state_key is not None)
    akey = _pick_key(feats, action_key, LEROBOT_ACTION_KEYS, "actions", where, True)
    cam_keys = [k for k in (ikey, wkey) if k is not None]
    shapes = {k: _image_shape(feats[k], k, where) for k in cam_keys}
    videos = [k for k in cam_keys if feats[k]["dtype"] == "video"]
    columns = [akey] + ([skey] if skey else []) + [k for k in cam_keys if feats[k]["dtype"] == "image"]
    fps = float(info["fps"])

    # Pass 1: the parquet rows (actions, states, timestamps; PNG bytes for image features), no video decoded.
    episodes: list[_LeRobotEpisode] = []
    per_task: dict[str, int] = {}
    for ep in _iter_lerobot_episodes(root, info, columns, videos):
        if ep.rows.num_rows == 0:
            logger.warning("%s:episode_%06d is empty; skipped", root, ep.index)
            continue
        per_task[ep.task] = per_task.get(ep.task, 0) + 1
        if max_demos_per_task is None or per_task[ep.task] <= max_demos_per_task:
            episodes.append(ep)
    if not episodes:
        raise ValueError(f"no episodes found in {root}")
    n = sum(ep.rows.num_rows for ep in episodes)
    need = n * sum(h * w * 3 for h, w in shapes.values())
    if need > max_bytes:
        raise ValueError(f"{root}: {n} frames of {', '.join(cam_keys)} need {need / 2**30:.1f} GiB in memory, more "
                         f"than max_bytes = {max_bytes / 2**30:.1f} GiB; load fewer episodes (max_demos_per_task)")

    # Pass 2: decode into preallocated arrays.
    images = {k: np.empty((n, *shapes[k], 3), dtype=np.uint8) for k in cam_keys}
    chunks, states, demo_of = [], [], []
    instructions, sources = [], []
    offset = 0
    for d, ep in enumerate(episodes):
        name = f"episode_{ep.index:06d}"
        at = f"{root.name}:{name}"
        t = ep.rows.num_rows
        actions = _column(ep.rows, akey, action_dim, at)
        chunks.append(chunk_actions(actions, chunk_len))
        if skey:
            states.append(_column(ep.rows, skey, state_dim, at))
        for k in cam_keys:
            out = images[k][offset:offset + t]
            if k in ep.files:
                path, start = ep.files[k]
                _decode_video(path, start + _timestamps(ep.rows, fps), fps, out, f"{at}:{k}")
            else:
                _decode_image_column(ep.rows, k, out, f"{at}:{k}")
            if rotate_180:
                out[:] = out[:, ::-1, ::-1].copy()
        demo_of.append(np.full(t, d, dtype=np.int64))
        instructions.append(ep.task)
        sources.append(at)
        offset += t
    samples = DemoSamples(
        images=images[ikey],
        wrist_images=images[wkey] if wkey else None,
        states=np.concatenate(states) if skey else None,
        chunks=np.concatenate(chunks).astype(np.float32),
        instructions=instructions,
        demo_of=np.concatenate(demo_of),
        sources=sources,
    )
    logger.info("loaded %d samples from %d LeRobot episodes in %s (%s, %d tasks)", len(samples), len(episodes),
                root, info["codebase_version"], len(set(instructions)))
    return samples
