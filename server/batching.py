"""Dynamic batching: stack concurrent clients' ``infer`` requests into one forward pass.

Policy: take everything already queued (up to ``max_batch``) the moment the worker is free. A lone
client therefore never waits. Only when more clients have been active recently than the batch
holds does the batcher linger up to ``max_wait_ms`` for their requests. While a batch runs on the
inference thread, new requests pile up and form the next batch, so throughput grows with load.

The batcher is driven by callbacks on the event loop, not by a task: ``submit`` dispatches at once
when the worker is idle, and the worker's completion callback dispatches the next batch. That keeps
a lone client's request to one hand-off to the inference thread and one back (no event to wake a
task, no executor future), which is most of what a loopback round trip costs besides the sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.policies.base import PolicyOutput
from server.worker import InferenceWorker, JobResult

logger = logging.getLogger(__name__)

ACTIVE_CLIENT_WINDOW_S = 1.0


@dataclass
class PendingRequest:
    """One queued ``infer`` request and how to answer it."""

    obs: dict[str, Any]
    req_id: Any
    client: bytes
    respond: Callable[[PendingRequest, PolicyOutput | None, str | None, str | None, dict[str, Any]], None]
    received: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Owns the queue of ``infer`` requests and feeds them to the policy on the inference worker."""

    def __init__(
        self,
        run_batch: Callable[[list[dict[str, Any]]], list[PolicyOutput]],
        worker: InferenceWorker,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        request_timeout_s: float,
    ) -> None:
        self._run_batch = run_batch
        self._worker = worker
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self._queue: deque[PendingRequest] = deque()
        self._solo: deque[PendingRequest] = deque()  # requests of a failed batch, retried one by one
        self._busy = False
        self._closing = False
        self._linger_deadline: float | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._client_seen: dict[bytes, float] = {}
        self.in_flight = 0

    # -- producer side (event loop) ---------------------------------------------------------------
    def submit(self, item: PendingRequest) -> bool:
        """Queue a request; False when the queue is full (the caller answers ``overloaded``)."""
        if self._closing or len(self._queue) >= self.max_queue:
            return False
        self._queue.append(item)
        self._client_seen[item.client] = item.received
        self._idle.clear()
        self._pump()
        return True

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._solo)

    def close(self) -> None:
        """Stop accepting; what is queued is still run (see :meth:`drained`)."""
        self._closing = True
        self._pump()

    async def drained(self) -> None:
        """Wait until nothing is queued or running."""
        await self._idle.wait()

    # -- scheduling -------------------------------------------------------------------------------
    def _active_clients(self, now: float) -> int:
        stale = [c for c, t in self._client_seen.items() if now - t > ACTIVE_CLIENT_WINDOW_S]
        for c in stale:
            del self._client_seen[c]
        return len(self._client_seen)

    def _should_linger(self) -> bool:
        """True while a partial batch should wait for requests that recently active clients will send."""
        if self.max_wait_s <= 0 or self._closing or len(self._queue) >= self.max_batch:
            return False
        wanted = min(self.max_batch, self._active_clients(time.perf_counter()))
        if len(self._queue) >= wanted:
            return False
        loop = asyncio.get_running_loop()
        if self._linger_deadline is None:
            self._linger_deadline = loop.time() + self.max_wait_s
            self._linger_timer = loop.call_at(self._linger_deadline, self._linger_expired)
            return True
        return loop.time() < self._linger_deadline

    def _linger_expired(self) -> None:
        self._linger_timer = None
        self._linger_deadline = float("-inf")  # expired: the next _pump dispatches what is queued
        self._pump()

    def _stop_lingering(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._linger_deadline = None

    def _pump(self) -> None:
        """Dispatch the next batch if the worker is free and one is due."""
        while not self._busy:
            if self._solo:
                self._dispatch([self._solo.popleft()])
                return
            if not self._queue:
                self._stop_lingering()
                self._idle.set()
                return
            if self._should_linger():
                return
            self._stop_lingering()
            batch = self._drop_expired(self._take(self.max_batch))
            if batch:
                self._dispatch(batch)
                return

    def _take(self, limit: int) -> list[PendingRequest]:
        batch: list[PendingRequest] = []
        while self._queue and len(batch) < limit:
            batch.append(self._queue.popleft())
        return batch

    def _drop_expired(self, batch: list[PendingRequest]) -> list[PendingRequest]:
        if self.request_timeout_s <= 0:
            return batch
        now = time.perf_counter()
        keep = []
        for item in batch:
            waited = now - item.received
            if waited > self.request_timeout_s:
                item.respond(item, None, "timeout",
                             f"request waited {waited:.1f}s in the queue (limit {self.request_timeout_s:.1f}s)", {})
            else:
                keep.append(item)
        return keep

    # -- execution --------------------------------------------------------------------------------
    def _dispatch(self, batch: list[PendingRequest]) -> None:
        self._busy = True
        self.in_flight = len(batch)
        observations = [b.obs for b in batch]
        self._worker.submit(lambda: self._run_batch(observations), lambda result: self._finished(batch, result))

    def _finished(self, batch: list[PendingRequest], result: JobResult) -> None:
        self._busy = False
        self.in_flight = 0
        error = result.error
        outputs = result.value
        if error is None and len(outputs) != len(batch):
            error = RuntimeError(f"policy returned {len(outputs)} outputs for a batch of {len(batch)}")
        try:
            if error is not None:
                if len(batch) > 1:
                    # Find the culprit: rerun one by one so only the bad request gets an error.
                    logger.warning("batch of %d failed (%r); retrying its requests one by one", len(batch), error)
                    self._solo.extend(batch)
                else:
                    item = batch[0]
                    logger.error("inference failed for request %r", item.req_id, exc_info=error)
                    item.respond(item, None, "internal", "inference failed (see server log)", {})
            else:
                for item, out in zip(batch, outputs, strict=True):
                    timing = {
                        "queue_ms": (result.started - item.received) * 1000.0,
                        "infer_ms": result.run_ms,
                        "batch_size": len(batch),
                    }
                    item.respond(item, out, None, None, timing)
        finally:
            self._pump()
