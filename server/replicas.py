"""Replicas behind one address: a front process that owns the client-facing ROUTER and forwards to replica servers.

``--replicas N`` starts N ordinary ``python -m server`` processes on loopback ports (replica k on ``cuda:k`` with
``--device cuda``; on CPU each with its own ``--torch-threads``) and serves them on ``--port``;
``--replica-endpoints tcp://host:port,...`` serves already-running servers on other machines instead. Clients are
unchanged: they talk to the front exactly as to one server (our protocol and GR00T's; openpi's websocket front
end runs inside one server process and is refused here).

The front is the ZeroMQ guide's load-balancing broker (ch. 3) with the paranoid pirate's heartbeats (ch. 4), on
one ``zmq.Poller`` loop:

* **routing**: a request gets a broker sequence number; it is sent as ``[tag, b"", *payload]`` (``tag`` =
  :data:`client.wire.ROUTE_TAG_PREFIX` + the number) on the DEALER of the *ready* replica with the fewest requests
  in flight, and the replica echoes the tag in front of its reply (:func:`server.app.split_envelope`). The reply
  goes back to the client identity frames recorded for that number, payload untouched (the protocol's request id
  inside it is the client's own). Requests are not decoded beyond a peek at the header's ``type``.
* **exactly once**: the first reply for a number is delivered and the number forgotten; any later reply for it
  (a reset broadcast's other answers) is dropped and counted. A dead replica's socket is closed before its
  requests are re-sent, so it can never answer one of them afterwards.
* **health**: every replica is pinged each ``HEALTH_INTERVAL_S``; it is routed to once its ping says ``"ready"``
  (so a replica still loading its model is not). A ready replica that misses pings for ``HEALTH_TIMEOUT_S``, or a
  local one whose process exits, is taken out; its in-flight requests are re-sent to another ready replica (at
  most ``MAX_ATTEMPTS`` sends per request, so a request that kills replicas cannot take them all down); a local one
  is restarted with exponential backoff (a replica that exits with 2 before ever being ready has a configuration
  error and is not restarted); a remote one is probed until it answers ready again.
* **service answers**: ``ping`` and ``stats`` are answered by the front (``status`` ready when one replica is;
  ``replicas`` = ready / total), ``metadata`` from the first ready replica's plus the ``replicas`` section,
  ``reset`` is sent to every ready replica (the first answer is delivered).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from client import wire
from client.gr00t_client import packb as gr00t_packb
from server.app import bind_client_socket, split_envelope
from server.config import ConfigError, ServerConfig, build_parser, replica_endpoint_list
from server.gr00t_protocol import error_reply as gr00t_error
from server.gr00t_protocol import is_gr00t_message

logger = logging.getLogger("server.replicas")

HEALTH_INTERVAL_S = 0.5  # ping period per replica
HEALTH_TIMEOUT_S = 5.0  # a ready replica silent this long is taken out (its event loop answers ping at once)
MAX_ATTEMPTS = 3  # sends per request (the first + re-sends after replica failures)
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 10.0  # a replica ready this long has its restart backoff reset
TICK_S = 0.05
MAX_PER_WAKE = 256
# Flags the front decides for each replica (stripped from the command line it inherits, then appended).
_FRONT_ONLY = ("replicas", "replica_endpoints", "port", "host", "ws_port", "curve_keys", "device", "torch_threads")
_FRONT_ONLY_ENV = ("VLA_SERVER_REPLICAS", "VLA_SERVER_REPLICA_ENDPOINTS", "VLA_SERVER_PORT", "VLA_SERVER_HOST",
                   "VLA_SERVER_WS_PORT", "VLA_SERVER_CURVE_KEYS", "VLA_SERVER_DEVICE", "VLA_SERVER_TORCH_THREADS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the replica gets SIGTERM when the front dies, even by SIGKILL (no orphaned replicas)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def replica_argv(argv: Sequence[str], *, port: int, device: str, torch_threads: int) -> list[str]:
    """The front's command line for one local replica: its own flags without those the front decides, plus
    ``--port``/``--host 127.0.0.1``/``--device``/``--torch-threads``/``--replicas 1``.

    Raises :class:`ConfigError` if a front-only flag survives (an abbreviated spelling argparse would accept).
    """
    parser = build_parser()
    drop = {s for a in parser._actions if a.dest in _FRONT_ONLY for s in a.option_strings}  # noqa: SLF001
    out: list[str] = []
    it = iter(argv)
    for token in it:
        name = token.split("=", 1)[0]
        if name in drop:
            if "=" not in token:
                next(it, None)
            continue
        out.append(token)
    out += ["--replicas", "1", "--host", "127.0.0.1", "--port", str(port), "--device", device,
            "--torch-threads", str(torch_threads)]
    ns = parser.parse_args(out)
    if ns.curve_keys is not None or ns.ws_port is not None or ns.replica_endpoints is not None:
        raise ConfigError("write --curve-keys, --ws-port and --replica-endpoints out in full with --replicas")
    return out


def replica_devices(config: ServerConfig, n: int) -> list[str]:
    """One device per local replica: ``cuda:k`` for ``--device cuda`` (N GPUs needed), else ``--device``."""
    if config.device != "cuda":
        if config.device.startswith("cuda:"):
            logger.warning("--device %s: all %d replicas share that GPU (use --device cuda for one per GPU)",
                           config.device, n)
        return [config.device] * n
    import torch

    found = torch.cuda.device_count()
    if found < n:
        raise ConfigError(f"--replicas {n} with --device cuda needs {n} GPUs, found {found}")
    return [f"cuda:{k}" for k in range(n)]


@dataclass
class Replica:
    """One replica as the front sees it."""

    index: int
    endpoint: str
    cmd: list[str] | None = None  # local: the command that (re)starts it; None: a remote, already-running server
    env: dict[str, str] | None = None
    proc: subprocess.Popen | None = None
    sock: zmq.Socket | None = None
    state: str = "starting"  # starting | loading | ready | down | failed
    in_flight: set[int] = field(default_factory=set)
    last_pong: float = 0.0
    last_ping: float = 0.0
    ready_since: float = 0.0
    restart_at: float = 0.0
    failures: int = 0  # consecutive, for the restart backoff
    restarts: int = 0
    served: int = 0
    ever_ready: bool = False

    @property
    def local(self) -> bool:
        return self.cmd is not None

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "endpoint": self.endpoint, "local": self.local, "state": self.state,
                "in_flight": len(self.in_flight), "served": self.served, "restarts": self.restarts,
                "pid": self.proc.pid if self.proc is not None and self.proc.poll() is None else None}


@dataclass
class _Entry:
    """A client request between the front socket and its reply."""

    envelope: list[Any]
    payload: list[Any]
    kind: str  # infer | reset | gr00t | opaque (forwarded as-is)
    req_id: Any
    received: float
    replicas: set[int] = field(default_factory=set)
    attempts: int = 0


class ReplicaBroker:
    """The front process: client ROUTER on ``config.endpoint``, one DEALER per replica."""

    def __init__(self, config: ServerConfig, replicas: list[Replica], curve_setup: Any | None = None) -> None:
        self.config = config
        self.replicas = replicas
        self._curve_setup = curve_setup
        self.limits = wire.WireLimits(max_message_bytes=config.max_message_bytes,
                                      max_array_bytes=config.max_message_bytes,
                                      max_image_pixels=config.max_image_pixels)
        self._ctx: zmq.Context | None = None
        self._front: zmq.Socket | None = None
        self._seq = itertools.count(1)
        self._in_flight: dict[int, _Entry] = {}
        self._internal: dict[int, tuple[int, str]] = {}  # seq -> (replica index, "ping" | "metadata")
        self._pending: deque[tuple[int, _Entry]] = deque()  # no replica ready yet
        self._metadata: dict[str, Any] | None = None
        self._stop = False
        self._poller_dirty = True
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.events: Counter[str] = Counter()  # resent, restarts, duplicates_dropped, dropped_frames

    # -- lifecycle ------------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def serve(self) -> int:
        """Bind, start the replicas, relay until SIGINT/SIGTERM; 0, or 2 when every replica failed to start."""
        self._ctx = ctx = zmq.Context()
        front = bind_client_socket(ctx, self.config, self._curve_setup)
        self._front = front
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, self.request_stop)
        now = time.monotonic()
        for r in self.replicas:
            self._start(r, now)
        logger.info("serving %d replica(s) on %s: %s", len(self.replicas), self.config.endpoint,
                    ", ".join(r.endpoint for r in self.replicas))
        code = 0
        poller = zmq.Poller()
        next_tick = 0.0
        try:
            while not self._stop:
                if self._poller_dirty:
                    poller = zmq.Poller()
                    poller.register(front, zmq.POLLIN)
                    for r in self.replicas:
                        if r.sock is not None:
                            poller.register(r.sock, zmq.POLLIN)
                    self._poller_dirty = False
                events = dict(poller.poll(int(TICK_S * 1000)))
                for r in self.replicas:
                    if r.sock is not None and r.sock in events:
                        self._drain_replica(r)
                if front in events:
                    self._drain_front()
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK_S
                    self._tick(now)
                    if all(r.state == "failed" for r in self.replicas):
                        logger.error("every replica failed to start; stopping")
                        code = 2
                        break
        finally:
            self._shutdown()
        return code

    def _shutdown(self) -> None:
        """Stop reading clients; let local replicas finish what they hold (SIGTERM) and relay those replies."""
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        while self._in_flight and time.monotonic() < deadline:
            socks = [r.sock for r in self.replicas if r.sock is not None and r.state != "down"]
            if not socks:
                break
            poller = zmq.Poller()
            for s in socks:
                poller.register(s, zmq.POLLIN)
            for s, _ in poller.poll(100):
                self._drain_replica(next(r for r in self.replicas if r.sock is s))
        for _, entry in self._pending:
            self._error(entry, wire.ERR_INTERNAL, "the server is shutting down")
        for r in self.replicas:
            if r.proc is not None:
                try:
                    r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait()
            if r.sock is not None:
                r.sock.close(linger=0)
                r.sock = None
        if self._front is not None:
            self._front.close(linger=2000)
        stop_auth = getattr(self._curve_setup, "stop", None)
        if callable(stop_auth):
            stop_auth()
        if self._ctx is not None:
            self._ctx.term()
        logger.info("replica front stopped cleanly")

    # -- replicas -------------------------------------------------------------------------------
    def _start(self, r: Replica, now: float) -> None:
        if r.local:
            assert r.cmd is not None
            r.proc = subprocess.Popen(r.cmd, env=r.env, preexec_fn=_die_with_parent)  # noqa: PLW1509
            logger.info("replica %d: started pid %d on %s%s", r.index, r.proc.pid, r.endpoint,
                        f" (restart {r.restarts})" if r.restarts else "")
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue towards a replica that is not connected
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.connect(r.endpoint)
        r.sock = sock
        r.state = "starting"
        r.last_ping = 0.0
        r.last_pong = now
        self._poller_dirty = True

    def _take_out(self, r: Replica, reason: str, now: float) -> None:
        """Close ``r``'s socket, re-send what it held, schedule its restart (local) or re-probe (remote)."""
        if r.sock is not None:
            self._drain_replica(r)  # replies that arrived before it died are delivered, not re-run
            r.sock.close(linger=0)
            r.sock = None
            self._poller_dirty = True
        self._internal = {s: v for s, v in self._internal.items() if v[0] != r.index}
        held = sorted(r.in_flight)
        r.in_flight.clear()
        was = r.state
        if r.local and not r.ever_ready and r.proc is not None and r.proc.poll() == 2:
            r.state = "failed"
            logger.error("replica %d: exited with 2 before it was ready (a configuration error); not restarted",
                         r.index)
        else:
            r.state = "down"
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** r.failures)
            r.failures += 1
            r.restart_at = now + (delay if r.local else 0.0)
            logger.warning("replica %d (%s, was %s): %s; %d request(s) re-sent; %s", r.index, r.endpoint, was,
                           reason, len(held), f"restart in {delay:.1f} s" if r.local else "probing it")
        for seq in held:
            entry = self._in_flight.get(seq)
            if entry is None:
                continue
            entry.replicas.discard(r.index)
            if entry.replicas:  # a reset broadcast other replicas still answer
                continue
            self.events["resent"] += 1
            self._dispatch(seq, entry)

    def _tick(self, now: float) -> None:
        for r in self.replicas:
            if r.state == "failed":
                continue
            if r.local and r.proc is not None and r.proc.poll() is not None and r.state != "down":
                self._take_out(r, f"process exited with {r.proc.returncode}", now)
            if r.state == "down":
                if now >= r.restart_at:
                    if r.local:
                        r.restarts += 1
                        self.events["restarts"] += 1
                    self._start(r, now)
                continue
            if r.state == "ready" and now - r.last_pong > HEALTH_TIMEOUT_S:
                if r.local and r.proc is not None and r.proc.poll() is None:
                    r.proc.kill()  # hung: a fresh one is better than waiting
                    r.proc.wait()
                self._take_out(r, f"no answer to ping for {now - r.last_pong:.1f} s", now)
                continue
            if r.state == "ready" and r.failures and now - r.ready_since > STABLE_AFTER_S:
                r.failures = 0
            if now - r.last_ping >= HEALTH_INTERVAL_S:
                r.last_ping = now
                self._send_internal(r, "ping")
        # requests held while no replica was ready: dispatch, or time out
        if self._pending and any(r.state == "ready" for r in self.replicas):
            pending, self._pending = self._pending, deque()
            for seq, entry in pending:
                self._dispatch(seq, entry)
        while self._pending and now - self._pending[0][1].received > self.config.request_timeout_s > 0:
            _, entry = self._pending.popleft()
            self._error(entry, wire.ERR_TIMEOUT, "no replica became ready in time")

    def _send_internal(self, r: Replica, req_type: str) -> None:
        seq = next(self._seq)
        frames = wire.pack_frames(wire.make_request(req_type, f"front:{seq}"))
        if self._send_to(r, seq, frames):
            self._internal[seq] = (r.index, req_type)

    def _send_to(self, r: Replica, seq: int, payload: list[Any]) -> bool:
        if r.sock is None:
            return False
        try:
            r.sock.send_multipart([wire.ROUTE_TAG_PREFIX + seq.to_bytes(8, "big"), b"", *payload],
                                  flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # not connected (IMMEDIATE) or its queue is full
            return False
        except zmq.ZMQError as exc:
            logger.warning("replica %d: send failed: %s", r.index, exc)
            return False
        return True

    def _drain_replica(self, r: Replica) -> None:
        sock = r.sock
        for _ in range(MAX_PER_WAKE):
            if sock is None or sock.closed:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 3 or frames[1].buffer.nbytes or frames[0].bytes[:1] != wire.ROUTE_TAG_PREFIX:
                logger.warning("replica %d: dropping a reply without a routing tag", r.index)
                continue
            seq = int.from_bytes(frames[0].bytes[1:], "big")
            r.in_flight.discard(seq)
            internal = self._internal.pop(seq, None)
            if internal is not None:
                self._internal_reply(r, internal[1], frames[2:])
                continue
            entry = self._in_flight.pop(seq, None)
            if entry is None:
                self.events["duplicates_dropped"] += 1
                continue
            for other in entry.replicas:
                if other != r.index:
                    self.replicas[other].in_flight.discard(seq)
            r.served += 1
            self._send_front([*entry.envelope, *frames[2:]])

    def _internal_reply(self, r: Replica, kind: str, payload: list[Any]) -> None:
        now = time.monotonic()
        try:
            reply = wire.unpack_frames(payload, wire.WireLimits(max_message_bytes=64 << 20, max_array_bytes=64 << 20))
        except wire.WireError as exc:
            logger.warning("replica %d: undecodable %s reply: %s", r.index, kind, exc)
            return
        if not isinstance(reply, dict) or not reply.get("ok"):
            logger.warning("replica %d: %s failed: %s", r.index, kind, reply)
            return
        r.last_pong = now
        if kind == "metadata":
            self._metadata = dict(reply.get("metadata") or {})
            return
        status = reply.get("status")
        if status == "ready" and r.state != "ready":
            r.state = "ready"
            r.ready_since = now
            r.ever_ready = True
            logger.info("replica %d (%s): ready; routing to it (%d/%d ready)", r.index, r.endpoint,
                        sum(x.state == "ready" for x in self.replicas), len(self.replicas))
            if self._metadata is None:
                self._send_internal(r, "metadata")
        elif status == "loading" and r.state == "starting":
            r.state = "loading"
        elif status not in ("ready", "loading"):
            self._take_out(r, f"ping status {status!r}", now)

    # -- clients --------------------------------------------------------------------------------
    def _send_front(self, frames: list[Any]) -> None:
        assert self._front is not None
        try:
            self._front.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.warning("reply dropped: client send queue full")
        except zmq.ZMQError as exc:
            logger.warning("reply dropped: %s", exc)

    def _reply(self, envelope: list[Any], message: dict[str, Any]) -> None:
        self._send_front([*envelope, *wire.pack_frames(message)])

    def _error(self, entry: _Entry, code: str, message: str) -> None:
        self.errors[code] += 1
        logger.warning("request %r: %s: %s", entry.req_id, code, message)
        if entry.kind == "gr00t":
            self._send_front([*entry.envelope, gr00t_packb(gr00t_error(message))])
        else:
            self._reply(entry.envelope, wire.error_reply(entry.req_id, code, message))

    def _drain_front(self) -> None:
        assert self._front is not None
        for _ in range(MAX_PER_WAKE):
            try:
                frames = self._front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            split = split_envelope(frames)
            if split is None:
                self.events["dropped_frames"] += 1
                continue
            envelope, payload = split
            try:
                self._handle(envelope, payload)
            except Exception:  # never let one message kill the front
                logger.exception("unexpected error while handling a message")

    def _peek(self, payload: list[Any]) -> tuple[str, Any, dict[str, Any] | None]:
        """(kind, request id, decoded header) from the header frame alone; arrays are not decoded."""
        if self.config.protocol == "gr00t":
            return "gr00t", None, None
        head = payload[0].buffer
        if head.nbytes > self.limits.max_message_bytes:
            return "opaque", None, None
        try:
            message = msgpack.unpackb(head, ext_hook=lambda code, data: None, raw=False,
                                      max_str_len=self.limits.max_str_len, max_bin_len=self.limits.max_array_bytes,
                                      max_array_len=self.limits.max_container_len,
                                      max_map_len=self.limits.max_container_len)
        except Exception:  # noqa: BLE001 - the replica answers it with the proper error
            return "opaque", None, None
        if is_gr00t_message(message) and self.config.protocol != "vla":
            return "gr00t", None, message
        req_type = message.get("type") if isinstance(message, dict) else None
        if req_type in wire.REQUEST_TYPES:
            return req_type, wire.request_id_of(message), message
        return "opaque", wire.request_id_of(message), message

    def _handle(self, envelope: list[Any], payload: list[Any]) -> None:
        kind, req_id, message = self._peek(payload)
        self.counts[kind] += 1
        if kind in ("ping", "metadata", "stats"):
            try:
                request = wire.parse_request(message, self.limits)
            except wire.WireError as exc:
                self.errors[exc.code] += 1
                self._reply(envelope, wire.error_reply(req_id, exc.code, exc.message))
                return
            self._reply(envelope, self._service_reply(request))
            return
        entry = _Entry(envelope=envelope, payload=payload, kind=kind, req_id=req_id, received=time.monotonic())
        self._dispatch(next(self._seq), entry)

    def _service_reply(self, request: wire.Request) -> dict[str, Any]:
        ready = sum(r.state == "ready" for r in self.replicas)
        counts = {"ready": ready, "total": len(self.replicas)}
        if request.type == "ping":
            return wire.ok_reply(request.id, server_time=time.time(), protocol=wire.PROTOCOL_VERSION,
                                 status="ready" if ready else "loading", replicas=counts)
        if request.type == "metadata":
            if self._metadata is None or not ready:
                meta = {"status": "loading", "policy": self.config.policy, "protocol_version": wire.PROTOCOL_VERSION}
            else:
                meta = dict(self._metadata)
            meta["replicas"] = {**counts, "endpoints": [r.endpoint for r in self.replicas]}
            return wire.ok_reply(request.id, metadata=meta)
        return wire.ok_reply(request.id, stats={
            "requests": dict(self.counts), "errors": dict(self.errors), "in_flight": len(self._in_flight),
            **{k: self.events[k] for k in ("resent", "restarts", "duplicates_dropped", "dropped_frames")},
            "queue_depth": len(self._pending), "replicas": [r.describe() for r in self.replicas], **counts})

    def _dispatch(self, seq: int, entry: _Entry) -> None:
        ready = [r for r in self.replicas if r.state == "ready" and r.sock is not None]
        if entry.attempts >= MAX_ATTEMPTS:
            self._in_flight.pop(seq, None)
            self._error(entry, wire.ERR_INTERNAL, f"{MAX_ATTEMPTS} replicas failed while serving this request")
            return
        if not ready:
            self._in_flight.pop(seq, None)
            self._pending.append((seq, entry))
            return
        if entry.kind == "reset":  # policy state lives in every replica
            targets = ready
        else:
            start = seq % len(ready)  # ties: rotate
            targets = [min(ready[start:] + ready[:start], key=lambda r: len(r.in_flight))]
        entry.attempts += 1
        for r in targets:
            if self._send_to(r, seq, entry.payload):
                r.in_flight.add(seq)
                entry.replicas.add(r.index)
        if entry.replicas:
            self._in_flight[seq] = entry
        else:  # every send failed: wait for a replica
            entry.attempts -= 1
            self._pending.append((seq, entry))


def build_replicas(config: ServerConfig, argv: Sequence[str]) -> list[Replica]:
    """Local replicas for ``--replicas N`` (N > 1), or remote ones for ``--replica-endpoints``."""
    remote = replica_endpoint_list(config.replica_endpoints)
    if remote:
        return [Replica(index=k, endpoint=e) for k, e in enumerate(remote)]
    n = config.replicas
    devices = replica_devices(config, n)
    threads = config.torch_threads or max(1, (os.cpu_count() or 1) // n)
    env = {k: v for k, v in os.environ.items() if k not in _FRONT_ONLY_ENV}
    out = []
    for k in range(n):
        port = _free_port()
        cmd = [sys.executable, "-m", "server",
               *replica_argv(argv, port=port, device=devices[k], torch_threads=threads)]
        out.append(Replica(index=k, endpoint=f"tcp://127.0.0.1:{port}", cmd=cmd, env=env))
    return out


def check_combination(config: ServerConfig) -> None:
    """Refuse what the front cannot do, at start-up (raises :class:`ConfigError` naming the flags)."""
    if config.replica_endpoints is not None and config.replicas > 1:
        raise ConfigError("--replicas and --replica-endpoints are exclusive: the front serves local replicas or "
                          "remote servers, not both")
    if config.ws_port is not None:
        raise ConfigError("--ws-port cannot be combined with --replicas/--replica-endpoints: openpi's websocket "
                          "front end runs inside one server process; run it on one replica's own server instead")
