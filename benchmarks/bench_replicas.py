"""Replica scaling: requests/s of one server and of ``--replicas 2`` behind one port, under the same client load.

``python -m benchmarks.bench_replicas [--quick] [--clients 8] [--seconds S] [--policy debug|openvla-rsd ...]``

Three rows, side by side in one run: one server (the usual ``--replicas 1``, no front), one server behind the
replica front (``--replica-endpoints``: what the extra hop costs) and ``--replicas 2``. Every client is a thread
with its own :class:`client.policy_client.PolicyClient` sending LIBERO-like observations back to back.

The per-request compute must be real for scaling to mean anything: by default the debug policy with
``delay_ms`` per forward pass and ``--max-batch 1`` (each request is one pass, so a replica serves at most
1000/delay_ms requests/s whatever the load; the sleep holds no core, so the figure does not depend on how busy
the machine is); ``--policy openvla-rsd`` serves the embedded default model at ``--torch-threads 1`` per replica
instead (CPU-bound: on a machine whose cores are busy the ratio says more about the machine than the front).
The last stdout line is one JSON object with ``replica_scaling_2_vs_1`` (= throughput(2) / throughput(1)).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from client.policy_client import PolicyClient
from client.testing import ServerProcess, libero_observation


def wait_ready(port: int, n: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with PolicyClient(port=port, timeout_s=10) as c:
        while time.monotonic() < deadline:
            reply = c.ping()
            if reply.get("status") == "ready" and reply.get("replicas", {"ready": 1})["ready"] >= n:
                return
            time.sleep(0.1)
    raise RuntimeError(f"{n} replica(s) not ready after {timeout_s:.0f}s")


def load(port: int, clients: int, seconds: float, warmup_s: float, size: int) -> dict[str, Any]:
    """``clients`` threads sending back to back; requests answered in the measured window, and errors."""
    stop = threading.Event()
    measuring = threading.Event()
    counts = [0] * clients
    errors = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def client(t: int) -> None:
        obs = [libero_observation(t * 10 + k, size=size) for k in range(4)]
        with PolicyClient(port=port, timeout_s=60) as c:
            i = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.infer(obs[i % len(obs)])
                except Exception:  # noqa: BLE001 - counted
                    errors[t] += measuring.is_set()
                    continue
                finally:
                    i += 1
                if measuring.is_set():
                    counts[t] += 1
                    latencies[t].append((time.perf_counter() - t0) * 1000.0)

    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(clients)]
    for th in threads:
        th.start()
    time.sleep(warmup_s)
    measuring.set()
    t0 = time.perf_counter()
    time.sleep(seconds)
    measuring.clear()
    elapsed = time.perf_counter() - t0
    stop.set()
    for th in threads:
        th.join(timeout=70)
    lat = sorted(x for row in latencies for x in row)
    return {"requests_per_s": sum(counts) / elapsed, "requests": sum(counts), "errors": sum(errors),
            "p50_ms": lat[len(lat) // 2] if lat else None, "p99_ms": lat[int(len(lat) * 0.99)] if lat else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short windows (the whole run < 90 s)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=None, help="measured window per row (default 5, quick 4)")
    p.add_argument("--policy", default="debug", help="debug (default, with --delay-ms) or openvla-rsd")
    p.add_argument("--delay-ms", type=float, default=20.0, help="debug policy forward-pass time")
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args(argv)
    seconds = args.seconds or (4.0 if args.quick else 15.0)
    warmup = 1.0 if args.quick else 3.0
    policy = ["--policy", args.policy, "--max-batch", "1"]
    if args.policy == "debug":
        policy += ["--policy-option", f"delay_ms={args.delay_ms}"]
    else:
        policy += ["--torch-threads", "1"]
    rows: dict[str, dict[str, Any]] = {}
    with ServerProcess(policy, ready_timeout_s=180) as one:
        rows["1 (one server)"] = load(one.port, args.clients, seconds, warmup, args.image_size)
        with ServerProcess(["--replica-endpoints", f"tcp://127.0.0.1:{one.port}"], ready_timeout_s=60) as front:
            wait_ready(front.port, 1)
            rows["1 (behind the front)"] = load(front.port, args.clients, seconds, warmup, args.image_size)
    with ServerProcess(["--replicas", "2", *policy], ready_timeout_s=180) as two:
        wait_ready(two.port, 2, timeout_s=180)
        rows["2 (--replicas 2)"] = load(two.port, args.clients, seconds, warmup, args.image_size)

    print(f"policy {args.policy}" + (f" delay_ms={args.delay_ms}" if args.policy == "debug" else "")
          + f", --max-batch 1, {args.clients} clients, {seconds:.0f} s per row")
    print(f"{'replicas':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, r in rows.items():
        print(f"{name:<24}{r['requests_per_s']:>10.1f}{r['p50_ms'] or 0:>10.1f}{r['p99_ms'] or 0:>10.1f}"
              f"{r['errors']:>8d}")
    one_tp = rows["1 (one server)"]["requests_per_s"]
    two_tp = rows["2 (--replicas 2)"]["requests_per_s"]
    print(json.dumps({
        "benchmark": "replicas", "policy": args.policy, "clients": args.clients, "seconds": seconds,
        "delay_ms": args.delay_ms if args.policy == "debug" else None,
        "throughput_1_replica": one_tp, "throughput_1_replica_via_front": rows["1 (behind the front)"]["requests_per_s"],
        "throughput_2_replicas": two_tp,
        "replica_scaling_2_vs_1": two_tp / one_tp if one_tp else None,
        "errors": sum(r["errors"] for r in rows.values()),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
