"""Acceptance rules of residual speculative decoding, one RFSQ layer at a time.

A layer is one input token of the main model, so it is accepted or rejected whole; but the main model's codes
within a layer are conditionally independent given the prefix (one hidden state, one head), so a rejected layer
is *repaired* from the logits the verification pass already computed, with no extra pass:

* ``exact``: accept when every code equals main's argmax; repair = main's argmax (so the output is exactly
  main-only greedy decoding).
* ``sampling``: per code, accept the draft's sample ``d ~ q`` with probability ``min(1, p(d)/q(d))``, else resample
  from ``norm(max(0, p - q))`` (Leviathan et al. 2023). Each code is then an exact sample of ``p``; the layer
  counts as accepted only when every code was accepted (a resampled code differs from the draft, so the
  drafted layers after it are conditioned on the wrong input and must be discarded).
* ``relaxed``: levels are ordered, so a code passes when ``|d - argmax p| <= r`` (Spec-VLA's bin distance); the
  layer is accepted (the draft's tokens are kept, lossy) when the fraction of passing codes is ``>= tau``, else
  repaired with main's argmax.

* ``relaxed-action``: the layer is accepted when the action chunk decoded with the draft's layer differs from
  the chunk decoded with main's choice for it by at most a tolerance in millimetres / degrees, with the same
  gripper sign at every step (:func:`accept_action`; the engine computes the deviations with
  :class:`rsd.action_space.ActionSpace`), else repaired with main's argmax. Lossy, but bounded where it matters.

All functions take logits shaped ``[..., C, V]`` (C codes per layer, V levels; leading dims e.g. batch and
drafted layer, so a whole verification pass is decided at once) and draft tokens ``[..., C]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerDecision:
    """Outcome of checking one drafted layer against the main model's logits for that layer.

    Attributes:
        tokens: ``[B, C]`` the layer's final tokens (the draft's where accepted, main's repair elsewhere).
        accepted: ``[B]`` bool, the draft's layer was accepted whole (later drafted layers stay candidates).
        code_pass: ``[B]`` float, fraction of the layer's codes that passed (diagnostics / relaxed threshold).
    """

    tokens: Tensor
    accepted: Tensor
    code_pass: Tensor


def main_select(logits: Tensor, mode: str, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Main model's own choice for a layer: argmax (greedy modes) or a sample at ``temperature`` (sampling)."""
    if mode == "sampling":
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return _multinomial(probs, generator)
    return logits.argmax(dim=-1)


def draft_propose(
    logits: Tensor, mode: str, temperature: float = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """Draft tokens for one or more layers: argmax (greedy modes) or a sample from ``q`` (sampling mode).

    Returns ``(tokens, q)`` where ``q`` is the draft's probability table (``None`` in greedy modes), which the
    sampling acceptance rule needs.
    """
    if mode == "sampling":
        q = torch.softmax(logits.float() / temperature, dim=-1)
        return _multinomial(q, generator), q
    return logits.argmax(dim=-1), None


def accept_exact(draft_tokens: Tensor, main_logits: Tensor) -> LayerDecision:
    """Greedy verification: accept a layer iff every code equals main's argmax; repair = main's argmax."""
    target = main_logits.argmax(dim=-1)
    ok = draft_tokens == target
    return LayerDecision(tokens=target, accepted=ok.all(dim=-1), code_pass=ok.float().mean(dim=-1))


def accept_relaxed(draft_tokens: Tensor, main_logits: Tensor, r: int, tau: float) -> LayerDecision:
    """Spec-VLA-style tolerance on ordered levels; lossy. With ``r=0, tau=1`` it is :func:`accept_exact`."""
    target = main_logits.argmax(dim=-1)
    ok = (draft_tokens - target).abs() <= r
    n_codes = draft_tokens.shape[-1]
    need = max(1, math.ceil(tau * n_codes - 1e-9))
    accepted = ok.sum(dim=-1) >= need
    tokens = torch.where(accepted[..., None], draft_tokens, target)
    return LayerDecision(tokens=tokens, accepted=accepted, code_pass=ok.float().mean(dim=-1))


def accept_sampling(
    draft_tokens: Tensor,
    draft_probs: Tensor,
    main_logits: Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> LayerDecision:
    """Per-code speculative sampling; every output code is an exact sample of main's distribution ``p``.

    Why per code and not per layer: main's codes are independent given the prefix, so the product of per-code
    exact samples is an exact sample of the layer; a per-layer rule would accept with probability
    ``min(1, prod p / prod q)``, far lower for 128 codes.
    """
    p = torch.softmax(main_logits.float() / temperature, dim=-1)
    q = draft_probs.float()
    idx = draft_tokens.unsqueeze(-1)
    p_d = p.gather(-1, idx).squeeze(-1)
    q_d = q.gather(-1, idx).squeeze(-1)
    u = torch.rand(p_d.shape, generator=generator, device=p_d.device, dtype=p_d.dtype)
    ok = u * q_d < p_d  # u < p/q without dividing by a possibly tiny q
    residual = (p - q).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q exactly gives zero residual mass; the acceptance probability is then 1 so the value is unused
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
    resampled = _multinomial(residual, generator)
    tokens = torch.where(ok, draft_tokens, resampled)
    return LayerDecision(tokens=tokens, accepted=ok.all(dim=-1), code_pass=ok.float().mean(dim=-1))


def accept_action(
    draft_tokens: Tensor, main_logits: Tensor, pos_mm: Tensor, rot_deg: Tensor, flips: Tensor, eps_mm: float,
    eps_deg: float,
) -> LayerDecision:
    """Acceptance in action space: keep the draft's layer where its chunk is within ``eps`` of main's choice.

    ``pos_mm`` / ``rot_deg`` / ``flips`` ``[...]`` are the deviations between the chunk decoded with the draft's
    layer and the chunk decoded with main's argmax for it (same decided prefix). ``code_pass`` reports the
    fraction of codes equal to main's, as in the other modes.
    """
    target = main_logits.argmax(dim=-1)
    accepted = (pos_mm <= eps_mm) & (rot_deg <= eps_deg) & (flips == 0)
    tokens = torch.where(accepted[..., None], draft_tokens, target)
    return LayerDecision(tokens=tokens, accepted=accepted, code_pass=(draft_tokens == target).float().mean(dim=-1))


def decide_layer(
    mode: str,
    draft_tokens: Tensor,
    main_logits: Tensor,
    *,
    draft_probs: Tensor | None = None,
    r: int = 0,
    tau: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> LayerDecision:
    """Dispatch to the rule of ``mode`` (``exact`` | ``sampling`` | ``relaxed``)."""
    if mode == "exact":
        return accept_exact(draft_tokens, main_logits)
    if mode == "relaxed":
        return accept_relaxed(draft_tokens, main_logits, r, tau)
    if mode == "sampling":
        if draft_probs is None:
            raise ValueError("sampling mode needs the draft's probabilities q")
        return accept_sampling(draft_tokens, draft_probs, main_logits, temperature, generator)
    raise ValueError(f"unknown RSD mode {mode!r}")


def _multinomial(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One sample per row of the last dimension, for any leading shape."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator)
    return out.reshape(probs.shape[:-1])
