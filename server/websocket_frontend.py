"""openpi's websocket protocol, served by the same process and batcher as the ZeroMQ endpoint.

Why: users of openpi's ``openpi-client`` (``WebsocketClientPolicy``) connect unchanged with ``--ws-port``.
This module is the one owner of that protocol (docs/openpi_protocol.md):

- on connect the server sends its metadata, once the policy is ready (a client connecting while the model
  loads simply waits, as ``WebsocketClientPolicy`` does for its first message); a failed load is answered
  with an error text frame and a close,
- every binary frame is one observation packed with openpi's msgpack-numpy convention (arrays are maps
  ``{b"__ndarray__": True, b"data": bytes, b"dtype": str, b"shape": [...]}``, numpy scalars
  ``{b"__npgeneric__": True, b"data": x, b"dtype": str}``); openpi's LIBERO keys are renamed to ours,
- the reply is ``{"actions": float32 [H, D], "server_timing": {...}}`` in the same convention,
- an unusable request is answered with a text frame ``"<code>: <message>"`` (openpi's client raises it as
  ``RuntimeError``); unlike openpi's server, which closes after its traceback, the connection stays open,
  because every request stands alone and a client may go on after one bad observation,
- ``GET /healthz`` answers 200 ``ready`` or 503 with the readiness state.

The decoder checks the message size before it parses and every array's dtype (an allow-list looked up by
exact string, never ``np.dtype`` on client text), shape and byte count before it makes a zero-copy view; it
never unpickles. Image sizes and finiteness are then checked by :func:`client.wire.validate_observation`
with the server's :class:`~client.wire.WireLimits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import socket
import struct
from collections import deque
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Protocol

import msgpack
import numpy as np
from websockets.http11 import Request
from websockets.server import ServerProtocol

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

from client import wire
from server.policies.base import PolicyOutput


class ServerCore(Protocol):
    """What the front end needs from :class:`server.app.PolicyServer` (a protocol, so this module does not import
    the app that starts it)."""

    config: Any
    stats: Any
    limits: wire.WireLimits

    def readiness(self) -> str: ...
    def metadata(self) -> dict[str, Any]: ...
    def submit_observation(self, obs: dict[str, Any], client_key: bytes | str,
                           respond: Callable[[PolicyOutput | None, str | None, str | None], None]) -> None: ...

logger = logging.getLogger(__name__)

#: openpi's LIBERO example keys -> this server's observation keys. Every registered policy (debug, openvla,
#: openvla-rsd, gr00t) takes the LIBERO observation under our names, so one table serves them all; keys not
#: listed (e.g. GR00T-style ``video.*``) pass through unchanged for the policy to check.
OPENPI_LIBERO_KEYS: dict[str, str] = {
    "observation/image": "image",
    "observation/wrist_image": "wrist_image",
    "observation/state": "state",
    "prompt": "instruction",
}
KEY_MAPS: dict[str, Mapping[str, str]] = {}  # per-policy overrides of OPENPI_LIBERO_KEYS, by policy name

HEALTH_PATH = "/healthz"
READY = "ready"
FAILED = "failed"
READINESS_POLL_S = 0.05
CLOSE_TIMEOUT_S = 2.0
MAX_PENDING_FRAMES = 8
INITIAL_BUFFER_BYTES = 64 * 1024  # grown to the largest message a connection sends
HANDSHAKE_TIMEOUT_S = 10.0  # a peer that never completes the HTTP upgrade is dropped
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, CLOSE_INTERNAL_ERROR = 1001, 1002, 1009, 1011
CLOSE_INVALID_DATA = 1007  # a text message that is not UTF-8 (RFC 6455 8.1)
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_MAX_NDIM = 8

# dtype allow-list by the exact ``dtype.str`` openpi's packer writes (either byte order): no object, void,
# string or complex dtypes, and no dtype text from the client ever reaches ``np.dtype``.
_ALLOWED_DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                   "float16", "float32", "float64")
_DTYPES: dict[str, np.dtype] = {
    dt.str: dt for name in _ALLOWED_DTYPES
    for dt in (np.dtype(name).newbyteorder("<"), np.dtype(name).newbyteorder(">"))
}


def _valid_close(payload: bytes) -> bool:
    """Whether a peer's close payload is empty or a sendable code plus a UTF-8 reason (RFC 6455 5.5.1, 7.4)."""
    if not payload:
        return True
    if len(payload) < 2:
        return False
    code = _U16.unpack_from(payload)[0]
    if not (1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999):
        return False
    try:
        bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Refused(Exception):
    """Raised inside the msgpack object hook; carries the wire error out of msgpack unchanged."""

    def __init__(self, error: wire.WireError) -> None:
        super().__init__(error.message)
        self.error = error


# -- codec ----------------------------------------------------------------------------------------

def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.str not in _DTYPES:
            raise TypeError(f"dtype {obj.dtype} cannot be sent")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.str not in _DTYPES:
            raise TypeError(f"dtype {obj.dtype} cannot be sent")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def packb(message: Any) -> bytes:
    """Serialise ``message`` with openpi's msgpack-numpy convention (what ``openpi_client.msgpack_numpy`` reads)."""
    return msgpack.packb(message, default=_pack_default, use_bin_type=True)


def _decode_array(obj: dict[Any, Any], limits: wire.WireLimits) -> np.ndarray:
    data, dtype_str, shape = obj.get(b"data"), obj.get(b"dtype"), obj.get(b"shape")
    if not isinstance(data, bytes) or not isinstance(dtype_str, str) or not isinstance(shape, list):
        raise wire.WireError(wire.ERR_BAD_REQUEST, "an __ndarray__ map needs bytes 'data', str 'dtype', list 'shape'")
    dtype = _DTYPES.get(dtype_str)
    if dtype is None:
        raise wire.WireError(wire.ERR_BAD_REQUEST,
                             f"array dtype {dtype_str[:16]!r} is not allowed (allowed: {', '.join(_ALLOWED_DTYPES)})")
    if len(shape) > _MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
        raise wire.WireError(wire.ERR_BAD_REQUEST, f"array shape must be at most {_MAX_NDIM} non-negative ints")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a huge claim cannot overflow
    if nbytes > limits.max_array_bytes:
        raise wire.WireError(wire.ERR_TOO_LARGE,
                             f"array of shape {tuple(shape)} ({nbytes} bytes) exceeds {limits.max_array_bytes}")
    if nbytes != len(data):
        raise wire.WireError(wire.ERR_BAD_REQUEST,
                             f"array declares shape {tuple(shape)} {dtype.name} but carries {len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)  # zero-copy, read-only view of the frame
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def _decode_generic(obj: dict[Any, Any]) -> np.generic:
    data, dtype_str = obj.get(b"data"), obj.get(b"dtype")
    dtype = _DTYPES.get(dtype_str) if isinstance(dtype_str, str) else None
    if dtype is None or type(data) not in (bool, int, float):
        raise wire.WireError(wire.ERR_BAD_REQUEST, "an __npgeneric__ map needs a number 'data' and an allowed 'dtype'")
    try:
        return dtype.newbyteorder("=").type(data)
    except (OverflowError, ValueError, TypeError):
        raise wire.WireError(wire.ERR_BAD_REQUEST, f"{data!r} does not fit {dtype.name}") from None


def unpackb(payload: bytes, limits: wire.WireLimits = wire.DEFAULT_LIMITS) -> Any:
    """Decode one openpi msgpack-numpy message within ``limits``; raises only :class:`client.wire.WireError`."""
    if len(payload) > limits.max_message_bytes:
        raise wire.WireError(wire.ERR_TOO_LARGE, f"message of {len(payload)} bytes exceeds {limits.max_message_bytes}")

    def object_hook(obj: dict[Any, Any]) -> Any:
        try:
            if b"__ndarray__" in obj:
                return _decode_array(obj, limits)
            if b"__npgeneric__" in obj:
                return _decode_generic(obj)
        except wire.WireError as exc:
            raise _Refused(exc) from None
        return obj

    try:
        return msgpack.unpackb(
            payload, object_hook=object_hook, raw=False, strict_map_key=True,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_array_bytes,
            max_array_len=limits.max_container_len, max_map_len=limits.max_container_len, max_ext_len=0,
        )
    except _Refused as exc:
        raise exc.error from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types on hostile input; all are bad requests
        raise wire.WireError(wire.ERR_BAD_REQUEST, f"undecodable message: {type(exc).__name__}") from None


def to_observation(message: Any, limits: wire.WireLimits, key_map: Mapping[str, str] = OPENPI_LIBERO_KEYS
                   ) -> dict[str, Any]:
    """An openpi observation dict -> this server's observation (keys renamed, generic checks applied)."""
    if not isinstance(message, dict):
        raise wire.WireError(wire.ERR_BAD_REQUEST, "an observation must be a msgpack map")
    obs: dict[str, Any] = {}
    for key, value in message.items():
        if not isinstance(key, str):
            raise wire.WireError(wire.ERR_BAD_REQUEST, "observation keys must be strings")
        ours = key_map.get(key, key)
        if ours in obs:
            raise wire.WireError(wire.ERR_BAD_REQUEST, f"observation key {ours!r} is given twice (as {key!r})")
        obs[ours] = value
    return wire.validate_observation(obs, limits)


# -- server ---------------------------------------------------------------------------------------

class WebsocketFrontend:
    """Listens on ``host:port`` and feeds observations to :meth:`PolicyServer.submit_observation`.

    Driven by plain asyncio protocol callbacks, the way the ZeroMQ side is driven by reader callbacks: a
    message is decoded and submitted when its last byte is read and the reply is written from the batcher's
    completion callback, with no task, future or message queue per request. Why not websockets' asyncio
    server: its per-message tasks, queues and three copies of each frame cost more than our whole server
    (loopback p50 with a 400 kB observation: 1.7 ms against 0.6 ms for openpi's threaded baseline echo, where
    this front end measures 0.4-0.6 ms; benchmarks/bench_wire.py).
    """

    def __init__(self, server: ServerCore, host: str, port: int, max_frame_bytes: int) -> None:
        self.server = server
        self._host = host
        self._port = port
        self.max_frame_bytes = max_frame_bytes  # a message over this closes its connection with 1009
        self.key_map = KEY_MAPS.get(server.config.policy, OPENPI_LIBERO_KEYS)
        self._listener: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self.connections: set[_Connection] = set()
        self.bound_port: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(lambda: _Connection(self, f"ws-{next(self._ids)}"),
                                                  self._host, self._port, reuse_address=True)
        self.bound_port = self._listener.sockets[0].getsockname()[1] if self._listener.sockets else self._port
        logger.info("serving openpi's websocket protocol on ws://%s:%d", self._host, self.bound_port)

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections keep being answered (graceful stop)."""
        if self._listener is not None:
            self._listener.close()

    async def close(self) -> None:
        """Close every connection (close code 1001) and wait briefly for the peers' acknowledgements."""
        for conn in list(self.connections):
            conn.close(CLOSE_GOING_AWAY, "server shutting down")
        deadline = asyncio.get_running_loop().time() + CLOSE_TIMEOUT_S
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        if self._listener is not None:
            await self._listener.wait_closed()

    def health(self) -> tuple[HTTPStatus, str]:
        state = self.server.readiness()
        return (HTTPStatus.OK, f"{READY}\n") if state == READY else (HTTPStatus.SERVICE_UNAVAILABLE, f"{state}\n")


class _Connection(asyncio.BufferedProtocol):
    """One websocket peer: handshake, metadata once ready, then one request in flight at a time.

    The HTTP handshake goes through websockets' sans-I/O :class:`~websockets.server.ServerProtocol`; after it,
    frames (RFC 6455, no extensions) are parsed here straight from the buffer the event loop reads into, so a
    400 kB observation is copied once (unmasking) instead of three times, and a frame that declares more than
    the size limit is refused from its header, before its payload is buffered.
    """

    def __init__(self, frontend: WebsocketFrontend, key: str) -> None:
        self.frontend = frontend
        self.key = key
        self.handshake: ServerProtocol | None = ServerProtocol(max_size=frontend.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(INITIAL_BUFFER_BYTES)
        self.filled = 0
        self.open = False  # handshake done and metadata sent: requests are served
        self.closing = False
        self.busy = False  # a request is in the batcher; later messages wait in ``pending``
        self.paused = False
        self.serving = False  # inside _next (answers given synchronously do not recurse)
        self.write_paused = False  # the peer reads too slowly: stop reading until the transport drains
        self.pending: deque[str | bytes] = deque()
        self.fragments: list[bytes | bytearray] = []
        self.fragment_opcode: int | None = None
        self.message_bytes = 0

    # -- transport callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] - uvloop's transports do not subclass asyncio's
        self.frontend.connections.add(self)
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._handshake_expired)

    def _handshake_expired(self) -> None:
        if self.handshake is not None:
            logger.warning("websocket peer %s sent no complete handshake in %.0f s; dropped", self.key,
                           HANDSHAKE_TIMEOUT_S)
            self.abort()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.filled == len(self.buf):  # only while a header is incomplete; frames grow the buffer first
            self._grow(len(self.buf) * 2)
        return memoryview(self.buf)[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self.handshake is not None:
                self._handshake_data(bytes(self.buf[:nbytes]))
            else:
                self.filled += nbytes
                self._parse_frames()
        except Exception:  # never let one connection's trouble reach the server loop
            logger.exception("websocket connection %s failed", self.key)
            self.abort()

    def pause_writing(self) -> None:
        """The transport's write buffer is over its high-water mark (a peer that does not read its pongs or
        replies): read nothing more until it drains, instead of buffering what the peer's frames cause."""
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.paused:
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if self.handshake is not None:
            self.handshake.receive_eof()
            self._flush_handshake()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.open = False
        self.pending.clear()
        self.frontend.connections.discard(self)

    # -- handshake (websockets' sans-I/O protocol) ------------------------------------------------
    def _handshake_data(self, data: bytes) -> None:
        proto = self.handshake
        assert proto is not None
        proto.receive_data(data)
        for event in proto.events_received():
            if not isinstance(event, Request):
                continue
            if event.path.split("?", 1)[0] == HEALTH_PATH:
                status, text = self.frontend.health()
                proto.send_response(proto.reject(status, text))
            else:
                response = proto.accept(event)
                proto.send_response(response)
                if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS:
                    self._flush_handshake()
                    # Frames from here on are parsed below; bytes that came with the request are kept.
                    leftover = bytes(proto.reader.buffer)
                    self.handshake = None
                    self.buf[:len(leftover)] = leftover
                    self.filled = len(leftover)
                    self._send_metadata_when_ready()
                    self._parse_frames()
                    return
        self._flush_handshake()

    def _flush_handshake(self) -> None:
        proto = self.handshake
        if proto is None:
            return
        for data in proto.data_to_send():
            if self.transport is None:
                return
            if data:
                self.transport.write(data)
            else:  # SEND_EOF: a refused handshake or an answered health check
                self.transport.close()
                return

    def _send_metadata_when_ready(self) -> None:
        if self.transport is None or self.closing:
            return
        state = self.frontend.server.readiness()
        if state == FAILED:
            self._send(OP_TEXT, f"{wire.ERR_INTERNAL}: the policy failed to load (see server log)".encode())
            self.close(CLOSE_INTERNAL_ERROR, "policy failed to load")
        elif state != READY:  # a client connecting while the model loads waits for its metadata
            asyncio.get_running_loop().call_later(READINESS_POLL_S, self._send_metadata_when_ready)
        else:
            self._send(OP_BINARY, packb(self.frontend.server.metadata()))
            self.open = True
            self._next()

    # -- frames (RFC 6455 section 5) ---------------------------------------------------------------
    def _grow(self, size: int) -> None:
        bigger = bytearray(size)
        bigger[:self.filled] = self.buf[:self.filled]
        self.buf = bigger

    def _parse_frames(self) -> None:
        buf = self.buf
        while not self.closing and self.transport is not None:
            filled = self.filled
            if filled < 2:
                return
            b0, b1 = buf[0], buf[1]
            fin, opcode, length, header = b0 & 0x80, b0 & 0x0F, b1 & 0x7F, 2
            if length == 126:
                if filled < 4:
                    return
                length, header = _U16.unpack_from(buf, 2)[0], 4
            elif length == 127:
                if filled < 10:
                    return
                length, header = _U64.unpack_from(buf, 2)[0], 10
            if b0 & 0x70 or not b1 & 0x80 or opcode not in _OPCODES:  # RSV bits, unmasked or unknown
                self.close(CLOSE_PROTOCOL_ERROR, "protocol error: reserved bits, unmasked frame or unknown opcode")
                return
            if opcode >= OP_CLOSE and (length > 125 or not fin):
                self.close(CLOSE_PROTOCOL_ERROR, "protocol error: bad control frame")
                return
            if opcode < OP_CLOSE and self.message_bytes + length > self.frontend.max_frame_bytes:
                self.close(CLOSE_TOO_BIG, f"message over {self.frontend.max_frame_bytes} bytes")
                return
            total = header + 4 + length
            if filled < total:
                if len(buf) < total and filled == len(buf):  # grow with the bytes received, never to a claim
                    self._grow(min(total, 2 * len(buf)))
                    buf = self.buf
                return
            mask = bytes(buf[header:header + 4])
            payload = apply_mask(memoryview(buf)[header + 4:total], mask)
            rest = filled - total
            if rest:
                buf[:rest] = buf[total:filled]
            self.filled = rest
            self._frame(opcode, bool(fin), payload)
            buf = self.buf

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode == OP_PING:
            self._send(OP_PONG, payload)
            return
        if opcode == OP_PONG:
            return
        if opcode == OP_CLOSE:
            # Echo the peer's code, as the closing handshake asks; a malformed close frame is a protocol error.
            self._send(OP_CLOSE, payload[:2] if _valid_close(payload) else _U16.pack(CLOSE_PROTOCOL_ERROR))
            self.closing = True
            if self.transport is not None:
                self.transport.close()
            return
        if opcode == OP_CONT:
            if self.fragment_opcode is None:
                self.close(CLOSE_PROTOCOL_ERROR, "protocol error: continuation without a message")
                return
            if isinstance(self.fragments[0], bytes):  # one growing buffer, not an object per fragment
                self.fragments[0] = bytearray(self.fragments[0])
            self.fragments[0] += payload
        elif self.fragment_opcode is not None:
            self.close(CLOSE_PROTOCOL_ERROR, "protocol error: new message inside a fragmented one")
            return
        else:
            self.fragment_opcode, self.fragments = opcode, [payload]
        self.message_bytes += len(payload)
        if not fin:
            return
        data = self.fragments[0] if len(self.fragments) == 1 else b"".join(self.fragments)
        text = self.fragment_opcode == OP_TEXT
        self.fragments, self.fragment_opcode, self.message_bytes = [], None, 0
        if text:
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                self.close(CLOSE_INVALID_DATA, "text frame is not valid UTF-8")
                return
        self.pending.append(data)
        if len(self.pending) >= MAX_PENDING_FRAMES and not self.paused and self.transport is not None:
            self.transport.pause_reading()  # a client that does not wait for replies is slowed down, not buffered
            self.paused = True
        self._next()

    # -- requests ---------------------------------------------------------------------------------
    def _next(self) -> None:
        """Serve the oldest waiting message unless a request is in flight (replies stay in request order).

        Not re-entered: a request answered synchronously (refused by the policy, queue full) returns to the loop
        below instead of nesting one call per waiting message.
        """
        if self.serving:
            return
        self.serving = True
        try:
            self._serve_pending()
        finally:
            self.serving = False

    def _serve_pending(self) -> None:
        while self.open and not self.busy and self.pending and self.transport is not None:
            message = self.pending.popleft()
            if self.paused and len(self.pending) < MAX_PENDING_FRAMES // 2:
                if not self.write_paused:
                    self.transport.resume_reading()
                self.paused = False
            self.frontend.server.stats.requests["ws_infer"] += 1
            self._serve(message)

    def _serve(self, message: str | bytes) -> None:
        server = self.frontend.server
        limits = server.limits
        try:
            if isinstance(message, str):
                raise wire.WireError(wire.ERR_BAD_REQUEST, "expected a binary msgpack frame, got a text frame")
            obs = to_observation(unpackb(message, limits), limits, self.frontend.key_map)
        except wire.WireError as exc:
            self._error(exc.code, exc.message)
            return
        self.busy = True
        server.submit_observation(obs, self.key, self._respond)

    def _respond(self, out: PolicyOutput | None, code: str | None, text: str | None) -> None:
        """Batcher completion (event loop): write the reply, then serve the next waiting message."""
        self.busy = False
        if out is None:
            self._error(code or wire.ERR_INTERNAL, text or "")
        else:
            reply = {k: v for k, v in out.info.items() if k not in ("actions", "server_timing")}
            reply["actions"] = out.actions
            reply["server_timing"] = dict(getattr(out, "timing", {}))
            try:
                payload = packb(reply)
            except TypeError:
                logger.exception("could not encode a websocket reply")
                self._error(wire.ERR_INTERNAL, "reply not encodable")
            else:
                self._send(OP_BINARY, payload)
        self._next()

    def _error(self, code: str, message: str) -> None:
        self.frontend.server.stats.errors[code] += 1
        logger.warning("websocket request from %s: %s: %s", self.key, code, message)
        self._send(OP_TEXT, f"{code}: {message}".encode())

    # -- output -----------------------------------------------------------------------------------
    def _send(self, opcode: int, payload: bytes) -> None:
        """One unmasked, unfragmented frame (servers never mask, RFC 6455 section 5.1)."""
        if self.transport is None or self.closing:
            return
        n = len(payload)
        if n < 126:
            header = bytes((0x80 | opcode, n))
        elif n < 65536:
            header = bytes((0x80 | opcode, 126)) + _U16.pack(n)
        else:
            header = bytes((0x80 | opcode, 127)) + _U64.pack(n)
        self.transport.write(header + payload)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame and close the TCP connection once it is written."""
        if self.transport is None or self.closing:
            return
        self._send(OP_CLOSE, _U16.pack(code) + reason.encode()[:123])
        self.closing = True
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
