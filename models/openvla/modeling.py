"""OpenVLA / Prismatic model with parameter names identical to the released HF checkpoint.

State-dict layout (openvla/openvla-7b): ``vision_backbone.featurizer.*`` (DINOv2-L/14 reg4),
``vision_backbone.fused_featurizer.*`` (SigLIP So400m/14), ``projector.fc{1,2,3}.*`` and ``language_model.*``
(a transformers ``LlamaForCausalLM``). The projected patch embeddings are inserted right after BOS.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from models.common.vit import VisionTransformer
from models.openvla.config import OpenVLAConfig
from models.openvla.processing import OpenVLAProcessor, token_ids_to_normalized, unnormalize_actions

logger = logging.getLogger(__name__)


@dataclass
class PromptState:
    """Decoding state after a prompt (or after appended tokens)."""

    past_key_values: Any
    attention_mask: torch.Tensor  # [B, L] over everything in the cache
    next_position: torch.Tensor  # [B, 1] position id of the next token
    last_hidden: torch.Tensor  # [B, D] final-norm hidden state at the last position
    logits: torch.Tensor  # [B, V] next-token logits


class PrismaticVisionBackbone(nn.Module):
    """One or two ViT featurizers whose patch features are concatenated on the channel dim."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        cfgs = config.vision_configs()
        self.use_fused = config.use_fused_vision_backbone
        self.featurizer = VisionTransformer(cfgs[0])
        self.fused_featurizer = VisionTransformer(cfgs[1]) if self.use_fused else None
        self.embed_dim = sum(c.embed_dim for c in cfgs)
        self.num_patches = cfgs[0].num_patches
        if self.use_fused and cfgs[1].num_patches != self.num_patches:
            raise ValueError("fused featurizers must produce the same number of patches")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.use_fused:
            return self.featurizer(pixel_values)
        a = self.featurizer(pixel_values[:, :3])
        b = self.fused_featurizer(pixel_values[:, 3:])  # type: ignore[misc]
        return torch.cat([a, b], dim=2)


class PrismaticProjector(nn.Module):
    """``fused-gelu-mlp``: fc1 (d -> 4d), GELU, fc2 (4d -> llm), GELU, fc3 (llm -> llm); else ``gelu-mlp``."""

    def __init__(self, use_fused: bool, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.use_fused = use_fused
        if use_fused:
            inter = 4 * vision_dim
            self.fc1 = nn.Linear(vision_dim, inter, bias=True)
            self.fc2 = nn.Linear(inter, llm_dim, bias=True)
            self.fc3 = nn.Linear(llm_dim, llm_dim, bias=True)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim, bias=True)
            self.fc2 = nn.Linear(llm_dim, llm_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(x)))
        if self.use_fused:
            x = self.fc3(F.gelu(x))
        return x


class OpenVLAForActionPrediction(nn.Module):
    """Prismatic VLM + stock OpenVLA action decoding (greedy tokens -> 256 bins -> q01/q99 unnormalisation)."""

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = PrismaticVisionBackbone(config)
        llama_cfg = config.llama_config()
        self.projector = PrismaticProjector(
            config.use_fused_vision_backbone, self.vision_backbone.embed_dim, llama_cfg.hidden_size
        )
        self.language_model = LlamaForCausalLM(llama_cfg)
        self.processor: OpenVLAProcessor | None = None  # attached by the loader / tiny builder
        self.norm_stats: dict[str, Any] = dict(config.norm_stats)

    # ------------------------------------------------------------------ checkpoint naming (identity here)
    @staticmethod
    def to_checkpoint_key(module_key: str) -> str:
        return module_key

    @staticmethod
    def from_checkpoint_key(checkpoint_key: str) -> str:
        return checkpoint_key

    def tied_aliases(self) -> dict[str, str]:
        """Llama-2 does not tie ``lm_head`` to the embeddings, so nothing is aliased."""
        return {}

    def checkpoint_aliases(self) -> dict[str, str]:
        return {}

    def after_load(self) -> None:
        self.eval()

    # ------------------------------------------------------------------ multimodal prefix
    @property
    def num_patches(self) -> int:
        return self.vision_backbone.num_patches

    def project_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S]`` -> projected patch embeddings ``[B, P, llm_dim]``."""
        dtype = self.projector.fc1.weight.dtype
        return self.projector(self.vision_backbone(pixel_values.to(dtype)))

    def embed_prefix(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LLM input embeddings with the projected patches inserted right after BOS.

        Rows may be left-padded (``attention_mask`` 0 on the left); each row's BOS is its first attended token.
        The matching mask is ``extend_attention_mask(attention_mask)``.
        """
        patches = self.project_patches(pixel_values)
        tok = self.language_model.get_input_embeddings()(input_ids).to(patches.dtype)
        if attention_mask is None or bool(attention_mask.all()):
            return torch.cat([tok[:, :1], patches, tok[:, 1:]], dim=1)
        rows = []
        for b in range(tok.shape[0]):
            p = int((attention_mask[b] == 0).sum())  # left padding: BOS sits at index p
            rows.append(torch.cat([tok[b, : p + 1], patches[b], tok[b, p + 1 :]], dim=0))
        return torch.stack(rows)

    def extend_attention_mask(self, attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
        """Attention mask for ``embed_prefix`` output; for left padding the patch ones can go on the right."""
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long)
        ones = torch.ones(attention_mask.shape[0], self.num_patches, dtype=attention_mask.dtype,
                          device=attention_mask.device)
        return torch.cat([attention_mask, ones], dim=1)

    @staticmethod
    def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training/scoring forward: logits over the multimodal sequence; loss on ``labels`` if given.

        ``labels`` are aligned with ``input_ids`` (``-100`` = ignore); patch positions are ignored.
        """
        embeds = self.embed_prefix(pixel_values, input_ids, attention_mask)
        mask = self.extend_attention_mask(attention_mask, *input_ids.shape)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=self.position_ids_from_mask(mask)
        )
        result = {"logits": out.logits}
        if labels is not None:
            ignore = torch.full((labels.shape[0], self.num_patches), -100, dtype=labels.dtype, device=labels.device)
            full = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)
            result["loss"] = F.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), full[:, 1:].flatten(), ignore_index=-100
            )
        return result

    # ------------------------------------------------------------------ incremental decoding (stock + RSD)
    @torch.no_grad()
    def encode_prompt(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> PromptState:
        """Run the multimodal prompt once: KV cache, next-token logits and the final-norm hidden state
        (``hidden_states[-1]``) at the last prompt position, the feature the RSD draft model consumes."""
        embeds = self.embed_prefix(pixel_values, input_ids, attention_mask)
        mask = self.extend_attention_mask(attention_mask, *input_ids.shape).to(embeds.device)
        pos = self.position_ids_from_mask(mask)
        out = self.language_model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        h = out.last_hidden_state[:, -1]
        return PromptState(out.past_key_values, mask, pos[:, -1:] + 1, h, self.language_model.lm_head(h))

    @torch.no_grad()
    def decode_step(self, state: PromptState, token_ids: torch.Tensor) -> PromptState:
        """Append ``token_ids`` ``[B, k]`` to the cache; returns the state after the last of them."""
        k = token_ids.shape[1]
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(token_ids.shape[0], k)], dim=1)
        pos = state.next_position + torch.arange(k, device=token_ids.device)[None, :]
        out = self.language_model.model(input_ids=token_ids, attention_mask=mask, position_ids=pos,
                                        past_key_values=state.past_key_values, use_cache=True)
        h = out.last_hidden_state[:, -1]
        return PromptState(out.past_key_values, mask, pos[:, -1:] + 1, h, self.language_model.lm_head(h))

    @torch.no_grad()
    def generate_action_tokens(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_tokens: int = 7,
    ) -> torch.Tensor:
        """Greedy decoding of ``num_tokens`` ids with a KV cache (what HF ``generate`` does for OpenVLA)."""
        state = self.encode_prompt(pixel_values, input_ids, attention_mask)
        generated = []
        for i in range(num_tokens):
            nxt = state.logits.argmax(-1)
            generated.append(nxt)
            if i + 1 < num_tokens:
                state = self.decode_step(state, nxt[:, None])
        return torch.stack(generated, dim=1)

    def resolve_unnorm_key(self, unnorm_key: str | None) -> str:
        """Upstream rule: a key is required unless the checkpoint has statistics for exactly one dataset."""
        if unnorm_key is None:
            if len(self.norm_stats) != 1:
                raise ValueError(f"unnorm_key required; choose one of {sorted(self.norm_stats)}")
            return next(iter(self.norm_stats))
        if unnorm_key not in self.norm_stats:
            raise KeyError(f"unknown unnorm_key {unnorm_key!r}; available: {sorted(self.norm_stats)}")
        return unnorm_key

    def get_action_dim(self, unnorm_key: str | None = None) -> int:
        return len(self.norm_stats[self.resolve_unnorm_key(unnorm_key)]["action"]["q01"])

    def decode_actions(self, token_ids: torch.Tensor | np.ndarray, unnorm_key: str | None = None) -> np.ndarray:
        """Action token ids ``[B, D]`` -> unnormalised actions ``[B, D]`` (float64)."""
        key = self.resolve_unnorm_key(unnorm_key)
        ids = token_ids.cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
        norm = token_ids_to_normalized(ids, self.config.action_vocab_base, self.config.n_action_bins)
        return unnormalize_actions(norm, self.norm_stats[key]["action"])

    @torch.no_grad()
    def predict_action(
        self,
        images: Any,
        instruction: str | list[str],
        unnorm_key: str | None = None,
        center_crop: bool | None = None,
    ) -> np.ndarray:
        """Stock OpenVLA: preprocess, greedy-decode ``action_dim`` tokens, map to bins, unnormalise.

        Returns ``[action_dim]`` for a single instruction string, else ``[B, action_dim]``.
        """
        if self.processor is None:
            raise RuntimeError("no processor attached (load the model with models.load_pretrained)")
        single = isinstance(instruction, str)
        batch = self.processor(images, instruction, center_crop=center_crop)
        ids = self.generate_action_tokens(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"], self.get_action_dim(unnorm_key)
        )
        actions = self.decode_actions(ids, unnorm_key)
        return actions[0] if single else actions
