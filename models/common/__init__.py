"""Shared pieces of the model zoo: checkpoint I/O, meta-device construction, ViTs, tokenizers."""
