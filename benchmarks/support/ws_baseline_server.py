"""Baseline for bench_wire: a websocket + msgpack-numpy echo server, the wire openpi uses.

Arrays travel as ``{"__ndarray__": bytes, "dtype": str, "shape": list}`` maps inside msgpack,
per-message compression off. It decodes the observation and replies an 8x7 float32 chunk, like
our server does with its debugging policy. Run as a separate process: ``python -m
benchmarks.support.ws_baseline_server PORT``.
"""

from __future__ import annotations

import sys

import msgpack
import numpy as np
from websockets.sync.server import serve


def pack_array(obj):
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    return obj


def unpack_array(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"__ndarray__"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    return obj


def handler(ws) -> None:
    chunk = np.zeros((8, 7), np.float32)
    for message in ws:
        obs = msgpack.unpackb(message, object_hook=unpack_array)
        chunk[0, 0] = float(len(obs))
        ws.send(msgpack.packb({"actions": chunk}, default=pack_array))


def main() -> None:
    port = int(sys.argv[1])
    with serve(handler, "127.0.0.1", port, compression=None, max_size=None) as server:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        server.serve_forever()


if __name__ == "__main__":
    main()
