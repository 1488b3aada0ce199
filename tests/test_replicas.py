"""``--replicas N`` / ``--replica-endpoints``: several servers behind one address (server/replicas.py).

The debug policy's chunk is a pure function of the observation (:func:`expected_debug_actions`), so every reply
is checked against *its* request; the client drops any reply whose id is not the one it waits for, and counts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from client.gr00t_client import Gr00tClient
from client.policy_client import PolicyClient
from client.testing import REPO, ServerProcess, libero_observation, server_python
from server.policies.debug import expected_debug_actions
from server.replicas import replica_argv


def wait_for(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def replicas_ready(port: int, n: int) -> bool:
    with PolicyClient(port=port, timeout_s=5) as c:
        return c.ping()["replicas"]["ready"] == n


def observation(thread: int, i: int) -> dict:
    # distinct small states -> distinct chunks (tanh is injective); no images: the test is about routing
    state = np.array([thread * 0.1 + i * 1e-4, -thread * 0.05, i * 1e-3, 0.2, 0.0, 0.1, 0.3, 0.0], np.float32)
    return {"state": state, "instruction": f"client {thread} step {i}"}


def run_clients(port: int, n_threads: int, n_requests: int, on_progress=None) -> list[list]:
    """``n_threads`` clients, each its own socket; per thread a list of (request index, chunk or exception)."""
    results: list[list] = [[] for _ in range(n_threads)]
    stale = [0] * n_threads

    def client(t: int) -> None:
        with PolicyClient(port=port, timeout_s=20) as c:
            for i in range(n_requests):
                try:
                    results[t].append((i, c.infer(observation(t, i))))
                except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                    results[t].append((i, exc))
                if on_progress is not None:
                    on_progress()
            stale[t] = c.stale_replies_dropped

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert sum(stale) == 0, f"replies to other requests arrived: {stale}"
    return results


def check_exactly_once(results: list[list], n_requests: int) -> None:
    for t, rows in enumerate(results):
        assert [i for i, _ in rows] == list(range(n_requests))
        for i, chunk in rows:
            assert not isinstance(chunk, Exception), f"client {t} request {i}: {chunk!r}"
            np.testing.assert_array_equal(chunk, expected_debug_actions(observation(t, i)))


def test_two_replicas_survive_a_killed_replica_under_load() -> None:
    n_threads, n_requests = 4, 150
    args = ["--replicas", "2", "--policy-option", "delay_ms=5"]
    with ServerProcess(args, ready_timeout_s=60) as srv:
        wait_for(lambda: replicas_ready(srv.port, 2), what="both replicas ready")
        with PolicyClient(port=srv.port, timeout_s=10) as c:
            before = c.stats()["replicas"]
            meta = c.metadata()
        assert meta["replicas"]["total"] == 2 and meta["policy"] == "debug"
        victim = before[0]["pid"]
        done = [0]
        killed = threading.Event()
        lock = threading.Lock()

        def progress() -> None:
            with lock:
                done[0] += 1
                if done[0] == n_threads * n_requests // 3 and not killed.is_set():
                    os.kill(victim, signal.SIGKILL)
                    killed.set()

        start = time.monotonic()
        results = run_clients(srv.port, n_threads, n_requests, progress)
        assert killed.is_set()
        check_exactly_once(results, n_requests)
        # the killed replica is restarted (new pid) and serves again
        def restarted() -> bool:
            with PolicyClient(port=srv.port, timeout_s=5) as c:
                r0 = c.stats()["replicas"][0]
            return r0["state"] == "ready" and r0["restarts"] >= 1 and r0["pid"] not in (None, victim)

        wait_for(restarted, what="the killed replica restarted and ready")
        with PolicyClient(port=srv.port, timeout_s=10) as c:
            served_before = c.stats()["replicas"][0]["served"]
            for i in range(20):
                obs = observation(9, i)
                np.testing.assert_array_equal(c.infer(obs), expected_debug_actions(obs))
            stats = c.stats()
        assert stats["replicas"][0]["served"] > served_before, "the restarted replica gets no traffic"
        assert stats["resent"] >= 1, "the killed replica held no request: the test proved nothing"
        assert time.monotonic() - start < 50
    assert "replica 0" in srv.output() and "restart" in srv.output()


def test_gr00t_protocol_through_the_front() -> None:
    obs = libero_observation(3, size=64)
    with ServerProcess(["--replicas", "2"], ready_timeout_s=60) as srv:
        wait_for(lambda: replicas_ready(srv.port, 2), what="both replicas ready")
        with Gr00tClient(port=srv.port, timeout_s=10) as g, PolicyClient(port=srv.port, timeout_s=10) as c:
            assert g.ping()["readiness"] == "ready"
            assert "action" in g.get_modality_config()
            np.testing.assert_array_equal(c.infer(obs), expected_debug_actions(obs))
            c.reset()  # sent to every replica, answered once


def test_replica_endpoints_front_for_running_servers() -> None:
    with ServerProcess() as a, ServerProcess() as b:
        endpoints = f"tcp://127.0.0.1:{a.port},tcp://127.0.0.1:{b.port}"
        with ServerProcess(["--replica-endpoints", endpoints], ready_timeout_s=30) as front:
            wait_for(lambda: replicas_ready(front.port, 2), what="both remote replicas ready")
            results = run_clients(front.port, 2, 40)
            check_exactly_once(results, 40)
            b.kill()  # a remote replica is not restarted by the front; the other serves alone
            wait_for(lambda: not replicas_ready(front.port, 2), what="the dead endpoint taken out")
            check_exactly_once(run_clients(front.port, 2, 20), 20)
            with PolicyClient(port=front.port, timeout_s=5) as c:
                assert c.ping()["replicas"] == {"ready": 1, "total": 2}


@pytest.mark.parametrize("args, needle", [
    (["--replicas", "0"], "--replicas"),
    (["--replicas", "2", "--ws-port", "1"], "--ws-port"),
    (["--replicas", "2", "--replica-endpoints", "tcp://127.0.0.1:1"], "--replica-endpoints"),
    (["--replica-endpoints", "127.0.0.1:1"], "--replica-endpoints"),
])
def test_bad_replica_flags_fail_at_start_up(args: list[str], needle: str) -> None:
    proc = subprocess.run([server_python(), "-m", "server", "--policy", "debug", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_replica_command_line_drops_what_the_front_decides() -> None:
    argv = ["--port", "5555", "--policy", "debug", "--replicas=2", "--curve-keys", "/k", "--max-batch", "4",
            "--device=cpu", "--torch-threads", "8"]
    out = replica_argv(argv, port=6000, device="cpu", torch_threads=1)
    assert out == ["--policy", "debug", "--max-batch", "4", "--replicas", "1", "--host", "127.0.0.1",
                   "--port", "6000", "--device", "cpu", "--torch-threads", "1"]
