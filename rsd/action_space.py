"""Action chunks in physical units, and the cheap decoder that relaxed-action acceptance runs per drafted layer.

Why physical units: a tolerance on RFSQ codes (``relaxed``: level distance r, fraction tau) says nothing about
the robot. Measured on the shipped checkpoint, r = 1 / tau = 0.9 moved actions as much as dropping every layer
after the first. A tolerance in millimetres and degrees is what a user can reason about, and because RFSQ
levels are ordered and the decoder is cheap (one MLP call for every candidate of a round), it can be checked
exactly for each drafted layer.

Units (LIBERO, robosuite ``OSC_POSE`` controller defaults, the controller every LIBERO suite uses): an action
of 1.0 in a position dimension commands a 0.05 m end-effector displacement for that control step, 1.0 in a
rotation dimension 0.5 rad; the gripper dimension is a sign (open < 0 < close). Both scales are fields, so a
robot with another controller states its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

POS_M_PER_UNIT = 0.05  # robosuite OSC_POSE output_max for x, y, z (LIBERO)
ROT_RAD_PER_UNIT = 0.5  # robosuite OSC_POSE output_max for the three rotation dims (LIBERO)


@dataclass
class ChunkDeviation:
    """Per-sample deviation between two batches of action chunks (max over the chunk's steps)."""

    pos_mm: Tensor  # [...] max over steps of the Euclidean position difference, millimetres
    rot_deg: Tensor  # [...] max over steps of the Euclidean axis-angle difference, degrees
    gripper_flips: Tensor  # [...] int: steps whose gripper sign differs


class ActionSpace:
    """Normalised RFSQ chunks ``[..., H, A]`` -> physical differences; latents -> chunks through the decoder.

    Args:
        tokenizer: an :class:`rsd.rfsq.RFSQTokenizer` (its autoencoder decodes, its q01/q99 unnormalise).
        pos_m_per_unit / rot_rad_per_unit: controller scale of one raw action unit (LIBERO defaults).
        pos_dims / rot_dims: indices of the position and rotation dimensions; the gripper is the normaliser's.
    """

    def __init__(
        self,
        tokenizer,
        pos_m_per_unit: float = POS_M_PER_UNIT,
        rot_rad_per_unit: float = ROT_RAD_PER_UNIT,
        pos_dims: tuple[int, ...] = (0, 1, 2),
        rot_dims: tuple[int, ...] = (3, 4, 5),
    ) -> None:
        self.model = tokenizer.model
        norm = tokenizer.normalizer
        device = self.model.layer_scale.device
        half = torch.as_tensor((norm.q99 - norm.q01) / 2.0, dtype=torch.float32, device=device)
        self.pos_scale = half[list(pos_dims)] * (pos_m_per_unit * 1e3)  # mm per normalised unit
        self.rot_scale = half[list(rot_dims)] * math.degrees(rot_rad_per_unit)  # deg per normalised unit
        self.pos_dims, self.rot_dims = list(pos_dims), list(rot_dims)
        self.gripper_dim = norm.gripper_dim
        cfg = self.model.config
        self.num_layers, self.chunk_len, self.action_dim = cfg.num_layers, cfg.chunk_len, cfg.action_dim
        # dequantisation constants per layer, flattened to the layer-token order [L, H*D] (rsd.rfsq.tokens_to_layers)
        self._scale = self.model.layer_scale.reshape(cfg.num_layers, -1)
        self._mean = self.model.layer_mean.reshape(cfg.num_layers, -1)
        self._half_levels = (cfg.levels - 1) / 2.0

    def dequantize(self, layers: Tensor, first: int) -> Tensor:
        """Codes ``[B, n, C]`` of layers ``first .. first+n-1`` -> their latent contributions ``[B, n, C]``."""
        n = layers.shape[1]
        vals = layers.to(self._scale.dtype) / self._half_levels - 1.0
        return vals * self._scale[first : first + n] + self._mean[first : first + n]

    def decode_latent(self, z: Tensor) -> Tensor:
        """Summed latents ``[N, C]`` -> normalised chunks ``[N, H, A]`` with the full-depth decoder head.

        The full-depth head is used for every candidate (also for partial latents): acceptance asks how a layer
        changes the *final* chunk, and the later, finer layers only add to the latent.
        """
        out = self.model.decoder(z, self.num_layers)
        return out.reshape(z.shape[0], self.chunk_len, self.action_dim)

    def deviation(self, a: Tensor, b: Tensor) -> ChunkDeviation:
        """Deviation between normalised chunks ``a`` and ``b`` ``[..., H, A]`` in mm, degrees and gripper flips."""
        a, b = a.clamp(-1.0, 1.0), b.clamp(-1.0, 1.0)  # the normaliser clips before unnormalising
        d = a - b
        pos = (d[..., self.pos_dims] * self.pos_scale).norm(dim=-1).amax(dim=-1)
        rot = (d[..., self.rot_dims] * self.rot_scale).norm(dim=-1).amax(dim=-1)
        if self.gripper_dim is None:
            flips = torch.zeros(pos.shape, dtype=torch.long, device=pos.device)
        else:
            flips = ((a[..., self.gripper_dim] > 0) != (b[..., self.gripper_dim] > 0)).sum(dim=-1)
        return ChunkDeviation(pos_mm=pos, rot_deg=rot, gripper_flips=flips)

    def chunk_deviation(
        self, layers_a: Tensor, layers_b: Tensor, depth_a: int | None = None, depth_b: int | None = None
    ) -> ChunkDeviation:
        """Deviation between the chunks decoded (as the server does) from two sets of layers ``[B, L, C]``,
        the first ``depth_a`` / ``depth_b`` layers of each (default all)."""
        from rsd.rfsq import layers_to_tokens

        cfg = self.model.config
        ta = layers_to_tokens(layers_a, cfg.chunk_len, cfg.latent_dim)
        tb = layers_to_tokens(layers_b, cfg.chunk_len, cfg.latent_dim)
        return self.deviation(self.model.decode(ta, depth_a), self.model.decode(tb, depth_b))
