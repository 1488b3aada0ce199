"""Hammer the real server process with malformed messages while a good client checks its answers.

    .venv/bin/python scripts/fuzz_server.py [--messages 10000] [--senders 4] [--port P]

Starts ``python -m server`` (debug policy, so every good reply can be checked exactly), then
``--senders`` threads each send their share of malformed messages (random bytes, truncated msgpack,
deep nesting, huge declared lengths, ext types with lying shapes/dtypes, NaN/inf state, bad frame
counts, unknown types, oversized images) while a good client sends valid ``infer`` requests and
checks every reply. After the storm, it checks that the server still answers and did not crash.
Last line: JSON summary (messages sent, error replies, good requests ok/failed, server alive).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import threading
import time

import msgpack
import numpy as np
import zmq

from client import wire
from client.policy_client import PolicyClient
from client.testing import ServerProcess
from server.policies.debug import expected_debug_actions


def malformed_messages(rng: random.Random) -> list[bytes]:
    """One round of every kind of hostile message (each a list of frames)."""
    good = wire.packb(wire.make_request("infer", "x", {"state": np.zeros(8, np.float32)}))
    ext_header = struct.pack("<BB", rng.randrange(256), rng.randrange(10))
    lying_shape = struct.pack("<BB", 11, 2) + struct.pack("<2Q", 10**6, 10**6) + b"\0" * 16
    return [
        [os.urandom(rng.randrange(1, 2000))],
        [good[: rng.randrange(1, len(good))]],
        [b"\x91" * 100000 + b"\x00"],  # deep nesting
        [b"\xdb\xff\xff\xff\xff" + b"a" * 10],  # str declaring 4 GB
        [b"\xdd\xff\xff\xff\xff"],  # array declaring 4 G elements
        [b"\xc9\xff\xff\xff\xf0\x2a"],  # ext declaring 4 GB
        [msgpack.packb({"v": 1, "type": "infer", "id": 1,
                        "obs": {"state": msgpack.ExtType(42, ext_header + os.urandom(rng.randrange(64)))}})],
        [msgpack.packb({"v": 1, "type": "infer", "id": 2, "obs": {"image": msgpack.ExtType(42, lying_shape)}})],
        [wire.packb(wire.make_request("infer", 3, {"state": np.array([np.nan, np.inf], np.float32)}))],
        [wire.packb({"v": 1, "type": rng.choice(["", "kill", "get_action", "\x00"]), "id": 4})],
        [wire.packb({"v": 1, "type": "infer", "id": [1, 2], "obs": {}})],
        [wire.packb({"v": 99, "type": "ping", "id": 5})],
        [b"a", b"b", b"c"],  # bad frame count
        [wire.packb(wire.make_request("infer", 6, {"image": np.zeros((1200, 1200, 3), np.uint8)}))],
        [wire.packb(wire.make_request("infer", 7, {"image": np.zeros((4, 4, 7), np.uint8)}))],
    ]


def run(messages: int, senders: int, good_requests: int) -> dict:
    stats = {"messages_sent": 0, "error_replies": 0, "good_ok": 0, "good_failed": 0, "sender_errors": 0}
    lock = threading.Lock()
    with ServerProcess(args=["--log-level", "ERROR", "--max-queue", "256"]) as server:
        stop = threading.Event()

        def sender(seed: int, quota: int) -> None:
            rng = random.Random(seed)
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{server.port}")
            sent = errors = 0
            try:
                while sent < quota:
                    for frames in malformed_messages(rng):
                        if sent >= quota:
                            break
                        sock.send_multipart(frames)
                        sent += 1
                        while sock.poll(0):
                            reply = wire.unpackb(sock.recv_multipart()[-1])
                            errors += int(not reply["ok"])
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and sock.poll(500):
                    reply = wire.unpackb(sock.recv_multipart()[-1])
                    errors += int(not reply["ok"])
            except Exception:  # noqa: BLE001 - counted and reported
                with lock:
                    stats["sender_errors"] += 1
            finally:
                sock.close()
                with lock:
                    stats["messages_sent"] += sent
                    stats["error_replies"] += errors

        def good_client() -> None:
            with PolicyClient(port=server.port, timeout_s=20) as client:
                i = 0
                while i < good_requests or not stop.is_set():
                    obs = {"state": np.random.default_rng(i).standard_normal(8).astype(np.float32),
                           "image": np.full((64, 64, 3), i % 255, np.uint8), "instruction": "ok"}
                    try:
                        ok = np.allclose(client.infer(obs), expected_debug_actions(obs), atol=1e-6)
                    except Exception:  # noqa: BLE001
                        ok = False
                    with lock:
                        stats["good_ok" if ok else "good_failed"] += 1
                    i += 1

        threads = [threading.Thread(target=sender, args=(k, messages // senders + (k < messages % senders)))
                   for k in range(senders)]
        good = threading.Thread(target=good_client)
        t0 = time.monotonic()
        good.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        good.join(timeout=60)
        elapsed = time.monotonic() - t0
        # After the storm: the server is alive and exact.
        with PolicyClient(port=server.port, timeout_s=10) as client:
            obs = {"state": np.arange(8, dtype=np.float32), "instruction": "after"}
            after_ok = bool(np.allclose(client.infer(obs), expected_debug_actions(obs), atol=1e-6))
            server_stats = client.stats()
        alive = server.proc.poll() is None
        exit_code = server.stop()
    stats.update({
        "seconds": round(elapsed, 2),
        "server_alive_after": alive and after_ok,
        "server_exit_code": exit_code,
        "server_error_counts": server_stats["errors"],
        "server_dropped_frames": server_stats["dropped_frames"],
        "traceback_in_server_log": "Traceback" in (server.stderr or ""),
    })
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--good-requests", type=int, default=200)
    ns = p.parse_args()
    result = run(ns.messages, ns.senders, ns.good_requests)
    print(f"malformed messages sent: {result['messages_sent']} in {result['seconds']} s; "
          f"error replies: {result['error_replies']}; dropped frames: {result['server_dropped_frames']}")
    print(f"good requests: {result['good_ok']} ok, {result['good_failed']} failed; "
          f"server alive and exact afterwards: {result['server_alive_after']}; exit code {result['server_exit_code']}")
    print(json.dumps(result))
    ok = (result["good_failed"] == 0 and result["server_alive_after"] and result["server_exit_code"] == 0
          and result["sender_errors"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
