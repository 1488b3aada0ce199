"""Helpers the benchmarks and the top-level scripts share (matrix runner, baseline servers, W4A8 serving)."""
