"""Optional ZeroMQ CURVE authentication and encryption (``--curve-keys DIR``).

Layout of DIR (made by ``python -m server.keys DIR``)::

    server.key_secret            the server's key pair (ZeroMQ certificate format)
    authorized_clients/*.key     public keys of the clients allowed to connect

A client whose public key is not in ``authorized_clients`` fails the ZAP handshake: its requests
never reach the server and it gets no reply (its own call times out).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

logger = logging.getLogger(__name__)

SERVER_SECRET = "server.key_secret"
AUTHORIZED_DIR = "authorized_clients"


def curve_server_setup(keys_dir: str) -> Callable[[zmq.Socket], None]:
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
    holder: dict[str, AsyncioAuthenticator] = {}

    def setup(sock: zmq.Socket) -> None:
        auth = AsyncioAuthenticator(sock.context)
        auth.start()
        auth.configure_curve(domain="*", location=str(authorized))
        holder["auth"] = auth  # keep the authenticator alive as long as the socket
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        logger.info("CURVE enabled: %d authorised client key(s) in %s", len(list(authorized.glob("*.key"))),
                    authorized)

    return setup
