"""The server process core: one asyncio loop owns a ZeroMQ ROUTER socket; inference runs elsewhere.

Why ROUTER: it accepts REQ and DEALER clients alike, tags every message with the peer's identity
and never blocks on a slow or vanished peer. Every reply echoes the request id. The loop only
decodes, validates and routes; the policy runs on a single worker thread behind the
:class:`~server.batching.DynamicBatcher`, so a long forward pass never stalls ``ping`` or other
clients' error replies (the event loop blocking is a known failure of openpi's server).

The socket is integrated with the loop the way pyzmq documents for event loops: the loop watches
the socket's ``zmq.FD`` and, when it fires, the server drains every queued message with non-blocking
receives. That FD is edge-triggered and a send on the same socket can consume the edge, so after
replies sent outside the drain the server re-checks ``zmq.EVENTS``. Compared with awaiting
``zmq.asyncio`` futures and an executor this saves futures and task steps per message (loopback
round trip 1.15 -> 0.90 ms p50, old and new servers side by side on a quiet 2-core machine), and
one wake-up can serve many clients' messages.

Liveness is not readiness: given a ``policy_factory``, the server binds first and builds the policy on the
inference thread; until it is built ``ping`` says ``"status": "loading"`` and inference gets the ``loading``
error (:meth:`PolicyServer.readiness`). Isaac-GR00T's protocol shares the port: a message with ``"endpoint"``
goes to :class:`server.gr00t_protocol.Gr00tFrontEnd` (``--protocol``), which infers through the same batcher.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from client import wire
from client.gr00t_client import packb as gr00t_packb  # the one GR00T encoder
from server.batching import DynamicBatcher, PendingRequest
from server.config import ServerConfig
from server.gr00t_protocol import Gr00tFrontEnd, is_gr00t_message
from server.gr00t_protocol import error_reply as gr00t_error
from server.policies.base import Policy, PolicyInputError, PolicyOutput
from server.stats import ServerStats
from server.worker import InferenceWorker, JobResult

logger = logging.getLogger(__name__)

# ZMQ_MAXMSGSIZE is a hard cap enforced by libzmq (it drops the peer's connection). We set it a bit
# above our own limit so that a moderately oversized message still gets a polite 'too_large' reply.
HARD_CAP_FACTOR = 2
# Messages handled per loop callback before yielding, so completions and timers are not starved.
MAX_MESSAGES_PER_WAKE = 64


def bind_client_socket(ctx: zmq.Context, config: ServerConfig, curve_setup: Any | None = None) -> zmq.Socket:
    """The client-facing ROUTER socket (a server's, or the replica front's), configured and bound to
    ``config.endpoint``: frames over ``HARD_CAP_FACTOR`` x the message limit are cut by libzmq before allocation."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes * HARD_CAP_FACTOR)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # unroutable replies (client gone) are dropped silently
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 10000)
    if curve_setup is not None:
        curve_setup(sock)
    sock.bind(config.endpoint)
    return sock


def split_envelope(frames: list[zmq.Frame]) -> tuple[list[bytes], list[zmq.Frame]] | None:
    """A ROUTER message -> (reply envelope, payload frames), or ``None`` when it carries no payload.

    ROUTER frames: ``[identity, *payload]`` from DEALER, ``[identity, b"", *payload]`` from REQ, and
    ``[identity, tag, b"", *payload]`` from the replica front end (:mod:`server.replicas`), whose ``tag`` frame
    starts with :data:`client.wire.ROUTE_TAG_PREFIX` (a byte msgpack never uses, so no client header can look like
    one). The payload is a msgpack header frame plus out-of-band array frames (client/wire.py).
    """
    if len(frames) >= 3 and frames[1].buffer.nbytes == 0:
        return [frames[0].bytes, b""], frames[2:]
    if len(frames) >= 4 and frames[2].buffer.nbytes == 0 and frames[1].bytes[:1] == wire.ROUTE_TAG_PREFIX:
        return [frames[0].bytes, frames[1].bytes, b""], frames[3:]
    if len(frames) >= 2 and frames[1].buffer.nbytes > 0:
        return [frames[0].bytes], frames[1:]
    return None


@dataclass
class ServedOutput(PolicyOutput):
    """A policy output as answered to a client: float32 actions plus the server's timing breakdown."""

    timing: dict[str, Any] = field(default_factory=dict)


class PolicyServer:
    """Serves one policy on one endpoint until :meth:`request_stop` (or SIGINT/SIGTERM)."""

    def __init__(self, config: ServerConfig, policy: Policy | None = None, curve_setup: Any | None = None,
                 policy_factory: Callable[[], Policy] | None = None) -> None:
        """Serve ``policy``, or the one ``policy_factory()`` builds on the inference thread after the socket is
        bound (readiness "loading" until then, so clients can ping a server that is still loading)."""
        if (policy is None) == (policy_factory is None):
            raise ValueError("give exactly one of policy and policy_factory")
        self.config = config
        self.policy: Policy | None = policy
        self._policy_factory = policy_factory
        self._readiness = "ready" if policy is not None else "loading"
        #: Why the policy could not be built (readiness "failed"; serve() then returns).
        self.load_error: BaseException | None = None
        self.stats = ServerStats()
        self.limits = wire.WireLimits(
            max_message_bytes=config.max_message_bytes,
            max_array_bytes=config.max_message_bytes,
            max_image_pixels=config.max_image_pixels,
        )
        self._curve_setup = curve_setup
        self._stop = asyncio.Event()
        self._socket: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: InferenceWorker | None = None
        self._draining = False
        self.bound_port: int | None = None
        self._background: set[asyncio.Future] = set()
        self._request_log_level = logging.INFO if config.log_requests else logging.DEBUG
        self._policy_metadata: dict[str, Any] = policy.served_metadata() if policy is not None else {}
        self._gr00t: Gr00tFrontEnd | None = None
        if config.protocol != "vla":
            self._gr00t = Gr00tFrontEnd(self, api_token=config.api_token, allow_kill=config.allow_kill,
                                        modality_format=config.gr00t_api)

    # -- lifecycle ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        ctx = zmq.Context()
        sock = bind_client_socket(ctx, self.config, self._curve_setup)
        self._socket = sock
        self.bound_port = self.config.port
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._worker = InferenceWorker(loop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests) / Windows
                pass
        batcher = DynamicBatcher(
            run_batch=self._run_batch,
            worker=self._worker,
            max_batch=self.config.max_batch,
            max_wait_ms=self.config.max_wait_ms,
            max_queue=self.config.max_queue,
            request_timeout_s=self.config.request_timeout_s,
        )
        self._batcher = batcher
        if self._policy_factory is not None:
            self._load_started = time.perf_counter()
            self._worker.submit(self._policy_factory, self._policy_loaded)
        logger.info(
            "serving policy %r (%s) on %s, max_batch=%d max_wait_ms=%.1f, protocol=%s",
            self.config.policy, self._policy_metadata.get("model_id", "loading"), self.config.endpoint,
            self.config.max_batch, self.config.max_wait_ms, self.config.protocol,
        )
        ws_frontend = None
        if self.config.ws_port is not None:  # openpi's websocket protocol, on the same loop and batcher
            from server.websocket_frontend import WebsocketFrontend

            ws_frontend = WebsocketFrontend(self, self.config.host, self.config.ws_port,
                                            max_frame_bytes=self.config.max_message_bytes * HARD_CAP_FACTOR)
            await ws_frontend.start()  # before the ZeroMQ reader: answering a ping means both listen
        fd = sock.getsockopt(zmq.FD)
        loop.add_reader(fd, self._drain_socket)
        self._check_readable()  # anything that arrived before the reader was registered
        try:
            await self._stop.wait()
        finally:
            # Graceful stop: no new requests; finish what is queued and in flight; send the replies.
            loop.remove_reader(fd)
            if ws_frontend is not None:
                ws_frontend.stop_accepting()
            batcher.close()
            await batcher.drained()
            if ws_frontend is not None:
                await ws_frontend.close()
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)
            # A policy still loading is not waited for long: the worker is a daemon thread.
            self._worker.shutdown(None if self._readiness != "loading" else 5.0)
            if self.policy is not None:
                self.policy.close()
            sock.close(linger=2000)
            stop_auth = getattr(self._curve_setup, "stop", None)
            if callable(stop_auth):
                stop_auth()
            ctx.term()
            logger.info("server stopped cleanly")

    def _policy_loaded(self, result: JobResult) -> None:
        """Completion of the policy factory (event loop): readiness becomes "ready", or "failed" and stop."""
        if result.error is not None:
            self._readiness = "failed"
            self.load_error = result.error
            logger.error("the policy could not be built: %s", result.error)
            self.request_stop()
            return
        policy: Policy = result.value
        self.policy = policy
        self._policy_metadata = policy.served_metadata()
        self._readiness = "ready"
        logger.info("policy %r (%s) ready after %.1f s", self.config.policy, self._policy_metadata.get("model_id"),
                    time.perf_counter() - self._load_started)

    def readiness(self) -> str:
        """"loading" (the socket answers ping, the policy is being built), "ready" or "failed"."""
        return self._readiness

    def submit_reset(self, done: Callable[[str | None], None]) -> None:
        """Reset the policy on the inference thread (after what is queued there); ``done(error)`` on the loop."""
        assert self._worker is not None

        def finished(result: JobResult) -> None:
            if result.error is not None:
                logger.error("policy reset failed", exc_info=result.error)
                done("reset failed (see server log)")
            else:
                done(None)

        if self.policy is None:
            done("the policy is not loaded")
            return
        self._worker.submit(self.policy.reset, finished)

    def count(self, kind: str, error: str | None = None) -> None:
        """Count one request of ``kind`` (or, with ``error``, one error reply) in the ``stats`` endpoint."""
        if error is None:
            self.stats.requests[kind] += 1
        else:
            self.stats.errors[error] += 1

    def _drain_socket(self) -> None:
        """Reader callback: handle every message queued on the socket (up to a fair share per wake)."""
        sock = self._socket
        if sock is None or sock.closed or self._stop.is_set():
            return
        self._draining = True
        try:
            for _ in range(MAX_MESSAGES_PER_WAKE):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)  # zero-copy: arrays view these
                except zmq.Again:
                    return
                except zmq.ZMQError as exc:
                    logger.warning("receive failed: %s", exc)
                    return
                try:
                    self._handle_frames(frames)
                except Exception:  # never let one message kill the server
                    logger.exception("unexpected error while handling a message")
            assert self._loop is not None
            self._loop.call_soon(self._drain_socket)  # more may be queued: continue after other callbacks
        finally:
            self._draining = False

    def _check_readable(self) -> None:
        """Schedule a drain if messages wait: a send outside the drain may have consumed the FD's edge."""
        sock = self._socket
        if sock is None or sock.closed or self._draining or self._stop.is_set():
            return
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            assert self._loop is not None
            self._loop.call_soon(self._drain_socket)

    # -- request handling (event loop) ------------------------------------------------------------
    def _send(self, envelope: list[bytes], message: dict[str, Any]) -> None:
        assert self._socket is not None
        try:
            frames = wire.pack_frames(message)
        except TypeError:
            logger.exception("could not encode a reply")
            frames = wire.pack_frames(wire.error_reply(message.get("id"), wire.ERR_INTERNAL, "reply not encodable"))
        try:
            self._socket.send_multipart([*envelope, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("reply dropped: client send queue full")
        except zmq.ZMQError as exc:
            logger.warning("reply dropped: %s", exc)
        self._check_readable()

    def _send_raw(self, envelope: list[bytes], payload: bytes) -> None:
        """Send an already-encoded single-frame reply (the GR00T protocol's)."""
        assert self._socket is not None
        try:
            self._socket.send_multipart([*envelope, payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("reply dropped: client send queue full")
        except zmq.ZMQError as exc:
            logger.warning("reply dropped: %s", exc)
        self._check_readable()

    def _error(self, envelope: list[bytes], req_id: Any, code: str, message: str) -> None:
        self.stats.errors[code] += 1
        logger.warning("request %r from %s: %s: %s", req_id, envelope[0].hex()[:10], code, message)
        self._send(envelope, wire.error_reply(req_id, code, message))

    def _handle_frames(self, frames: list[zmq.Frame]) -> None:
        split = split_envelope(frames)
        if split is None:
            self.stats.dropped_frames += 1
            logger.warning("dropping a message with no payload frame")
            return
        envelope, payload = split
        received = time.perf_counter()
        try:
            message = wire.unpack_frames(payload, self.limits)
        except wire.WireError as exc:
            if self.config.protocol == "gr00t":
                self.count("gr00t.invalid", exc.code)
                self._send_raw(envelope, gr00t_packb(gr00t_error(exc.message)))
            else:
                self._error(envelope, None, exc.code, exc.message)
            return
        # One port, two protocols, told apart per message: ours carries "v"/"type", GR00T's "endpoint".
        if self._gr00t is not None and (self.config.protocol == "gr00t" or is_gr00t_message(message)):
            self._gr00t.handle(message, envelope[0], lambda obj: self._send_raw(envelope, gr00t_packb(obj)))
            return
        req_id = wire.request_id_of(message)
        try:
            request = wire.parse_request(message, self.limits)
        except wire.WireError as exc:
            self._error(envelope, req_id, exc.code, exc.message)
            return
        self.stats.requests[request.type] += 1
        if request.type == "ping":
            self._send(envelope, wire.ok_reply(request.id, server_time=time.time(),
                                               protocol=wire.PROTOCOL_VERSION, status=self._readiness))
        elif request.type in ("infer", "reset") and self._readiness != "ready":
            self._error(envelope, request.id, wire.ERR_LOADING,
                        f"the policy is {self._readiness}; retry once ping reports 'ready'")
        elif request.type == "metadata":
            self._send(envelope, wire.ok_reply(request.id, metadata=self.metadata()))
        elif request.type == "stats":
            self._send(envelope, wire.ok_reply(request.id, stats=self.stats_snapshot()))
        elif request.type == "reset":
            task = asyncio.ensure_future(self._reset(envelope, request.id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            self._submit_infer(envelope, request, received)

    def _submit_infer(self, envelope: list[bytes], request: wire.Request, received: float) -> None:
        req_id = request.id

        def respond(out: PolicyOutput | None, code: str | None, message: str | None) -> None:
            if out is None:
                self._error(envelope, req_id, code or wire.ERR_INTERNAL, message or "")
                return
            timing = getattr(out, "timing", {})
            self._send(envelope, wire.ok_reply(req_id, actions=out.actions, timing=timing, **out.info))

        self.submit_observation(request.obs, envelope[0], respond, request_id=req_id, received=received)

    def submit_observation(
        self,
        obs: dict[str, Any],
        client_key: bytes | str,
        respond: Callable[[PolicyOutput | None, str | None, str | None], None],
        *,
        request_id: Any = None,
        received: float | None = None,
    ) -> None:
        """Validate one observation and queue it on the shared batcher; every front end goes through here.

        ``respond(out, code, message)`` is called exactly once, on the event loop thread: with a
        :class:`ServedOutput` (float32 actions plus ``timing``) on success, or with ``None``, a
        ``client.wire`` error code and a message. ``client_key`` identifies the peer for the batcher's
        active-client count, so requests from all protocols batch together. Latency and batch-size
        stats are recorded here, once for every protocol.
        """
        received = time.perf_counter() if received is None else received
        if self.policy is None or self._readiness != "ready":
            respond(None, wire.ERR_LOADING, f"the policy is {self._readiness}; retry once ping reports 'ready'")
            return
        try:
            self.policy.validate(obs)
        except PolicyInputError as exc:
            respond(None, wire.ERR_BAD_REQUEST, str(exc))
            return
        peer = client_key.hex()[:10] if isinstance(client_key, bytes) else str(client_key)[:24]

        def on_done(item: PendingRequest, out: PolicyOutput | None, code: str | None, message: str | None,
                    timing: dict[str, Any]) -> None:
            if out is None:
                respond(None, code or wire.ERR_INTERNAL, message or "")
                return
            timing = dict(timing)
            timing["server_ms"] = (time.perf_counter() - item.received) * 1000.0
            self.stats.infer_latency.observe(timing["server_ms"])
            self.stats.batch_sizes[timing.get("batch_size", 1)] += 1
            logger.log(self._request_log_level,
                       "infer request_id=%r client=%s batch_size=%d queue_ms=%.3f infer_ms=%.3f server_ms=%.3f",
                       item.req_id, peer, timing.get("batch_size", 1), timing.get("queue_ms", 0.0),
                       timing.get("infer_ms", 0.0), timing["server_ms"])
            respond(ServedOutput(actions=np.asarray(out.actions, dtype=np.float32), info=out.info, timing=timing),
                    None, None)

        item = PendingRequest(obs=obs, req_id=request_id, client=client_key, respond=on_done, received=received)
        if not self._batcher.submit(item):
            respond(None, wire.ERR_OVERLOADED, f"queue full ({self._batcher.queued} waiting); retry later")

    async def _reset(self, envelope: list[bytes], req_id: Any) -> None:
        assert self._worker is not None
        try:
            await self._worker.call(self.policy.reset)
        except Exception:
            logger.exception("policy reset failed")
            self._error(envelope, req_id, wire.ERR_INTERNAL, "reset failed (see server log)")
            return
        self._send(envelope, wire.ok_reply(req_id))

    # -- inference thread -------------------------------------------------------------------------
    def _run_batch(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        return self.policy.infer(observations)

    # -- introspection ----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        if self.policy is None or self._readiness != "ready":
            return {"status": self._readiness, "policy": self.config.policy,
                    "protocol_version": wire.PROTOCOL_VERSION}
        meta = dict(self._policy_metadata)
        meta["status"] = "ready"
        meta.setdefault("quantization", {"enabled": False})
        meta["protocol_version"] = wire.PROTOCOL_VERSION
        meta["server"] = {
            "max_batch": self.config.max_batch,
            "max_wait_ms": self.config.max_wait_ms,
            "max_message_bytes": self.config.max_message_bytes,
            "max_image_pixels": self.config.max_image_pixels,
        }
        meta.update(self.policy.live_metadata())
        return meta

    def stats_snapshot(self) -> dict[str, Any]:
        snap = self.stats.as_dict()
        snap["queue_depth"] = self._batcher.queued
        snap["in_flight"] = self._batcher.in_flight
        return snap
