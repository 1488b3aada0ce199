"""A small synchronous client for the policy server (pyzmq + msgpack + numpy only).

Reliability model ("lazy pirate", ZeroMQ guide ch. 4): each call sends one request on a DEALER
socket and polls for the reply with a deadline. Replies carry the request's id; a reply whose id
is not the one we are waiting for is a late answer to a call we already gave up on, and is dropped
rather than returned (a stale chunk executed as the next one is a known failure of other clients).
After a timeout the socket is closed with linger 0 and a fresh one is opened on the next call, so
a restarted server is picked up without the caller rebuilding the client.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from client import wire
from client.settings import SettingError, above, check_fields, from_sources, in_range, setting

logger = logging.getLogger(__name__)

#: The ping ``status`` of a server whose policy is loaded ("loading" and "failed" are the others).
READY = "ready"


class PolicyClientError(RuntimeError):
    """Base class of everything the client raises."""


class PolicyTimeoutError(PolicyClientError):
    """No reply within the timeout (server down, restarting or overloaded)."""


class PolicyServerError(PolicyClientError):
    """The server answered with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"server error [{code}]: {message}")
        self.code = code
        self.message = message


class PolicyClient:
    """Talks to one policy server.

    Args:
        host: server address. ``port``: server port.
        timeout_s: per-call deadline; a call that has no matching reply by then raises
            :class:`PolicyTimeoutError` and resets the connection.
        connect_retries: how many times ``ping``/``metadata``/``stats`` re-send after a timeout before raising
            (0 = never; inference is not idempotent for stateful policies, so the default is 0).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5555,
        timeout_s: float = 30.0,
        connect_retries: int = 0,
        curve_server_key: bytes | None = None,
        curve_client_keys: tuple[bytes, bytes] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.endpoint = f"tcp://{host}:{port}"
        self.timeout_s = float(timeout_s)
        self.connect_retries = int(connect_retries)
        self._curve_server_key = curve_server_key
        self._curve_client_keys = curve_client_keys
        self._ctx = zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._session = uuid.uuid4().hex[:12]
        self._seq = itertools.count()
        self.last_reply: dict[str, Any] = {}
        self.stale_replies_dropped = 0

    # -- connection management -----------------------------------------------------------------
    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self._curve_server_key is not None:
                if self._curve_client_keys is None:
                    raise ValueError("CURVE needs the client's own key pair as well as the server key")
                public, secret = self._curve_client_keys
                sock.curve_serverkey = self._curve_server_key
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def _reset_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._reset_socket()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- request/reply -------------------------------------------------------------------------
    def _next_id(self) -> str:
        return f"{self._session}:{next(self._seq)}"

    def call(self, req_type: str, obs: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        """Send one request and return its (successful) reply map; raises on error replies."""
        attempts = 1 + (self.connect_retries if req_type in ("ping", "metadata", "stats") else 0)
        last_exc: PolicyTimeoutError | None = None
        for _ in range(attempts):
            try:
                return self._call_once(req_type, obs, options)
            except PolicyTimeoutError as exc:
                last_exc = exc
        assert last_exc is not None
        raise last_exc

    def _call_once(self, req_type: str, obs: dict[str, Any] | None, options: dict[str, Any]) -> dict[str, Any]:
        req_id = self._next_id()
        frames = wire.pack_frames(wire.make_request(req_type, req_id, obs, **options))
        sock = self._connect()
        deadline = time.monotonic() + self.timeout_s
        try:
            for i, frame in enumerate(frames):
                more = zmq.SNDMORE if i + 1 < len(frames) else 0
                # Image frames go to libzmq without a copy (the caller must not mutate them meanwhile).
                sock.send(frame, flags=zmq.NOBLOCK | more, copy=i == 0)
        except zmq.Again:
            # The pipe to the server is full (server gone for a while): treat as a timeout.
            self._reset_socket()
            raise PolicyTimeoutError(f"could not send to {self.endpoint}: send queue full") from None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                if time.monotonic() < deadline:
                    continue
                self._reset_socket()
                raise PolicyTimeoutError(
                    f"no reply from {self.endpoint} to {req_type!r} within {self.timeout_s:.1f}s "
                    "(is the server running? start it with ./run_inference_server.sh)"
                )
            frames = sock.recv_multipart()
            reply = self._decode(frames)
            if reply is None:
                continue
            if reply.get("id") != req_id:
                self.stale_replies_dropped += 1
                logger.warning("dropping a late reply to request %r (waiting for %r)", reply.get("id"), req_id)
                continue
            self.last_reply = reply
            if not reply.get("ok", False):
                err = reply.get("error") or {}
                raise PolicyServerError(str(err.get("code", "unknown")), str(err.get("message", "")))
            return reply

    @staticmethod
    def _decode(frames: list[bytes]) -> dict[str, Any] | None:
        try:
            reply = wire.unpack_frames(frames, wire.WireLimits(max_message_bytes=64 * 1024 * 1024,
                                                               max_array_bytes=64 * 1024 * 1024))
        except wire.WireError as exc:
            logger.warning("dropping an undecodable reply: %s", exc)
            return None
        if not isinstance(reply, dict):
            logger.warning("dropping a reply that is not a map")
            return None
        return reply

    # -- endpoints -----------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def metadata(self) -> dict[str, Any]:
        return self.call("metadata")["metadata"]

    def stats(self) -> dict[str, Any]:
        return self.call("stats")["stats"]

    def reset(self) -> None:
        self.call("reset")

    def infer(self, obs: dict[str, Any], **options: Any) -> np.ndarray:
        """Return the action chunk (float32 ``[H, action_dim]``) for one observation."""
        reply = self.call("infer", obs, **options)
        actions = reply.get("actions")
        if not isinstance(actions, np.ndarray) or actions.ndim != 2:
            raise PolicyClientError("reply has no 2-D 'actions' array")
        return np.asarray(actions, dtype=np.float32)


class ClientConfigError(SettingError):
    """A ``POLICY_SERVER_*`` value is invalid; the message names the variable."""


@dataclass(frozen=True)
class ClientConfig:
    """Where a script's client finds its server: the ``POLICY_SERVER_*`` variables (:mod:`client.settings`)."""

    host: str = setting("127.0.0.1", env="POLICY_SERVER_HOST", help="policy server address")
    port: int = setting(5555, env="POLICY_SERVER_PORT", check=in_range(1, 65535), help="policy server port")
    timeout_s: float = setting(30.0, env="POLICY_SERVER_TIMEOUT", check=above(0), help="per-call deadline, seconds")

    def __post_init__(self) -> None:
        check_fields(self, ClientConfigError)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientConfig:
        """Defaults < ``POLICY_SERVER_*``; a bad value raises :class:`ClientConfigError` naming the variable."""
        return from_sources(cls, None, env, error=ClientConfigError)


def client_from_env(**overrides: Any) -> PolicyClient:
    """Build a client from ``POLICY_SERVER_HOST``/``POLICY_SERVER_PORT``/``POLICY_SERVER_TIMEOUT``
    (:class:`ClientConfig`); keyword ``overrides`` win (``connect_retries``, CURVE keys, ...)."""
    cfg = ClientConfig.from_env()
    kwargs: dict[str, Any] = {"host": cfg.host, "port": cfg.port, "timeout_s": cfg.timeout_s}
    kwargs.update(overrides)
    return PolicyClient(**kwargs)


def wait_until_serving(port: int, host: str = "127.0.0.1", timeout_s: float = 60.0,
                       alive: Callable[[], bool] | None = None) -> bool:
    """Ping until the server reports ``"status": "ready"`` (True), ``timeout_s`` passes or ``alive()`` turns
    false (False).

    For scripts that start a server process and must not talk to it before it has loaded its policy: a server
    binds and answers ping while it loads (``"status": "loading"``), so an answer alone is not readiness. A
    reply without ``status`` (an older server, which answers only once loaded) counts as ready.
    """
    deadline = time.monotonic() + timeout_s
    with PolicyClient(host, port, timeout_s=0.5, connect_retries=0) as client:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                return False
            try:
                status = client.ping().get("status", READY)
            except PolicyTimeoutError:
                continue
            if status == READY:
                return True
            time.sleep(0.05)  # loading: ask again shortly
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m client.policy_client wait --port P [--timeout S] [--pid PID]``: block until a server is ready.

    The one readiness wait for shell scripts (run_demo.sh): exit 0 and print the served policy once its ping
    says ``"status": "ready"``, 1 when ``--timeout`` passes or the server process ``--pid`` exits first.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m client.policy_client", description="policy server client tools")
    sub = ap.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait", help="wait until a server reports ready (its policy loaded), then print its policy")
    w.add_argument("--host", default="127.0.0.1")
    w.add_argument("--port", type=int, default=5555)
    w.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    w.add_argument("--pid", type=int, default=None, help="give up as soon as this server process exits")
    ns = ap.parse_args(argv)
    alive = (lambda: _pid_alive(ns.pid)) if ns.pid is not None else None
    if not wait_until_serving(ns.port, ns.host, ns.timeout, alive):
        why = "exited" if alive is not None and not alive() else f"did not answer ready within {ns.timeout:g}s"
        print(f"server on {ns.host}:{ns.port} {why}", file=sys.stderr)
        return 1
    with PolicyClient(ns.host, ns.port, timeout_s=10.0) as client:
        meta = client.metadata()
    print(f"server ready: policy={meta.get('policy')} model={meta.get('model_id')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
