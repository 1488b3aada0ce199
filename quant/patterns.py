"""Default layer-selection regexes, checked against the real GR00T N1.5 and OpenVLA module names.

Why not the regexes of the published GR00T DuQuant recipe (see docs/duquant.md): it selected
``.*(backbone\\..*\\.(q_proj|...|down_proj)|action_head\\..*\\.mlp\\.(gate_proj|up_proj|down_proj)).*`` and excluded
``(?:^|\\.)(vision|radio|norm|ln|layernorm|embed|lm_head)(?:\\.|$)|action_head\\..*\\.self_attn\\.``. Against the
real GR00T N1.5 module tree (``models/fixtures/gr00t_n15_3b_public_keys.json``) that is wrong twice:

* the action head has no ``mlp.{gate,up,down}_proj``: its DiT MLP Linears are
  ``action_head.model.transformer_blocks.N.ff.net.0.proj`` and ``...ff.net.2`` (diffusers ``FeedForward``), so the
  recipe's action-head branch matches **nothing** and the DiT MLP is never quantised;
* the exclude names ``vision`` only as a whole dotted component, but the SigLIP tower lives under
  ``backbone.eagle_model.vision_model.vision_model.encoder.layers.N.self_attn.{q,k,v}_proj`` (component
  ``vision_model``), so the recipe **does** quantise the vision tower's q/k/v projections (``out_proj`` and
  ``mlp.fc1/fc2`` escape only because their names are not in the include list).

The defaults below select, by construction (an allow-list, then a safety-net deny-list):

* LLM attention and MLP projections of GR00T's Qwen3
  (``backbone.eagle_model.language_model.model.layers.N.self_attn.{q,k,v,o}_proj``, ``...mlp.{gate,up,down}_proj``)
  and of OpenVLA's Llama-2 (``language_model.model.layers.N...`` with the same leaf names);
* action-head MLP Linears: the DiT's ``action_head.model.transformer_blocks.N.ff.net.{0.proj,2}`` and the same
  ``ff`` Linears of ``action_head.vl_self_attention.transformer_blocks.N`` (a transformer over the VL tokens inside
  the action head; its feed-forward is the same diffusers block as the DiT's).

and never: the vision towers (``vision_model``, ``vision_backbone``, ``featurizer``, ``fused_featurizer``),
DiT / VL attention (``attn1``, ``attn2``), the action output (``proj_out_1/2``, ``action_decoder``), per-embodiment
encoders, the timestep embedder, ``lm_head``, embeddings and norms (incl. ada-norm ``norm1.linear``).

The vision→LLM projector (GR00T ``backbone.eagle_model.mlp1.0``, OpenVLA ``projector.fc{1,2,3}``) is *not*
selected: it is < 1 % of the FLOPs (one pass over 256 patch tokens), while every visual token the policy sees goes
through it, and its input is raw vision-tower features with a wider dynamic range than the LLM residual stream;
the published recipe (and the openpi one it follows) keeps it in floating point too. Add it with ``INCLUDE`` if wanted.

Both regexes are applied with ``re.search`` to the module's full dotted name.
"""

from __future__ import annotations

#: LLM projections (GR00T Qwen3 and OpenVLA Llama) + action-head feed-forward Linears.
DEFAULT_INCLUDE = (
    r"(?:^|\.)language_model\.(?:model\.)?layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$"
    r"|(?:^|\.)action_head\.(?:model|vl_self_attention)\.transformer_blocks\.\d+\.ff\.net\.(?:0\.proj|2)$"
)

#: Safety net applied after INCLUDE (also to a user's own INCLUDE): components that must stay in floating point.
DEFAULT_EXCLUDE = (
    r"(?:^|\.)(?:vision_model|vision_tower|vision_backbone|featurizer|fused_featurizer|radio|siglip"
    r"|attn1|attn2|proj_out_\d+|proj_out|action_decoder|action_encoder|state_encoder|timestep_encoder"
    r"|lm_head|embed_tokens|embeddings|\w*embed\w*|\w*norm\w*|layernorm|ln_\w+)(?:\.|$)"
)

#: The published recipe's own regexes, kept only so tests can document what they (fail to) select on the real trees.
SEED_INCLUDE = (
    r".*(backbone\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|action_head\..*\.mlp\.(gate_proj|up_proj|down_proj)).*"
)
SEED_EXCLUDE = r"(?:^|\.)(vision|radio|norm|ln|layernorm|embed|lm_head)(?:\.|$)|action_head\..*\.self_attn\."

#: Recommended values of ``GR00T_DUQUANT_*`` variables (without the prefix) per server ``--policy``, applied by
#: ``DuQuantConfig.from_env(policy=...)`` under the environment (a variable that is set, even to the empty string,
#: wins) and only when DuQuant is enabled.
#:
#: OpenVLA-RSD's, measured on the embedded default with ``benchmarks/bench_rsd_quant.py`` (37 held-out LIBERO
#: frames, calibrated on 27 frames of other demonstrations; docs/duquant.md has the tables):
#:
#: * ``ACT_PCT_RE``: the layer head reads RFSQ layer 0 from the hidden state of the *last* prefix token (the
#:   proprio token), and that one token is an outlier at the input of both ``mlp.down_proj``: the static per-tensor
#:   scale from the 99.9th percentile over all ~150 prefix tokens clipped 6 % (block 0) and 10 % (block 1) of its
#:   values (any other layer at that token: <= 0.4 %). Scaling those two layers from the maximum costs no memory and
#:   cut the teacher-forced layer-0 code flips from 0.097 to 0.057 and the action MAE vs full precision from
#:   0.0396 to 0.0321.
#: * ``WBITS_RE``: the same two layers at W8 as well (20 % of the quantised weights; packed codes 1.2x those of
#:   all-W4): layer-0 flips 0.041, MAE 0.0272 (per-frame change -0.0124, 95 % bootstrap [-0.017, -0.008]; 0.0383 ->
#:   0.0271 and 0.0394 -> 0.0290 with the other two calibration splits). W8 alone, without the scale fix, gave
#:   nothing (0.0403); all MLP projections at W8 give 0.0178 but keep 60 % of the weights at 8 bits, so that stays
#:   an option (``WBITS_RE='\.mlp\.:8'``).
POLICY_DEFAULTS: dict[str, dict[str, str]] = {
    "openvla-rsd": {"ACT_PCT_RE": r"\.down_proj$:100", "WBITS_RE": r"\.down_proj$:8"},
}
