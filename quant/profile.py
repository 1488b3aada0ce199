"""Optional per-phase timing of fake-quant forwards (``GR00T_DUQUANT_PROFILE=1``), logged as a table at exit.

Why per phase: fake quantisation adds work (transforms, rounding) that a real INT kernel would not have; the table
says where a slow quantised server spends its time (input transform vs activation rounding vs matmul vs restore).
With ``PROFILE_SYNC=1`` CUDA is synchronised around each phase so GPU times are real (and the run is slower).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

LOG = logging.getLogger("quant")

PHASES = ("transform_in", "act_quant", "weight", "matmul", "restore", "total")


class Profiler:
    """Thread-safe accumulator ``(layer, phase) -> (calls, seconds)``; one process-wide instance."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        self._atexit = False
        self.sync = False

    def register(self, sync: bool) -> None:
        """Arm the at-exit report (idempotent)."""
        self.sync = self.sync or sync
        if not self._atexit:
            atexit.register(self.log_report)
            self._atexit = True

    @contextmanager
    def section(self, layer: str, phase: str, device: torch.device | None = None) -> Iterator[None]:
        """Time one phase of one layer's forward."""
        sync = self.sync and device is not None and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            with self._lock:
                s = self._stats[(layer, phase)]
                s[0] += 1
                s[1] += dt

    def reset(self) -> None:
        with self._lock:
            self._stats.clear()

    def totals(self) -> dict[str, tuple[int, float]]:
        """Per phase, summed over layers: ``phase -> (calls, seconds)``."""
        out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        with self._lock:
            for (_, phase), (n, t) in self._stats.items():
                out[phase][0] += n
                out[phase][1] += t
        return {k: (int(v[0]), v[1]) for k, v in out.items()}

    def report(self, top: int = 10) -> str:
        """A text table: phase totals, then the slowest layers by total time."""
        tot = self.totals()
        if not tot:
            return "[GR00T-DUQUANT][PROFILE] no quantised forwards recorded"
        lines = ["[GR00T-DUQUANT][PROFILE] phase          calls    total_ms   mean_us"]
        for phase in PHASES:
            if phase in tot:
                n, t = tot[phase]
                lines.append(f"[GR00T-DUQUANT][PROFILE] {phase:<13} {n:>7} {t * 1e3:>11.2f} {t / max(n, 1) * 1e6:>9.1f}")
        with self._lock:
            per_layer = sorted(((t, name) for (name, ph), (_, t) in self._stats.items() if ph == "total"), reverse=True)
        for t, name in per_layer[:top]:
            lines.append(f"[GR00T-DUQUANT][PROFILE] slowest {name}: {t * 1e3:.2f} ms")
        return "\n".join(lines)

    def log_report(self) -> None:
        LOG.info("%s", self.report())


PROFILER = Profiler()
