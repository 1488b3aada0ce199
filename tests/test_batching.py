"""The dynamic batcher and the inference worker in-process (the real server is covered in test_server_e2e)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from server.batching import DynamicBatcher, PendingRequest
from server.policies.base import PolicyOutput
from server.worker import InferenceWorker


class Recorder:
    """A policy stand-in: records batch compositions; can block (gate) and fail on marked observations."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        self.gate.wait(5.0)
        self.threads.add(threading.current_thread().name)
        self.batches.append([o["n"] for o in observations])
        if any(o.get("bad") for o in observations):
            raise RuntimeError("bad observation")
        return [PolicyOutput(actions=np.full((2, 7), o["n"], np.float32)) for o in observations]


def _request(n: int, replies: dict[int, Any], client: bytes | None = None, received: float | None = None,
             **obs: Any) -> PendingRequest:
    def respond(item, out, code, message, timing):
        replies[n] = (out, code, timing)

    return PendingRequest(obs={"n": n, **obs}, req_id=n, client=client or bytes([n]), respond=respond,
                          received=time.perf_counter() if received is None else received)


async def _until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def _finish(batcher: DynamicBatcher, worker: InferenceWorker) -> None:
    """Close the batcher, wait for it to drain, stop the worker thread."""
    batcher.close()
    await batcher.drained()
    worker.shutdown()


def _make(recorder: Recorder, **kw: Any) -> tuple[DynamicBatcher, InferenceWorker]:
    worker = InferenceWorker(asyncio.get_running_loop())
    args = {"max_batch": 4, "max_wait_ms": 0.0, "max_queue": 64, "request_timeout_s": 30.0}
    args.update(kw)
    return DynamicBatcher(recorder, worker, **args), worker


def test_a_lone_client_is_served_without_lingering() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher, worker = _make(rec, max_wait_ms=10_000.0)  # would be seconds if it lingered
        replies: dict[int, Any] = {}
        assert batcher.submit(_request(1, replies))
        await asyncio.wait_for(_until(lambda: 1 in replies), 2.0)
        out, code, timing = replies[1]
        assert code is None and out.actions[0, 0] == 1 and timing["batch_size"] == 1
        assert rec.threads == {"inference"}  # ran on the worker thread, not the loop
        await _finish(batcher, worker)

    asyncio.run(main())


def test_requests_arriving_while_busy_form_one_batch_in_order() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher, worker = _make(rec, max_batch=4)
        replies: dict[int, Any] = {}
        rec.gate.clear()
        batcher.submit(_request(0, replies))  # occupies the worker
        await _until(lambda: batcher.in_flight == 1)
        for n in range(1, 7):
            batcher.submit(_request(n, replies))
        assert batcher.queued == 6
        rec.gate.set()
        await _until(lambda: len(replies) == 7)
        assert rec.batches == [[0], [1, 2, 3, 4], [5, 6]]
        assert all(replies[n][0].actions[0, 0] == n for n in range(7))
        assert replies[3][2]["batch_size"] == 4
        await _finish(batcher, worker)

    asyncio.run(main())


def test_lingers_for_recently_active_clients_then_batches_them() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher, worker = _make(rec, max_batch=4, max_wait_ms=0.0)
        replies: dict[int, Any] = {}
        for n in (1, 2, 3):  # three clients become active
            batcher.submit(_request(n, replies))
            await _until(lambda n=n: n in replies)
        assert rec.batches == [[1], [2], [3]]
        batcher.max_wait_s = 2.0
        # now two of the three send: the batcher waits for the third instead of running a batch of one
        batcher.submit(_request(11, replies, client=bytes([1])))
        await asyncio.sleep(0.05)
        assert 11 not in replies
        batcher.submit(_request(12, replies, client=bytes([2])))
        batcher.submit(_request(13, replies, client=bytes([3])))
        await _until(lambda: {11, 12, 13} <= replies.keys())
        assert rec.batches[-1] == [11, 12, 13]
        await _finish(batcher, worker)

    asyncio.run(main())


def test_linger_gives_up_after_max_wait() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher, worker = _make(rec, max_batch=4, max_wait_ms=30.0)
        replies: dict[int, Any] = {}
        for n in (1, 2):
            batcher.submit(_request(n, replies))
            await _until(lambda n=n: n in replies)
        batcher.submit(_request(21, replies, client=bytes([1])))  # client 2 never sends
        await asyncio.wait_for(_until(lambda: 21 in replies), 2.0)
        assert rec.batches[-1] == [21]
        await _finish(batcher, worker)

    asyncio.run(main())


def test_a_failing_batch_is_retried_one_by_one_and_only_the_culprit_errors() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher, worker = _make(rec, max_batch=8)
        replies: dict[int, Any] = {}
        rec.gate.clear()
        batcher.submit(_request(0, replies))
        await _until(lambda: batcher.in_flight == 1)
        batcher.submit(_request(1, replies))
        batcher.submit(_request(2, replies, bad=True))
        batcher.submit(_request(3, replies))
        rec.gate.set()
        await _until(lambda: len(replies) == 4)
        assert rec.batches == [[0], [1, 2, 3], [1], [2], [3]]
        assert replies[2][0] is None and replies[2][1] == "internal"
        assert [replies[n][0].actions[0, 0] for n in (0, 1, 3)] == [0, 1, 3]
        await _finish(batcher, worker)

    asyncio.run(main())


def test_requests_older_than_the_timeout_are_answered_timeout_not_run() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher, worker = _make(rec, request_timeout_s=0.5)
        replies: dict[int, Any] = {}
        batcher.submit(_request(1, replies, received=time.perf_counter() - 10.0))
        batcher.submit(_request(2, replies))
        await _until(lambda: len(replies) == 2)
        assert replies[1][1] == "timeout" and replies[2][1] is None
        assert rec.batches == [[2]]
        await _finish(batcher, worker)

    asyncio.run(main())


def test_close_refuses_new_work_but_finishes_the_queue() -> None:
    async def main() -> None:
        rec = Recorder()
        batcher, worker = _make(rec, max_batch=2, max_queue=3)
        replies: dict[int, Any] = {}
        rec.gate.clear()
        batcher.submit(_request(0, replies))
        await _until(lambda: batcher.in_flight == 1)
        assert all(batcher.submit(_request(n, replies)) for n in (1, 2, 3))
        assert not batcher.submit(_request(4, replies))  # queue full: the server answers 'overloaded'
        batcher.close()
        assert not batcher.submit(_request(5, replies))
        rec.gate.set()
        await asyncio.wait_for(batcher.drained(), 5.0)
        assert sorted(replies) == [0, 1, 2, 3]
        worker.shutdown()

    asyncio.run(main())


def test_worker_call_keeps_order_and_reraises() -> None:
    async def main() -> None:
        worker = InferenceWorker(asyncio.get_running_loop())
        order: list[int] = []

        def job(n: int):
            return lambda: order.append(n) or n

        results = await asyncio.gather(*(worker.call(job(n)) for n in range(20)))
        assert results == list(range(20)) and order == list(range(20))

        def boom() -> None:
            raise ValueError("from the worker")

        with pytest.raises(ValueError, match="from the worker"):
            await worker.call(boom)
        worker.shutdown(timeout_s=5.0)
        with pytest.raises(RuntimeError, match="shut down"):
            worker.submit(lambda: None, lambda r: None)

    asyncio.run(main())
