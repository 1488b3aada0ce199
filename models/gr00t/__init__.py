"""GR00T N1.5: Eagle 2.5 VLM backbone (SigLIP + Qwen3, truncated) -> flow-matching DiT action head."""
