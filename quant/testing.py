"""Small module trees with the *real* GR00T N1.5 and OpenVLA module names (see ``models/fixtures/*_keys.json``).

Used by the tests and by ``python -m quant.scan --policy demo-gr00t|demo-openvla`` so that layer selection can be
checked without ``models/`` or any checkpoint. Widths are tiny; only names, nesting and module types matter.
"""

from __future__ import annotations

import torch
from torch import nn


class _Tree(nn.Module):
    """A container whose children are given as keyword arguments (keeps the builders readable)."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for k, v in children.items():
            self.add_module(k, v)


class CategorySpecificLinear(nn.Module):
    """GR00T's per-embodiment linear: raw parameters ``W [E, in, out]``, ``b [E, out]`` (not an nn.Linear)."""

    def __init__(self, n_emb: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.zeros(n_emb, d_in, d_out))
        self.b = nn.Parameter(torch.zeros(n_emb, d_out))


class _GeluProj(nn.Module):
    """diffusers ``GELU`` activation module: holds the first feed-forward Linear as ``proj``."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.proj(x))


def _ff(d: int, h: int) -> nn.Module:
    return _Tree(net=nn.ModuleList([_GeluProj(d, h), nn.Dropout(0.0), nn.Linear(h, d)]))


def _attn_diffusers(d: int) -> nn.Module:
    return _Tree(to_q=nn.Linear(d, d), to_k=nn.Linear(d, d), to_v=nn.Linear(d, d),
                 to_out=nn.ModuleList([nn.Linear(d, d), nn.Dropout(0.0)]))


def _llm_layer(d: int, kv: int, mlp: int, qk_norm: bool) -> nn.Module:
    attn = _Tree(q_proj=nn.Linear(d, d, bias=False), k_proj=nn.Linear(d, kv, bias=False),
                 v_proj=nn.Linear(d, kv, bias=False), o_proj=nn.Linear(d, d, bias=False))
    if qk_norm:
        attn.add_module("q_norm", nn.LayerNorm(d))
        attn.add_module("k_norm", nn.LayerNorm(kv))
    return _Tree(
        self_attn=attn,
        mlp=_Tree(gate_proj=nn.Linear(d, mlp, bias=False), up_proj=nn.Linear(d, mlp, bias=False),
                  down_proj=nn.Linear(mlp, d, bias=False)),
        input_layernorm=nn.LayerNorm(d), post_attention_layernorm=nn.LayerNorm(d),
    )


def _llm(vocab: int, d: int, kv: int, mlp: int, n: int, qk_norm: bool) -> nn.Module:
    return _Tree(
        model=_Tree(embed_tokens=nn.Embedding(vocab, d),
                    layers=nn.ModuleList([_llm_layer(d, kv, mlp, qk_norm) for _ in range(n)]), norm=nn.LayerNorm(d)),
        lm_head=nn.Linear(d, vocab, bias=False),
    )


def gr00t_like(llm_layers: int = 2, dit_layers: int = 2, vl_layers: int = 1, vis_layers: int = 1) -> nn.Module:
    """GR00T N1.5 shape: Eagle (SigLIP + mlp1 + Qwen3) backbone, flow-matching DiT action head."""
    vis, d, dit, emb = 24, 32, 16, 24
    def siglip_layer() -> nn.Module:
        return _Tree(
        self_attn=_Tree(q_proj=nn.Linear(vis, vis), k_proj=nn.Linear(vis, vis), v_proj=nn.Linear(vis, vis),
                        out_proj=nn.Linear(vis, vis)),
        layer_norm1=nn.LayerNorm(vis), mlp=_Tree(fc1=nn.Linear(vis, 2 * vis), fc2=nn.Linear(2 * vis, vis)),
        layer_norm2=nn.LayerNorm(vis),
        )

    vision = _Tree(vision_model=_Tree(
        embeddings=_Tree(patch_embedding=nn.Conv2d(3, vis, 14, 14), position_embedding=nn.Embedding(16, vis)),
        encoder=_Tree(layers=nn.ModuleList([siglip_layer() for _ in range(vis_layers)])),
        post_layernorm=nn.LayerNorm(vis),
    ))
    eagle = _Tree(vision_model=vision, mlp1=nn.Sequential(nn.Linear(vis, d)),
                  language_model=_llm(64, d, d // 2, 48, llm_layers, qk_norm=True))

    def dit_block() -> nn.Module:
        return _Tree(norm1=_Tree(linear=nn.Linear(dit, 2 * dit)), attn1=_attn_diffusers(dit), norm3=nn.LayerNorm(dit),
                     ff=_ff(dit, 4 * dit))

    def vl_block() -> nn.Module:
        return _Tree(norm1=nn.LayerNorm(d), attn1=_attn_diffusers(d), norm3=nn.LayerNorm(d), ff=_ff(d, 4 * d))

    action_head = _Tree(
        vlln=nn.LayerNorm(d),
        vl_self_attention=_Tree(transformer_blocks=nn.ModuleList([vl_block() for _ in range(vl_layers)])),
        state_encoder=_Tree(layer1=CategorySpecificLinear(4, 8, dit), layer2=CategorySpecificLinear(4, dit, emb)),
        action_encoder=_Tree(W1=CategorySpecificLinear(4, 7, emb), W2=CategorySpecificLinear(4, 2 * emb, emb),
                             W3=CategorySpecificLinear(4, emb, emb)),
        action_decoder=_Tree(layer1=CategorySpecificLinear(4, dit, dit), layer2=CategorySpecificLinear(4, dit, 7)),
        future_tokens=nn.Embedding(4, emb),
        position_embedding=nn.Embedding(32, emb),
        model=_Tree(
            timestep_encoder=_Tree(timestep_embedder=_Tree(linear_1=nn.Linear(8, dit), linear_2=nn.Linear(dit, dit))),
            transformer_blocks=nn.ModuleList([dit_block() for _ in range(dit_layers)]),
            norm_out=nn.LayerNorm(dit), proj_out_1=nn.Linear(dit, 2 * dit), proj_out_2=nn.Linear(dit, dit),
        ),
    )
    return _Tree(backbone=_Tree(eagle_model=eagle), action_head=action_head)


def openvla_like(llm_layers: int = 2, vit_layers: int = 1) -> nn.Module:
    """OpenVLA (Prismatic) shape: fused DINOv2 + SigLIP featurizers, 3-layer projector, Llama-2."""
    v1, v2, d = 16, 24, 32

    def vit(w: int) -> nn.Module:
        def blk() -> nn.Module:
            return _Tree(norm1=nn.LayerNorm(w), attn=_Tree(qkv=nn.Linear(w, 3 * w), proj=nn.Linear(w, w)),
                         norm2=nn.LayerNorm(w), mlp=_Tree(fc1=nn.Linear(w, 4 * w), fc2=nn.Linear(4 * w, w)))

        return _Tree(patch_embed=_Tree(proj=nn.Conv2d(3, w, 14, 14)),
                     blocks=nn.ModuleList([blk() for _ in range(vit_layers)]),
                     norm=nn.LayerNorm(w))

    return _Tree(
        vision_backbone=_Tree(featurizer=vit(v1), fused_featurizer=vit(v2)),
        projector=_Tree(fc1=nn.Linear(v1 + v2, 4 * (v1 + v2)), fc2=nn.Linear(4 * (v1 + v2), d), fc3=nn.Linear(d, d)),
        language_model=_llm(64, d, d, 48, llm_layers, qk_norm=False),
    )


def expected_default_selection(model: nn.Module) -> list[str]:
    """What the default regexes must select in a tree from this module (LLM projections + action-head ff)."""
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        llm = ".language_model.model.layers." in "." + name and name.rsplit(".", 1)[-1] in {
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        ff = name.startswith("action_head.") and (name.endswith(".ff.net.0.proj") or name.endswith(".ff.net.2"))
        if llm or ff:
            out.append(name)
    return out
