"""Benchmarks: run each as ``python -m benchmarks.bench_NAME`` from the repository root."""
