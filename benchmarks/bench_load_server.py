"""Load and soak: N client processes hammering ``infer`` on the real server.

    python -m benchmarks.bench_load_server [--quick] [--policy NAME] [--requests-per-level N]

For each client count (1, 2, 4, 8, 16) the same total number of requests is spread over N client
processes; reported: throughput, p50/p99 latency, lost/mismatched replies (exact check with the
debug policy, id/shape check otherwise), batch sizes seen, and the server's RSS before and after the
whole run (soak: >= 10,000 requests in the full run). Then an overload phase against a server with a
tiny queue: every request must get either a chunk or an ``overloaded`` reply, none may hang.
Last line: JSON (``batching_gain_8_vs_1``, ``lost_replies``, ``rss_growth_mb``, ...).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import numpy as np

from client.testing import ServerProcess, libero_observation


def make_obs(k: int, image_size: int) -> dict:
    return libero_observation(k, image_size)


def client_worker(port: int, worker: int, n: int, exact: bool, image_size: int, start_at: float, out) -> None:
    from client.policy_client import PolicyClient, PolicyClientError
    from server.policies.debug import expected_debug_actions

    lat, lost, mismatched, batch_sizes = [], 0, 0, []
    observations = [make_obs(worker * 100000 + i, image_size) for i in range(min(n, 16))]
    client = PolicyClient(port=port, timeout_s=60)
    while time.time() < start_at:
        time.sleep(0.001)
    for i in range(n):
        obs = observations[i % len(observations)]
        t0 = time.perf_counter()
        try:
            actions = client.infer(obs)
        except PolicyClientError:
            lost += 1
            continue
        lat.append((time.perf_counter() - t0) * 1000.0)
        batch_sizes.append(client.last_reply["timing"].get("batch_size", 1))
        if exact and not np.allclose(actions, expected_debug_actions(obs), atol=1e-6):
            mismatched += 1
        elif actions.ndim != 2:
            mismatched += 1
    client.close()
    out.put({"lat": lat, "lost": lost, "mismatched": mismatched, "batch_sizes": batch_sizes,
             "stale": client.stale_replies_dropped})


def run_level(port: int, n_clients: int, total: int, exact: bool, image_size: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    per = max(1, total // n_clients)
    start_at = time.time() + 3.0 + 0.3 * n_clients  # let every process import before the start line
    procs = [ctx.Process(target=client_worker, args=(port, w, per, exact, image_size, start_at, out))
             for w in range(n_clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=900) for _ in procs]
    elapsed = time.time() - start_at
    for p in procs:
        p.join()
    lat = np.concatenate([r["lat"] for r in results]) if any(r["lat"] for r in results) else np.zeros(1)
    sizes = np.concatenate([r["batch_sizes"] for r in results]) if results else np.zeros(1)
    return {
        "clients": n_clients,
        "requests": per * n_clients,
        "throughput_rps": per * n_clients / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_batch": float(sizes.mean()),
        "lost": sum(r["lost"] for r in results),
        "mismatched": sum(r["mismatched"] for r in results),
        "stale_dropped": sum(r["stale"] for r in results),
    }


def overload_phase(policy_args: list[str], image_size: int, burst: int) -> dict:
    import zmq

    from client import wire

    with ServerProcess(args=[*policy_args, "--max-queue", "4", "--max-batch", "2", "--log-level", "ERROR"],
                       default_policy="--policy" not in policy_args) as server:
        socks = []
        t0 = time.perf_counter()
        for k in range(burst):
            s = zmq.Context.instance().socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.1:{server.port}")
            s.send(wire.packb(wire.make_request("infer", f"o{k}", make_obs(k, image_size))))
            socks.append(s)
        ok = overloaded = other = hung = 0
        for s in socks:
            if not s.poll(60000):
                hung += 1
                continue
            reply = wire.unpackb(s.recv_multipart()[-1])
            if reply["ok"]:
                ok += 1
            elif reply["error"]["code"] == "overloaded":
                overloaded += 1
            else:
                other += 1
            s.close()
        seconds = time.perf_counter() - t0
    return {"burst": burst, "ok": ok, "overloaded": overloaded, "other_errors": other, "hung": hung,
            "seconds": round(seconds, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI size: 1/2/4/8 clients, 200 requests per level")
    p.add_argument("--policy", default=None, help="server policy (default: the server's embedded default)")
    p.add_argument("--model-path", default=None)
    p.add_argument("--requests-per-level", type=int, default=None)
    p.add_argument("--image-size", type=int, default=256)
    ns = p.parse_args()
    import psutil

    from client.policy_client import PolicyClient

    levels = [1, 2, 4, 8] if ns.quick else [1, 2, 4, 8, 16]
    per_level = ns.requests_per_level or (200 if ns.quick else 2400)
    policy_args = (["--policy", ns.policy] if ns.policy else []) + (
        ["--model-path", ns.model_path] if ns.model_path else [])
    rows = []
    with ServerProcess(args=[*policy_args, "--log-level", "WARNING"], ready_timeout_s=600,
                       default_policy=not policy_args) as server:
        with PolicyClient(port=server.port) as c:
            meta = c.metadata()
        exact = meta.get("policy") == "debug"
        rss = psutil.Process(server.proc.pid)
        run_level(server.port, 1, 20, exact, ns.image_size)  # warm-up
        rss_before = rss.memory_info().rss / 2**20
        for n in levels:
            rows.append(run_level(server.port, n, per_level, exact, ns.image_size))
        rss_after = rss.memory_info().rss / 2**20
    burst = 32 if ns.quick else 64
    # The debug policy answers in microseconds, so give it a simulated 30 ms forward pass here:
    # the queue can only fill when inference is slower than arrivals, as with a real model.
    over_args = policy_args + (["--policy-option", "delay_ms=30"] if exact else [])
    over = overload_phase(over_args, ns.image_size, burst)

    print(f"policy: {meta.get('policy')} ({meta.get('model_id')}); image {ns.image_size}px; exact check: {exact}")
    print(f"{'clients':>7s} {'requests':>8s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'batch':>6s} "
          f"{'lost':>5s} {'mismatch':>8s}")
    for r in rows:
        print(f"{r['clients']:7d} {r['requests']:8d} {r['throughput_rps']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['mean_batch']:6.2f} {r['lost']:5d} {r['mismatched']:8d}")
    total = sum(r["requests"] for r in rows)
    by_n = {r["clients"]: r for r in rows}
    gain = by_n[8]["throughput_rps"] / by_n[1]["throughput_rps"]
    print(f"server RSS {rss_before:.1f} MB -> {rss_after:.1f} MB over {total} requests "
          f"(growth {rss_after - rss_before:+.1f} MB; bound 50 MB)")
    print(f"dynamic batching gain (8 clients / 1 client throughput): {gain:.2f}x")
    print(f"overload: burst of {over['burst']} against --max-queue 4: {over['ok']} served, "
          f"{over['overloaded']} overloaded, {over['other_errors']} other errors, {over['hung']} hung")
    print(json.dumps({
        "policy": meta.get("policy"),
        "total_requests": total,
        "throughput_rps_by_clients": {str(r["clients"]): round(r["throughput_rps"], 1) for r in rows},
        "p50_ms_by_clients": {str(r["clients"]): round(r["p50_ms"], 3) for r in rows},
        "p99_ms_by_clients": {str(r["clients"]): round(r["p99_ms"], 3) for r in rows},
        "batching_gain_8_vs_1": round(gain, 3),
        "lost_replies": sum(r["lost"] for r in rows),
        "mismatched_replies": sum(r["mismatched"] for r in rows),
        "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),
        "overload_served": over["ok"], "overload_overloaded": over["overloaded"], "overload_hung": over["hung"],
    }))


if __name__ == "__main__":
    main()
