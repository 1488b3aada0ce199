"""Default layer selection against the released checkpoints' key names (public facts, tests/public_keys.py)."""

from __future__ import annotations

import re
from collections import Counter

from public_keys import expand, public_fixture

from quant.patterns import DEFAULT_EXCLUDE, DEFAULT_INCLUDE


def _selected(fname: str) -> list[str]:
    keys = expand(public_fixture(fname))
    mods = [k[: -len(".weight")] for k, v in keys.items() if k.endswith(".weight") and v is not None and len(v) == 2]
    inc, exc = re.compile(DEFAULT_INCLUDE), re.compile(DEFAULT_EXCLUDE)
    return [m for m in mods if inc.search(m) and not exc.search(m)]


def _kinds(names: list[str]) -> Counter[str]:
    return Counter(re.sub(r"\.\d+\.", ".N.", n) for n in names)


def test_gr00t_n15_3b() -> None:
    sel = _selected("gr00t_n15_3b_public_keys.json")
    kinds = _kinds(sel)
    assert len(sel) == 12 * 7 + 16 * 2 + 4 * 2  # truncated Qwen3 (12 layers) + DiT ff + VL-self-attention ff
    assert kinds["action_head.model.transformer_blocks.N.ff.net.2"] == 16
    assert kinds["backbone.eagle_model.language_model.model.layers.N.self_attn.q_proj"] == 12
    assert not [n for n in sel if re.search(r"vision_model|attn1|proj_out|action_decoder|mlp1|lm_head", n)]


def test_openvla_7b() -> None:
    sel = _selected("openvla_7b_public_keys.json")
    assert len(sel) == 32 * 7 and all(n.startswith("language_model.model.layers.") for n in sel)
