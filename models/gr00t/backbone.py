"""Eagle 2.5 VLM backbone of GR00T N1.5 (``backbone.eagle_model.*``).

- ``vision_model``: transformers ``SiglipVisionModel``. The released checkpoint names it
  ``backbone.eagle_model.vision_model.vision_model.*`` (transformers 4.x had an inner ``vision_model`` level that
  transformers 5 removed); ``GR00TPolicyModel.from_checkpoint_key`` maps the names.
- ``mlp1``: ``Sequential(Linear(vision_hidden, llm_hidden))`` connector (N1.5: 1 layer, no pixel shuffle).
- ``language_model``: ``Qwen3ForCausalLM`` truncated to ``select_layer`` layers; features are
  ``hidden_states[select_layer]``, i.e. the final-RMSNorm output of the truncated stack.
- Image features: SigLIP ``hidden_states[vision select_layer]`` (HF indexing; ``-1`` means
  ``last_hidden_state``, i.e. after ``post_layernorm``, as upstream and the released Eagle config (-1) use);
  they replace the embeddings of the ``<IMG_CONTEXT>`` tokens in order.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen3ForCausalLM, SiglipVisionModel

from models.gr00t.config import GR00TConfig


class EagleModel(nn.Module):
    """The three Eagle parts under their released names."""

    def __init__(self, config: GR00TConfig) -> None:
        super().__init__()
        ecfg = config.eagle_config
        self.vision_model = SiglipVisionModel(config.siglip_config())
        qcfg = config.qwen3_config()
        self.mlp1 = nn.Sequential(nn.Linear(int(ecfg["vision_config"]["hidden_size"]), qcfg.hidden_size))
        self.language_model = Qwen3ForCausalLM(qcfg)
        # Upstream pops the unused top layers, so the checkpoint only has the first ``select_layer``.
        while len(self.language_model.model.layers) > config.select_layer:
            self.language_model.model.layers.pop(-1)
        self.image_token_index = int(ecfg["image_token_index"])
        self.vision_select_layer = int(ecfg.get("select_layer", -1))

    def vision_layers_to_run(self) -> int:
        """How many SigLIP encoder layers ``select_layer`` needs, with HF ``hidden_states`` indexing:
        ``hidden_states[0]`` is the embedding output and ``hidden_states[k]`` the output of layer ``k``, so
        ``k >= 0`` runs ``k`` layers and ``k < -1`` runs ``L + 1 + k``. ``-1`` is upstream's special case: the
        model's ``last_hidden_state`` (all ``L`` layers, then ``post_layernorm``)."""
        n = len(self.vision_model.encoder.layers)
        k = self.vision_select_layer
        if not -(n + 1) <= k <= n:
            raise ValueError(f"vision select_layer {k} outside -{n + 1}..{n} for {n} encoder layers")
        return n if k == -1 else (k if k >= 0 else n + 1 + k)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> connector output ``[N, patches, llm_hidden]``.

        Runs only the layers ``select_layer`` needs (the rest would be discarded by ``hidden_states[k]``)."""
        vm = self.vision_model
        h = vm.embeddings(pixel_values.to(self.mlp1[0].weight.dtype))
        for layer in vm.encoder.layers[: self.vision_layers_to_run()]:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        if self.vision_select_layer == -1:
            h = vm.post_layernorm(h)
        return self.mlp1(h)


class EagleBackbone(nn.Module):
    """``backbone``: fused vision-language embeddings -> truncated Qwen3 -> features ``[B, L, 2048]``."""

    def __init__(self, config: GR00TConfig) -> None:
        super().__init__()
        self.eagle_model = EagleModel(config)
        proj = config.backbone_cfg.get("project_to_dim")
        hidden = config.qwen3_config().hidden_size
        self.eagle_linear: nn.Module = nn.Linear(hidden, int(proj)) if proj else nn.Identity()

    def embed(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings with ``<IMG_CONTEXT>`` positions replaced by image features (row-major order)."""
        em = self.eagle_model
        embeds = em.language_model.get_input_embeddings()(input_ids)
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.flatten(0, 1)
        vit = em.extract_feature(pixel_values).to(embeds.dtype)
        selected = input_ids == em.image_token_index
        if int(selected.sum()) != vit.shape[0] * vit.shape[1]:
            raise ValueError(f"{int(selected.sum())} image tokens for {vit.shape[0]}x{vit.shape[1]} image features")
        embeds = embeds.clone()
        embeds[selected] = vit.reshape(-1, vit.shape[-1])
        return embeds

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed(pixel_values, input_ids)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.eagle_model.language_model.model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos, use_cache=False
        )
        return self.eagle_linear(out.last_hidden_state), attention_mask
