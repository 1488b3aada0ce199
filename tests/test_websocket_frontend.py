"""openpi's websocket protocol on ``--ws-port``: a real server process, a websockets client written here.

The client side packs with openpi's msgpack-numpy convention independently of the server's codec, so the
two cannot agree on a private mistake.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from client.policy_client import PolicyClient
from client.testing import ServerProcess, free_port
from client.testing import libero_observation as make_obs
from server.policies.debug import expected_debug_actions

MAX_MESSAGE_BYTES = 1_000_000  # small, so oversized frames stay cheap; two 256x256 RGB images fit
MAX_IMAGE_PIXELS = 256 * 256


def _pack_default(obj):
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _unpack_hook(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def pack(obj) -> bytes:
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, object_hook=_unpack_hook)


def openpi_obs(seed: int) -> tuple[dict, dict]:
    """(the observation under openpi's LIBERO keys, the same observation under ours)."""
    ours = make_obs(seed)
    theirs = {"observation/image": ours["image"], "observation/wrist_image": ours["wrist_image"],
              "observation/state": ours["state"], "prompt": ours["instruction"]}
    return theirs, ours


@pytest.fixture(scope="module")
def server():
    ws_port = free_port()
    args = ["--ws-port", str(ws_port), "--max-message-bytes", str(MAX_MESSAGE_BYTES),
            "--max-image-pixels", str(MAX_IMAGE_PIXELS),
            "--policy-option", "delay_ms=20", "--max-wait-ms", "5"]
    with ServerProcess(args=args) as proc:
        proc.ws_port = ws_port
        yield proc


@contextmanager
def ws_connect(server: ServerProcess) -> Iterator[tuple[ClientConnection, dict]]:
    """A connection as openpi's client opens it (no compression, no size limit) and the metadata it receives."""
    with connect(f"ws://127.0.0.1:{server.ws_port}", compression=None, max_size=None, open_timeout=10) as conn:
        yield conn, unpack(conn.recv(timeout=10))


def infer(conn: ClientConnection, obs: dict) -> dict:
    conn.send(pack(obs))
    reply = conn.recv(timeout=10)
    assert isinstance(reply, bytes), f"error reply: {reply}"
    return unpack(reply)


def assert_good_request_answered(conn: ClientConnection, seed: int = 3) -> None:
    theirs, ours = openpi_obs(seed)
    np.testing.assert_allclose(infer(conn, theirs)["actions"], expected_debug_actions(ours), atol=1e-6)


def test_metadata_on_connect(server: ServerProcess) -> None:
    with ws_connect(server) as (conn, meta):
        assert meta["policy"] == "debug" and meta["action_horizon"] == 8 and meta["action_dim"] == 7


def test_infer_with_openpi_libero_keys(server: ServerProcess) -> None:
    with ws_connect(server) as (conn, _):
        for seed in range(3):
            theirs, ours = openpi_obs(seed)
            reply = infer(conn, theirs)
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (8, 7)
            np.testing.assert_allclose(reply["actions"], expected_debug_actions(ours), atol=1e-6)
            assert set(reply["server_timing"]) >= {"infer_ms", "queue_ms", "server_ms", "batch_size"}


def test_numpy_scalar_and_our_own_keys_accepted(server: ServerProcess) -> None:
    _, ours = openpi_obs(4)
    with ws_connect(server) as (conn, _):
        reply = infer(conn, {**ours, "step": np.int64(3)})
    np.testing.assert_allclose(reply["actions"], expected_debug_actions(ours), atol=1e-6)


def test_healthz(server: ServerProcess) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ws_port}/healthz", timeout=10) as resp:
        assert resp.status == 200 and resp.read().decode().strip() == "ready"


def _array_map(data: bytes, dtype: str, shape: list[int]) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


_, _OURS = openpi_obs(0)
MALFORMED = {
    "text frame": ("text", "bad_request"),
    "bad msgpack": (b"\xc1\x00\xff", "bad_request"),
    "truncated msgpack": (pack(openpi_obs(0)[0])[:-100], "bad_request"),
    "not a map": (pack([1, 2, 3]), "bad_request"),
    "oversized": (pack({"prompt": "x", "blob": b"\x00" * (MAX_MESSAGE_BYTES + 10)}), "too_large"),
    "object dtype": (pack({"observation/state": _array_map(b"\x00" * 8, "|O", [1])}), "bad_request"),
    "void dtype": (pack({"observation/state": _array_map(b"\x00" * 8, "|V8", [1])}), "bad_request"),
    "huge shape claim": (pack({"observation/image": _array_map(b"\x00" * 12, "|u1", [1 << 40, 1 << 40, 3])}),
                         "too_large"),
    "shape/bytes mismatch": (pack({"observation/state": _array_map(b"\x00" * 12, "<f4", [8])}), "bad_request"),
    "negative shape": (pack({"observation/state": _array_map(b"", "<f4", [-1])}), "bad_request"),
    "ndarray map missing data": (pack({"observation/state": {b"__ndarray__": True, b"dtype": "<f4"}}),
                                 "bad_request"),
    "state as a string": (pack({**openpi_obs(0)[0], "observation/state": "nope"}), "bad_request"),
    "image as float": (pack({**openpi_obs(0)[0], "observation/image": np.zeros((8, 8, 3), np.float32)}),
                       "bad_request"),
    "image too many pixels": (pack({"observation/image": np.zeros((1, MAX_IMAGE_PIXELS + 1, 3), np.uint8)}),
                              "too_large"),
    "nested map value": (pack({"observation": {"image": 1}}), "bad_request"),
    "non-string key": (pack({1: 2}), "bad_request"),
    "key given twice": (pack({"state": _OURS["state"], "observation/state": _OURS["state"]}), "bad_request"),
    "NaN state": (pack({**openpi_obs(0)[0], "observation/state": np.full(8, np.nan, np.float32)}), "bad_request"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frame_gets_error_and_server_keeps_serving(server: ServerProcess, name: str) -> None:
    frame, code = MALFORMED[name]
    with ws_connect(server) as (conn, _), ws_connect(server) as (other, _):
        conn.send(frame)
        reply = conn.recv(timeout=10)
        assert isinstance(reply, str), "an error is a text frame (openpi's client raises it)"
        assert reply.startswith(f"{code}: "), reply
        assert_good_request_answered(conn)  # the same connection goes on
        assert_good_request_answered(other)  # and so do the others


def test_frame_over_the_hard_cap_closes_only_that_connection(server: ServerProcess) -> None:
    # The server refuses the frame from its header (close 1009) while the client is still sending it, so the
    # client may see the close in send, in recv or when it closes: any of them must end this connection only.
    with pytest.raises((ConnectionClosed, ConnectionError)):  # not TimeoutError: the server must close it
        with ws_connect(server) as (conn, _):
            conn.send(b"\x00" * (3 * MAX_MESSAGE_BYTES))
            conn.recv(timeout=10)
    with ws_connect(server) as (later, _):
        assert_good_request_answered(later)
    with PolicyClient(port=server.port, timeout_s=10) as client:
        assert client.ping()


def test_unknown_http_path_is_not_health(server: ServerProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{server.ws_port}/other", timeout=10)
    assert exc.value.code in (400, 426)  # websockets refuses a plain HTTP request to a websocket path


def test_zmq_and_websocket_requests_share_the_batcher(server: ServerProcess) -> None:
    """One websocket and one ZeroMQ client under load: a websocket reply from a batch of 2 held both."""
    n = 40
    ws_batches: list[int] = []
    failures: list[str] = []

    def ws_worker() -> None:
        with ws_connect(server) as (conn, _):
            for i in range(n):
                theirs, ours = openpi_obs(100 + i)
                reply = infer(conn, theirs)
                if not np.allclose(reply["actions"], expected_debug_actions(ours), atol=1e-6):
                    failures.append(f"ws request {i} mismatched")
                ws_batches.append(int(reply["server_timing"]["batch_size"]))

    def zmq_worker() -> None:
        with PolicyClient(port=server.port, timeout_s=20) as client:
            for i in range(n):
                obs = make_obs(200 + i)
                if not np.allclose(client.infer(obs), expected_debug_actions(obs), atol=1e-6):
                    failures.append(f"zmq request {i} mismatched")

    threads = [threading.Thread(target=ws_worker), threading.Thread(target=zmq_worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert failures == [] and len(ws_batches) == n
    assert max(ws_batches) == 2  # the only other client is the ZeroMQ one
    with PolicyClient(port=server.port, timeout_s=10) as client:
        stats = client.stats()
    assert stats["requests"]["ws_infer"] >= n and stats["requests"]["infer"] >= n


def test_fragmented_message_and_ping(server: ServerProcess) -> None:
    theirs, ours = openpi_obs(9)
    payload = pack(theirs)
    with ws_connect(server) as (conn, _):
        assert conn.ping().wait(timeout=10)  # answered with a pong
        conn.send([payload[:1000], payload[1000:200000], payload[200000:]])  # one message in three frames
        reply = conn.recv(timeout=10)
    assert isinstance(reply, bytes)
    np.testing.assert_allclose(unpack(reply)["actions"], expected_debug_actions(ours), atol=1e-6)


def _raw_handshake(port: int) -> tuple[socket.socket, bytes]:
    """A websocket handshake by hand; returns the socket and what came after the 101 response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101")
    return sock, head.split(b"\r\n\r\n", 1)[1]


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames: [(first header byte, payload)]."""
    out = []
    while data:
        n, head = data[1] & 0x7F, 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[2:10], "big"), 10
        out.append((data[0], data[head:head + n]))
        data = data[head + n:]
    return out


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("garbage", [
    b"\x82\x05hello",  # an unmasked frame: clients must mask (RFC 6455 5.1)
    b"\xf2\x80\x00\x00\x00\x00",  # reserved bits set
    b"\x83\x80\x00\x00\x00\x00",  # unknown opcode
    b"\x89\xfe\x01\x00" + b"\x00" * 260,  # a ping longer than 125 bytes
    b"\x80\x80\x00\x00\x00\x00",  # a continuation with no message
    b"\x82\xff" + b"\x7f" * 8 + b"\x00" * 4,  # a frame declaring 9 EB: refused from its header
])
def test_protocol_violations_close_only_that_connection(server: ServerProcess, garbage: bytes) -> None:
    sock, data = _raw_handshake(server.ws_port)
    with sock:
        sock.sendall(garbage)
        data += _recv_all(sock)
    opcodes = [b0 & 0x0F for b0, _ in _frames(data)]
    assert opcodes == [0x2, 0x8]  # the metadata, then a close frame; then the server closed the socket
    with ws_connect(server) as (conn, _):
        assert_good_request_answered(conn)


def test_random_bytes_after_handshake_never_hurt_the_server(server: ServerProcess) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        sock, _ = _raw_handshake(server.ws_port)
        with sock:
            sock.sendall(rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes())
            sock.shutdown(socket.SHUT_WR)
            _recv_all(sock)
    with ws_connect(server) as (conn, _):
        assert_good_request_answered(conn)


def test_metadata_waits_until_the_policy_is_loaded() -> None:
    """A client that connects while the model loads gets its metadata once it is ready; /healthz says so."""
    from server.app import PolicyServer
    from server.config import ServerConfig
    from server.policies.debug import DebugPolicy

    release = threading.Event()

    def slow_factory() -> DebugPolicy:
        release.wait(30)
        return DebugPolicy()

    ws_port = free_port()
    policy_server = PolicyServer(ServerConfig(port=free_port(), ws_port=ws_port, policy="debug"),
                                 policy_factory=slow_factory)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(policy_server.serve(),), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{ws_port}/healthz"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                raise AssertionError("healthy while loading")
            except urllib.error.HTTPError as exc:
                assert exc.code == 503 and exc.read().decode().strip() == "loading"
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "the websocket port never opened"
                time.sleep(0.05)
        with connect(f"ws://127.0.0.1:{ws_port}", compression=None, max_size=None, open_timeout=10) as conn:
            with pytest.raises(TimeoutError):
                conn.recv(timeout=0.3)  # no metadata while loading
            release.set()
            meta = unpack(conn.recv(timeout=10))
            assert meta["status"] == "ready" and meta["policy"] == "debug"
            theirs, ours = openpi_obs(5)
            conn.send(pack(theirs))
            np.testing.assert_allclose(unpack(conn.recv(timeout=10))["actions"], expected_debug_actions(ours),
                                       atol=1e-6)
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200 and resp.read().decode().strip() == "ready"
    finally:
        release.set()
        loop.call_soon_threadsafe(policy_server.request_stop)
        thread.join(timeout=30)
        loop.close()
    assert not thread.is_alive()


# -- in-process checks of the frame parser's resource bounds (a fake server, a real asyncio loop) ----------

class _FakeServer:
    """Just what the websocket front end reads from a PolicyServer (readiness, metadata, limits, stats)."""

    def __init__(self) -> None:
        import collections
        import types

        from client import wire

        self.config = types.SimpleNamespace(policy="debug")
        self.limits = wire.WireLimits(max_message_bytes=MAX_MESSAGE_BYTES, max_array_bytes=MAX_MESSAGE_BYTES,
                                      max_image_pixels=MAX_IMAGE_PIXELS)
        self.stats = types.SimpleNamespace(requests=collections.Counter(), errors=collections.Counter())

    def readiness(self) -> str:
        return "ready"

    def metadata(self) -> dict:
        return {"policy": "debug"}


def _masked(opcode: int, payload: bytes, fin: bool = True, declared: int | None = None) -> bytes:
    """One client frame (masked with a zero key, so the payload bytes go as they are)."""
    n = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


async def _frontend_connection(max_frame_bytes: int):
    """A started front end, a raw client (reader, writer) past the handshake, and the server-side connection."""
    from server.websocket_frontend import WebsocketFrontend

    frontend = WebsocketFrontend(_FakeServer(), "127.0.0.1", 0, max_frame_bytes=max_frame_bytes)
    await frontend.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a peer that reads nothing fills up fast
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", frontend.bound_port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    for _ in range(100):
        if any(c.open for c in frontend.connections):
            break
        await asyncio.sleep(0.01)
    (conn,) = frontend.connections
    return frontend, reader, writer, conn


async def _shutdown(frontend, writer) -> None:
    writer.transport.abort()
    frontend.stop_accepting()
    for conn in list(frontend.connections):
        conn.abort()
    await asyncio.sleep(0)


def test_declared_frame_length_is_not_allocated_up_front() -> None:
    """A 14-byte header declaring a frame just under the limit must not make the server allocate that much."""
    async def main() -> int:
        frontend, _, writer, conn = await _frontend_connection(max_frame_bytes=256 * 1024 * 1024)
        try:
            writer.write(_masked(0x2, b"", declared=200 * 1024 * 1024)[:14])
            await writer.drain()
            await asyncio.sleep(0.2)
            return len(conn.buf)
        finally:
            await _shutdown(frontend, writer)

    assert asyncio.run(main()) < 4 * 1024 * 1024


def test_many_tiny_fragments_are_not_buffered_as_objects() -> None:
    """Fragments within the size limit cost their bytes, not a Python object each (7 wire bytes -> ~40 B)."""
    import tracemalloc

    async def main() -> int:
        frontend, _, writer, conn = await _frontend_connection(max_frame_bytes=1024 * 1024)
        try:
            writer.write(_masked(0x2, b"x", fin=False))
            n = 50_000
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            writer.write(_masked(0x0, b"x", fin=False) * n)
            await writer.drain()
            for _ in range(200):
                if conn.message_bytes > n:
                    break
                await asyncio.sleep(0.01)
            assert conn.message_bytes == n + 1
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            return grown
        finally:
            await _shutdown(frontend, writer)

    assert asyncio.run(main()) < 10 * 50_000


def test_peer_that_never_reads_is_not_buffered_without_bound() -> None:
    """A ping flood from a peer that reads no pongs: the server stops reading instead of queueing pongs."""
    async def main() -> int:
        frontend, _, writer, conn = await _frontend_connection(max_frame_bytes=1024 * 1024)
        try:
            ping = _masked(0x9, b"p" * 125) * 1000  # 131 kB of pings, 127 kB of pongs
            for _ in range(200):  # up to 26 MB, until the server stops taking them
                writer.write(ping)
                try:
                    await asyncio.wait_for(writer.drain(), 0.2)
                except TimeoutError:
                    break
            await asyncio.sleep(0.1)
            return conn.transport.get_write_buffer_size()
        finally:
            await _shutdown(frontend, writer)

    assert asyncio.run(main()) < 2 * 1024 * 1024


@pytest.mark.parametrize(("close_payload", "expected"), [
    (b"", b""),  # no status: answered with none
    ((1000).to_bytes(2, "big") + b"bye", (1000).to_bytes(2, "big")),  # a valid code is echoed
    ((4001).to_bytes(2, "big"), (4001).to_bytes(2, "big")),  # an application code too
    (b"\x03", (1002).to_bytes(2, "big")),  # a 1-byte close payload is a protocol error (RFC 6455 5.5.1)
    ((1005).to_bytes(2, "big"), (1002).to_bytes(2, "big")),  # 1005/1006/1015 never go on the wire (7.4.1)
    ((999).to_bytes(2, "big"), (1002).to_bytes(2, "big")),  # not a close code (7.4.2)
    ((1000).to_bytes(2, "big") + b"\xff\xfe", (1002).to_bytes(2, "big")),  # a reason that is not UTF-8
])
def test_close_handshake_validates_the_peers_close_frame(server: ServerProcess, close_payload: bytes,
                                                          expected: bytes) -> None:
    sock, data = _raw_handshake(server.ws_port)
    with sock:
        sock.sendall(_masked(0x8, close_payload))
        data += _recv_all(sock)
    frames = _frames(data)
    assert [b0 & 0x0F for b0, _ in frames] == [0x2, 0x8]
    assert frames[1][1][:2] == expected


def test_text_frame_that_is_not_utf8_closes_with_1007(server: ServerProcess) -> None:
    """RFC 6455 8.1: a text message that is not valid UTF-8 fails the connection (1007), others go on."""
    sock, data = _raw_handshake(server.ws_port)
    with sock:
        sock.sendall(_masked(0x1, b"caf\xc3"))
        data += _recv_all(sock)
    frames = _frames(data)
    assert [b0 & 0x0F for b0, _ in frames] == [0x2, 0x8]
    assert frames[1][1][:2] == (1007).to_bytes(2, "big")
    with ws_connect(server) as (conn, _):
        assert_good_request_answered(conn)


def test_many_waiting_requests_answered_at_once_do_not_recurse() -> None:
    """Requests queued behind one in flight and refused synchronously must not nest a call each (RecursionError
    in the batcher's completion callback would cost other clients their replies)."""
    stashed: list = []

    class Refusing(_FakeServer):
        def submit_observation(self, obs, client_key, respond) -> None:
            if not stashed:
                stashed.append(respond)  # the first request stays in flight
            else:
                respond(None, "bad_request", "refused at once")

    async def main() -> tuple[int, int]:
        from server.websocket_frontend import WebsocketFrontend

        frontend = WebsocketFrontend(Refusing(), "127.0.0.1", 0, max_frame_bytes=1024 * 1024)
        await frontend.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", frontend.bound_port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        await reader.readuntil(b"\r\n\r\n")
        try:
            n = 4000
            writer.write(_masked(0x2, b"\x80") * (n + 1))  # n + 1 empty maps, in one write
            await writer.drain()
            (conn,) = frontend.connections
            for _ in range(200):
                if len(conn.pending) >= n:
                    break
                await asyncio.sleep(0.01)
            assert len(conn.pending) >= n and stashed
            stashed[0](None, "internal", "the first one failed")  # as the batcher would, on the loop
            return len(conn.pending), frontend.server.stats.errors["bad_request"]
        finally:
            await _shutdown(frontend, writer)

    left, refused = asyncio.run(main())
    assert left == 0 and refused >= 4000
