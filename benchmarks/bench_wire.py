"""Round-trip latency of our msgpack-over-ZeroMQ wire vs a websocket + msgpack-numpy baseline.

Both servers run as separate processes on loopback; the same client process measures both, side
by side, with the LIBERO observation of docs/wire_protocol.md (two 256x256x3 uint8 images + 8 floats + an instruction;
reply 8x7 float32). Ours goes through the real server (`python -m server --policy debug`).

    python -m benchmarks.bench_wire [--quick] [--requests N]

Two floors are measured in the same run to show where the time goes: a bare pyzmq DEALER/ROUTER echo
of the same frames inside this process, and our client against a bare ZeroMQ echo in another process
(``benchmarks/support/zmq_echo_server.py``: no validation, no batching, no policy).

Isaac-GR00T's protocol (REQ socket, ``np.save`` arrays in msgpack maps) is measured against the same real server
with the same observation, in the same run (``gr00t_p50_ms``, ``gr00t_p50_ratio_vs_websocket``).

openpi's websocket protocol served by our real server (``--ws-port``, server/websocket_frontend.py) is measured
with the same observation under openpi's keys against the websocket baseline echo, in the same run
(``ws_frontend_p50_ms``, ``ws_frontend_p50_ratio_vs_websocket_baseline``, target <= 1.0: the full server, with
validation and batching, no slower than a bare openpi-style echo).

Last line: JSON with p50/p99 for both and ``p50_ratio_vs_websocket`` (target <= 0.5, p50 < 1 ms).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import msgpack
import numpy as np

from client.policy_client import PolicyClient
from client.testing import REPO, ServerProcess, free_port, libero_observation


def make_obs() -> dict:
    return libero_observation(0)


def summarize(samples_ms: list[float]) -> dict[str, float]:
    arr = np.asarray(samples_ms)
    total_s = arr.sum() / 1000.0
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "requests_per_s": float(len(arr) / total_s),
    }


def bench_ours(n: int, warmup: int) -> dict[str, float]:
    obs = make_obs()
    with ServerProcess(args=["--policy", "debug", "--log-level", "WARNING"]) as server:
        client = PolicyClient(port=server.port, timeout_s=10)
        for _ in range(warmup):
            client.infer(obs)
        samples, server_ms = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            client.infer(obs)
            samples.append((time.perf_counter() - t0) * 1000.0)
            server_ms.append(float(client.last_reply["timing"]["server_ms"]))
        client.close()
    return {**summarize(samples), "server_internal_p50_ms": float(np.median(server_ms))}


def bench_gr00t(n: int, warmup: int) -> dict[str, float]:
    """The same observation through Isaac-GR00T's protocol (REQ, ``np.save`` arrays) on our real server."""
    from client.gr00t_client import Gr00tClient, libero_gr00t_observation

    obs = make_obs()
    g_obs = libero_gr00t_observation(obs["image"], obs["wrist_image"], obs["state"], obs["instruction"])
    with ServerProcess(args=["--policy", "debug", "--log-level", "WARNING"]) as server, \
            Gr00tClient(port=server.port, timeout_s=10) as client:
        samples = timed_calls(lambda: client.get_action(g_obs), n, warmup)
        assert len(client.get_action(g_obs)) == 7
    return summarize(samples)


def bench_raw_zmq(n: int, warmup: int) -> dict[str, float]:
    """The floor: the same request frames through a bare DEALER -> ROUTER echo thread (no parsing, no policy)."""
    import threading

    import zmq

    from client import wire

    frames = wire.pack_frames(wire.make_request("infer", "bench", make_obs()))
    reply = wire.pack_frames(wire.ok_reply("bench", actions=np.zeros((8, 7), np.float32)))
    ctx = zmq.Context()
    port = free_port()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")

    def echo() -> None:
        while True:
            msg = router.recv_multipart(copy=False)
            if len(msg) == 2 and msg[1].bytes == b"stop":
                return
            router.send_multipart([msg[0], *reply])

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    samples = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        dealer.send_multipart(frames, copy=False)
        dealer.recv_multipart()
        if i >= warmup:
            samples.append((time.perf_counter() - t0) * 1000.0)
    dealer.send_multipart([b"stop"])
    th.join(timeout=5)
    dealer.close(0)
    router.close(0)
    ctx.term()
    return summarize(samples)


def bench_client_vs_echo_process(n: int, warmup: int) -> dict[str, float]:
    """Our client (encode, send, poll, decode, id check) against a bare ZeroMQ echo in another process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.support.zmq_echo_server", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        obs = make_obs()
        with PolicyClient(port=port, timeout_s=10) as client:
            samples = timed_calls(lambda: client.infer(obs), n, warmup)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return summarize(samples)


def bench_websocket(n: int, warmup: int) -> dict[str, float]:
    from websockets.sync.client import connect

    from benchmarks.support.ws_baseline_server import pack_array, unpack_array

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.support.ws_baseline_server", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        obs = make_obs()
        with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
            def call() -> None:
                ws.send(msgpack.packb(obs, default=pack_array))
                reply = msgpack.unpackb(ws.recv(), object_hook=unpack_array)
                assert reply["actions"].shape == (8, 7)

            samples = timed_calls(call, n, warmup)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return summarize(samples)


def timed_calls(call, n: int, warmup: int) -> list[float]:
    """Run ``call`` ``warmup`` times untimed, then ``n`` times; the latencies in ms."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def bench_ws_frontend(n: int, warmup: int) -> dict[str, float]:
    """openpi's websocket protocol on our real server (``--ws-port``), the same observation under openpi's keys."""
    from websockets.sync.client import connect

    from server.websocket_frontend import packb as openpi_packb
    from server.websocket_frontend import unpackb as openpi_unpackb

    obs = make_obs()
    openpi_obs = {"observation/image": obs["image"], "observation/wrist_image": obs["wrist_image"],
                  "observation/state": obs["state"], "prompt": obs["instruction"]}
    ws_port = free_port()
    with ServerProcess(args=["--policy", "debug", "--log-level", "WARNING", "--ws-port", str(ws_port)]), \
            connect(f"ws://127.0.0.1:{ws_port}", compression=None, max_size=None) as ws:
        ws.recv(timeout=10)  # the metadata sent on connect

        def call() -> None:
            ws.send(openpi_packb(openpi_obs))
            reply = openpi_unpackb(ws.recv())
            assert reply["actions"].shape == (8, 7)

        samples = timed_calls(call, n, warmup)
    return summarize(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI size (300 requests each)")
    p.add_argument("--requests", type=int, default=None)
    ns = p.parse_args()
    n = ns.requests or (300 if ns.quick else 3000)
    warmup = 50
    # Interleave the two to share whatever the machine is doing: ours, baseline, ours, baseline.
    halves = [n // 2, n - n // 2]
    ours, ws, raw, echo, gr00t = [], [], [], [], []
    ws_front: list[dict[str, float]] = []
    for h in halves:
        ours.append(bench_ours(h, warmup))
        gr00t.append(bench_gr00t(h, warmup))
        ws.append(bench_websocket(h, warmup))
        ws_front.append(bench_ws_frontend(h, warmup))
        raw.append(bench_raw_zmq(h, warmup))
        echo.append(bench_client_vs_echo_process(h, warmup))
    def merge(parts):
        return {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
    o, w, r0, e, g = merge(ours), merge(ws), merge(raw), merge(echo), merge(gr00t)
    rows = [("ours: msgpack + ZeroMQ (real server)", o), ("baseline: websocket + msgpack-numpy", w),
            ("floor: bare pyzmq echo, same frames", r0), ("our client vs bare echo process", e),
            ("GR00T protocol (REQ + np.save), our server", g)]
    wf = merge(ws_front)
    rows.append(("openpi websocket, our server (--ws-port)", wf))
    print(f"{'transport':40s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s} {'req/s':>8s}")
    for name, r in rows:
        print(f"{name:40s} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['mean_ms']:8.3f} {r['requests_per_s']:8.0f}")
    ratio = o["p50_ms"] / w["p50_ms"]
    print(f"p50 ratio ours/websocket: {ratio:.3f} (target <= 0.5); ours p50 {o['p50_ms']:.3f} ms (target < 1 ms)")
    print(f"openpi websocket on our server / websocket baseline echo (p50): {wf['p50_ms'] / w['p50_ms']:.3f} "
          f"(target <= 1.0)")
    print(f"inside our server (receive -> reply, p50): {o['server_internal_p50_ms']:.3f} ms; "
          f"bare ZeroMQ floor / websocket: {r0['p50_ms'] / w['p50_ms']:.3f}; "
          f"our client vs a bare echo process / websocket: {e['p50_ms'] / w['p50_ms']:.3f}")
    print(json.dumps({
        "requests_each": n,
        "ours_p50_ms": round(o["p50_ms"], 4), "ours_p99_ms": round(o["p99_ms"], 4),
        "websocket_p50_ms": round(w["p50_ms"], 4), "websocket_p99_ms": round(w["p99_ms"], 4),
        "ours_requests_per_s": round(o["requests_per_s"], 1),
        "websocket_requests_per_s": round(w["requests_per_s"], 1),
        "p50_ratio_vs_websocket": round(ratio, 4),
        "ours_server_internal_p50_ms": round(o["server_internal_p50_ms"], 4),
        "raw_zmq_echo_p50_ms": round(r0["p50_ms"], 4),
        "raw_zmq_floor_ratio_vs_websocket": round(r0["p50_ms"] / w["p50_ms"], 4),
        "client_vs_echo_process_p50_ms": round(e["p50_ms"], 4),
        "client_vs_echo_process_ratio_vs_websocket": round(e["p50_ms"] / w["p50_ms"], 4),
        "gr00t_p50_ms": round(g["p50_ms"], 4), "gr00t_p99_ms": round(g["p99_ms"], 4),
        "gr00t_p50_ratio_vs_websocket": round(g["p50_ms"] / w["p50_ms"], 4),
        "ws_frontend_p50_ms": round(wf["p50_ms"], 4), "ws_frontend_p99_ms": round(wf["p99_ms"], 4),
        "ws_frontend_p50_ratio_vs_websocket_baseline": round(wf["p50_ms"] / w["p50_ms"], 4),
    }))


if __name__ == "__main__":
    main()
