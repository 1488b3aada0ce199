"""Optional ZeroMQ CURVE authentication and encryption (``--curve-keys DIR``).

Layout of DIR (made by ``python -m server.keys DIR``)::

    server.key_secret            the server's key pair (ZeroMQ certificate format)
    authorized_clients/*.key     public keys of the clients allowed to connect

A client whose public key is not in ``authorized_clients`` fails the ZAP handshake: its requests
never reach the server and it gets no reply (its own call times out).
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

SERVER_SECRET = "server.key_secret"
AUTHORIZED_DIR = "authorized_clients"


def curve_server_setup(keys_dir: str) -> CurveSetup:
    """Validate the key directory now (start-up) and return a hook that arms a socket with CURVE."""
    root = Path(keys_dir)
    secret_file = root / SERVER_SECRET
    authorized = root / AUTHORIZED_DIR
    if not secret_file.is_file():
        raise ValueError(f"{secret_file} is missing (create keys with: python -m server.keys {keys_dir})")
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise ValueError(f"{authorized} has no client public keys (*.key): nobody could connect")
    public, secret = zmq.auth.load_certificate(str(secret_file))
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    return CurveSetup(public, secret, authorized)


class CurveSetup:
    """Arms a server socket with CURVE and owns the ZAP authenticator that checks client keys."""

    def __init__(self, public: bytes, secret: bytes, authorized: Path) -> None:
        self._public, self._secret, self._authorized = public, secret, authorized
        self._auth: ThreadAuthenticator | None = None

    def __call__(self, sock: zmq.Socket) -> None:
        # A thread, not the event loop, answers ZAP: the handshake never waits on a busy loop.
        self._auth = ThreadAuthenticator(sock.context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(self._authorized))
        sock.curve_server = True
        sock.curve_publickey = self._public
        sock.curve_secretkey = self._secret
        logger.info("CURVE enabled: %d authorised client key(s) in %s",
                    len(list(self._authorized.glob("*.key"))), self._authorized)

    def stop(self) -> None:
        """Close the authenticator's socket; without this the context cannot terminate."""
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
