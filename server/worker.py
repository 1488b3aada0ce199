"""The inference thread: runs every policy call, one at a time, off the event loop.

Why not ``loop.run_in_executor``: an executor call costs a ``concurrent.futures.Future``, an
asyncio future chained to it, and a task step to resume the awaiting coroutine — about a tenth of a
millisecond per request on a small machine, which is a third of the whole loopback round trip the
wire benchmark measures. Here the event loop hands the thread a plain callable and gets the result
back through exactly one ``call_soon_threadsafe`` callback. One thread keeps calls ordered (a
``reset`` never overtakes the batch queued before it) and keeps the policy single-threaded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    """What a job returned (or raised), and when it ran on the inference thread (``perf_counter``)."""

    value: Any
    error: BaseException | None
    started: float
    finished: float

    @property
    def run_ms(self) -> float:
        return (self.finished - self.started) * 1000.0


class InferenceWorker:
    """A single daemon thread draining a job queue; completions are delivered on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "inference") -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[JobResult], None]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, job: Callable[[], Any], on_done: Callable[[JobResult], None]) -> None:
        """Run ``job()`` on the thread; ``on_done(result)`` is then called on the event loop."""
        if self._closed:
            raise RuntimeError("inference worker is shut down")
        self._jobs.put((job, on_done))

    async def call(self, job: Callable[[], Any]) -> Any:
        """Await ``job()`` run on the thread (for rare calls such as ``reset``); re-raises its error."""
        future: asyncio.Future[JobResult] = self._loop.create_future()

        def done(result: JobResult) -> None:
            if not future.done():
                future.set_result(result)

        self.submit(job, done)
        result = await future
        if result.error is not None:
            raise result.error
        return result.value

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Finish the queued jobs, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, on_done = item
            started = time.perf_counter()
            try:
                value, error = job(), None
            except BaseException as exc:  # noqa: BLE001 - delivered to the caller, who decides
                value, error = None, exc
            result = JobResult(value, error, started, time.perf_counter())
            try:
                self._loop.call_soon_threadsafe(on_done, result)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                logger.debug("event loop closed; dropping a job result")
