"""Dynamic batching: stack concurrent clients' ``infer`` requests into one forward pass.

Policy: take everything already queued (up to ``max_batch``) the moment the worker is free. A lone
client therefore never waits. Only when more clients have been active recently than the batch
holds does the batcher linger up to ``max_wait_ms`` for their requests. While a batch runs on the
inference thread, new requests pile up and form the next batch, so throughput grows with load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from server.policies.base import PolicyOutput

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
    """Owns the queue of ``infer`` requests and feeds them to the policy on one worker thread."""

    def __init__(
        self,
        run_batch: Callable[[list[dict[str, Any]]], list[PolicyOutput]],
        executor: Executor,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        request_timeout_s: float,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self._queue: deque[PendingRequest] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._client_seen: dict[bytes, float] = {}
        self.in_flight = 0

    # -- producer side (event loop) ---------------------------------------------------------------
    def submit(self, item: PendingRequest) -> bool:
        """Queue a request; False when the queue is full (the caller answers ``overloaded``)."""
        if self._closing or len(self._queue) >= self.max_queue:
            return False
        self._queue.append(item)
        self._client_seen[item.client] = item.received
        self._wakeup.set()
        return True

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _active_clients(self, now: float) -> int:
        stale = [c for c, t in self._client_seen.items() if now - t > ACTIVE_CLIENT_WINDOW_S]
        for c in stale:
            del self._client_seen[c]
        return len(self._client_seen)

    # -- consumer side ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Batch loop; returns once closed and the queue is drained."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            if len(batch) < self.max_batch and self.max_wait_s > 0 and not self._closing:
                wanted = min(self.max_batch, self._active_clients(time.perf_counter()))
                deadline = time.perf_counter() + self.max_wait_s
                while len(batch) < wanted and (remaining := deadline - time.perf_counter()) > 0:
                    self._wakeup.clear()
                    if not self._queue:
                        try:
                            await asyncio.wait_for(self._wakeup.wait(), remaining)
                        except asyncio.TimeoutError:
                            break
                    batch.extend(self._take_batch(self.max_batch - len(batch)))
            batch = self._drop_expired(batch)
            if batch:
                await self._execute(loop, batch)

    def _take_batch(self, limit: int | None = None) -> list[PendingRequest]:
        limit = self.max_batch if limit is None else limit
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

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[PendingRequest]) -> None:
        started = time.perf_counter()
        self.in_flight = len(batch)
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, [b.obs for b in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"policy returned {len(outputs)} outputs for a batch of {len(batch)}")
        except Exception:
            if len(batch) > 1:
                # Find the culprit: rerun one by one so only the bad request gets an error.
                logger.warning("batch of %d failed; retrying its requests one by one", len(batch))
                for item in batch:
                    await self._execute(loop, [item])
                return
            logger.exception("inference failed for request %r", batch[0].req_id)
            item = batch[0]
            item.respond(item, None, "internal", "inference failed (see server log)", {})
            return
        finally:
            self.in_flight = 0
        infer_ms = (time.perf_counter() - started) * 1000.0
        for item, out in zip(batch, outputs, strict=True):
            timing = {
                "queue_ms": (started - item.received) * 1000.0,
                "infer_ms": infer_ms,
                "batch_size": len(batch),
            }
            item.respond(item, out, None, None, timing)

    def close(self) -> None:
        """Stop accepting; :meth:`run` finishes what is queued and returns."""
        self._closing = True
        self._wakeup.set()
