"""A bare ZeroMQ ROUTER in its own process that answers every request with a fixed action chunk.

The floor for any server that speaks our wire through :class:`client.policy_client.PolicyClient`: no
validation, no batching, no policy, no event loop — only reading the request id so the client accepts
the reply. ``python -m benchmarks.support.zmq_echo_server PORT`` prints ``ready`` once bound.
"""

from __future__ import annotations

import sys

import msgpack
import numpy as np
import zmq

from client import wire


def main() -> None:
    port = int(sys.argv[1])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    actions = np.zeros((8, 7), np.float32)
    print("ready", flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)
        header = msgpack.unpackb(frames[1].buffer, ext_hook=lambda code, data: None, raw=False)
        sock.send_multipart([frames[0], *wire.pack_frames(wire.ok_reply(header.get("id"), actions=actions))])


if __name__ == "__main__":
    main()
