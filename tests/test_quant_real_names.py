"""Default selection against the released checkpoints' full key lists (fixtures kept by models/, if present)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from quant.patterns import DEFAULT_EXCLUDE, DEFAULT_INCLUDE

FIX = Path(__file__).resolve().parents[1] / "models" / "fixtures"


def _selected(fname: str) -> list[str]:
    path = FIX / fname
    assert path.exists(), f"{path} is missing (python -m models.common.keys regenerates it)"
    keys = json.loads(path.read_text())["keys"]
    mods = [k[: -len(".weight")] for k, v in keys.items() if k.endswith(".weight") and len(v) == 2]
    inc, exc = re.compile(DEFAULT_INCLUDE), re.compile(DEFAULT_EXCLUDE)
    return [m for m in mods if inc.search(m) and not exc.search(m)]


def _kinds(names: list[str]) -> Counter[str]:
    return Counter(re.sub(r"\.\d+\.", ".N.", n) for n in names)


def test_gr00t_n15_3b() -> None:
    sel = _selected("gr00t_n15_3b_keys.json")
    kinds = _kinds(sel)
    assert len(sel) == 12 * 7 + 16 * 2 + 4 * 2  # truncated Qwen3 (12 layers) + DiT ff + VL-self-attention ff
    assert kinds["action_head.model.transformer_blocks.N.ff.net.2"] == 16
    assert kinds["backbone.eagle_model.language_model.model.layers.N.self_attn.q_proj"] == 12
    assert not [n for n in sel if re.search(r"vision_model|attn1|proj_out|action_decoder|mlp1|lm_head", n)]


def test_openvla_7b() -> None:
    sel = _selected("openvla_7b_keys.json")
    assert len(sel) == 32 * 7 and all(n.startswith("language_model.model.layers.") for n in sel)
