"""Residual FSQ (RFSQ) action tokenizer: naive and robust residual quantisation of action chunks.

An action chunk (H=8 steps × A=7 dims, normalised to [-1, 1]) is encoded into a latent z of shape H×D (D=16).
L=8 residual layers each quantise every latent scalar to one of K=7 uniform levels in [-1, 1] with a
straight-through estimator (STE); the tokens are the level indices, an int64 array [B, H, D, L] in 0..K-1.
One layer is H·D = 128 codes: the unit the speculative decoder (rsd/engine) predicts per step, coarse to fine.

Modes:

* ``naive``: q_l = Q(r_l), r_{l+1} = r_l − q_l. Once |r_l| < 1/(K−1) every scalar rounds to the middle level,
  so after the first layer or two the residual lies inside one quantisation cell and the later layers carry
  nothing (dead layers).
* ``robust``: q_l = Q((r_l − m_l)/s_l)·s_l + m_l with per-layer constants m_l, s_l, one per latent scalar
  ([L, H, D]). While training they are running statistics of the residual (mean, ``robust_range``·std, and
  on one layer the full observed range so nothing is clipped for good); they are recalibrated once on training
  latents and frozen, and the rest of training adapts to them. Being constants in the checkpoint, ``decode``
  works from tokens alone — a policy predicts tokens, never statistics. (Per-sample LayerNorm
  statistics would have to be sent next to every chunk.)

What makes every one of the 8 layers count (measured in benchmarks/bench_rfsq.py):

* ``robust_range`` κ: the residual shrinks by about 1/(0.096·κ) per layer (×3.5 for κ=3, ~10× in MSE).
* An affine encoder (``encoder_hidden=0``) that the decoder's linear skip can invert exactly, and a decoder
  with one output head per decoding depth whose weights are finally refitted by least squares
  (``polish_decoder``): together they remove the autoencoder's continuous error floor (1e-5..1e-4 MSE with a
  gradient-trained MLP pair), which otherwise hides layers 4–7 entirely. The MLP trunk of the decoder still
  helps the coarse depths.

Public API (imported by the server and the RSD engine — keep the names):
``RFSQConfig``, ``RFSQAutoencoder``, ``RFSQTokenizer``, ``tokens_to_layers``, ``layers_to_tokens``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rsd.normalization import NORMALIZATION_FILENAME, ActionNormalizer

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
MODEL_TYPE = "rfsq_action_tokenizer"
FORMAT_VERSION = 1
MODES = ("naive", "robust")


@dataclass
class RFSQConfig:
    """Shape and training-relevant hyper-parameters of the tokenizer (stored as ``config.json``).

    Attributes:
        chunk_len: H, action steps per chunk.
        action_dim: A, action dimensions (Δpos 3, Δrot 3, gripper).
        latent_dim: D, latent channels per step.
        num_layers: L, residual quantisation layers.
        levels: K, uniform levels per scalar in [-1, 1] (odd, so 0 is a level).
        mode: ``naive`` or ``robust``.
        hidden_dim: width of the encoder/decoder MLPs.
        num_hidden: hidden layers in each MLP.
        robust_range: κ in s_l = κ·std(r_l) (robust only).
        stats_momentum: EMA momentum of the running residual statistics while they are not frozen.
        linear_skip: add a linear path around each MLP, so the autoencoder starts close to an invertible
            linear map and its continuous reconstruction floor (which no number of layers can beat) is low.
        encoder_hidden: hidden layers in the encoder (-1: same as ``num_hidden``). 0 makes the encoder affine,
            so the decoder's linear path can invert it exactly and the fine layers are never masked by an
            autoencoder error floor.
        robust_range0: κ for layer 0 only; 0 means "cover the largest deviation seen in calibration" (no latent
            clipped at layer 0, at the price of a coarser first layer); > 0 fits layer 0 to the bulk of the
            latent and makes layer 1 cover what layer 0 clipped.
        range0_margin: factor on that largest deviation, for unseen chunks outside the calibration set (an
            overflow there saturates every later layer for that scalar). 1.2 left held-out latents up to 1.5×
            the training maximum unabsorbed on synthetic data (last-layer gain fell to 2.5 %); 2.0 costs about
            one third of layer 1's gain and keeps every later layer at ~90 %.

    Defaults are the values tuned with benchmarks/bench_rfsq.py (robust_range0 2.2 vs 0/1.7/2.6; margin 2.0
    vs 1.2/1.5).
    """

    chunk_len: int = 8
    action_dim: int = 7
    latent_dim: int = 16
    num_layers: int = 8
    levels: int = 7
    mode: str = "robust"
    hidden_dim: int = 256
    num_hidden: int = 2
    robust_range: float = 3.0
    stats_momentum: float = 0.05
    linear_skip: bool = True
    encoder_hidden: int = 0
    robust_range0: float = 2.2
    range0_margin: float = 2.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Fails early, naming the field, on values the model cannot be built with."""
        for name in ("chunk_len", "action_dim", "latent_dim", "num_layers", "hidden_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RFSQConfig.{name} must be >= 1; got {getattr(self, name)}")
        if self.num_hidden < 0:
            raise ValueError(f"RFSQConfig.num_hidden must be >= 0; got {self.num_hidden}")
        if self.encoder_hidden < -1:
            raise ValueError(f"RFSQConfig.encoder_hidden must be >= -1; got {self.encoder_hidden}")
        if self.levels < 3 or self.levels % 2 == 0:
            raise ValueError(f"RFSQConfig.levels must be odd and >= 3; got {self.levels}")
        if self.mode not in MODES:
            raise ValueError(f"RFSQConfig.mode must be one of {MODES}; got {self.mode!r}")
        if self.range0_margin < 1:
            raise ValueError(f"RFSQConfig.range0_margin must be >= 1; got {self.range0_margin}")
        if self.robust_range0 < 0:
            raise ValueError(f"RFSQConfig.robust_range0 must be >= 0; got {self.robust_range0}")
        if not self.robust_range > 0:
            raise ValueError(f"RFSQConfig.robust_range must be > 0; got {self.robust_range}")
        if not 0 < self.stats_momentum <= 1:
            raise ValueError(f"RFSQConfig.stats_momentum must be in (0, 1]; got {self.stats_momentum}")

    @property
    def codes_per_layer(self) -> int:
        """H·D codes in one residual layer."""
        return self.chunk_len * self.latent_dim

    def to_dict(self) -> dict[str, Any]:
        """JSON form, tagged with a model type and format version."""
        return {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RFSQConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored with a warning (forward compatibility)."""
        if d.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"config model_type {d.get('model_type')!r} is not {MODEL_TYPE!r}")
        if int(d.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise ValueError(f"config format_version {d['format_version']} is newer than this code")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known - {"model_type", "format_version"}
        if unknown:
            logger.warning("ignoring unknown RFSQ config keys: %s", sorted(unknown))
        return cls(**{k: v for k, v in d.items() if k in known})


def tokens_to_layers(tokens: torch.Tensor) -> torch.Tensor:
    """[B, H, D, L] tokens → [B, L, H·D] (one row of 128 codes per layer, index h·D + d)."""
    if tokens.ndim != 4:
        raise ValueError(f"tokens must be [B, H, D, L]; got shape {tuple(tokens.shape)}")
    b, h, d, n_layers = tokens.shape
    return tokens.permute(0, 3, 1, 2).reshape(b, n_layers, h * d)


def layers_to_tokens(layers: torch.Tensor, chunk_len: int = 8, latent_dim: int = 16) -> torch.Tensor:
    """Inverse of :func:`tokens_to_layers`: [B, L, H·D] → [B, H, D, L] (L may be fewer than 8)."""
    if layers.ndim != 3 or layers.shape[-1] != chunk_len * latent_dim:
        raise ValueError(f"layers must be [B, L, {chunk_len * latent_dim}]; got shape {tuple(layers.shape)}")
    b, n_layers, _ = layers.shape
    return layers.reshape(b, n_layers, chunk_len, latent_dim).permute(0, 2, 3, 1).contiguous()


class _MLP(nn.Module):
    """MLP with an optional linear skip path (see ``RFSQConfig.linear_skip``)."""

    def __init__(self, n_in: int, n_hidden: int, width: int, n_out: int, linear_skip: bool) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        prev = n_in
        for _ in range(n_hidden):
            mods += [nn.Linear(prev, width), nn.GELU()]
            prev = width
        mods.append(nn.Linear(prev, n_out))
        self.net = nn.Sequential(*mods)
        self.skip = nn.Linear(n_in, n_out, bias=False) if linear_skip and n_hidden > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y if self.skip is None else y + self.skip(x)


class _DepthDecoder(nn.Module):
    """Shared MLP trunk with one output head (+ linear skip) per decoding depth 1..L.

    Why per depth: ``decode(tokens, layers=k)`` knows k, and one head cannot be optimal both for coarse latents
    (on the layer-0 grid) and for the full-precision latent; a single shared head trades one against the other
    and puts a floor under the fine layers. Heads are cheap (a Linear each).
    """

    def __init__(self, n_z: int, n_hidden: int, width: int, n_x: int, linear_skip: bool, depths: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        prev = n_z
        for _ in range(n_hidden):
            mods += [nn.Linear(prev, width), nn.GELU()]
            prev = width
        self.trunk = nn.Sequential(*mods)
        self.heads = nn.ModuleList(nn.Linear(prev, n_x) for _ in range(depths))
        self.skips = (nn.ModuleList(nn.Linear(n_z, n_x, bias=False) for _ in range(depths))
                      if linear_skip and n_hidden > 0 else None)

    def forward(self, z: torch.Tensor, depth: int) -> torch.Tensor:
        y = self.heads[depth - 1](self.trunk(z))
        return y if self.skips is None else y + self.skips[depth - 1](z)


class RFSQAutoencoder(nn.Module):
    """MLP encoder → residual FSQ (naive or robust) → MLP decoder, on normalised action chunks [B, H, A].

    Buffers ``layer_mean``/``layer_scale`` [L, H, D] hold the robust per-layer constants, one per latent scalar
    of the chunk (the latent's spread differs per step and channel); zeros/ones in naive mode.
    ``stats_frozen`` records whether they are final. Everything needed to decode is in the state dict.
    """

    def __init__(self, config: RFSQConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        n_x, n_z = c.chunk_len * c.action_dim, c.chunk_len * c.latent_dim
        enc_hidden = c.num_hidden if c.encoder_hidden < 0 else c.encoder_hidden
        self.encoder = _MLP(n_x, enc_hidden, c.hidden_dim, n_z, c.linear_skip)
        self.decoder = _DepthDecoder(n_z, c.num_hidden, c.hidden_dim, n_x, c.linear_skip, c.num_layers)
        self.register_buffer("layer_mean", torch.zeros(c.num_layers, c.chunk_len, c.latent_dim))
        self.register_buffer("layer_scale", torch.ones(c.num_layers, c.chunk_len, c.latent_dim))
        self.register_buffer("stats_frozen", torch.tensor(c.mode == "naive"))
        self.register_buffer("stats_initialized", torch.tensor(c.mode == "naive"))
        self._half = (c.levels - 1) / 2.0

    # ----------------------------------------------------------------- checks
    def check_actions(self, x: torch.Tensor) -> torch.Tensor:
        """Validates a normalised chunk batch [B, H, A]; returns it as float32."""
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 3 or tuple(x.shape[1:]) != (c.chunk_len, c.action_dim):
            raise ValueError(f"actions must have shape [B, {c.chunk_len}, {c.action_dim}]; got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("actions contain NaN or infinite values")
        return x.float()

    def check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Validates tokens [B, H, D, L'] with 1 <= L' <= L and values in 0..K-1; returns int64."""
        c = self.config
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"expected a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dtype.is_complex:
            raise ValueError(f"tokens must be an integer tensor; got {tokens.dtype}")
        if tokens.ndim != 4 or tuple(tokens.shape[1:3]) != (c.chunk_len, c.latent_dim):
            raise ValueError(
                f"tokens must have shape [B, {c.chunk_len}, {c.latent_dim}, L<= {c.num_layers}]; got {tuple(tokens.shape)}"
            )
        if not 1 <= tokens.shape[3] <= c.num_layers:
            raise ValueError(f"tokens carry {tokens.shape[3]} layers; expected 1..{c.num_layers}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= c.levels):
            raise ValueError(f"token values must be in 0..{c.levels - 1}")
        return tokens.long()

    # ------------------------------------------------------------ quantiser
    def _grid_index(self, u: torch.Tensor) -> torch.Tensor:
        """Nearest of K uniform levels in [-1, 1] (values outside clamp to the end levels)."""
        return torch.clamp(torch.round((u + 1.0) * self._half), 0, self.config.levels - 1).long()

    def _grid_value(self, idx: torch.Tensor) -> torch.Tensor:
        return idx.to(self.layer_scale.dtype) / self._half - 1.0

    def _layer_stats(self, layer: int, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-scalar (mean, scale) [H, D] for one layer's residual r [N, H, D].

        scale = κ·std; one layer additionally covers the largest deviation seen (times ``range0_margin``),
        because a clipped latent leaves a residual bigger than every later layer's range and masks all of them
        (later residuals are bounded by half the previous step, which κ·std of a uniform residual covers for
        κ >= √3). With ``robust_range0`` = 0 that layer is layer 0; with κ0 > 0 layer 0 is fitted to the bulk
        (κ0·std, tails clip) and layer 1 catches the clipped tails.
        """
        flat = r.reshape(-1, *r.shape[-2:])
        mean = flat.mean(0)
        std = flat.std(0, unbiased=False)
        scale = self.config.robust_range * std
        k0 = self.config.robust_range0
        cover_layer = 1 if k0 > 0 else 0
        if layer == 0 and k0 > 0:
            scale = k0 * std
        if layer == cover_layer:
            scale = torch.maximum(scale, self.config.range0_margin * (flat - mean).abs().amax(0))
        return mean, scale.clamp_min(1e-8)

    @torch.no_grad()
    def _update_stats(self, layer: int, r: torch.Tensor) -> None:
        """EMA of the residual's per-scalar mean and scale (robust mode, before the constants are frozen)."""
        mean, scale = self._layer_stats(layer, r)
        if not bool(self.stats_initialized):
            self.layer_mean[layer].copy_(mean)
            self.layer_scale[layer].copy_(scale)
        else:
            mom = self.config.stats_momentum
            self.layer_mean[layer].lerp_(mean, mom)
            self.layer_scale[layer].lerp_(scale, mom)

    def quantize(self, z: torch.Tensor, update_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Residual quantisation of z [B, H, D].

        Returns:
            z_q: quantised latent with straight-through gradients to z.
            codes: int64 [B, H, D, L].
            partial: detached cumulative latents after 1..L layers (for coarse-to-fine losses/diagnostics).
        """
        robust = self.config.mode == "robust"
        update = robust and update_stats and not bool(self.stats_frozen)
        r = z.detach()
        total = torch.zeros_like(r)
        codes: list[torch.Tensor] = []
        partial: list[torch.Tensor] = []
        for layer in range(self.config.num_layers):
            if update:
                self._update_stats(layer, r)
            m, s = self.layer_mean[layer], self.layer_scale[layer]
            idx = self._grid_index((r - m) / s)
            q = self._grid_value(idx) * s + m
            r = r - q
            total = total + q
            codes.append(idx)
            partial.append(total)
        if update:
            self.stats_initialized.fill_(True)
        z_q = z + (total - z).detach()
        return z_q, torch.stack(codes, dim=-1), partial

    @torch.no_grad()
    def calibrate(self, z: torch.Tensor, freeze: bool = True) -> None:
        """Sets the robust constants from latents z [N, H, D] layer by layer (each layer sees the residual its
        predecessors leave), then freezes them. No-op in naive mode."""
        if self.config.mode != "robust":
            return
        r = z.detach().to(self.layer_scale.dtype)
        for layer in range(self.config.num_layers):
            m, s = self._layer_stats(layer, r)
            self.layer_mean[layer], self.layer_scale[layer] = m, s
            r = r - (self._grid_value(self._grid_index((r - m) / s)) * s + m)
        self.stats_initialized.fill_(True)
        if freeze:
            self.stats_frozen.fill_(True)

    @torch.no_grad()
    def polish_decoder(self, x: torch.Tensor, ridge: float = 1e-10) -> list[float]:
        """Refits every depth's output head (and linear skip) by least squares in float64, trunk fixed.

        Why: gradient training leaves an optimisation floor (Adam's step noise, ~1e-5 MSE) that would hide the
        fine layers; with the trunk features fixed, each head's best weights solve a linear problem exactly.
        Returns the training MSE per depth after the refit.
        """
        dec = self.decoder
        z = self.encode_latent(x)
        _, _, partial = self.quantize(z, update_stats=False)
        y = x.reshape(x.shape[0], -1).double()
        mses = []
        for depth, zk in enumerate(partial, start=1):
            zf = zk.reshape(zk.shape[0], -1)
            parts = [dec.trunk(zf).double(), torch.ones(zf.shape[0], 1, dtype=torch.float64)]
            if dec.skips is not None:
                parts.append(zf.double())
            phi = torch.cat(parts, 1)
            gram = phi.T @ phi
            gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
            theta = torch.linalg.solve(gram, phi.T @ y)  # [features, out]
            head = dec.heads[depth - 1]
            n_h = head.in_features
            head.weight.copy_(theta[:n_h].T.float())
            head.bias.copy_(theta[n_h].float())
            if dec.skips is not None:
                dec.skips[depth - 1].weight.copy_(theta[n_h + 1 :].T.float())
            mses.append(float(((self.decode_latent(zk, depth) - x) ** 2).mean()))
        return mses

    def residual_stats(self, z: torch.Tensor) -> dict[str, list[float]]:
        """Per-layer std of the residual entering each layer (latent units) and, for robust, of the normalised
        residual the quantiser actually sees; plus the fraction of non-middle codes (a layer whose codes are all
        the middle level adds nothing)."""
        r = z.detach()
        raw, norm, active = [], [], []
        mid = (self.config.levels - 1) // 2
        for layer in range(self.config.num_layers):
            m, s = self.layer_mean[layer], self.layer_scale[layer]
            u = (r - m) / s
            idx = self._grid_index(u)
            raw.append(float(r.std()))
            norm.append(float(u.std()))
            active.append(float((idx != mid).float().mean()))
            r = r - (self._grid_value(idx) * s + m)
        return {"residual_std": raw, "normalized_residual_std": norm, "active_code_frac": active}

    # ------------------------------------------------------------ network
    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised chunks [B, H, A] → latent z [B, H, D] (continuous)."""
        c = self.config
        return self.encoder(x.reshape(x.shape[0], -1)).reshape(x.shape[0], c.chunk_len, c.latent_dim)

    def decode_latent(self, z: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Latent [B, H, D] → normalised chunks [B, H, A] with the head for ``depth`` layers (default all)."""
        c = self.config
        depth = c.num_layers if depth is None else depth
        return self.decoder(z.reshape(z.shape[0], -1), depth).reshape(z.shape[0], c.chunk_len, c.action_dim)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """Training/diagnostic pass: reconstruction through the STE, codes and the coarse cumulative latents."""
        z = self.encode_latent(x)
        z_q, codes, partial = self.quantize(z, update_stats=self.training)
        return {"recon": self.decode_latent(z_q), "z": z, "codes": codes, "partial": partial}

    def tokens_to_latent(self, tokens: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Sum of the first ``layers`` dequantised layers: [B, H, D, L'] → [B, H, D]."""
        n = tokens.shape[-1] if layers is None else int(layers)
        if not 1 <= n <= tokens.shape[-1]:
            raise ValueError(f"layers must be in 1..{tokens.shape[-1]} for these tokens; got {layers}")
        return self._values_to_latent(self._grid_value(tokens[..., :n]))

    def probs_to_latent(self, probs: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Expected latent under per-code level distributions: [B, H, D, L', K] → [B, H, D].

        Each code contributes its expected grid value ``sum_k p_k v_k`` instead of the value of one level; the
        sum over layers is linear, so this is the latent's expectation when every layer's distribution is taken
        on the decided coarser layers.
        """
        n = probs.shape[-2] if layers is None else int(layers)
        if probs.ndim != 5 or probs.shape[-1] != self.config.levels or not 1 <= n <= probs.shape[-2]:
            raise ValueError(f"probs must be [B, H, D, L', {self.config.levels}] with 1 <= layers <= L'; got "
                             f"{tuple(probs.shape)}, layers={layers}")
        grid = self._grid_value(torch.arange(self.config.levels, device=probs.device))
        return self._values_to_latent((probs[..., :n, :].to(grid.dtype) * grid).sum(-1))

    def _values_to_latent(self, vals: torch.Tensor) -> torch.Tensor:
        """Grid values of the first n layers [B, H, D, n] → latent [B, H, D] (scale and shift per layer)."""
        n = vals.shape[-1]
        scale = self.layer_scale[:n].permute(1, 2, 0)  # [H, D, n]
        mean = self.layer_mean[:n].permute(1, 2, 0)
        return (vals * scale + mean).sum(-1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised chunks [B, H, A] → int64 tokens [B, H, D, L] (no gradient, no statistics update)."""
        x = self.check_actions(x).to(self.layer_scale.device)
        _, codes, _ = self.quantize(self.encode_latent(x), update_stats=False)
        return codes

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Tokens [B, H, D, L'] → normalised chunks [B, H, A], from the first ``layers`` layers (default all)."""
        tokens = self.check_tokens(tokens).to(self.layer_scale.device)
        depth = tokens.shape[-1] if layers is None else int(layers)
        return self.decode_latent(self.tokens_to_latent(tokens, layers), depth)


def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a numpy array or torch.Tensor; got {type(x).__name__}")


class RFSQTokenizer:
    """Model + action normalisation: raw environment action chunks ⇄ RFSQ tokens.

    ``encode`` takes raw actions [B, 8, 7] (numpy or torch) and returns int64 tokens [B, 8, 16, 8];
    ``decode`` takes tokens (all 8 layers, or fewer for a coarse decode) and returns raw float32 actions
    [B, 8, 7] as a CPU torch tensor, gripper binarised to ±1.
    """

    def __init__(self, model: RFSQAutoencoder, normalizer: ActionNormalizer) -> None:
        if normalizer.action_dim != model.config.action_dim:
            raise ValueError(
                f"normaliser has {normalizer.action_dim} dims but the model expects {model.config.action_dim}"
            )
        self.model = model.eval()
        self.normalizer = normalizer

    # ---------------------------------------------------------- properties
    @property
    def config(self) -> RFSQConfig:
        """The model's configuration."""
        return self.model.config

    @property
    def num_layers(self) -> int:
        """L residual layers (8)."""
        return self.config.num_layers

    @property
    def codes_per_layer(self) -> int:
        """Codes per layer, H·D (128)."""
        return self.config.codes_per_layer

    @property
    def levels(self) -> int:
        """K levels per code (7)."""
        return self.config.levels

    @property
    def chunk_len(self) -> int:
        """H action steps per chunk (8)."""
        return self.config.chunk_len

    @property
    def action_dim(self) -> int:
        """A action dimensions (7)."""
        return self.config.action_dim

    @property
    def latent_dim(self) -> int:
        """D latent channels per step (16)."""
        return self.config.latent_dim

    # ---------------------------------------------------------- encode/decode
    def normalize(self, actions: Any) -> torch.Tensor:
        """Raw actions [B, H, A] → normalised float32 tensor, with shape/NaN checks (ValueError)."""
        t = _to_tensor(actions, "actions")
        c = self.config
        if t.ndim != 3 or tuple(t.shape[1:]) != (c.chunk_len, c.action_dim):
            raise ValueError(f"actions must have shape [B, {c.chunk_len}, {c.action_dim}]; got {tuple(t.shape)}")
        if t.dtype.is_floating_point and not torch.isfinite(t).all():
            raise ValueError("actions contain NaN or infinite values")
        return torch.from_numpy(self.normalizer.normalize(t.detach().cpu().numpy()))

    def encode(self, actions: Any) -> torch.Tensor:
        """Raw action chunks [B, 8, 7] → int64 tokens [B, 8, 16, 8] in 0..6."""
        return self.model.encode(self.normalize(actions)).cpu()

    def decode_normalized(self, tokens: Any, layers: int | None = None) -> torch.Tensor:
        """Tokens → normalised chunks (before unnormalisation; used by benchmarks for MSE in [-1, 1] space)."""
        return self.model.decode(_to_tensor(tokens, "tokens"), layers).cpu()

    def decode(self, tokens: Any, layers: int | None = None) -> torch.Tensor:
        """Tokens [B, 8, 16, L'] → raw float32 actions [B, 8, 7] from the first ``layers`` layers."""
        norm = self.decode_normalized(tokens, layers).float()  # bf16 under a bf16 run's autocast (validation)
        return torch.from_numpy(self.normalizer.unnormalize(norm.numpy()))

    @torch.no_grad()
    def decode_expected(self, layer_probs: Any, layers: int | None = None) -> torch.Tensor:
        """Per-layer code distributions [B, L, 128, K] (rows as :meth:`tokens_to_layers`) → raw float32 actions
        [B, 8, 7]: the chunk decoded from the expected latent (``expected`` action decode) of the first
        ``layers`` layers."""
        p = _to_tensor(layer_probs, "layer_probs").float()
        c = self.config
        if p.ndim != 4 or p.shape[2] != c.chunk_len * c.latent_dim or p.shape[3] != c.levels:
            raise ValueError(f"layer_probs must be [B, L, {c.chunk_len * c.latent_dim}, {c.levels}]; got "
                             f"{tuple(p.shape)}")
        b, n_layers = p.shape[:2]
        p = p.reshape(b, n_layers, c.chunk_len, c.latent_dim, c.levels).permute(0, 2, 3, 1, 4)
        m = self.model
        p = p.to(m.layer_scale.device)
        depth = n_layers if layers is None else int(layers)
        norm = m.decode_latent(m.probs_to_latent(p, depth), depth).float().cpu()
        return torch.from_numpy(self.normalizer.unnormalize(norm.numpy()))

    def tokens_to_layers(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, 8, 16, L] → [B, L, 128]."""
        return tokens_to_layers(tokens)

    def layers_to_tokens(self, layers: torch.Tensor) -> torch.Tensor:
        """[B, L, 128] → [B, 8, 16, L]."""
        return layers_to_tokens(layers, self.chunk_len, self.latent_dim)

    # ---------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes model.safetensors, config.json and normalization.json into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILENAME), metadata={"model_type": MODEL_TYPE})
        (d / CONFIG_FILENAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        self.normalizer.save(d / NORMALIZATION_FILENAME)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> RFSQTokenizer:
        """Loads a directory written by :meth:`save_pretrained` (local only; no hub)."""
        from safetensors.torch import load_file

        d = Path(directory)
        for name in (CONFIG_FILENAME, WEIGHTS_FILENAME, NORMALIZATION_FILENAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found (expected an RFSQ tokenizer directory)")
        config = RFSQConfig.from_dict(json.loads((d / CONFIG_FILENAME).read_text()))
        model = RFSQAutoencoder(config)
        model.load_state_dict(load_file(str(d / WEIGHTS_FILENAME)), strict=True)
        if config.mode == "robust" and not bool(model.stats_frozen):
            logger.warning("%s: robust RFSQ constants were never frozen (checkpoint saved mid-training?)", d)
        return cls(model.to(device), ActionNormalizer.load(d / NORMALIZATION_FILENAME))
