"""Tiny random models and stub drafts shared by the RSD tests (no checkpoints, CPU, fast)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from rsd.layer_head import RFSQLayerHeadModel
from rsd.normalization import ActionNormalizer
from rsd.rfsq import RFSQAutoencoder, RFSQConfig, RFSQTokenizer


def tiny_main(
    seed: int = 0,
    hidden: int = 32,
    num_layers: int = 8,
    codes: int = 128,
    levels: int = 7,
    sharpen: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> RFSQLayerHeadModel:
    """A 2-block Llama with an RFSQ layer head; ``sharpen`` scales the head and layer embedding.

    Sharpening makes main's distributions peaked and strongly dependent on the fed layer (a random init is
    nearly uniform), so acceptance and statistical tests see both accepted and rejected layers.
    """
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    llm = LlamaForCausalLM(cfg).to(dtype)
    model = RFSQLayerHeadModel(llm, num_layers=num_layers, codes_per_layer=codes, levels=levels).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            model.head.weight.mul_(sharpen)
            model.code_embed.weight.mul_(sharpen)
    return model


class FixedDraft(nn.Module):
    """A draft that returns given logits ``[B, k, C, V]`` (or one-hot of given tokens) whatever ``h`` is."""

    def __init__(self, logits: Tensor | None = None, tokens: Tensor | None = None, levels: int = 7) -> None:
        super().__init__()
        if logits is None:
            assert tokens is not None
            logits = F.one_hot(tokens.long(), levels).float() * 10.0
        self.register_buffer("logits", logits.float())

    def forward(self, hidden: Tensor) -> Tensor:
        b = hidden.shape[0]
        if self.logits.shape[0] == b:
            return self.logits
        return self.logits.expand(b, *self.logits.shape[1:])


class TableDraft(nn.Module):
    """A deep draft that proposes given layers ``[B, L, C]`` whatever the prefix (an oracle when they are main's);
    ``calls`` records the number of decided layers at every call."""

    deep = True
    first_layer = 1

    def __init__(self, layers: Tensor, levels: int = 7) -> None:
        super().__init__()
        self.register_buffer("table", layers.clone())
        self.levels = levels
        self.calls: list[int] = []

    def forward(self, hidden: Tensor, prefix: Tensor, num: int | None = None) -> Tensor:
        m = prefix.shape[1]
        num = self.table.shape[1] - m if num is None else num
        self.calls.append(m)
        return F.one_hot(self.table[:, m : m + num], self.levels).float() * 10.0


def random_prefix(seed: int, b: int, p: int = 6, hidden: int = 32) -> Tensor:
    """A batch of random prefix embeddings ``[b, p, hidden]`` (what the VLA's image + prompt would be)."""
    return torch.randn(b, p, hidden, generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer() -> RFSQTokenizer:
    """An untrained RFSQ tokenizer (random encoder/decoder, LIBERO-like action bounds)."""
    torch.manual_seed(0)
    ae = RFSQAutoencoder(RFSQConfig(hidden_dim=32)).eval()
    q01 = np.array([-0.9, -0.9, -0.9, -0.1, -0.1, -0.2, -1.0])
    return RFSQTokenizer(ae, ActionNormalizer(q01=q01, q99=-q01))


def shift_codes(tokens: Tensor, levels: int = 7) -> Tensor:
    """Every code moved one level (so no code equals the original): an adversarial draft."""
    return (tokens + 1) % levels


def chi2_sf(stat: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma)."""
    if dof <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0, dtype=torch.float64)))


def chi2_two_sample(a: Tensor, b: Tensor, num_cells: int, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Chi-square test of homogeneity of two samples of categorical values in ``0..num_cells-1``.

    Cells whose pooled expected count is below ``min_expected`` in either sample are merged into one cell (the
    usual validity rule). Returns ``(statistic, dof, p_value)``.
    """
    ca = torch.bincount(a.reshape(-1), minlength=num_cells).double()
    cb = torch.bincount(b.reshape(-1), minlength=num_cells).double()
    na, nb = ca.sum(), cb.sum()
    pooled = (ca + cb) / (na + nb)
    small = (pooled * min(na, nb)) < min_expected
    if bool(small.any()):
        ca = torch.cat([ca[~small], ca[small].sum(0, keepdim=True)])
        cb = torch.cat([cb[~small], cb[small].sum(0, keepdim=True)])
        keep = (ca + cb) > 0
        ca, cb = ca[keep], cb[keep]
    tot = ca + cb
    ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
    stat = float((((ca - ea) ** 2) / ea).sum() + (((cb - eb) ** 2) / eb).sum())
    dof = int(tot.numel()) - 1
    return stat, dof, chi2_sf(stat, dof)


def chi2_goodness(samples: Tensor, probs: Tensor, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Chi-square goodness of fit of categorical ``samples`` to ``probs`` (small cells merged)."""
    n = samples.numel()
    obs = torch.bincount(samples.reshape(-1), minlength=probs.numel()).double()
    exp = probs.double() * n
    small = exp < min_expected
    if bool(small.any()):
        obs = torch.cat([obs[~small], obs[small].sum(0, keepdim=True)])
        exp = torch.cat([exp[~small], exp[small].sum(0, keepdim=True)])
        keep = exp > 0
        obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = int(obs.numel()) - 1
    return stat, dof, chi2_sf(stat, dof)
