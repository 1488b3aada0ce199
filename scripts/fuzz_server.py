"""Hammer the real server process with malformed messages while a good client checks its answers.

    .venv/bin/python scripts/fuzz_server.py [--messages 10000] [--senders 4] [--port P]

Starts ``python -m server`` (debug policy, so every good reply can be checked exactly), then
``--senders`` threads each send their share of malformed messages (random bytes, truncated msgpack,
deep nesting, huge declared lengths, ext types with lying shapes/dtypes, NaN/inf state, bad frame
counts, unknown types, oversized images, and Isaac-GR00T-protocol messages with lying ``.npy`` headers,
object dtypes, pickles and wrong types) while a good client sends valid ``infer`` requests, alternately in our
protocol and GR00T's, and checks every reply. One more sender sends ``--ws-messages`` hostile frames to openpi's
websocket protocol (``--ws-port``: text frames, lying ``__ndarray__`` maps, object dtypes, huge shape claims, wrong
types), each of which must be answered with error text on the same connection, while a websocket good client
checks its replies. After the storm, it checks that the server still answers (all protocols) and did not crash.
Last line: JSON summary (messages sent, error replies, good requests ok/failed, server alive).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import struct
import threading
import time

import msgpack
import numpy as np
import zmq
from websockets.sync.client import connect as ws_connect

from client import wire
from client.gr00t_client import Gr00tClient, actions_from_reply, libero_gr00t_observation
from client.policy_client import PolicyClient
from client.testing import ServerProcess, free_port
from server import websocket_frontend as ws_frontend
from server.policies.debug import expected_debug_actions

WS_CLIENT_LIMITS = wire.WireLimits(max_message_bytes=1 << 30, max_array_bytes=1 << 30)  # replies are trusted


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


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """A bare ``.npy`` header (any dtype, e.g. ``|O``, which an honest ``np.save`` would pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def malformed_gr00t_messages(rng: random.Random) -> list[list[bytes]]:
    """One round of hostile Isaac-GR00T-protocol messages (``{"endpoint": ..., "data": ...}``)."""
    good = _npy(np.zeros((1, 8, 8, 3), np.uint8))

    def action(value) -> list[bytes]:
        return [msgpack.packb({"endpoint": "get_action", "data": {"video.image": value, "state.x": value,
                                                                   "annotation.x": ["go"]}}, use_bin_type=True)]

    def arr(as_npy) -> dict:
        return {"__ndarray_class__": True, "as_npy": as_npy}

    cut = rng.randrange(1, len(good))
    return [
        action(arr(good[:cut])),  # truncated .npy
        action(arr(os.urandom(rng.randrange(1, 200)))),
        action(arr(b"\x93NUMPY\x01\x00" + os.urandom(rng.randrange(0, 100)))),  # magic then junk
        action(arr(_npy_header("<f8", (10**6, 10**6)) + b"\0" * 32)),  # header declaring 8 TB
        action(arr(_npy_header("|O", (1,)) + b"\x80\x04N.")),  # object dtype + a pickle
        action(arr(_npy(np.zeros(3, dtype=[("a", "<f4")])))),
        action(arr(bytes(rng.randrange(256) for _ in range(40)))),
        action(arr(12345)),
        action({"__ndarray_class__": True}),
        action("not an array"),
        [msgpack.packb({"endpoint": rng.choice(["kill", "", "shell", 7]), "data": {}})],
        [msgpack.packb({"endpoint": "get_action", "data": [1, 2, 3]})],
        [msgpack.packb({"endpoint": "get_action", "data": {"observation": {"video": 5}}})],
        [msgpack.packb({"endpoint": "get_action", "data": {"video.image": arr(good), "annotation.x": 7}})],
    ]


def malformed_ws_frames(rng: random.Random) -> list[bytes | str]:
    """One round of hostile frames for openpi's websocket protocol (``--ws-port``): each should get error text."""
    good = ws_frontend.packb(_ws_observation(0)[0])

    def arr(data, dtype, shape) -> dict:
        return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}

    def obs(**values) -> bytes:
        return msgpack.packb({"prompt": "x", **values}, use_bin_type=True)

    return [
        "a text frame",
        os.urandom(rng.randrange(1, 2000)),
        good[: rng.randrange(1, len(good))],
        b"\x91" * 100000 + b"\x00",  # deep nesting
        b"\xdb\xff\xff\xff\xff" + b"a" * 10,  # str declaring 4 GB
        b"\xc6\xff\xff\xff\xff" + b"a" * 10,  # bin declaring 4 GB
        obs(**{"observation/state": arr(b"\0" * 8, rng.choice(["|O", "|V8", "<c8", "<U2", "(2,)f4"]), [1])}),
        obs(**{"observation/image": arr(b"\0" * 12, "|u1", [10**6, 10**6, 3])}),  # claims 3 TB
        obs(**{"observation/state": arr(os.urandom(rng.randrange(64)), "<f4", [rng.randrange(-3, 40)])}),
        obs(**{"observation/state": arr(b"\0" * 4, "<f4", "not a shape")}),
        obs(**{"observation/state": {b"__npgeneric__": True, b"data": 2**40, b"dtype": "<i4"}}),
        obs(**{"observation/state": "nope"}),
        obs(**{"observation/image": {"nested": 1}}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb({1: 2}),
        ws_frontend.packb({"observation/state": np.array([np.nan, np.inf], np.float32), "prompt": "x"}),
        ws_frontend.packb({"observation/image": np.zeros((1200, 1200, 3), np.uint8)}),
    ]


def _ws_observation(i: int) -> tuple[dict, dict]:
    """(an observation under openpi's LIBERO keys, the same under ours) for the websocket good client."""
    ours = {"state": np.random.default_rng(i).standard_normal(8).astype(np.float32),
            "image": np.full((64, 64, 3), i % 255, np.uint8), "instruction": "ok"}
    return {"observation/state": ours["state"], "observation/image": ours["image"], "prompt": "ok"}, ours


def _ws_infer(conn, obs: dict) -> np.ndarray:
    conn.send(ws_frontend.packb(obs))
    reply = conn.recv(timeout=20)
    if isinstance(reply, str):
        raise RuntimeError(reply)
    return ws_frontend.unpackb(reply, WS_CLIENT_LIMITS)["actions"]


def run(messages: int, senders: int, good_requests: int, ws_messages: int = 2000) -> dict:
    stats = {"messages_sent": 0, "error_replies": 0, "good_ok": 0, "good_failed": 0, "sender_errors": 0}
    stats.update({"ws_frames_sent": 0, "ws_error_replies": 0, "ws_valid_by_chance": 0, "ws_good_ok": 0,
                  "ws_good_failed": 0})
    lock = threading.Lock()
    ws_port = free_port()
    with ServerProcess(args=["--log-level", "ERROR", "--max-queue", "256", "--ws-port", str(ws_port)]) as server:
        stop = threading.Event()

        def ws_sender(seed: int, quota: int) -> None:
            """Hostile frames over one websocket connection: every one must be answered (a missing reply raises).

            Random bytes or random array data occasionally form a valid observation; those get actions.
            """
            rng = random.Random(seed)
            sent = errors = valid = 0
            try:
                with ws_connect(f"ws://127.0.0.1:{ws_port}", compression=None, max_size=None) as conn:
                    conn.recv(timeout=20)  # the metadata
                    while sent < quota:
                        for frame in malformed_ws_frames(rng):
                            if sent >= quota:
                                break
                            conn.send(frame)
                            sent += 1
                            reply = conn.recv(timeout=20)
                            errors += isinstance(reply, str)
                            valid += not isinstance(reply, str)
            except Exception:  # noqa: BLE001 - counted and reported
                with lock:
                    stats["sender_errors"] += 1
            finally:
                with lock:
                    stats["ws_frames_sent"] += sent
                    stats["ws_error_replies"] += errors
                    stats["ws_valid_by_chance"] += valid

        def ws_good_client() -> None:
            with ws_connect(f"ws://127.0.0.1:{ws_port}", compression=None, max_size=None) as conn:
                conn.recv(timeout=20)
                i = 0
                while i < good_requests or not stop.is_set():
                    theirs, ours = _ws_observation(i)
                    try:
                        ok = bool(np.allclose(_ws_infer(conn, theirs), expected_debug_actions(ours), atol=1e-6))
                    except Exception:  # noqa: BLE001
                        ok = False
                    with lock:
                        stats["ws_good_ok" if ok else "ws_good_failed"] += 1
                    i += 1

        def sender(seed: int, quota: int) -> None:
            rng = random.Random(seed)
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{server.port}")
            sent = errors = replies = 0
            try:
                while sent < quota:
                    for frames in malformed_messages(rng) + malformed_gr00t_messages(rng):
                        if sent >= quota:
                            break
                        sock.send_multipart(frames)
                        sent += 1
                        while sock.poll(0):
                            errors += _is_error(sock.recv_multipart()[-1])
                            replies += 1
                # Every message here carries a payload, so each gets a reply: wait for all of them. A pause in the
                # replies is not the end (a CI run once stopped listening after a 0.5 s gap and missed one).
                deadline = time.monotonic() + 60
                while replies < sent and time.monotonic() < deadline:
                    if sock.poll(500):
                        errors += _is_error(sock.recv_multipart()[-1])
                        replies += 1
            except Exception:  # noqa: BLE001 - counted and reported
                with lock:
                    stats["sender_errors"] += 1
            finally:
                sock.close()
                with lock:
                    stats["messages_sent"] += sent
                    stats["error_replies"] += errors

        def good_client() -> None:
            with PolicyClient(port=server.port, timeout_s=20) as client, \
                    Gr00tClient(port=server.port, timeout_s=20) as gr00t:
                i = 0
                while i < good_requests or not stop.is_set():
                    obs = {"state": np.random.default_rng(i).standard_normal(8).astype(np.float32),
                           "image": np.full((64, 64, 3), i % 255, np.uint8), "instruction": "ok"}
                    try:
                        if i % 2:  # the same observation through the GR00T protocol
                            g_obs = libero_gr00t_observation(obs["image"], None, obs["state"], "ok")
                            actions = actions_from_reply(gr00t.get_action(g_obs))
                        else:
                            actions = client.infer(obs)
                        ok = np.allclose(actions, expected_debug_actions(obs), atol=1e-6)
                    except Exception:  # noqa: BLE001
                        ok = False
                    with lock:
                        stats["good_ok" if ok else "good_failed"] += 1
                    i += 1

        threads = [threading.Thread(target=sender, args=(k, messages // senders + (k < messages % senders)))
                   for k in range(senders)]
        threads.append(threading.Thread(target=ws_sender, args=(senders, ws_messages)))
        ws_good = threading.Thread(target=ws_good_client)
        ws_good.start()
        good = threading.Thread(target=good_client)
        t0 = time.monotonic()
        good.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        good.join(timeout=60)
        ws_good.join(timeout=60)
        elapsed = time.monotonic() - t0
        # After the storm: the server is alive and exact.
        with PolicyClient(port=server.port, timeout_s=10) as client:
            obs = {"state": np.arange(8, dtype=np.float32), "instruction": "after"}
            after_ok = bool(np.allclose(client.infer(obs), expected_debug_actions(obs), atol=1e-6))
            server_stats = client.stats()
        with Gr00tClient(port=server.port, timeout_s=10) as gr00t:
            g_obs = libero_gr00t_observation(np.zeros((8, 8, 3), np.uint8), None, obs["state"], "after")
            after_ok = after_ok and bool(np.allclose(actions_from_reply(gr00t.get_action(g_obs)),
                                                     expected_debug_actions({"state": obs["state"],
                                                                             "image": np.zeros((8, 8, 3))}),
                                                     atol=1e-6))
        with ws_connect(f"ws://127.0.0.1:{ws_port}", compression=None, max_size=None) as conn:
            conn.recv(timeout=10)
            theirs, ours = _ws_observation(7)
            after_ok = after_ok and bool(np.allclose(_ws_infer(conn, theirs), expected_debug_actions(ours),
                                                     atol=1e-6))
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


def _is_error(payload: bytes) -> int:
    """1 for an error reply of either protocol (ours: ``ok`` false; GR00T's: an ``error`` key), else 0."""
    reply = msgpack.unpackb(payload, raw=False, ext_hook=lambda code, data: None)
    return int(isinstance(reply, dict) and (reply.get("ok") is False or "error" in reply))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=10000)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--good-requests", type=int, default=200)
    p.add_argument("--ws-messages", type=int, default=2000, help="hostile frames for the websocket front end")
    ns = p.parse_args()
    result = run(ns.messages, ns.senders, ns.good_requests, ns.ws_messages)
    print(f"malformed messages sent: {result['messages_sent']} in {result['seconds']} s; "
          f"error replies: {result['error_replies']}; dropped frames: {result['server_dropped_frames']}")
    print(f"good requests: {result['good_ok']} ok, {result['good_failed']} failed; "
          f"server alive and exact afterwards: {result['server_alive_after']}; exit code {result['server_exit_code']}")
    print(f"websocket: {result['ws_frames_sent']} hostile frames, {result['ws_error_replies']} error replies, "
          f"{result['ws_valid_by_chance']} valid by chance (answered with actions); good requests: "
          f"{result['ws_good_ok']} ok, "
          f"{result['ws_good_failed']} failed")
    print(json.dumps(result))
    ok = (result["good_failed"] == 0 and result["server_alive_after"] and result["server_exit_code"] == 0
          and result["sender_errors"] == 0)
    ok = ok and result["ws_good_failed"] == 0
    ok = ok and result["ws_error_replies"] + result["ws_valid_by_chance"] == result["ws_frames_sent"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
