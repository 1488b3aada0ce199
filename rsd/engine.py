"""Residual speculative decoding (RSD) over RFSQ layers (DESIGN section 8).

Per chunk, with ``k`` drafted layers (default 3) and ``L`` RFSQ layers (8):

1. Prefill the main model -> last hidden state ``h``, KV cache, main's own layer-0 logits ``p_0``.
2. The draft proposes layers ``0..k-1`` from ``h`` in one cheap pass.
3. Draft layer 0 is checked against ``p_0`` *before* any extra pass and repaired from ``p_0`` if rejected
   (the draft predicts its layers jointly from ``h``, so a repaired layer 0 does not invalidate ``d_1..``).
4. ONE main pass over ``[layer 0, d_1, .., d_{k-1}]`` yields ``p_1..p_k``; the longest passing prefix of
   ``d_1..`` is accepted; the first rejected layer is repaired from logits already computed (no extra pass);
   if every drafted layer passed, ``p_k`` gives layer ``k`` for free.
5. The KV cache is cropped to the accepted prefix and the remaining layers are decoded one step each.

Main passes after the prefill: ``1 + (L - 1 - n)`` where ``n`` is the number of valid fed tokens after
verification (1 + accepted drafted layers among ``d_1..d_{k-1}``): 7 when ``d_1`` is rejected (the same as
main-only decoding, whose first step the verification pass replaces), 5 with all three layers accepted.
Variant (DESIGN section 8): a draft with ``first_layer = 1`` proposes layers 1..k *given* main's free layer 0;
the verification pass feeds ``[layer 0, d_1, .., d_k]`` and all accepted costs 1 + 3 passes instead of 1 + 4.

Batching (B > 1): samples may accept different prefixes. We crop the cache to the batch minimum ``n_min`` and
decode the tail in lockstep; samples that are ahead *re-feed* their already decided layers (their logits are
ignored). Why not per-sample attention masks over a ragged cache: a batched pass costs the same for every
sample, so the batch needs ``L - 1 - n_min`` tail passes either way -- masking holes would save no pass, would
leave masked garbage in the cache, and would make the cache differ from a from-scratch recompute. The cost of
batching is that the slowest sample sets the pass count; ``stats.main_passes_per_sample`` reports what each
sample would have needed alone, so the loss is measured.

Exactness: ``exact`` reproduces main-only greedy decoding token for token provided the verification pass's logits
equal those of single-token steps. They do in our float32/float64 CPU tests; with bf16 GPU kernels a 3-token
pass can round differently from a 1-token pass, so an argmax on a near-tie could flip (true of any speculative
decoder). The tail after verification runs the very code the main-only baseline runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rsd.acceptance import decide_layer, draft_propose, main_select
from rsd.config import RSDConfig
from rsd.layer_head import RFSQLayerHeadModel

logger = logging.getLogger(__name__)


class DraftLike(Protocol):
    """Maps the main model's last hidden state ``[B, H]`` to draft logits ``[B, k, C, V]``.

    A draft with attribute ``first_layer = 1`` proposes layers 1..k and is called as ``draft(h, layer0)`` with
    main's decided layer 0 ``[B, C]`` (DESIGN section 8 variant); the default (seed) drafts layers 0..k-1.
    """

    def __call__(self, hidden: Tensor, layer0: Tensor | None = None) -> Tensor: ...


@dataclass
class RSDStats:
    """What one ``generate`` call did (reported in the server reply's ``rsd`` field)."""

    mode: str
    batch_size: int
    draft_layers: int
    accepted: Tensor  # [B, k] bool: drafted layer i accepted (and reached)
    reached: Tensor  # [B, k] bool: drafted layer i was checked (layer 0 always; j>=2 after d_1..d_{j-1} passed)
    code_pass: Tensor  # [B, k] float: fraction of codes that passed where reached
    main_passes: int  # main passes after the prefill for the batch (main-only: L - 1)
    main_passes_per_sample: list[int]  # what each sample alone would need
    timings_ms: dict[str, float] = field(default_factory=dict)
    first_layer: int = 0  # drafted layers are first_layer .. first_layer + draft_layers - 1

    @property
    def per_layer_acceptance(self) -> list[float]:
        """Fraction of samples whose drafted layer j was accepted (unconditional)."""
        return self.accepted.float().mean(0).tolist()

    @property
    def per_layer_acceptance_given_reached(self) -> list[float]:
        """P(drafted layer j accepted | it was checked)."""
        r = self.reached.float().sum(0)
        return (self.accepted.float().sum(0) / r.clamp_min(1)).tolist()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "mode": self.mode,
            "batch_size": self.batch_size,
            "draft_layers": self.draft_layers,
            "first_drafted_layer": self.first_layer,
            "per_layer_acceptance": [round(x, 4) for x in self.per_layer_acceptance],
            "per_layer_acceptance_given_reached": [round(x, 4) for x in self.per_layer_acceptance_given_reached],
            "mean_code_pass": [round(x, 4) for x in self.code_pass.float().mean(0).tolist()],
            "main_passes": self.main_passes,
            "main_passes_incl_prefill": self.main_passes + 1,
            "main_passes_per_sample": self.main_passes_per_sample,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


class SpeculativeDecoder:
    """RSD engine: ``generate(inputs_embeds, attention_mask) -> (tokens [B, L, C], RSDStats)``."""

    def __init__(
        self,
        main: RFSQLayerHeadModel,
        draft: DraftLike | nn.Module | None,
        config: RSDConfig | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        self.main = main
        self.draft = draft
        self.config = config or RSDConfig()
        self.tokenizer = tokenizer
        # drafted layers are first_layer .. first_layer + k - 1 (seed draft: 0..2; layer-0-conditioned: 1..3)
        self.first_layer = int(getattr(draft, "first_layer", 0)) if draft is not None else 0
        if self.first_layer + self.config.draft_layers > main.num_layers - 1:
            raise ValueError(
                f"draft_layers={self.config.draft_layers} (+ first drafted layer {self.first_layer}) must be <= "
                f"num_layers - 1 = {main.num_layers - 1}"
            )
        device = next(main.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(self.config.seed)

    def reseed(self, seed: int) -> None:
        """Reset the sampling generator (reproducible sampling runs)."""
        self.generator.manual_seed(seed)

    def _sync(self, t: Tensor) -> None:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)

    @torch.no_grad()
    def generate(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, RSDStats]:
        """Decode one chunk of RFSQ layers per sample with speculative decoding (or main-only if disabled)."""
        cfg = self.config
        main = self.main
        mode = cfg.mode
        gen = self.generator
        b = inputs_embeds.shape[0]
        n_layers, n_codes = main.num_layers, main.codes_per_layer
        dev = inputs_embeds.device
        k = cfg.draft_layers
        t0 = time.perf_counter()
        timings: dict[str, float] = {}

        pre = main.prefill(inputs_embeds, attention_mask)
        self._sync(pre.logits0)
        t1 = time.perf_counter()
        timings["prefill"] = (t1 - t0) * 1e3
        layers = torch.zeros(b, n_layers, n_codes, dtype=torch.long, device=dev)
        accepted = torch.zeros(b, k, dtype=torch.bool, device=dev)
        reached = torch.zeros(b, k, dtype=torch.bool, device=dev)
        code_pass = torch.zeros(b, k, device=dev)

        if not cfg.enabled or self.draft is None:
            # main-only baseline, same tail code as the speculative path
            layers[:, 0] = main_select(pre.logits0, mode, cfg.temperature, gen)
            decided = torch.ones(b, dtype=torch.long, device=dev)
            passes = main.complete_layers(layers, decided, pre.cache, mode, cfg.temperature, gen)
            self._sync(layers)
            timings["draft"] = timings["verify"] = 0.0
            timings["decode"] = (time.perf_counter() - t1) * 1e3
            timings["total"] = (time.perf_counter() - t0) * 1e3
            stats = RSDStats(mode, b, k, accepted, reached, code_pass, passes, [passes] * b, timings)
            return layers, stats

        # 2. draft proposes layers first..K-1 from h (a layer-0-conditioned draft gets main's free layer 0)
        first = self.first_layer
        top = first + k  # verification feeds layers 0..top-1 and yields p_1..p_top
        if first == 0:
            draft_logits = self.draft(pre.hidden_last)
        else:
            layers[:, 0] = main_select(pre.logits0, mode, cfg.temperature, gen)
            draft_logits = self.draft(pre.hidden_last, layers[:, 0])
        draft_logits = draft_logits[:, :k].float()
        if draft_logits.shape[1] < k or draft_logits.shape[2:] != (n_codes, main.levels):
            raise ValueError(f"draft logits {tuple(draft_logits.shape)} do not match [B, {k}, {n_codes}, {main.levels}]")
        d_tokens, d_probs = draft_propose(draft_logits, mode, cfg.temperature, gen)
        self._sync(d_tokens)
        t2 = time.perf_counter()
        timings["draft"] = (t2 - t1) * 1e3

        def decide(i: int, logits: Tensor):
            return decide_layer(
                mode,
                d_tokens[:, i],
                logits,
                draft_probs=None if d_probs is None else d_probs[:, i],
                r=cfg.relaxed_r,
                tau=cfg.relaxed_tau,
                temperature=cfg.temperature,
                generator=gen,
            )

        # 3. drafted layer 0 against p_0 from the prefill: decided (accepted or repaired) with no extra pass
        if first == 0:
            dec0 = decide(0, pre.logits0)
            layers[:, 0] = dec0.tokens
            accepted[:, 0] = dec0.accepted
            reached[:, 0] = True
            code_pass[:, 0] = dec0.code_pass

        # 4. one verification pass over [layer 0, d_1, .., d_{top-1}] -> p_1..p_top
        feed = torch.cat([layers[:, :1], d_tokens[:, 1 - first : top - first]], dim=1)
        ver_logits = main.step(feed, pre.cache)
        alive = torch.ones(b, dtype=torch.bool, device=dev)  # every drafted layer so far accepted
        n_valid = torch.ones(b, dtype=torch.long, device=dev)  # fed tokens whose input is final
        decided = torch.ones(b, dtype=torch.long, device=dev)
        for j in range(1, top):
            i = j - first  # index of layer j among the drafted layers
            dec = decide(i, ver_logits[:, j - 1])
            layers[:, j] = torch.where(alive[:, None], dec.tokens, layers[:, j])
            reached[:, i] = alive
            code_pass[:, i] = torch.where(alive, dec.code_pass, torch.zeros_like(dec.code_pass))
            ok = alive & dec.accepted
            accepted[:, i] = ok
            decided = torch.where(alive, torch.full_like(decided, j + 1), decided)
            n_valid = torch.where(ok, torch.full_like(n_valid, j + 1), n_valid)
            alive = ok
        if bool(alive.any()):
            # all drafted layers accepted: p_top gives layer `top` without another pass
            bonus = main_select(ver_logits[:, top - 1], mode, cfg.temperature, gen)
            layers[:, top] = torch.where(alive[:, None], bonus, layers[:, top])
            decided = torch.where(alive, torch.full_like(decided, top + 1), decided)
        self._sync(layers)
        t3 = time.perf_counter()
        timings["verify"] = (t3 - t2) * 1e3

        # 5. crop to the batch's shortest valid prefix, decode the tail in lockstep
        n_min = int(n_valid.min())
        pre.cache.crop(n_min)
        tail = main.complete_layers(layers, decided, pre.cache, mode, cfg.temperature, gen)
        self._sync(layers)
        t4 = time.perf_counter()
        timings["decode"] = (t4 - t3) * 1e3
        timings["total"] = (t4 - t0) * 1e3
        per_sample = [1 + (n_layers - 1 - int(n)) for n in n_valid.tolist()]
        stats = RSDStats(mode, b, k, accepted, reached, code_pass, 1 + tail, per_sample, timings, first)
        logger.debug("rsd chunk: %s", stats.to_dict())
        return layers, stats

    def decode_actions(self, tokens: Tensor, layers: int | None = None) -> Tensor:
        """RFSQ layers ``[B, L, C]`` -> action chunks ``[B, H, A]`` via the robust RFSQ tokenizer.

        The tokenizer is imported lazily so the engine works (and is tested) without a trained tokenizer.
        """
        if self.tokenizer is None:
            raise RuntimeError("SpeculativeDecoder has no tokenizer; pass tokenizer=RFSQTokenizer(...) to decode")
        to_tokens = getattr(self.tokenizer, "layers_to_tokens", None)
        if to_tokens is None:
            from rsd.rfsq import layers_to_tokens as to_tokens  # lazy: rsd.rfsq pulls in the tokenizer stack
        return self.tokenizer.decode(to_tokens(tokens), layers)
