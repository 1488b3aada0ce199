"""Observation/action-chunk samples from LIBERO-layout demonstrations, for training the VLA policies.

Each demonstration step t gives one sample: the agent-view image at t (as the evaluation client sends it:
rotated 180 degrees), the wrist image and 8-D state when present, the task instruction, and the action chunk
``actions[t : t + H]`` (padded at the end by repeating the last action, as :mod:`rsd.action_data` does).
Images stay uint8 in memory; splits are by whole demonstration so neighbouring steps never straddle them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from rsd.action_data import chunk_actions, resolve_paths

logger = logging.getLogger(__name__)


@dataclass
class VLASamples:
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

    def subset(self, index: np.ndarray) -> VLASamples:
        return VLASamples(
            images=self.images[index],
            wrist_images=None if self.wrist_images is None else self.wrist_images[index],
            states=None if self.states is None else self.states[index],
            chunks=self.chunks[index],
            instructions=self.instructions,
            demo_of=self.demo_of[index],
            sources=self.sources,
        )

    def split_by_demo(self, heldout_frac: float, seed: int) -> tuple[VLASamples, VLASamples]:
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


def _instruction_of(f: h5py.File, demo: h5py.Group) -> str:
    for holder in (demo, f["data"], f):
        value = holder.attrs.get("language_instruction")
        if value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    raise ValueError(f"{f.filename}: no 'language_instruction' attribute on the demo, data group or file")


def load_vla_samples(data: str | Path | list[str | Path], chunk_len: int = 8, image_key: str = "agentview_rgb",
                     wrist_key: str = "eye_in_hand_rgb", state_key: str = "state_8d",
                     max_demos_per_file: int | None = None) -> VLASamples:
    """Read every ``data/demo_*`` of the HDF5 files matched by ``data`` into memory."""
    paths = resolve_paths(data)
    images, wrists, states, chunks, demo_of = [], [], [], [], []
    instructions: list[str] = []
    sources: list[str] = []
    have_wrist = have_state = True
    for path in paths:
        with h5py.File(path, "r") as f:
            names = sorted((k for k in f["data"] if k.startswith("demo_")), key=lambda s: int(s.split("_")[1]))
            for name in names[:max_demos_per_file]:
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
                instructions.append(_instruction_of(f, g))
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
        raise ValueError(f"no demonstrations found in {data}")
    samples = VLASamples(
        images=np.concatenate(images),
        wrist_images=np.concatenate(wrists) if have_wrist else None,
        states=np.concatenate(states) if have_state else None,
        chunks=np.concatenate(chunks).astype(np.float32),
        instructions=instructions,
        demo_of=np.concatenate(demo_of),
        sources=sources,
    )
    logger.info("loaded %d samples from %d demonstrations in %d files (%d tasks)", len(samples),
                len(instructions), len(paths), len(set(instructions)))
    return samples


def random_crop(images: np.ndarray, area: float, rng: np.random.Generator) -> np.ndarray:
    """Random square crops covering ``area`` of each image (OpenVLA's training augmentation)."""
    n, h, w, _ = images.shape
    side_h, side_w = int(round(h * area**0.5)), int(round(w * area**0.5))
    out = np.empty((n, side_h, side_w, 3), dtype=images.dtype)
    ys = rng.integers(0, h - side_h + 1, size=n)
    xs = rng.integers(0, w - side_w + 1, size=n)
    for i in range(n):
        out[i] = images[i, ys[i]:ys[i] + side_h, xs[i]:xs[i] + side_w]
    return out
