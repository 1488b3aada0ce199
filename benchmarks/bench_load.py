"""Checkpoint load benchmark: peak RSS and time of ``models.load_pretrained`` in a fresh interpreter.

``python -m benchmarks.bench_load [--quick] [--model-path DIR --policy P] [--dtype float32]``

Without ``--model-path`` it first builds an OpenVLA checkpoint under ``artifacts/bench_load/``: the tiny preset
(``--quick``, ~4 MB) or the medium preset (~320 MB fp32, 6 Llama layers of width 1024). The load then runs in a
child process that imports torch, transformers and ``models`` first; that interpreter's RSS is the baseline and
is subtracted. The child resets the kernel's RSS high-water mark (``/proc/self/clear_refs``) after the imports,
so the peak is the load's own. Target: (peak - baseline) <= 1.3 x the weights' bytes on disk.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from client.testing import REPO


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(policy: str, path: str, dtype_name: str) -> None:
    """Runs in the fresh interpreter: baseline after imports, reset HWM, load, report."""
    import gc

    import torch

    import models
    import models.gr00t.loading  # noqa: F401  (import cost belongs to the baseline)
    import models.openvla.loading  # noqa: F401

    gc.collect()
    baseline = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    t0 = time.perf_counter()
    model = models.load_pretrained(policy, path, dtype=getattr(torch, dtype_name))
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"baseline_kb": baseline, "peak_kb": peak, "load_seconds": seconds,
                      "param_bytes": params, "hwm_reset": hwm_reset}))


def build_checkpoint(out: Path, preset: str) -> None:
    if (out / "model.safetensors.index.json").exists():
        return
    subprocess.run([sys.executable, "-m", "models.openvla.tiny", "--out", str(out), "--preset", preset,
                    "--shards", "3"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model-path", type=Path)
    ap.add_argument("--policy", default="openvla", choices=["openvla", "openvla-rsd", "gr00t"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.policy, str(args.model_path), args.dtype)
        return
    path = args.model_path
    if path is None:
        preset = "tiny" if args.quick else "medium"
        path = REPO / "artifacts" / "bench_load" / f"openvla_{preset}"
        build_checkpoint(path, preset)
        args.policy = "openvla"
    weights = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_load", "--child", "--model-path", str(path),
         "--policy", args.policy, "--dtype", args.dtype],
        check=True, capture_output=True, text=True, cwd=REPO,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    delta = (r["peak_kb"] - r["baseline_kb"]) * 1024
    result = {
        "policy": args.policy,
        "model_path": str(path),
        "weights_mb": round(weights / 1e6, 2),
        "loaded_param_mb": round(r["param_bytes"] / 1e6, 2),
        "baseline_rss_mb": round(r["baseline_kb"] * 1024 / 1e6, 1),
        "peak_rss_mb": round(r["peak_kb"] * 1024 / 1e6, 1),
        "peak_rss_over_baseline_mb": round(delta / 1e6, 2),
        "peak_rss_to_weights_ratio": round(delta / weights, 3),
        "load_seconds": round(r["load_seconds"], 3),
        "hwm_reset": r["hwm_reset"],
        "target_ratio": 1.3,
    }
    print(f"loaded {result['weights_mb']} MB of weights in {result['load_seconds']} s; "
          f"peak RSS over baseline {result['peak_rss_over_baseline_mb']} MB "
          f"(ratio {result['peak_rss_to_weights_ratio']}, baseline {result['baseline_rss_mb']} MB)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
