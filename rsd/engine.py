"""Residual speculative decoding (RSD) over RFSQ layers: the main model decides layers coarse to fine, a draft
proposes several at once, one main pass verifies them.

One chunk, ``L`` RFSQ layers (8), layer 0 free from the prefill:

1. Prefill the main model -> last hidden state ``h``, KV cache, main's layer-0 logits ``p_0`` (layer 0 decided).
2. Rounds until every layer is decided. With layers ``0..m-1`` decided, a round drafts ``k`` layers
   ``m..m+k-1`` and feeds ``[layer m-1, d_m, .., d_{m+k-1}]`` to the main model in ONE pass, which yields
   ``p_m..p_{m+k}``. The longest passing prefix of the drafted layers is kept; the first rejected layer is
   repaired from logits already computed; if all passed, ``p_{m+k}`` gives one more layer for free. The KV cache
   is cropped to the tokens whose input is final. ``k = 0`` is a plain main step.
   * a **deep draft** (:class:`rsd.draft.DeepDraftModel`) proposes any remaining layers given the decided
     prefix, so after a rejection the next round speculates again from the repaired prefix;
   * **Jacobi** (``jacobi``, deep drafts): main's logits for the layers past a rejected one were computed on a
     slightly wrong prefix, and are the next round's proposals for those layers (fixed-point iteration as in
     PD-VLA / CEED-VLA) -- no draft call, and main's own guesses for its fine layers;
   * the **fixed-k draft** (:class:`rsd.draft.RFSQDraftModel`) proposes a fixed set of coarse layers from
     ``h`` once (layers ``0..k-1``, or ``1..k`` given layer 0); its layer 0 is checked against ``p_0`` with no
     pass; later layers are main steps.
3. ``adaptive`` (deep drafts): the depth of every round is chosen by a small dynamic programme over the
   remaining layers that minimises expected time from measured pass costs (EMA of every timed pass: ``n``-token
   verification, draft) and per-layer acceptance (EMA); with a batch, a layer counts as accepted only if every
   sample accepts it. When speculation is not expected to pay the plan is ``k = 0`` everywhere: main-only.

Acceptance (``rsd.acceptance``): ``exact`` (greedy, bit-identical to main-only), ``sampling`` (Leviathan et
al.: an exact sample of main), ``relaxed`` (code distance r, fraction tau; lossy), ``relaxed-action`` (chunk
deviation per drafted layer within a tolerance in mm / degrees, same gripper sign; lossy, bounded in action
space). ``decode_layers = l`` truncates every mode to the first ``l`` layers (the "anytime" baseline).

Batching (B > 1): samples may accept different prefixes. The cache is cropped to the batch minimum and samples
that are ahead re-feed their decided layers, which count as accepted "drafts" in the next round; their logits
are ignored. A batched pass costs the same for every sample, so masking a ragged cache would save no pass.
``main_passes_per_sample`` counts the passes in which each sample made progress (what it needed itself).

Exactness: ``exact`` reproduces main-only greedy decoding token for token provided an n-token pass's logits
equal those of single-token steps (the ``expected`` action decode, which averages over main's logits, then
agrees to float rounding: ~2e-8 on the CPU tests). They do in our float32/float64 CPU tests; with bf16 GPU kernels a near-tie
argmax could flip (true of any speculative decoder).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rsd.acceptance import LayerDecision, accept_action, decide_layer, draft_propose, main_select
from rsd.config import RSDConfig
from rsd.layer_head import LayerCache, RFSQLayerHeadModel

logger = logging.getLogger(__name__)


class DraftLike(Protocol):
    """Seed-shaped draft: ``[B, H]`` last hidden state -> logits ``[B, k, C, V]`` for a fixed set of layers.

    ``first_layer = 1`` drafts layers 1..k given main's layer 0 (``draft(h, layer0)``); the default drafts 0..k-1.
    A deep draft instead has ``deep = True`` and is called as ``draft(h, decided_layers [B, m, C], num)``.
    """

    def __call__(self, hidden: Tensor, layer0: Tensor | None = None) -> Tensor: ...


@dataclass
class RSDStats:
    """What one ``generate`` call did (reported in the server reply's ``rsd`` field).

    Columns of ``accepted`` / ``reached`` / ``code_pass`` are the draftable layers ``first_layer ..
    first_layer + draft_layers - 1``.
    """

    mode: str
    batch_size: int
    draft_layers: int
    accepted: Tensor  # [B, W] bool: drafted layer accepted
    reached: Tensor  # [B, W] bool: drafted layer was checked against main
    code_pass: Tensor  # [B, W] float: fraction of codes that passed where reached
    main_passes: int  # main passes after the prefill for the batch (main-only: decoded layers - 1)
    main_passes_per_sample: list[int]  # passes in which each sample made progress
    timings_ms: dict[str, float] = field(default_factory=dict)
    first_layer: int = 0
    rounds: int = 0  # speculation rounds (each one draft call + one verification pass)
    chosen_k: list[int] = field(default_factory=list)  # draft depth of every main pass in order (0 = plain step)
    decoded_layers: int = 8
    action_dev_mm: Tensor | None = None  # [B] relaxed-action: summed deviation of the kept drafted layers
    action_dev_deg: Tensor | None = None
    # [B, L, C, V] float32: main's logits for every decided layer given the decided layers before it (the
    # distribution an ``expected`` action decode averages over; computed by the passes anyway, so free)
    main_logits: Tensor | None = None

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
        out = {
            "mode": self.mode,
            "batch_size": self.batch_size,
            "draft_layers": self.draft_layers,
            "first_drafted_layer": self.first_layer,
            "decoded_layers": self.decoded_layers,
            "per_layer_acceptance": [round(x, 4) for x in self.per_layer_acceptance],
            "per_layer_acceptance_given_reached": [round(x, 4) for x in self.per_layer_acceptance_given_reached],
            "mean_code_pass": [round(x, 4) for x in self.code_pass.float().mean(0).tolist()],
            "main_passes": self.main_passes,
            "main_passes_incl_prefill": self.main_passes + 1,
            "main_passes_per_sample": self.main_passes_per_sample,
            "rounds": self.rounds,
            "chosen_k": self.chosen_k,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }
        if self.action_dev_mm is not None and self.action_dev_deg is not None:
            out["action_dev_mm"] = [round(x, 4) for x in self.action_dev_mm.tolist()]
            out["action_dev_deg"] = [round(x, 4) for x in self.action_dev_deg.tolist()]
        return out


class CostModel:
    """Pass costs (ms) as exponential moving averages of timed passes, and per-layer acceptance estimates.

    Before anything is measured a verification pass over n tokens is assumed to cost ``1 + 0.1 (n - 1)`` steps and
    the draft 0.2 steps; :meth:`SpeculativeDecoder.calibrate` measures them at start-up.
    """

    def __init__(self, num_layers: int, momentum: float = 0.1, prior_acceptance: float = 0.5) -> None:
        self.num_layers = num_layers
        self.momentum = momentum
        self.pass_ms: dict[int, float] = {}
        self.draft_ms: float | None = None
        self.acceptance = [prior_acceptance] * num_layers  # P(drafted layer j accepted | reached), per sample
        self.observations = [0] * num_layers  # rounds that reached each layer so far
        self.frozen_costs = False  # keep pass / draft costs as set (tests, projections); acceptance still updates

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.momentum) * old + self.momentum * new

    def observe_pass(self, n: int, ms: float) -> None:
        if not self.frozen_costs:
            self.pass_ms[n] = self._ema(self.pass_ms.get(n), ms)

    def observe_draft(self, ms: float) -> None:
        if not self.frozen_costs:
            self.draft_ms = self._ema(self.draft_ms, ms)

    def observe_acceptance(self, layer: int, rate: float) -> None:
        """Running mean over a layer's first ``1 / momentum`` observations, an EMA after: the prior is replaced
        by the first measurement instead of being decayed by 10% a round. (A plain EMA from the 0.5 prior still
        estimated ~0.3 for a layer the draft never got right after the first 4 full-depth probes, so the planner
        kept drafting it: exact RSD ran at 0.87x main-only over the first 64 chunks on the shipped checkpoint.)"""
        self.observations[layer] += 1
        m = max(self.momentum, 1.0 / self.observations[layer])
        self.acceptance[layer] = (1 - m) * self.acceptance[layer] + m * rate

    def pass_cost(self, n: int) -> float:
        if n in self.pass_ms:
            return self.pass_ms[n]
        step = self.pass_ms.get(1)
        if step is None:
            known = sorted(self.pass_ms)
            step = self.pass_ms[known[0]] / (1 + 0.1 * (known[0] - 1)) if known else 1.0
        return step * (1 + 0.1 * (n - 1))

    def draft_cost(self) -> float:
        return 0.2 * self.pass_cost(1) if self.draft_ms is None else self.draft_ms

    def plan(self, depth: int, k_max: int, batch: int) -> list[int]:
        """Best draft depth per number of decided layers ``m`` (index m, 1..depth-1); see :meth:`solve`."""
        return self.solve(depth, k_max, batch)[0]

    def solve(self, depth: int, k_max: int, batch: int) -> tuple[list[int], list[float]]:
        """``(best k, expected remaining time)`` per number of decided layers ``m``, minimising expected time.

        Value iteration from the last layer back: ``V[m] = min_k cost(k) + E[V[m + progress]]`` where progress is
        ``n_acc + 1`` (accepted layers plus the repaired or free one), ``P(n_acc >= i) = prod_{t<i} a_{m+t}^B``.
        """
        value = [0.0] * (depth + 1)
        best = [0] * (depth + 1)
        step = self.pass_cost(1)
        draft = self.draft_cost()
        for m in range(depth - 1, 0, -1):
            choice, cost = 0, step + value[m + 1]
            for k in range(1, min(k_max, depth - m) + 1):
                last = m + k == depth  # nothing to predict after the last layer: no extra fed token
                n_feed = k if last else k + 1
                exp, reach = 0.0, 1.0  # reach = P(n_acc >= i)
                for i in range(k + 1):
                    p_stop = reach * (1.0 - self.acceptance[m + i] ** batch) if i < k else reach
                    progress = i + 1 if i < k else (k if last else k + 1)
                    exp += p_stop * value[m + progress]
                    if i < k:
                        reach *= self.acceptance[m + i] ** batch
                c = draft + self.pass_cost(n_feed) + exp
                if c < cost - 1e-12:
                    choice, cost = k, c
            value[m], best[m] = cost, choice
        return best, value


class SpeculativeDecoder:
    """RSD engine: ``generate(inputs_embeds, attention_mask) -> (layers [B, L, C], RSDStats)``."""

    def __init__(
        self,
        main: RFSQLayerHeadModel,
        draft: DraftLike | nn.Module | None,
        config: RSDConfig | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        self.main = main
        self.draft = draft
        self.config = cfg = config or RSDConfig()
        self.tokenizer = tokenizer
        n_layers = main.num_layers
        self.depth = cfg.decode_layers or n_layers
        if not 1 <= self.depth <= n_layers:
            raise ValueError(f"decode_layers={cfg.decode_layers} must be in 1..{n_layers} (0 = all)")
        self.deep = bool(getattr(draft, "deep", False))
        self.first_layer = 1 if self.deep else (int(getattr(draft, "first_layer", 0)) if draft is not None else 0)
        if self.deep:
            self.k_max = min(cfg.draft_layers or n_layers - 1, n_layers - 1)
        elif cfg.draft_layers and self.first_layer + cfg.draft_layers > n_layers - 1:
            raise ValueError(
                f"draft_layers={cfg.draft_layers} (+ first drafted layer {self.first_layer}) must be <= "
                f"num_layers - 1 = {n_layers - 1}"
            )
        self.action_space = None
        if cfg.mode == "relaxed-action":
            if tokenizer is None:
                raise ValueError("mode relaxed-action needs the RFSQ tokenizer (to decode candidate chunks)")
            from rsd.action_space import ActionSpace

            self.action_space = ActionSpace(tokenizer)
        self.costs = CostModel(n_layers)
        self._plans: dict[int, tuple[int, list[int]]] = {}  # batch size -> (calls when planned, plan)
        self._calls = 0
        device = next(main.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def reseed(self, seed: int) -> None:
        """Reset the sampling generator (reproducible sampling runs)."""
        self.generator.manual_seed(seed)

    @staticmethod
    def _sync(t: Tensor) -> None:
        if t.is_cuda:
            torch.cuda.synchronize(t.device)

    # ------------------------------------------------------------------ costs
    @torch.no_grad()
    def calibrate(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None, reps: int = 5) -> dict[str, float]:
        """Measure prefill, n-token passes (n = 1..L-1) and the draft on one input; seeds the cost model."""
        main, n_layers = self.main, self.main.num_layers
        b, dev = inputs_embeds.shape[0], inputs_embeds.device
        zeros = torch.zeros(b, n_layers, main.codes_per_layer, dtype=torch.long, device=dev)
        out: dict[str, float] = {}

        def median(fn) -> float:
            times = []
            for _ in range(reps + 1):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            times = sorted(times[1:])  # first run warms caches
            return times[len(times) // 2]

        out["prefill_ms"] = median(lambda: self._sync(main.prefill(inputs_embeds, attention_mask).logits0))
        pre = main.prefill(inputs_embeds, attention_mask)
        for n in range(1, n_layers):
            def one(n: int = n) -> None:
                pre.cache.crop(0)
                self._sync(main.step(zeros[:, :n], pre.cache))

            ms = median(one)
            out[f"pass{n}_ms"] = ms
            self.costs.pass_ms[n] = ms
        if self.draft is not None:
            h = pre.hidden_last
            if self.deep:
                out["draft_ms"] = median(lambda: self._sync(self.draft(h, zeros[:, :1], self.k_max)))
            elif self.first_layer == 1:
                out["draft_ms"] = median(lambda: self._sync(self.draft(h, zeros[:, 0])))
            else:
                out["draft_ms"] = median(lambda: self._sync(self.draft(h)))
            self.costs.draft_ms = out["draft_ms"]
        self._plans.clear()
        return out

    def _plan(self, batch: int) -> list[int]:
        """Depth per decided-prefix length for this batch size (re-planned every 8 calls as estimates move)."""
        cfg = self.config
        if not cfg.adaptive:
            return [0] + [self.k_max] * self.depth
        if cfg.probe_every and self._calls % cfg.probe_every == 0:
            return [0] + [self.k_max] * self.depth
        cached = self._plans.get(batch)
        if cached is None or self._calls - cached[0] >= 8:
            cached = (self._calls, self.costs.plan(self.depth, self.k_max, batch))
            self._plans[batch] = cached
        return cached[1]

    # ------------------------------------------------------------------ decisions
    def _decide(self, proposals: Tensor, probs: Tensor | None, logits: Tensor, layers: Tensor, m: int) -> tuple[
        LayerDecision, Tensor | None, Tensor | None
    ]:
        """Decide drafted layers ``m..m+k-1`` (``proposals [B, k, C]``) against main's ``logits [B, k, C, V]``."""
        cfg = self.config
        if cfg.mode != "relaxed-action":
            dec = decide_layer(cfg.mode, proposals, logits, draft_probs=probs, r=cfg.relaxed_r, tau=cfg.relaxed_tau,
                               temperature=cfg.temperature, generator=self.generator)
            return dec, None, None
        space = self.action_space
        assert space is not None
        b, k, _ = proposals.shape
        target = logits.argmax(dim=-1)
        dq_p = space.dequantize(proposals, m)
        dq_t = space.dequantize(target, m)
        base = space.dequantize(layers[:, :m], 0).sum(dim=1) if m > 0 else torch.zeros_like(dq_p[:, 0])
        with_draft = base[:, None] + dq_p.cumsum(dim=1)  # chain d_m..d_i
        with_main = with_draft - dq_p + dq_t  # same chain, main's choice at i
        chunks = space.decode_latent(torch.cat([with_draft, with_main]).reshape(2 * b * k, -1))
        chunks = chunks.view(2, b, k, *chunks.shape[1:])
        dev = space.deviation(chunks[0], chunks[1])
        dec = accept_action(proposals, logits, dev.pos_mm, dev.rot_deg, dev.gripper_flips, cfg.action_eps_mm,
                            cfg.action_eps_deg)
        same = (proposals == target).all(dim=-1)  # identical layers deviate by exactly 0
        zero = torch.zeros_like(dev.pos_mm)
        return dec, torch.where(same, zero, dev.pos_mm), torch.where(same, zero, dev.rot_deg)

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, RSDStats]:
        """Decode one chunk of RFSQ layers per sample (speculatively unless disabled or without a draft)."""
        cfg, main, gen = self.config, self.main, self.generator
        mode = cfg.mode
        select_mode = "sampling" if mode == "sampling" else "exact"
        b, dev = inputs_embeds.shape[0], inputs_embeds.device
        n_layers, n_codes, depth = main.num_layers, main.codes_per_layer, self.depth
        speculate = cfg.enabled and self.draft is not None
        t0 = time.perf_counter()
        timings = {"draft": 0.0, "verify": 0.0, "decode": 0.0}

        pre = main.prefill(inputs_embeds, attention_mask)
        self._sync(pre.logits0)
        t1 = time.perf_counter()
        timings["prefill"] = (t1 - t0) * 1e3
        layers = torch.zeros(b, n_layers, n_codes, dtype=torch.long, device=dev)
        main_logits = torch.zeros(b, n_layers, n_codes, main.levels, device=dev)
        main_logits[:, 0] = pre.logits0.float()
        decided = torch.ones(b, dtype=torch.long, device=dev)
        progress = torch.zeros(b, dtype=torch.long, device=dev)
        dev_mm = torch.zeros(b, device=dev) if self.action_space is not None and speculate else None
        dev_deg = torch.zeros(b, device=dev) if dev_mm is not None else None

        # fixed-k drafts propose once, from h (and layer 0); a deep draft proposes every round
        seed_tok: Tensor | None = None
        seed_probs: Tensor | None = None
        width = 0
        if speculate and not self.deep:
            tc = time.perf_counter()
            if self.first_layer == 0:
                d_logits = self.draft(pre.hidden_last)
            else:
                layers[:, 0] = main_select(pre.logits0, select_mode, cfg.temperature, gen)
                d_logits = self.draft(pre.hidden_last, layers[:, 0])
            k = cfg.draft_layers or d_logits.shape[1]
            d_logits = d_logits[:, :k].float()
            if d_logits.shape[1] < k or d_logits.shape[2:] != (n_codes, main.levels):
                raise ValueError(
                    f"draft logits {tuple(d_logits.shape)} do not match [B, {k}, {n_codes}, {main.levels}]"
                )
            seed_tok, seed_probs = draft_propose(d_logits, select_mode, cfg.temperature, gen)
            self._sync(seed_tok)
            timings["draft"] += (time.perf_counter() - tc) * 1e3
            width = k
        elif speculate:
            width = n_layers - 1
        accepted = torch.zeros(b, width, dtype=torch.bool, device=dev)
        reached = torch.zeros(b, width, dtype=torch.bool, device=dev)
        code_pass = torch.zeros(b, width, device=dev)

        if seed_tok is not None and self.first_layer == 0:
            # drafted layer 0 against p_0 from the prefill: decided (accepted or repaired) with no extra pass
            dec0, mm0, deg0 = self._decide(seed_tok[:, :1], None if seed_probs is None else seed_probs[:, :1],
                                           pre.logits0[:, None], layers, 0)
            layers[:, 0] = dec0.tokens[:, 0]
            accepted[:, 0], reached[:, 0], code_pass[:, 0] = dec0.accepted[:, 0], True, dec0.code_pass[:, 0]
            if dev_mm is not None and mm0 is not None and deg0 is not None:
                dev_mm += torch.where(dec0.accepted[:, 0], mm0[:, 0], torch.zeros_like(mm0[:, 0]))
                dev_deg += torch.where(dec0.accepted[:, 0], deg0[:, 0], torch.zeros_like(deg0[:, 0]))
            seed_tok = seed_tok[:, 1:]
            seed_probs = None if seed_probs is None else seed_probs[:, 1:]
        elif seed_tok is None:
            layers[:, 0] = main_select(pre.logits0, select_mode, cfg.temperature, gen)

        plan = self._plan(b) if speculate and self.deep else None
        self._calls += 1
        cache: LayerCache = pre.cache
        passes, rounds, chosen = 0, 0, []
        guess: Tensor | None = None  # Jacobi proposals [B, L, C, V] from the last verification pass
        guess_ok = torch.zeros(b, n_layers, dtype=torch.bool, device=dev)
        m = ahead = 1  # fewest / most decided layers over the batch
        while m < depth:
            if not speculate:
                k = 0
            elif self.deep:
                k = plan[m] if (not cfg.max_rounds or rounds < cfg.max_rounds) else 0
                k = min(k, depth - m)
            else:  # fixed-k: its proposals are for layers 1..; only usable in the first round
                k = min(seed_tok.shape[1], depth - m) if (rounds == 0 and m == 1 and seed_tok is not None) else 0
            f = cache.num_fed
            tp = time.perf_counter()
            if k == 0:
                logits = main.step(layers[:, f:m], cache)[:, -1]
                self._sync(logits)
                ms = (time.perf_counter() - tp) * 1e3
                self.costs.observe_pass(m - f, ms)
                timings["decode"] += ms
                new = main_select(logits, select_mode, cfg.temperature, gen)
                passes += 1
                chosen.append(0)
                if ahead <= m:  # every sample needs this layer (always so without speculation): no masking
                    layers[:, m] = new
                    main_logits[:, m] = logits.float()
                    progress += 1
                    decided.fill_(m + 1)
                    m = ahead = m + 1
                    continue
                need = decided <= m
                layers[:, m] = torch.where(need[:, None], new, layers[:, m])
                main_logits[:, m] = torch.where(need[:, None, None], logits.float(), main_logits[:, m])
                progress += need.long()
                decided = torch.where(need, torch.full_like(decided, m + 1), decided)
                m = int(decided.min())
                continue

            # ---- one speculation round over layers m..m+k-1
            idx = torch.arange(m, m + k, device=dev)
            forced = idx[None] < decided[:, None]  # samples ahead: their decided layers stand in for drafts
            if self.deep:
                have = None if guess is None else guess_ok[:, m : m + k]
                if have is not None and bool(have.all()):
                    d_logits = guess[:, m : m + k]  # Jacobi: main's own guesses from the last pass, no draft call
                else:
                    d_logits = self.draft(pre.hidden_last, layers[:, :m], k)
                    if have is not None and bool(have.any()):
                        d_logits = torch.where(have[..., None, None], guess[:, m : m + k], d_logits)
                tok, probs = draft_propose(d_logits.float(), select_mode, cfg.temperature, gen)
                self._sync(tok)
                ms = (time.perf_counter() - tp) * 1e3
                if have is None or not bool(have.all()):
                    self.costs.observe_draft(ms)
                timings["draft"] += ms
            else:
                tok, probs = seed_tok[:, :k], None if seed_probs is None else seed_probs[:, :k]
            proposals = torch.where(forced[..., None], layers[:, m : m + k], tok)
            last = m + k == depth
            tv = time.perf_counter()
            feed = torch.cat([layers[:, f:m], proposals if not last else proposals[:, : k - 1]], dim=1)
            ver = main.step(feed, cache)[:, m - 1 - f :]  # ver[:, i] predicts layer m + i
            dec, mm, deg = self._decide(proposals, probs, ver[:, :k], layers, m)
            if cfg.jacobi and self.deep and ver.shape[1] > 1:
                # main's logits past a rejected layer were computed on a slightly wrong prefix: they are the
                # next round's proposals for those layers (Jacobi iteration), better than a draft that never
                # saw main's fine layers
                if guess is None:
                    guess = torch.zeros(b, n_layers, n_codes, main.levels, device=dev)
                    guess_ok = torch.zeros(b, n_layers, dtype=torch.bool, device=dev)
                guess[:, m + 1 : m + ver.shape[1]] = ver[:, 1:]
                guess_ok[:, m + 1 : m + ver.shape[1]] = True
            ok = dec.accepted | forced
            chain = ok.long().cumprod(dim=1).bool()  # [B, k] every layer up to i accepted
            n_acc = chain.sum(dim=1)
            repair = (~chain) & (torch.arange(k, device=dev)[None] == n_acc[:, None])
            block = torch.where(chain[..., None], proposals, layers[:, m : m + k])
            layers[:, m : m + k] = torch.where(repair[..., None], dec.tokens, block)
            # main's logits of every layer this round decided (accepted drafts and the repair), all computed on
            # the decided prefix; forced layers keep the logits of the round that decided them
            fresh = ((chain & ~forced) | repair)[..., None, None]
            main_logits[:, m : m + k] = torch.where(fresh, ver[:, :k].float(), main_logits[:, m : m + k])
            full = n_acc == k
            new_decided = torch.where(full, torch.full_like(n_acc, m + k + (0 if last else 1)), m + n_acc + 1)
            if not last:
                bonus_need = full & (decided <= m + k)
                if bool(bonus_need.any()):
                    bonus = main_select(ver[:, k], select_mode, cfg.temperature, gen)
                    layers[:, m + k] = torch.where(bonus_need[:, None], bonus, layers[:, m + k])
                    main_logits[:, m + k] = torch.where(bonus_need[:, None, None], ver[:, k].float(),
                                                        main_logits[:, m + k])
            # bookkeeping: columns are layers first_layer..; forced positions were not drafts
            col = m - self.first_layer
            drafted = ~forced
            was_reached = drafted & (torch.arange(k, device=dev)[None] <= n_acc[:, None])
            reached[:, col : col + k] |= was_reached
            accepted[:, col : col + k] |= chain & drafted
            code_pass[:, col : col + k] = torch.where(was_reached, dec.code_pass, code_pass[:, col : col + k])
            if dev_mm is not None and mm is not None and deg is not None:
                kept = chain & drafted
                dev_mm += torch.where(kept, mm, torch.zeros_like(mm)).sum(dim=1)
                dev_deg += torch.where(kept, deg, torch.zeros_like(deg)).sum(dim=1)
            progress += (new_decided > decided).long()
            decided = torch.maximum(decided, new_decided)
            n_valid = m + torch.minimum(n_acc, torch.full_like(n_acc, feed.shape[1] - (m - f)))
            cache.crop(int(n_valid.min()))
            self._sync(layers)
            ms = (time.perf_counter() - tv) * 1e3
            self.costs.observe_pass(feed.shape[1], ms)
            timings["verify"] += ms
            if self.deep:
                self._observe(was_reached, chain & drafted, m, k)
            passes += 1
            rounds += 1
            chosen.append(k)
            m, ahead = int(decided.min()), int(decided.max())

        timings["total"] = (time.perf_counter() - t0) * 1e3
        stats = RSDStats(
            mode, b, width, accepted, reached, code_pass, passes, progress.tolist(), timings, self.first_layer,
            rounds, chosen, depth, dev_mm, dev_deg, main_logits,
        )
        logger.debug("rsd chunk: %s", stats.to_dict())
        return layers, stats

    def _observe(self, reached: Tensor, accepted: Tensor, m: int, k: int) -> None:
        """Feed per-layer acceptance of this round into the cost model (per-sample rates)."""
        r = reached.float().sum(0).tolist()
        a = accepted.float().sum(0).tolist()
        for i in range(k):
            if r[i] > 0:
                self.costs.observe_acceptance(m + i, a[i] / r[i])

    def decode_actions(self, tokens: Tensor, layers: int | None = None, main_logits: Tensor | None = None) -> Tensor:
        """RFSQ layers ``[B, L, C]`` -> action chunks ``[B, H, A]`` via the robust RFSQ tokenizer.

        ``layers`` defaults to the engine's decoded depth (``decode_layers``). With ``action_decode = expected``
        and ``main_logits`` (:attr:`RSDStats.main_logits` of the same ``generate`` call) the chunk comes from the
        expected latent under main's distributions instead of the codes. The tokenizer is imported lazily so the
        engine works (and is tested) without a trained tokenizer.
        """
        if self.tokenizer is None:
            raise RuntimeError("SpeculativeDecoder has no tokenizer; pass tokenizer=RFSQTokenizer(...) to decode")
        depth = self.depth if layers is None else layers
        if self.config.action_decode == "expected":
            if main_logits is None:
                raise ValueError("action_decode=expected needs the main_logits of the generate call")
            return self.tokenizer.decode_expected(main_logits.float().softmax(-1), depth)
        to_tokens = getattr(self.tokenizer, "layers_to_tokens", None)
        if to_tokens is None:
            from rsd.rfsq import layers_to_tokens as to_tokens  # lazy: rsd.rfsq pulls in the tokenizer stack
        return self.tokenizer.decode(to_tokens(tokens), depth)
