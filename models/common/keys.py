"""Key/shape fixtures of the full-size released checkpoints, built on the meta device (no weights).

``python -m models.common.keys --policy openvla|gr00t --out FILE`` writes the build's list (for inspection).
Tests never compare against such a self-generated list: ``tests/test_models_keys.py`` checks the meta build
against ``models/fixtures/*_public_keys.json``, names and shapes written by hand from public sources.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

HEADERS: dict[str, str] = {
    "openvla": (
        "openvla/openvla-7b (HF format). Names: the checkpoint's module tree as described by the public "
        "Prismatic HF code and model card (vision_backbone.featurizer = timm DINOv2-L/14-reg4 with LayerScale "
        "stored as ls*.scale_factor, vision_backbone.fused_featurizer = timm SigLIP So400m/14 incl. attn_pool, "
        "projector.fc1-3, language_model = LlamaForCausalLM). The released model.safetensors.index.json lists "
        "names only; shapes are computed from config.json (LlamaConfig defaults + vocab 32064, image_sizes 224, "
        "timm 0.9.x architectures). Cross-check: total parameters 7,541,237,184 = the public '7.54B params' "
        "and 15,082,474,368 bytes in bf16 (3 shards 6.95+6.97+1.16 GB)."
    ),
    "gr00t": (
        "nvidia/GR00T-N1.5-3B. Names: GR00T_N1_5 module tree from the public Isaac-GR00T sources "
        "(backbone.eagle_model.{vision_model.vision_model (transformers 4.x SiglipVisionModel), mlp1.0, "
        "language_model (Qwen3ForCausalLM truncated to select_layer=12)}, action_head.{vlln, vl_self_attention, "
        "state/action encoders+decoder as CategorySpecificLinear W/b, future_tokens, position_embedding, "
        "model = DiT}). Shapes computed from config.json (action_head_cfg, backbone_cfg) and the bundled Eagle 2.5 "
        "config (Qwen3-1.7B text, SigLIP 400M/14 @224 with vision_use_head default true). "
        "Unverified: whether the tied Qwen3 matrix is stored as model.embed_tokens.weight (listed here), as "
        "lm_head.weight, or both; the loader accepts any of these."
    ),
}


def key_fixture(policy: str) -> dict[str, Any]:
    """Build the full-size architecture on meta and return ``{"_header", "total_params", "keys"}``."""
    from models.common.loading import checkpoint_shapes

    if policy == "openvla":
        from models.openvla.config import OpenVLAConfig
        from models.openvla.loading import build_empty

        model = build_empty(OpenVLAConfig())
    elif policy == "gr00t":
        from models.gr00t.config import GR00TConfig
        from models.gr00t.loading import build_empty

        model = build_empty(GR00TConfig())
    else:
        raise ValueError(policy)
    shapes = checkpoint_shapes(model)
    return {
        "_header": HEADERS[policy],
        "total_params": sum(math.prod(s) for s in shapes.values()),
        "num_keys": len(shapes),
        "keys": {k: list(v) for k, v in sorted(shapes.items())},
    }


def dumps_fixture(fx: dict[str, Any]) -> str:
    """JSON with one ``"key": [shape]`` per line, so diffs of the fixture stay readable."""
    head = {k: v for k, v in fx.items() if k != "keys"}
    lines = [json.dumps(head, indent=1)[:-2] + ",", ' "keys": {']
    items = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in fx["keys"].items()]
    lines.append(",\n".join(items))
    lines.append(" }\n}\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, choices=["openvla", "gr00t"])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    fx = key_fixture(args.policy)
    args.out.write_text(dumps_fixture(fx))
    print(json.dumps({"out": str(args.out), "num_keys": fx["num_keys"], "total_params": fx["total_params"]}))


if __name__ == "__main__":
    main()
