"""Main model with an RFSQ layer head: an LLM that generates RFSQ layers coarse to fine, one layer per step.

The LLM (a transformers ``LlamaForCausalLM`` or its inner ``LlamaModel``; in production the Llama-2 of OpenVLA's
Prismatic backbone) continues from a prefix of input embeddings (image + prompt in production, random
embeddings in tests). Each RFSQ layer is *one* input token: the sum of a learned embedding per (code position,
level) over the layer's 128 codes -- i.e. a bias-free Linear over the one-hot 128x7 layer, computed as a gather
-- plus a learned embedding of the layer index (RoPE gives relative order, the layer embedding tells the model
*which* residual scale it is looking at). The hidden state at every position goes through one Linear head to
128x7 logits for the *next* layer; layer 0's logits come from the last prefix position, so the baseline is a
prefill plus 7 decoding steps.

Why one token per layer (and not 128 tokens): it makes a decoding step cost one token, and lets the
speculative engine verify several drafted layers in one pass over a handful of tokens.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from rsd.acceptance import main_select

logger = logging.getLogger(__name__)


@dataclass
class LayerCache:
    """KV cache of the main model plus what a step needs to extend it correctly.

    Attributes:
        kv: the transformers ``DynamicCache`` (prefix + fed layer tokens).
        attention_mask: ``[B, prefix_len + num_fed]`` (1 = real token); prefixes may be left-padded.
        prefix_len: padded prefix length (fed layer tokens start at this cache index).
        first_pos: ``[B]`` RoPE position of the first layer token per sample (= real prefix length), so a
            left-padded sample gets the same positions as the same prefix unpadded.
    """

    kv: DynamicCache
    attention_mask: Tensor
    prefix_len: int
    first_pos: Tensor

    @property
    def num_fed(self) -> int:
        """Number of RFSQ layer tokens already in the cache (fed layer f is RFSQ layer f)."""
        return int(self.kv.get_seq_length()) - self.prefix_len

    def crop(self, num_fed: int) -> None:
        """Keep only the prefix and the first ``num_fed`` layer tokens (drop rejected drafted layers).

        The crop is exact: a causal model's keys/values at kept positions never depended on later tokens.
        """
        cur = self.num_fed
        if num_fed > cur or num_fed < 0:
            raise ValueError(f"cannot crop to {num_fed} fed layers, cache holds {cur}")
        if num_fed < cur:
            # transformers 5.x: a negative argument is the number of tokens to remove
            self.kv.crop(-(cur - num_fed))
            self.attention_mask = self.attention_mask[:, : self.prefix_len + num_fed]


@dataclass
class PrefillOut:
    """Result of the prefill: the draft's input, main's own layer-0 logits, and the cache to continue from."""

    hidden_last: Tensor  # [B, hidden]
    logits0: Tensor  # [B, codes, levels]
    cache: LayerCache


class RFSQLayerHeadModel(nn.Module):
    """LLM + RFSQ layer embedding + RFSQ layer head (see the module docstring)."""

    def __init__(self, llm: nn.Module, num_layers: int = 8, codes_per_layer: int = 128, levels: int = 7) -> None:
        super().__init__()
        self.llm = llm
        self.num_layers = num_layers
        self.codes_per_layer = codes_per_layer
        self.levels = levels
        hidden = self.hidden_size
        ref = next(self.backbone.parameters())
        init_std = float(getattr(self.backbone.config, "initializer_range", 0.02))
        # sum of C independent embeddings: scale each by 1/sqrt(C) so a layer token has the scale of a word token
        self.code_embed = nn.Embedding(codes_per_layer * levels, hidden, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(self.code_embed.weight, std=init_std / codes_per_layer**0.5)
        self.layer_embed = nn.Embedding(num_layers, hidden, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(self.layer_embed.weight, std=init_std)
        self.head = nn.Linear(hidden, codes_per_layer * levels, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)
        self.register_buffer(
            "_code_offsets", torch.arange(codes_per_layer, device=ref.device) * levels, persistent=False
        )

    # ------------------------------------------------------------------ plumbing
    @property
    def backbone(self) -> nn.Module:
        """The inner transformer (``LlamaModel``) that runs on ``inputs_embeds``."""
        inner = getattr(self.llm, "model", None)
        return inner if isinstance(inner, nn.Module) and hasattr(self.llm, "lm_head") else self.llm

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def head_state_dict(self) -> dict[str, Tensor]:
        """Only the RFSQ-specific parameters (the LLM is saved by its own loader)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def embed_layers(self, layer_codes: Tensor, first_layer: int) -> Tensor:
        """``[B, n, C]`` codes of layers ``first_layer .. first_layer+n-1`` -> ``[B, n, hidden]`` input tokens."""
        b, n, c = layer_codes.shape
        if c != self.codes_per_layer:
            raise ValueError(f"expected {self.codes_per_layer} codes per layer, got {c}")
        idx = layer_codes.long() + self._code_offsets
        tok = F.embedding(idx, self.code_embed.weight).sum(dim=-2)
        layer_ids = torch.arange(first_layer, first_layer + n, device=layer_codes.device)
        return tok + self.layer_embed(layer_ids)[None]

    def logits_from_hidden(self, hidden: Tensor) -> Tensor:
        """``[..., hidden]`` -> ``[..., C, V]`` float32 logits for the next layer."""
        return self.head(hidden).float().unflatten(-1, (self.codes_per_layer, self.levels))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def prefill(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> PrefillOut:
        """Run the prefix; return the last hidden state, main's layer-0 logits and a :class:`LayerCache`.

        Prefixes of different lengths must be *left*-padded (the last position is the one that predicts
        layer 0 and where layer tokens are appended).
        """
        b, p, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, p, dtype=torch.long, device=inputs_embeds.device)
        attention_mask = attention_mask.long()
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("prefixes must be left-padded: attention_mask[:, -1] must be 1 for every sample")
        pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        kv = DynamicCache(config=self.backbone.config)
        out = self.backbone(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=pos,
            past_key_values=kv,
            use_cache=True,
        )
        hidden_last = out.last_hidden_state[:, -1]
        cache = LayerCache(kv=kv, attention_mask=attention_mask, prefix_len=p, first_pos=attention_mask.sum(-1))
        return PrefillOut(hidden_last=hidden_last, logits0=self.logits_from_hidden(hidden_last), cache=cache)

    @torch.no_grad()
    def step(self, layer_codes: Tensor, cache: LayerCache) -> Tensor:
        """Feed ``n >= 1`` layers at once (the next ones after the cache); return ``[B, n, C, V]`` logits.

        With ``f`` layers already in the cache, the fed layers are ``f .. f+n-1`` and output ``i`` predicts layer
        ``f + i + 1``. ``n > 1`` is the verification pass of speculative decoding; ``n = 1`` an ordinary step.
        """
        b, n, _ = layer_codes.shape
        start = cache.num_fed
        if start + n > self.num_layers:
            raise ValueError(f"feeding {n} layers after {start} exceeds {self.num_layers} layers")
        emb = self.embed_layers(layer_codes, start).to(next(self.backbone.parameters()).dtype)
        mask = torch.cat([cache.attention_mask, cache.attention_mask.new_ones(b, n)], dim=1)
        pos = cache.first_pos[:, None] + torch.arange(start, start + n, device=layer_codes.device)[None]
        out = self.backbone(
            inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache.kv, use_cache=True
        )
        cache.attention_mask = mask
        return self.logits_from_hidden(out.last_hidden_state)

    @torch.no_grad()
    def complete_layers(
        self,
        layers: Tensor,
        decided: Tensor,
        cache: LayerCache,
        mode: str = "exact",
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> int:
        """Decode the remaining layers in place, one main step per layer, in lockstep over the batch.

        ``layers`` ``[B, L, C]`` holds ``decided[b]`` final layers per sample; the cache holds the first
        ``cache.num_fed`` of them (``num_fed < decided.min()``). Samples that are ahead re-feed their already
        decided layers (their logits are ignored), so the cache stays rectangular. Used both by the main-only
        baseline and by the speculative engine, so both decode the tail with the same code. Returns the
        number of main passes it ran.
        """
        passes = 0
        f = cache.num_fed
        if not bool((decided > f).all()):
            raise ValueError("every sample needs its next layer to feed decided")
        while f < self.num_layers - 1:
            logits = self.step(layers[:, f : f + 1], cache)[:, 0]
            passes += 1
            need = decided <= f + 1
            if bool(need.any()):
                new = main_select(logits, mode, temperature, generator)
                layers[need, f + 1] = new[need]
                decided = torch.where(need, torch.full_like(decided, f + 2), decided)
            f += 1
        return passes

    def _decode_main(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None,
        mode: str,
        temperature: float,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Main-only decoding through the same prefill/tail code the speculative engine uses."""
        pre = self.prefill(inputs_embeds, attention_mask)
        b = inputs_embeds.shape[0]
        layers = torch.zeros(b, self.num_layers, self.codes_per_layer, dtype=torch.long, device=inputs_embeds.device)
        layers[:, 0] = main_select(pre.logits0, mode, temperature, generator)
        decided = torch.ones(b, dtype=torch.long, device=inputs_embeds.device)
        self.complete_layers(layers, decided, pre.cache, mode, temperature, generator)
        return layers

    @torch.no_grad()
    def decode_greedy(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Main-only greedy baseline: prefill + 7 steps -> tokens ``[B, L, C]``."""
        return self._decode_main(inputs_embeds, attention_mask, "exact", 1.0, None)

    @torch.no_grad()
    def decode_sample(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Main-only ancestral sampling baseline at ``temperature`` -> tokens ``[B, L, C]``."""
        return self._decode_main(inputs_embeds, attention_mask, "sampling", temperature, generator)

    # ------------------------------------------------------------------ training
    def forward(
        self, inputs_embeds: Tensor, layers: Tensor, attention_mask: Tensor | None = None,
        layer_weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced forward over all layers: returns ``(loss, logits [B, L, C, V])``.

        The sequence is prefix + tokens of layers 0..L-2; the output at the last prefix position predicts layer
        0 and the output at layer token l predicts layer l+1. Loss = mean cross-entropy over all codes, or with
        ``layer_weights`` (``[L]``) the weighted mean of the per-layer means: on the shipped LIBERO tokenizer a
        wrong greedy layer 0 moves the action by 0.043 (mean abs, normalised), layer 3 by 0.006 and layers 5-7 by
        < 0.001, while layers 3-7 are nearly unpredictable (cross-entropy 1.26 vs 1.39 for the marginal), so equal
        weights spend 5/8 of the gradient on codes that do not move the robot.
        """
        b, p, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, p, dtype=torch.long, device=inputs_embeds.device)
        attention_mask = attention_mask.long()
        n_in = self.num_layers - 1
        emb = self.embed_layers(layers[:, :n_in], 0).to(inputs_embeds.dtype)
        x = torch.cat([inputs_embeds, emb], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, n_in)], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.backbone(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False)
        logits = self.logits_from_hidden(out.last_hidden_state[:, p - 1 :])
        if layer_weights is None:
            return F.cross_entropy(logits.reshape(-1, self.levels), layers.reshape(-1).long()), logits
        w = torch.as_tensor(layer_weights, dtype=logits.dtype, device=logits.device)
        if w.shape != (self.num_layers,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"layer_weights needs {self.num_layers} non-negative values with a positive sum, "
                             f"got {w.tolist()}")
        ce = F.cross_entropy(logits.reshape(-1, self.levels), layers.reshape(-1).long(), reduction="none")
        per_layer = ce.view(b, self.num_layers, -1).mean(dim=(0, 2))
        return (per_layer * w).sum() / w.sum(), logits


# ---------------------------------------------------------------------- persistence (tiny / test checkpoints)
HEAD_CONFIG_NAME = "rsd_head_config.json"
HEAD_WEIGHTS_NAME = "rsd_main.safetensors"


def save_layer_head_model(model: RFSQLayerHeadModel, directory: str | Path) -> Path:
    """Save a Llama-based :class:`RFSQLayerHeadModel` (LLM config + all weights) as safetensors + JSON.

    Used for tiny benchmark/test checkpoints; a 7B backbone is saved by the models/ loader and only
    :meth:`RFSQLayerHeadModel.head_state_dict` needs storing next to it.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {
        "num_layers": model.num_layers,
        "codes_per_layer": model.codes_per_layer,
        "levels": model.levels,
        "llm_config": model.backbone.config.to_dict(),
    }
    (d / HEAD_CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    save_file(state, str(d / HEAD_WEIGHTS_NAME), metadata={"format": "pt", "kind": "rsd-main"})
    return d


def load_layer_head_model(directory: str | Path, device: str | torch.device = "cpu") -> RFSQLayerHeadModel:
    """Inverse of :func:`save_layer_head_model` (no pickle, no hub)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    d = Path(directory)
    cfg = json.loads((d / HEAD_CONFIG_NAME).read_text())
    llm_cfg = LlamaConfig.from_dict(cfg["llm_config"])
    model = RFSQLayerHeadModel(
        LlamaForCausalLM(llm_cfg), cfg["num_layers"], cfg["codes_per_layer"], cfg["levels"]
    )
    missing, unexpected = model.load_state_dict(load_file(str(d / HEAD_WEIGHTS_NAME)), strict=False)
    if unexpected or [m for m in missing if not m.endswith("_code_offsets")]:
        raise ValueError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    return model.to(device).eval()
