"""Flow-matching DiT action head of GR00T N1.5 (``action_head.*``), names as in the released checkpoint.

- ``vlln`` LayerNorm + ``vl_self_attention`` (4 pre-LN self-attention blocks) over backbone features.
- ``state_encoder`` / ``action_encoder`` / ``action_decoder``: per-embodiment ``CategorySpecificLinear`` layers
  stored as raw ``W [num_embodiments, in, out]`` and ``b [num_embodiments, out]`` parameters.
- ``model``: DiT with AdaLN (timestep conditioned), diffusers-style ``attn1.{to_q,to_k,to_v,to_out.0}`` and
  ``ff.net.{0.proj,2}``; even blocks cross-attend to VL tokens, odd blocks self-attend (interleaved).
- Sequence: ``cat(state (1), future_tokens (32), action tokens (16))``; the velocity is read on the last 16.
- Inference: Euler from noise, ``t = i/N``, ``t_disc = int(t * 1000)``, ``a += v / N``.

Deliberate difference: key-padding masks on VL tokens are applied (upstream passes none), so padded batch rows
give the same result as unpadded single rows; with no padding the computation is identical.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Where the flow-matching sampler starts (GR00TPolicyModel.initial_noise, the server's initial_noise option).
INITIAL_NOISE = ("gaussian", "zero")


class CategorySpecificLinear(nn.Module):
    """``x @ W[cat] + b[cat]`` with one weight matrix per embodiment."""

    def __init__(self, num_categories: int, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(num_categories, input_dim, hidden_dim))
        self.b = nn.Parameter(torch.empty(num_categories, hidden_dim))
        # In-place init after registration: free on the meta device (a randn here would allocate GBs).
        nn.init.normal_(self.W, std=0.02)
        nn.init.zeros_(self.b)

    def forward(self, x: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.W[cat_ids]) + self.b[cat_ids].unsqueeze(1)


class CategorySpecificMLP(nn.Module):
    """layer1 -> ReLU -> layer2 (both per embodiment)."""

    def __init__(self, num_categories: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer1 = CategorySpecificLinear(num_categories, input_dim, hidden_dim)
        self.layer2 = CategorySpecificLinear(num_categories, hidden_dim, output_dim)

    def forward(self, x: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.relu(self.layer1(x, cat_ids)), cat_ids)


def sinusoidal_encoding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """``[..., ] -> [..., dim]``: ``cat(sin, cos)`` with frequencies ``exp(-i log(1e4) / (dim/2))``."""
    half = dim // 2
    exponent = -torch.arange(half, dtype=torch.float32, device=timesteps.device) * (math.log(10000.0) / half)
    freqs = timesteps.float().unsqueeze(-1) * exponent.exp()
    return torch.cat([freqs.sin(), freqs.cos()], dim=-1)


class MultiEmbodimentActionEncoder(nn.Module):
    """W1(action) ‖ sinusoid(t) -> W2 -> swish -> W3 (all per embodiment)."""

    def __init__(self, action_dim: int, hidden_size: int, num_embodiments: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.W1 = CategorySpecificLinear(num_embodiments, action_dim, hidden_size)
        self.W2 = CategorySpecificLinear(num_embodiments, 2 * hidden_size, hidden_size)
        self.W3 = CategorySpecificLinear(num_embodiments, hidden_size, hidden_size)

    def forward(self, actions: torch.Tensor, timesteps: torch.Tensor, cat_ids: torch.Tensor) -> torch.Tensor:
        b, t, _ = actions.shape
        a = self.W1(actions, cat_ids)
        tau = sinusoidal_encoding(timesteps.unsqueeze(1).expand(b, t), self.hidden_size).to(a.dtype)
        x = F.silu(self.W2(torch.cat([a, tau], dim=-1), cat_ids))
        return self.W3(x, cat_ids)


def timestep_proj(timesteps: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1)``: ``cat(cos, sin)``."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1)
    emb = timesteps.float()[:, None] * exponent.exp()[None, :]
    return torch.cat([emb.cos(), emb.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepEncoder(nn.Module):
    def __init__(self, dim: int, channels: int = 256) -> None:
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedding(channels, dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        proj = timestep_proj(timesteps, self.channels).to(self.timestep_embedder.linear_1.weight.dtype)
        return self.timestep_embedder(proj)


class Attention(nn.Module):
    """diffusers-style attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), self or cross."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=True)
        self.to_k = nn.Linear(cross_dim or dim, inner, bias=True)
        self.to_v = nn.Linear(cross_dim or dim, inner, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True), nn.Dropout(0.0)])

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.heads, self.head_dim).transpose(1, 2)
        mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](out))


class GELUProj(nn.Module):
    """diffusers ``GELU(approximate="tanh")`` activation module: a Linear named ``proj`` then GELU."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net = [GELU(proj), Dropout, Linear, Dropout]`` -> keys ``ff.net.0.proj``, ``ff.net.2``."""

    def __init__(self, dim: int, inner: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.net:
            x = m(x)
        return x


class AdaLayerNorm(nn.Module):
    """``norm(x) * (1 + scale) + shift`` with ``scale, shift = linear(silu(temb)).chunk(2)``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class BasicTransformerBlock(nn.Module):
    """norm1 -> attn1 (+res) -> norm3 -> ff (+res); ``ada_norm`` (DiT) or affine ``layer_norm`` (VL-SA)."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_dim: int | None, norm_type: str,
                 dropout: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.ada = norm_type == "ada_norm"
        self.norm1: nn.Module = AdaLayerNorm(dim, eps) if self.ada else nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads, head_dim, cross_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=not self.ada)
        self.ff = FeedForward(dim, 4 * dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x, temb) if self.ada else self.norm1(x)
        x = x + self.dropout(self.attn1(h, context, key_mask))
        return x + self.ff(self.norm3(x))


class SelfAttentionTransformer(nn.Module):
    """``vl_self_attention``: plain pre-LN self-attention blocks over the VL tokens."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        heads, hd = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(heads * hd, heads, hd, None, "layer_norm", float(cfg.get("dropout", 0.0)))
            for _ in range(int(cfg["num_layers"]))
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.transformer_blocks:
            x = blk(x, key_mask=key_mask)
        return x


class DiT(nn.Module):
    """``action_head.model``: timestep-conditioned transformer with interleaved cross/self attention."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        heads, hd = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        dim = heads * hd
        self.inner_dim = dim
        self.interleave = bool(cfg.get("interleave_self_attention", False))
        cross = int(cfg["cross_attention_dim"])
        self.timestep_encoder = TimestepEncoder(dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(dim, heads, hd, None if (self.interleave and i % 2 == 1) else cross,
                                  cfg.get("norm_type", "ada_norm"), float(cfg.get("dropout", 0.0)))
            for i in range(int(cfg["num_layers"]))
        )
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, int(cfg["output_dim"]))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.timestep_encoder(timestep)
        x = hidden_states
        for i, blk in enumerate(self.transformer_blocks):
            if self.interleave and i % 2 == 1:
                x = blk(x, temb)
            else:
                x = blk(x, temb, encoder_hidden_states, encoder_attention_mask)
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out_2(x)


class FlowmatchingActionHead(nn.Module):
    """``action_head``: VL conditioning, per-embodiment encoders/decoder, DiT, Euler sampling, FM loss."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        n_emb = int(cfg["max_num_embodiments"])
        hidden, inp = int(cfg["hidden_size"]), int(cfg["input_embedding_dim"])
        self.action_dim, self.action_horizon = int(cfg["action_dim"]), int(cfg["action_horizon"])
        self.num_timestep_buckets = int(cfg["num_timestep_buckets"])
        dcfg = dict(cfg["diffusion_model_cfg"])
        dcfg.setdefault("cross_attention_dim", int(cfg["backbone_embedding_dim"]))
        self.model = DiT(dcfg)
        self.state_encoder = CategorySpecificMLP(n_emb, int(cfg["max_state_dim"]), hidden, inp)
        self.action_encoder = MultiEmbodimentActionEncoder(self.action_dim, inp, n_emb)
        self.action_decoder = CategorySpecificMLP(n_emb, hidden, hidden, self.action_dim)
        self.future_tokens = nn.Embedding(int(cfg["num_target_vision_tokens"]), inp)
        use_vlln = bool(cfg.get("use_vlln", True))
        bdim = int(cfg["backbone_embedding_dim"])
        self.vlln: nn.Module = nn.LayerNorm(bdim) if use_vlln else nn.Identity()
        self.vl_self_attention: nn.Module = (
            SelfAttentionTransformer(cfg["vl_self_attention_cfg"]) if use_vlln else nn.Identity()
        )
        self.add_pos_embed = bool(cfg.get("add_pos_embed", True))
        if self.add_pos_embed:
            self.position_embedding = nn.Embedding(int(cfg.get("max_seq_len", 1024)), inp)

    def process_backbone(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.vlln(features)
        if isinstance(self.vl_self_attention, SelfAttentionTransformer):
            x = self.vl_self_attention(x, mask)
        return x

    def _velocity(self, vl: torch.Tensor, mask: torch.Tensor | None, state_feat: torch.Tensor,
                  actions: torch.Tensor, t_disc: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        a = self.action_encoder(actions, t_disc, emb)
        if self.add_pos_embed:
            a = a + self.position_embedding(torch.arange(a.shape[1], device=a.device)).unsqueeze(0).to(a.dtype)
        fut = self.future_tokens.weight.unsqueeze(0).expand(a.shape[0], -1, -1).to(a.dtype)
        seq = torch.cat([state_feat, fut, a], dim=1)
        out = self.model(seq, vl, t_disc, mask)
        return self.action_decoder(out, emb)[:, -actions.shape[1] :]

    @torch.no_grad()
    def get_action(self, features: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor,
                   embodiment_id: torch.Tensor, num_steps: int | None = None,
                   generator: torch.Generator | None = None, initial_noise: str = "gaussian") -> torch.Tensor:
        """Euler integration of the learned velocity -> normalised actions ``[B, H, A]``.

        ``initial_noise``: ``gaussian`` starts from an N(0, I) draw (upstream; a sample of the learned action
        distribution), ``zero`` from the prior's mean (deterministic; the flow from the centre of the noise lands
        near the distribution's centre, which is what a regression metric rewards).
        """
        if initial_noise not in INITIAL_NOISE:
            raise ValueError(f"initial_noise must be one of {INITIAL_NOISE}, got {initial_noise!r}")
        n = int(num_steps or self.cfg["num_inference_timesteps"])
        vl = self.process_backbone(features, mask)
        state_feat = self.state_encoder(state.to(vl.dtype), embodiment_id)
        b = features.shape[0]
        shape = (b, self.action_horizon, self.action_dim)
        if initial_noise == "zero":
            actions = torch.zeros(shape, device=features.device, dtype=vl.dtype)
        else:
            actions = torch.randn(shape, generator=generator, device=features.device, dtype=torch.float32).to(vl.dtype)
        for i in range(n):
            t_disc = torch.full((b,), int(i / n * self.num_timestep_buckets), device=features.device, dtype=torch.long)
            v = self._velocity(vl, mask, state_feat, actions, t_disc, embodiment_id)
            actions = actions + v / n
        return actions

    def sample_time(self, batch: int, device: torch.device) -> torch.Tensor:
        """``t = (s - Beta(1.5, 1).sample) / s`` with ``s = 0.999`` (upstream: emphasises noisy times)."""
        beta = torch.distributions.Beta(float(self.cfg.get("noise_beta_alpha", 1.5)),
                                        float(self.cfg.get("noise_beta_beta", 1.0)))
        s = float(self.cfg.get("noise_s", 0.999))
        return ((s - beta.sample((batch,))) / s).to(device)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor,
                embodiment_id: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        """Flow-matching loss: predict ``actions - noise`` at ``x_t = (1-t) noise + t actions``."""
        vl = self.process_backbone(features, mask)
        state_feat = self.state_encoder(state.to(vl.dtype), embodiment_id)
        noise = torch.randn_like(actions)
        t = self.sample_time(actions.shape[0], actions.device)[:, None, None].to(actions.dtype)
        noisy = (1 - t) * noise + t * actions
        t_disc = (t[:, 0, 0] * self.num_timestep_buckets).long()
        pred = self._velocity(vl, mask, state_feat, noisy, t_disc, embodiment_id)
        loss = F.mse_loss(pred, actions - noise, reduction="none") * action_mask
        return loss.sum() / action_mask.sum().clamp(min=1)
