"""Counters and latency histograms the server exposes through the ``stats`` endpoint."""

from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Upper bucket bounds in milliseconds (Prometheus-style cumulative histogram).
LATENCY_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))


@dataclass
class LatencyHistogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_MS))
    total_ms: float = 0.0
    n: int = 0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.total_ms += ms
        self.n += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile (coarse, but constant memory)."""
        if self.n == 0:
            return None
        target = q * self.n
        running = 0
        for bound, count in zip(LATENCY_BUCKETS_MS, self.counts, strict=True):
            running += count
            if running >= target:
                return bound
        return LATENCY_BUCKETS_MS[-1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.n,
            "mean_ms": self.total_ms / self.n if self.n else None,
            "p50_le_ms": self.quantile(0.5),
            "p99_le_ms": self.quantile(0.99),
            "buckets_le_ms": [b if b != float("inf") else "inf" for b in LATENCY_BUCKETS_MS],
            "bucket_counts": list(self.counts),
        }


@dataclass
class ServerStats:
    started: float = field(default_factory=time.time)
    requests: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    batch_sizes: Counter = field(default_factory=Counter)
    infer_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    dropped_frames: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "uptime_s": time.time() - self.started,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "infer_latency": self.infer_latency.as_dict(),
            "dropped_frames": self.dropped_frames,
        }
