"""End-to-end tests: the real server process over real ZeroMQ sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from client import wire
from client.policy_client import PolicyClient, PolicyServerError, PolicyTimeoutError
from client.testing import REPO, ServerProcess, free_port
from client.testing import libero_observation as make_obs
from server.policies.debug import FAIL_INSTRUCTION, expected_debug_actions


@pytest.fixture(scope="module")
def server():
    with ServerProcess() as proc:
        yield proc


def raw_dealer(port: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def recv_reply(sock: zmq.Socket, timeout_ms: int = 5000) -> dict:
    assert sock.poll(timeout_ms), "no reply"
    return wire.unpackb(sock.recv_multipart()[-1])


def test_round_trip_two_images_state_instruction(server: ServerProcess) -> None:
    obs = make_obs(1)
    with PolicyClient(port=server.port, timeout_s=10) as client:
        actions = client.infer(obs)
        timing = client.last_reply["timing"]
        meta = client.metadata()
    assert actions.dtype == np.float32 and actions.shape == (8, 7)
    np.testing.assert_allclose(actions, expected_debug_actions(obs), atol=1e-6)
    assert meta["policy"] == "debug" and "debugging" in meta["kind"]
    assert meta["protocol_version"] == wire.PROTOCOL_VERSION and meta["action_horizon"] == 8
    assert set(timing) >= {"queue_ms", "infer_ms", "server_ms", "batch_size"}


def test_concurrent_clients_every_reply_matched(server: ServerProcess) -> None:
    n_clients, n_requests = 8, 50
    failures: list[str] = []

    def worker(k: int) -> None:
        with PolicyClient(port=server.port, timeout_s=20) as client:
            for i in range(n_requests):
                obs = make_obs(1000 * k + i)
                got = client.infer(obs)
                if not np.allclose(got, expected_debug_actions(obs), atol=1e-6):
                    failures.append(f"client {k} request {i}: mismatched reply")
            if client.stale_replies_dropped:
                failures.append(f"client {k} saw {client.stale_replies_dropped} stale replies")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    with PolicyClient(port=server.port) as client:
        stats = client.stats()
    assert stats["requests"]["infer"] >= n_clients * n_requests


MALFORMED = {
    "random_bytes": os.urandom(300),
    "not_a_map": wire.packb([1, 2, 3]),
    "missing_obs": wire.packb({"v": 1, "type": "infer", "id": "m1"}),
    "unknown_type": wire.packb({"v": 1, "type": "explode", "id": "m2"}),
    "wrong_dtype_image": wire.packb(wire.make_request("infer", "m3", {"image": np.zeros((8, 8, 3), np.float64)})),
    "image_wrong_shape": wire.packb(wire.make_request("infer", "m4", {"image": np.zeros((8, 8, 5), np.uint8)})),
    "state_not_float": wire.packb(wire.make_request("infer", "m5", {"state": np.zeros(8, np.int32)})),
    "nan_state": wire.packb(wire.make_request("infer", "m6", {"state": np.full(8, np.nan, np.float32)})),
    "oversized": wire.packb(wire.make_request("infer", "m7", {"image": np.zeros((1800, 1800, 3), np.uint8)})),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_gets_error_and_server_keeps_serving(server: ServerProcess, name: str) -> None:
    sock = raw_dealer(server.port)
    try:
        sock.send(MALFORMED[name])
        reply = recv_reply(sock)
        assert reply["ok"] is False
        assert reply["error"]["code"] in ("bad_request", "too_large")
        if name == "oversized":
            assert reply["error"]["code"] == "too_large"
    finally:
        sock.close()
    with PolicyClient(port=server.port, timeout_s=10) as client:
        obs = make_obs(7)
        np.testing.assert_allclose(client.infer(obs), expected_debug_actions(obs), atol=1e-6)


def test_wrong_frame_count_dropped_and_req_clients_work(server: ServerProcess) -> None:
    sock = raw_dealer(server.port)
    sock.send_multipart([b"a", b"b", b"c"])  # not a valid envelope: dropped
    sock.close()
    req = zmq.Context.instance().socket(zmq.REQ)  # a REQ client (GR00T-style) also works
    req.setsockopt(zmq.LINGER, 0)
    req.connect(f"tcp://127.0.0.1:{server.port}")
    req.send(wire.packb(wire.make_request("ping", "r1")))
    assert req.poll(5000)
    assert wire.unpackb(req.recv())["id"] == "r1"
    req.close()


def test_client_timeout_is_clear_when_no_server() -> None:
    client = PolicyClient(port=free_port(), timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(PolicyTimeoutError, match="no reply"):
        client.ping()
    assert time.monotonic() - started < 2.0
    client.close()


def test_client_reconnects_after_server_restart() -> None:
    port = free_port()
    client = PolicyClient(port=port, timeout_s=2.0)
    with ServerProcess(port=port):
        assert client.ping()["ok"]
    with pytest.raises(PolicyTimeoutError):
        client.ping()
    with ServerProcess(port=port):
        obs = make_obs(3)
        np.testing.assert_allclose(client.infer(obs), expected_debug_actions(obs), atol=1e-6)
    client.close()


def test_late_reply_to_abandoned_request_is_never_returned_for_a_newer_one() -> None:
    with ServerProcess(args=["--policy-option", "delay_ms=600", "--max-batch", "1"]) as proc:
        client = PolicyClient(port=proc.port, timeout_s=0.3)
        first, second = make_obs(10), make_obs(11)
        with pytest.raises(PolicyTimeoutError):
            client.infer(first)
        client.timeout_s = 5.0
        got = client.infer(second)
        np.testing.assert_allclose(got, expected_debug_actions(second), atol=1e-6)
        client.close()


def test_policy_exception_gives_internal_error_and_others_still_served() -> None:
    with ServerProcess() as proc, PolicyClient(port=proc.port, timeout_s=10) as client:
        bad = make_obs(4) | {"instruction": FAIL_INSTRUCTION}
        with pytest.raises(PolicyServerError) as exc:
            client.infer(bad)
        assert exc.value.code == "internal"
        good = make_obs(5)
        np.testing.assert_allclose(client.infer(good), expected_debug_actions(good), atol=1e-6)


def test_dynamic_batching_and_overloaded_replies() -> None:
    args = ["--policy-option", "delay_ms=50", "--max-batch", "4", "--max-queue", "6", "--max-wait-ms", "5"]
    with ServerProcess(args=args) as proc:
        socks = [raw_dealer(proc.port) for _ in range(16)]
        for k, sock in enumerate(socks):
            sock.send(wire.packb(wire.make_request("infer", f"q{k}", make_obs(k))))
        replies = [recv_reply(s, 10000) for s in socks]
        for s in socks:
            s.close()
        codes = [r["error"]["code"] for r in replies if not r["ok"]]
        ok = [r for r in replies if r["ok"]]
        assert len(codes) + len(ok) == 16
        assert codes and set(codes) == {"overloaded"}
        assert max(r["timing"]["batch_size"] for r in ok) > 1
        for r in ok:
            k = int(r["id"][1:])
            np.testing.assert_allclose(r["actions"], expected_debug_actions(make_obs(k)), atol=1e-6)


def test_sigterm_exits_zero_without_traceback() -> None:
    proc = ServerProcess()
    with PolicyClient(port=proc.port) as client:
        client.infer(make_obs(0))
    code = proc.stop(signal.SIGTERM)
    assert code == 0
    assert "Traceback" not in proc.stderr
    assert "stopped cleanly" in proc.stderr


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--port", "abc"], {}, "--port"),
        (["--max-batch", "0"], {}, "--max-batch"),
        (["--policy", "nope"], {}, "--policy"),
        (["--model-path", "/does/not/exist"], {}, "--model-path"),
        (["--frobnicate"], {}, "--frobnicate"),
        ([], {"VLA_SERVER_PORT": "x"}, "--port"),
        ([], {"VLA_SERVER_BOGUS": "1"}, "VLA_SERVER_BOGUS"),
        (["--policy-option", "horizon=zero"], {}, "horizon"),
    ],
)
def test_bad_flag_fails_at_startup_naming_it(args, env, needle) -> None:
    python = str(REPO / ".venv" / "bin" / "python")
    python = python if os.path.exists(python) else sys.executable
    result = subprocess.run([python, "-m", "server", "--port", str(free_port()), *args], cwd=REPO,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_sigkill_mid_request_then_restart() -> None:
    """A server killed while a request is in flight: the call fails within its timeout with a clear error,
    and the same client object works again once a new server is up on the same port."""
    port = free_port()
    client = PolicyClient(port=port, timeout_s=1.5)
    slow = ServerProcess(port=port, args=["--policy-option", "delay_ms=3000", "--max-batch", "1"])
    result: dict = {}

    def call() -> None:
        started = time.monotonic()
        try:
            client.infer(make_obs(20))
        except PolicyTimeoutError as exc:
            result["error"] = str(exc)
        result["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.5)
    slow.stop(signal.SIGKILL)
    worker.join(timeout=10)
    assert "no reply" in result["error"] and result["seconds"] < 3.0
    with ServerProcess(port=port):
        obs = make_obs(21)
        np.testing.assert_allclose(client.infer(obs), expected_debug_actions(obs), atol=1e-6)
    client.close()


def test_wait_until_serving_gives_up_on_a_dead_process_or_no_server() -> None:
    from client.policy_client import wait_until_serving

    port = free_port()
    t0 = time.monotonic()
    assert wait_until_serving(port, timeout_s=30, alive=lambda: False) is False
    assert time.monotonic() - t0 < 5  # a dead process ends the wait at once, not at the timeout
    assert wait_until_serving(port, timeout_s=1.0) is False  # nobody listening
    with ServerProcess() as proc:
        assert wait_until_serving(proc.port, timeout_s=10) is True
