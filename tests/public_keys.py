"""The released checkpoints' key names and shapes as public facts (``models/fixtures/*_public_keys.json``, written
by hand from public sources recorded in each file), expanded from their per-layer patterns. Shared by the key test
and the quantisation layer-selection test, so neither depends on key lists the project's own code generated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[1] / "models" / "fixtures"


def public_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def expand(fx: dict[str, Any]) -> dict[str, list[int] | None]:
    """Key -> shape (``None`` entries: dimensions the sources do not state) for every ``{i}`` of every group."""
    out: dict[str, list[int] | None] = {}
    for group in fx["groups"]:
        layers = group.get("layers")
        idx = [None] if layers is None else range(layers[0], layers[1], group.get("step", 1))
        for i in idx:
            for pattern, shape in group["keys"].items():
                key = pattern if i is None else pattern.replace("{i}", str(i))
                assert key not in out, key
                out[key] = shape
    return out
