"""Evaluation results: one JSON file, rewritten atomically after every episode.

Why one file rewritten whole (not JSON lines): a reader (a dashboard, ``--resume``) always sees a
complete, valid document with up-to-date aggregates; ``os.replace`` makes the swap atomic, so a run
killed mid-write never leaves a truncated file. Episodes are keyed by (task_id, trial) so ``--resume``
can skip what is already there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def wilson_ci(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Chosen over the normal approximation because evaluation counts are small (often 10-50 per task)
    and rates sit near 0 or 1, where the normal interval collapses or leaves [0, 1].
    Returns (0, 1) for n == 0.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} outside [0, n={n}]")
    p = successes / n
    z2 = z * z
    den = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / den
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value for a paired comparison of two policies on the same episodes.

    ``only_a``/``only_b``: episodes that only policy A / only policy B solved (the discordant pairs).
    Why: variants of a success-rate matrix run the very same init states, so the paired test uses far
    more of the data than comparing two independent rates' intervals (which overlap at these sizes).
    """
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts must be >= 0")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


#: Config keys a resumed run must share with the recorded one (mixing them would mix two experiments), and their flag.
RESUME_MUST_MATCH = {"preprocess": "--preprocess", "seed": "--seed", "resolution": "--resolution",
                     "fixtures": "--fixtures", "replan": "--replan", "ensemble": "--ensemble",
                     "gripper_confirm": "--gripper-confirm", "max_steps": "--max-steps",
                     "num_wait_steps": "--wait-steps"}


#: The server metadata entries that say which model produced an episode, recorded as the config's ``server``:
#: weights (``checkpoint_digest``, a content fingerprint), policy, quantisation and the decoding settings.
SERVER_IDENTITY_KEYS = ("policy", "model_id", "checkpoint_digest", "quantization", "action_horizon", "replan_steps",
                        "denoising_steps", "initial_noise", "embodiment_tag", "rsd_config", "unnorm_key", "center_crop")
#: Recorded but not compared on resume: the same weights may be served from another path.
SERVER_IDENTITY_UNCOMPARED = ("model_id",)


def server_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SERVER_IDENTITY_KEYS` entries of a server's ``metadata`` reply (those it has)."""
    return {k: meta[k] for k in SERVER_IDENTITY_KEYS if k in meta}


def server_mismatch(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Identity entries that differ between a recorded server and this one (only entries both sides have)."""
    return [k for k in SERVER_IDENTITY_KEYS if k not in SERVER_IDENTITY_UNCOMPARED
            and k in before and k in now and before[k] != now[k]]


def common_identity(recorded: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The one model identity that ``(where, identity)`` records of runs to be joined share (empty ones are not
    recorded and skipped); ``ValueError`` naming the two sources and the entries that differ otherwise."""
    known = [(where, ident) for where, ident in recorded if ident]
    for where, ident in known[1:]:
        if differ := server_mismatch(known[0][1], ident):
            raise ValueError(f"{known[0][0]} and {where} were run against different models ({', '.join(differ)} "
                             "differ)")
    return known[0][1] if known else {}


class ResultsFileError(ValueError):
    """A results file that cannot be continued by this run (another suite, or other episode settings)."""


@dataclass
class EpisodeResult:
    """One evaluation episode. ``errored`` episodes (server down, timeout, error reply, simulator
    exception) are infrastructure failures and are excluded from success rates."""

    task_id: int
    task_name: str
    instruction: str
    trial: int
    init_state_index: int
    success: bool
    errored: bool
    steps: int
    wall_time_s: float
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    num_queries: int = 0
    error: str | None = None
    video: str | None = None
    server_timing_ms_p50: dict[str, float] = field(default_factory=dict)

    def key(self) -> tuple[int, int]:
        return (self.task_id, self.trial)


def _rate(eps: list[dict[str, Any]]) -> dict[str, Any]:
    """Success statistics over the non-errored episodes of ``eps``."""
    valid = [e for e in eps if not e["errored"]]
    n = len(valid)
    k = sum(1 for e in valid if e["success"])
    lo, hi = wilson_ci(k, n)
    return {
        "episodes": len(eps),
        "valid_episodes": n,
        "errored": len(eps) - n,
        "successes": k,
        "success_rate": (k / n) if n else None,
        "ci95_low": lo,
        "ci95_high": hi,
    }


class ResultsFile:
    """The results document for one suite run; ``add`` appends an episode and rewrites the file."""

    def __init__(self, path: str | os.PathLike[str], suite: str, config: dict[str, Any],
                 versions: dict[str, str], resume: bool = False) -> None:
        self.path = Path(path)
        self.suite = suite
        self.config = config
        self.versions = versions
        self.episodes: list[dict[str, Any]] = []
        # Parallel runs (--workers, --ray): an episode whose worker was lost and that ran again, one entry per retry.
        self.retries: list[dict[str, Any]] = []
        self.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.path.exists():
            if not resume:
                raise FileExistsError(
                    f"results file {self.path} exists; pass --resume to continue it or choose another --results path"
                )
            doc = json.loads(self.path.read_text())
            if doc.get("suite") != suite:
                raise ResultsFileError(f"results file {self.path} is for suite {doc.get('suite')!r}, not {suite!r}")
            before = doc.get("config") or {}
            for key, flag in RESUME_MUST_MATCH.items():  # settings that change what an episode is
                if key in before and key in config and before[key] != config[key]:
                    raise ResultsFileError(
                        f"results file {self.path} was recorded with {key} {before[key]!r}, this run would use "
                        f"{config[key]!r} ({flag}): resume with the same setting or choose another --results path")
            self._check_server(before.get("server") or {}, config.get("server") or {})
            self.episodes = list(doc.get("episodes", []))
            self.retries = list(doc.get("retries", []))
            self.created = doc.get("created", self.created)
            log.info("resuming %s: %d episodes already recorded", self.path, len(self.episodes))

    def _check_server(self, before: dict[str, Any], now: dict[str, Any]) -> None:
        """Refuse to continue episodes of another model (a checkpoint replaced in place keeps its path)."""
        if not now:
            return
        if "checkpoint_digest" not in before:  # None is recorded too: a policy without a checkpoint (debug)
            log.warning("resuming %s: it does not record which checkpoint produced its episodes (written before "
                        "results recorded the server's checkpoint digest), so this run cannot check that the "
                        "server still serves the same weights", self.path)
            return
        differ = server_mismatch(before, now)
        if differ:
            what = "; ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in differ)
            raise ResultsFileError(
                f"results file {self.path} was recorded against another model than the server now serves "
                f"({what}; recorded model_id {before.get('model_id')!r}): resume against the same checkpoint and "
                "settings, or choose another --results path")

    def done_keys(self) -> set[tuple[int, int]]:
        """(task_id, trial) of episodes already recorded (errored ones are retried on resume)."""
        return {(e["task_id"], e["trial"]) for e in self.episodes if not e["errored"]}

    def add(self, ep: EpisodeResult) -> None:
        d = asdict(ep)
        self.episodes = [e for e in self.episodes if (e["task_id"], e["trial"]) != ep.key()]
        self.episodes.append(d)
        self.write()

    def record_retry(self, task_id: int, trial: int, reason: str, attempt: int = 2) -> None:
        """Note that episode (task_id, trial) is run again (``attempt``) because ``reason``; rewrites the file."""
        self.retries.append({"task_id": task_id, "trial": trial, "attempt": attempt, "reason": reason,
                             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.write()

    def per_task(self) -> dict[int, dict[str, Any]]:
        tasks: dict[int, list[dict[str, Any]]] = {}
        for e in self.episodes:
            tasks.setdefault(e["task_id"], []).append(e)
        out = {}
        for tid in sorted(tasks):
            eps = tasks[tid]
            out[tid] = {"task_name": eps[0]["task_name"], "instruction": eps[0]["instruction"], **_rate(eps)}
        return out

    def document(self) -> dict[str, Any]:
        doc = {
            "schema_version": SCHEMA_VERSION,
            "suite": self.suite,
            "created": self.created,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": self.config,
            "versions": self.versions,
            "summary": _rate(self.episodes),
            "per_task": {str(k): v for k, v in self.per_task().items()},
            "episodes": sorted(self.episodes, key=lambda e: (e["task_id"], e["trial"])),
        }
        if self.retries:
            doc["retries"] = self.retries
        return doc

    def write(self) -> None:
        atomic_write_json(self.path, self.document())

    def summary_table(self) -> str:
        """Plain-text table: one row per task plus the suite total."""
        rows = [("task", "succ/valid", "rate", "95% CI", "err", "name")]
        for tid, t in self.per_task().items():
            rows.append(_row(str(tid), t, t["task_name"]))
        rows.append(_row("all", _rate(self.episodes), self.suite))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
            if i == 0 or i == len(rows) - 2:
                lines.append("-" * (sum(widths) + 2 * 5 + 20))
        return "\n".join(lines)


def _row(label: str, t: dict[str, Any], name: str) -> tuple[str, ...]:
    rate = "-" if t["success_rate"] is None else f"{100 * t['success_rate']:.1f}%"
    ci = f"[{100 * t['ci95_low']:.1f}, {100 * t['ci95_high']:.1f}]"
    return (label, f"{t['successes']}/{t['valid_episodes']}", rate, ci, str(t["errored"]), name)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then ``os.replace`` over ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
