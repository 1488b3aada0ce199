"""``python -m server.keys DIR [--client NAME ...]``: generate CURVE key pairs for the server and clients.

Writes ``DIR/server.key(_secret)``, ``DIR/clients/NAME.key(_secret)`` for each client and copies
each client's *public* key into ``DIR/authorized_clients/``. Give a client its ``NAME.key_secret``
and ``server.key`` (public); keep ``server.key_secret`` on the server.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import zmq.auth


def generate(keys_dir: str, clients: list[str]) -> None:
    root = Path(keys_dir)
    (root / "clients").mkdir(parents=True, exist_ok=True)
    (root / "authorized_clients").mkdir(parents=True, exist_ok=True)
    if not (root / "server.key_secret").exists():
        zmq.auth.create_certificates(str(root), "server")
    for name in clients:
        public, _ = zmq.auth.create_certificates(str(root / "clients"), name)
        shutil.copy(public, root / "authorized_clients" / Path(public).name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.keys", description=__doc__)
    p.add_argument("keys_dir")
    p.add_argument("--client", action="append", default=["client"], help="client name (repeatable)")
    ns = p.parse_args(argv)
    generate(ns.keys_dir, sorted(set(ns.client)))
    sys.stdout.write(f"keys written to {ns.keys_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
