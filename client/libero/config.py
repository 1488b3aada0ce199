"""``EvalConfig``: every knob of a LIBERO evaluation run, filled from CLI flags in one place.

Validated at start-up so a bad value fails before a simulator is created, with a message naming the flag.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.libero.protocol import DEFAULT_SEED, GRIPPER_CONVENTIONS, NUM_WAIT_STEPS, SUITES, max_steps_for

DEFAULT_OUT_ROOT = Path("artifacts") / "libero_eval"


@dataclass
class EvalConfig:
    """One evaluation run of one suite against one policy server."""

    suite: str
    host: str = "127.0.0.1"
    port: int = 5555
    timeout_s: float = 30.0
    trials: int = 50
    tasks: list[int] | None = None  # None = every task of the suite
    seed: int = DEFAULT_SEED
    replan: int | None = None  # None = metadata's "replan_steps", else the whole returned chunk
    max_steps: int | None = None  # None = the suite's standard limit
    num_wait_steps: int = NUM_WAIT_STEPS
    resolution: int = 256
    video_dir: str | None = None
    save_video: bool = True
    results: str | None = None
    resume: bool = False
    stop_on_error: bool = False
    headless: bool = True
    gripper_convention: str | None = None  # None = from the server's metadata (default "libero")
    progress: bool = True
    render_all_steps: bool = False  # True = robosuite's default: every camera at every step (slower, same images)
    extra: dict[str, Any] = field(default_factory=dict)

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
        """Raise ``ValueError`` naming the offending flag."""
        if self.suite not in SUITES:
            raise ValueError(f"SUITE must be one of {', '.join(SUITES)}, got {self.suite!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {self.port}")
        if self.timeout_s <= 0:
            raise ValueError(f"--timeout must be positive, got {self.timeout_s}")
        if self.trials < 1:
            raise ValueError(f"--trials must be >= 1, got {self.trials}")
        if self.tasks is not None and (not self.tasks or any(t < 0 for t in self.tasks)):
            raise ValueError(f"--tasks must be a comma-separated list of task ids >= 0, got {self.tasks}")
        if self.replan is not None and self.replan < 1:
            raise ValueError(f"--replan must be >= 1, got {self.replan}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.num_wait_steps < 0:
            raise ValueError(f"--wait-steps must be >= 0, got {self.num_wait_steps}")
        if not 16 <= self.resolution <= 1024:
            raise ValueError(f"--resolution must be in 16..1024, got {self.resolution}")
        if self.gripper_convention is not None and self.gripper_convention not in GRIPPER_CONVENTIONS:
            raise ValueError(f"--gripper-convention must be one of {GRIPPER_CONVENTIONS}")
        if not self.headless and not os.environ.get("DISPLAY"):
            raise ValueError(
                "no DISPLAY is set, so a window cannot be opened: pass --headless to render off-screen "
                "(MUJOCO_GL=egl, falling back to osmesa)"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["effective_max_steps"] = self.effective_max_steps
        d["results_path"] = str(self.results_path)
        d["videos_path"] = str(self.videos_path) if self.save_video else None
        return d


def _task_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tasks expects comma-separated integers like 0,3, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m client.libero.evaluate",
        description="Headless LIBERO evaluation of a policy served by the VLA policy server.",
    )
    p.add_argument("suite", metavar="SUITE", help=f"one of {', '.join(SUITES)}")
    p.add_argument("--headless", action="store_true",
                   help="render off-screen only, never open a window (required when no DISPLAY is set)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--timeout", dest="timeout_s", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--trials", type=int, default=50, help="trials (init states) per task, standard 50")
    p.add_argument("--tasks", type=_task_list, default=None, help="comma-separated task ids, e.g. 0,3")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--replan", type=int, default=None,
                   help="actions executed from each returned chunk before querying again (default: all)")
    p.add_argument("--max-steps", type=int, default=None, help="override the suite's step limit (tests, smoke runs)")
    p.add_argument("--wait-steps", dest="num_wait_steps", type=int, default=NUM_WAIT_STEPS)
    p.add_argument("--resolution", type=int, default=256, help="camera resolution (standard 256)")
    p.add_argument("--video-dir", default=None, help="where mp4s go (default: next to the results file)")
    p.add_argument("--no-video", dest="save_video", action="store_false")
    p.add_argument("--results", default=None, help="results JSON (default artifacts/libero_eval/SUITE/results.json)")
    p.add_argument("--resume", action="store_true", help="skip episodes already in the results file")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first errored episode (exit 3)")
    p.add_argument("--gripper-convention", choices=GRIPPER_CONVENTIONS, default=None,
                   help="override the server's declared gripper convention")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--render-all-steps", action="store_true",
                   help="render every camera at every step as robosuite does by default; by default only the "
                        "frames that are sent (and the video's camera) are rendered: identical images, ~5-10x "
                        "faster episodes on a CPU renderer")
    return p


def config_from_args(argv: list[str] | None = None) -> EvalConfig:
    ns = build_parser().parse_args(argv)
    cfg = EvalConfig(**vars(ns))
    cfg.validate()
    return cfg
