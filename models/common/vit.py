"""A small ViT whose parameter names and shapes equal timm's ``VisionTransformer`` as stored in OpenVLA.

timm cannot be installed beside this torch (it hard-imports torchvision), and upstream OpenVLA pins timm
0.9.10-0.9.16 anyway. So we reimplement just what Prismatic uses: DINOv2 with register tokens and LayerScale
(``ls1.scale_factor`` is how HF-converted OpenVLA checkpoints name timm's ``LayerScale.gamma``), SigLIP with the
``attn_pool`` latent-attention head, and ``get_intermediate_layers``-style feature extraction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ViTConfig:
    """Architecture of one timm-style ViT (the fields timm's ``VisionTransformer`` takes that matter here)."""

    image_size: int = 224
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_hidden_dim: int = 4096
    class_token: bool = True
    num_reg_tokens: int = 0
    layer_scale: bool = False  # DINOv2: LayerScale (init 1e-5) after attention and MLP
    global_pool: str = ""  # "map" adds timm's AttentionPoolLatent as ``attn_pool``
    act: str = "gelu"  # "gelu" (exact, timm 0.9.x default) or "gelu_tanh"
    eps: float = 1e-6
    feature_block: int = -2  # features = output of blocks[feature_block] (Prismatic: second to last)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


class PatchEmbed(nn.Module):
    """Non-overlapping patches via a strided conv (``patch_embed.proj``)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, cfg.patch_size, cfg.patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Fused-qkv multi-head self-attention (timm ``attn.qkv`` / ``attn.proj``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = _act(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale; the parameter is named ``scale_factor`` as in OpenVLA's HF checkpoint."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Block(nn.Module):
    """Pre-norm transformer block (norm1/attn/ls1, norm2/mlp/ls2)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.attn = Attention(d, cfg.num_heads)
        self.ls1: nn.Module = LayerScale(d) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)
        self.mlp = Mlp(d, cfg.mlp_hidden_dim, cfg.act)
        self.ls2: nn.Module = LayerScale(d) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """timm's MAP head (``attn_pool``): one learned latent query attends over all tokens, then an MLP.

    Prismatic never calls it (features come from an intermediate block) but it is in the checkpoint, so it must
    exist for the key set to match.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.num_heads = cfg.num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d, bias=True)
        self.kv = nn.Linear(d, 2 * d, bias=True)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.eps)
        self.mlp = Mlp(d, cfg.mlp_hidden_dim, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, h, c // h).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, c)
        out = self.proj(out)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class VisionTransformer(nn.Module):
    """timm-compatible ViT (``no_embed_class`` position embedding: positions cover patch tokens only)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.num_prefix_tokens = int(cfg.class_token) + cfg.num_reg_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_reg_tokens, d)) if cfg.num_reg_tokens else None
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches, d))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.eps)
        self.attn_pool = AttentionPoolLatent(cfg) if cfg.global_pool == "map" else None
        self._init_weights()

    def _init_weights(self) -> None:
        """Truncated-normal-ish init so tiny random models give non-degenerate features (no-op on meta)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        for p in (self.cls_token, self.reg_token):
            if p is not None:
                nn.init.normal_(p, std=1e-6)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patchify, add positions, then prepend class and register tokens (timm order: cls, reg, patches)."""
        x = self.patch_embed(x) + self.pos_embed
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        return torch.cat([*prefix, x], dim=1) if prefix else x

    def forward_features_at(self, x: torch.Tensor, block_index: int | None = None) -> torch.Tensor:
        """Patch tokens after ``blocks[block_index]`` (no final norm, prefix tokens dropped).

        This is what timm's ``get_intermediate_layers(n={i})`` returns and what Prismatic feeds the projector.
        """
        idx = self.cfg.feature_block if block_index is None else block_index
        idx = idx % len(self.blocks)
        h = self.embed(x)
        for blk in self.blocks[: idx + 1]:
            h = blk(h)
        return h[:, self.num_prefix_tokens :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features_at(x)



def resize_patch_embed(weight: torch.Tensor, patch: int) -> torch.Tensor:
    """A ``[D, C, p, p]`` patch-embedding kernel for ``patch``-pixel patches that embeds a patch as the old kernel
    embeds it resized to ``p`` pixels (FlexiViT's PI-resize): ``<w_new, x> = <w_old, B x>`` for every patch ``x``,
    with ``B`` the bilinear resize to ``p``. For ``patch < p`` that is exactly ``w_new = B^T w_old``; a larger
    patch takes the least-squares solution (``pinv``)."""
    d, c, p, p2 = weight.shape
    if p != p2 or patch < 1:
        raise ValueError(f"cannot resize a {tuple(weight.shape)} kernel to {patch}-pixel patches")
    if patch == p:
        return weight.clone()
    basis = torch.eye(patch * patch, dtype=torch.float64).reshape(-1, 1, patch, patch)
    resize = F.interpolate(basis, size=(p, p), mode="bilinear", align_corners=False, antialias=patch > p)
    b = resize.reshape(patch * patch, p * p).T  # [p*p, patch*patch]: x -> B x
    w = weight.double().reshape(d * c, p * p)
    new = w @ b if patch < p else w @ torch.linalg.pinv(b.T)
    return new.reshape(d, c, patch, patch).to(weight.dtype)


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch-only position embeddings ``[1, g*g, D]`` bicubically resampled to a ``grid x grid`` layout."""
    n, d = pos.shape[1], pos.shape[2]
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"position embeddings for {n} patches are not a square grid")
    x = pos.reshape(1, g, g, d).permute(0, 3, 1, 2).double()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos.dtype)
