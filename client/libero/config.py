"""``EvalConfig``: every knob of a LIBERO evaluation run, declared once as a field with its flag.

Each field says its flag (:mod:`client.settings`), its default and its check, so ``--help``, parsing and
validation come from one declaration; a bad value fails at start-up, before a simulator is created, with a message
naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.libero.protocol import (
    DEFAULT_SEED,
    FIXTURE_CHOICES,
    FIXTURES_PINNED,
    GR00T_IMAGE_SIZE,
    GRIPPER_CONVENTIONS,
    NUM_WAIT_STEPS,
    PREPROCESS_AUTO,
    PREPROCESS_CHOICES,
    PREPROCESS_DESCRIPTIONS,
    PREPROCESS_GR00T,
    SUITES,
    max_steps_for,
)
from client.settings import (
    SettingError,
    above,
    add_arguments,
    at_least,
    check_fields,
    from_sources,
    in_range,
    setting,
)

DEFAULT_OUT_ROOT = Path("artifacts") / "libero_eval"


class EvalConfigError(SettingError):
    """An invalid evaluation setting (a ``ValueError``); the message names the flag."""


def _task_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise ValueError("expected comma-separated integers like 0,3") from None


def _task_ids(value: list[int]) -> str | None:
    ok = bool(value) and all(isinstance(t, int) and t >= 0 for t in value)
    return None if ok else f"must be a comma-separated list of task ids >= 0, got {value}"


@dataclass
class EvalConfig:
    """One evaluation run of one suite against one policy server."""

    suite: str = setting(dataclasses.MISSING, "suite", metavar="SUITE", choices=SUITES, help="benchmark suite")
    host: str = setting("127.0.0.1", "--host", help="policy server address")
    port: int = setting(5555, "--port", check=in_range(1, 65535), help="policy server port")
    timeout_s: float = setting(30.0, "--timeout", check=above(0), help="per-request timeout, seconds")
    trials: int = setting(50, "--trials", check=at_least(1), help="trials (init states) per task")
    first_trial: int = setting(0, "--first-trial", check=at_least(0),
                               help="run trials FIRST..FIRST+TRIALS-1 (trial k starts from init state k mod the "
                                    "task's count), e.g. --first-trial 10 keeps clear of an evaluation's trials 0-9")
    tasks: list[int] | None = setting(None, "--tasks", parse=_task_list, check=_task_ids,
                                      help="comma-separated task ids, e.g. 0,3 (default: every task of the suite)")
    seed: int = setting(DEFAULT_SEED, "--seed", help="seed of the episode initialisation")
    replan: int | None = setting(None, "--replan", check=at_least(1),
                                 help="actions executed from each returned chunk before querying again (default: "
                                      "the server's replan_steps, else all)")
    ensemble: float | None = setting(None, "--ensemble", metavar="M", check=in_range(-10.0, 10.0),
                                     help="temporal ensembling (ACT): execute the weighted mean of every overlapping "
                                          "chunk's prediction for a step, weight exp(-M*k) with k=0 the oldest "
                                          "(0: equal weights); needs --replan (or the server's replan_steps) "
                                          "shorter than the chunk; default off: the newest chunk only")
    gripper_confirm: bool = setting(False, "--gripper-confirm",
                                    help="before executing a gripper flip (close to grasp, open to release) that a "
                                         "chunk plans after its first action, stop at the flip and ask the policy "
                                         "again from the state reached; the new chunk is executed as returned (one "
                                         "confirmation per flip). Re-observes at contact without re-querying the "
                                         "whole chunk (see docs/evaluation.md)")
    max_steps: int | None = setting(None, "--max-steps", check=at_least(1),
                                    help="override the suite's step limit (tests, smoke runs)")
    num_wait_steps: int = setting(NUM_WAIT_STEPS, "--wait-steps", check=at_least(0),
                                  help="no-op steps while objects settle before the first query")
    resolution: int = setting(256, "--resolution", check=in_range(16, 1024), help="camera resolution, pixels")
    video_dir: str | None = setting(None, "--video-dir", help="where mp4s go (default: next to the results file)")
    save_video: bool = setting(True, off=("--no-video",), help="do not write episode videos")
    trajectory_dir: str | None = setting(None, "--trajectory-dir", metavar="DIR",
                                         help="also write each episode's trajectory to DIR (one .npz named like "
                                              "its video: executed actions, end-effector position and gripper "
                                              "joints per step, query steps, returned chunks; "
                                              "client.libero.trajectory.load_trajectory reads it)")
    results: str | None = setting(None, "--results",
                                  help="results JSON (default artifacts/libero_eval/SUITE/results.json)")
    resume: bool = setting(False, "--resume", help="skip episodes already in the results file")
    stop_on_error: bool = setting(False, "--stop-on-error", help="stop at the first errored episode (exit 3)")
    headless: bool = setting(False, "--headless",
                             help="render off-screen only, never open a window (required when no DISPLAY is set)")
    gripper_convention: str | None = setting(None, "--gripper-convention", choices=GRIPPER_CONVENTIONS,
                                             help="override the server's declared gripper convention "
                                                  "(default: from its metadata)")
    fixtures: str = setting(FIXTURES_PINNED, "--fixtures", choices=FIXTURE_CHOICES,
                            help="furniture placement per episode: 'pinned' (default) restores the env's first "
                                 "layout at every reset, so an episode depends only on (task, init state, seed, "
                                 "policy); 'per-reset' keeps LIBERO's drift of ~1-2 cm from reset to reset "
                                 "(upstream harnesses)")
    preprocess: str = setting(PREPROCESS_AUTO, "--preprocess", choices=(PREPROCESS_AUTO, *PREPROCESS_CHOICES),
                              help="image path before sending: 'auto' (default) = the one the server advertises "
                                   "in its metadata (a released OpenVLA/OFT checkpoint: openvla, GR00T N1.5: "
                                   "gr00t, the project's own models: none; set on the server with "
                                   "--policy-option libero_preprocess=...); 'none' = rotated render at --resolution (the "
                                   "project's own models); 'openvla' = upstream OpenVLA's LIBERO harness (JPEG "
                                   "round trip, lanczos3 resize to 224x224); its 0.9-area centre crop for "
                                   "checkpoints trained with image augmentation stays the server policy's "
                                   "center_crop option; 'gr00t' = Isaac-GR00T's N1.5 LIBERO harness (the "
                                   "rotated 256x256 render unchanged; needs --resolution 256)")
    server_wait_s: float = setting(600.0, "--server-wait", check=at_least(0.0),
                                   help="at start, wait up to this many seconds for a server that is still loading "
                                        "its checkpoint to report ready (a 7B takes minutes); 0: do not wait")
    progress: bool = setting(True, off=("--no-progress",), help="no progress bar")
    render_all_steps: bool = setting(False, "--render-all-steps",
                                     help="render every camera at every step as robosuite does by default; by "
                                          "default only the frames that are sent (and the video's camera) are "
                                          "rendered: identical images, ~5-10x faster episodes on a CPU renderer")
    workers: int = setting(1, "--workers", check=at_least(1),
                           help="simulator processes on this machine draining the (task, trial) episodes from one "
                                "queue, each with its own env and server connection; one results file written by "
                                "the parent; a worker that dies has its episode retried once (1: one process)")
    ray: str | None = setting(None, "--ray", metavar="ADDRESS",
                              help="run the episodes as Ray tasks: 'auto' (the running cluster), 'local' (start a "
                                   "local Ray instance) or a cluster ADDRESS; needs the 'ray' extra "
                                   "(pip install '.[ray]')")
    expert_labels: str | None = setting(None, "--expert-labels", metavar="DIR",
                                        help="DAgger data: at every query also record the scripted expert's "
                                             "16-step chunk from that state (computed in a physics-only copy of the "
                                             "env; the episode itself is unchanged), one HDF5 per episode in DIR, "
                                             "readable by the trainers' --demos (pick-and-place tasks only)")
    expert_mix: float = setting(0.0, "--expert-mix", check=in_range(0.0, 1.0),
                                help="with --expert-labels: the fraction of queries on which the expert's chunk is "
                                     "executed instead of the policy's (DAgger's beta; 0 = the policy always acts)")
    extra: dict[str, Any] = field(default_factory=dict)
    #: The served model's identity, taken from the server's metadata at start (``evaluate.settle_from_server``);
    #: empty when the server did not answer. Recorded in the results file; ``--resume`` compares it.
    server: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, EvalConfigError)

    # -- derived ------------------------------------------------------------------------------
    @property
    def effective_max_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else max_steps_for(self.suite)

    @property
    def results_path(self) -> Path:
        return Path(self.results) if self.results else DEFAULT_OUT_ROOT / self.suite / "results.json"

    @property
    def videos_path(self) -> Path:
        return Path(self.video_dir) if self.video_dir else self.results_path.parent / "videos"

    def validate(self) -> None:
        """Check every field (they may have been changed since construction) and that a window can be opened
        when one is asked for; raises :class:`EvalConfigError` (a ``ValueError``) naming the flag."""
        check_fields(self, EvalConfigError)
        if self.preprocess == PREPROCESS_GR00T and self.resolution != GR00T_IMAGE_SIZE:
            raise EvalConfigError(
                f"--preprocess {PREPROCESS_GR00T} sends the render unchanged, and GR00T's LIBERO data config "
                f"expects {GR00T_IMAGE_SIZE}x{GR00T_IMAGE_SIZE} frames: use --resolution {GR00T_IMAGE_SIZE} "
                f"(got {self.resolution})"
            )
        if self.expert_mix > 0 and self.expert_labels is None:
            raise EvalConfigError(f"--expert-mix {self.expert_mix:g} needs --expert-labels DIR (the expert's chunks "
                                  "are computed only when they are recorded)")
        if self.gripper_confirm and self.ensemble is not None:
            raise EvalConfigError("--gripper-confirm and --ensemble are exclusive: an ensemble mixes several chunks' "
                                  "gripper commands, so no one chunk's flip can be confirmed")
        if self.ray is not None and self.workers > 1:
            raise EvalConfigError("--workers and --ray are exclusive: Ray schedules the episodes on its own workers "
                                  f"(got --workers {self.workers} --ray {self.ray})")
        if self.ray is not None and importlib.util.find_spec("ray") is None:
            raise EvalConfigError(f"--ray {self.ray} needs the ray package, which is not installed in this "
                                  "environment: pip install '.[ray]' (scripts/setup.sh libero installs it)")
        if not self.headless and not os.environ.get("DISPLAY"):
            raise EvalConfigError(
                "no DISPLAY is set, so a window cannot be opened: pass --headless to render off-screen "
                "(MUJOCO_GL=egl, falling back to osmesa)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["effective_max_steps"] = self.effective_max_steps
        d["preprocessing"] = PREPROCESS_DESCRIPTIONS.get(self.preprocess, "the server's advertised preset")
        d["results_path"] = str(self.results_path)
        d["videos_path"] = str(self.videos_path) if self.save_video else None
        return d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m client.libero.evaluate",
        description="Headless LIBERO evaluation of a policy served by the VLA policy server.",
    )
    add_arguments(p, EvalConfig, switches=True)
    return p


def config_from_args(argv: list[str] | None = None) -> EvalConfig:
    """Parse the command line into a validated :class:`EvalConfig` (raises :class:`EvalConfigError`)."""
    cfg = from_sources(EvalConfig, build_parser().parse_args(argv), {}, error=EvalConfigError)
    cfg.validate()
    return cfg
