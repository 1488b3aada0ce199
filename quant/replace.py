"""``replace_linear_layers``: swap selected ``nn.Linear`` modules for fake-quant layers, in place.

Also owns ``ROW_ROT=propagate`` planning. Propagating a layer's output rotation is only correct when the *only*
consumer of that output is a Linear that can absorb the rotation (``W_next <- W_next R_out``) with nothing
non-linear or channel-mixing in between. Inside a module tree we cannot see the data flow in general, so we accept
exactly one pattern we can prove: ``self_attn.v_proj -> self_attn.o_proj`` of the transformers Llama / Qwen2 /
Qwen3 / Mistral attention classes (V is only mixed across tokens by the attention weights, per head, so a
per-head block rotation of V's output commutes with attention and is absorbed by o_proj's input columns; grouped
KV heads reuse their KV head's rotation). ``BLOCK_OUT`` must divide ``head_dim``. Every other layer keeps
``restore`` and the log says how many; if no layer can propagate at all, ``ROW_ROT=propagate`` is refused.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, NamedTuple

import torch
from torch import nn

from quant.config import PREFIX, DuQuantConfig, DuQuantConfigError
from quant.linear import DuQuantLinear, FakeQuantLinear, RTNLinear, SmoothQuantLinear
from quant.packcache import PackCache, pack_key, pack_key_digest, weight_hash
from quant.profile import PROFILER
from quant.selection import SelectedLayer, select_layers

LOG = logging.getLogger("quant")

METHODS = ("duquant", "rtn", "smoothquant")

#: Attention implementations whose v_proj -> o_proj data flow we have checked (see module docstring).
PROPAGATE_ATTENTION_CLASSES = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention")


class ReplacedLayer(NamedTuple):
    """One row of the replacement report."""

    name: str
    in_features: int
    out_features: int
    wbits: int
    abits: int


class _Pair(NamedTuple):
    consumer: str
    head_dim: int
    n_heads: int
    n_kv: int


def layer_line(tag: str, sel: SelectedLayer, config: DuQuantConfig, method: str = "duquant", row_rot: str = "") -> str:
    """The log line for one layer, shared by the dry-run scan and the replacement log."""
    a = f"A{sel.abits}" if sel.abits > 0 else "Aoff"
    lin = f"Linear({sel.module.in_features}->{sel.module.out_features})"
    detail = (
        f"block={config.block} block_out={config.block_out} permute={int(config.permute)} "
        f"row_rot={row_rot or config.row_rot} rot={config.rot}"
        if method == "duquant"
        else f"method={method}"
    )
    pct = config.act_pct_for(sel.name)
    if sel.abits > 0 and pct != config.act_pct:  # an ACT_PCT_RE override
        a += f" act_pct={pct:g}"
    if tag == "DRYRUN":
        return f"[GR00T-DUQUANT][DRYRUN] {sel.name}: {lin} W{sel.wbits} {a} {detail}"
    cls = {"duquant": "DuQuantLinear", "rtn": "RTNLinear", "smoothquant": "SmoothQuantLinear"}[method]
    return f"[GR00T-DUQUANT][REPLACED] {sel.name}: {lin} -> {cls} W{sel.wbits} {a} {detail}"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), leaf


def plan_propagation(model: nn.Module, selected: list[SelectedLayer], block_out: int) -> dict[str, _Pair]:
    """Producer name -> consumer for every provably absorbable ``v_proj -> o_proj`` pair among ``selected``."""
    names = {s.name for s in selected}
    pairs: dict[str, _Pair] = {}
    for s in selected:
        if not s.name.endswith("self_attn.v_proj"):
            continue
        parent_name = s.name[: -len(".v_proj")]
        consumer = parent_name + ".o_proj"
        parent = model.get_submodule(parent_name)
        cls = type(parent)
        if consumer not in names or cls.__name__ not in PROPAGATE_ATTENTION_CLASSES:
            continue
        if not cls.__module__.startswith("transformers."):
            continue
        hd = getattr(parent, "head_dim", None)
        o = model.get_submodule(consumer)
        if not isinstance(hd, int) or hd % block_out or s.module.out_features % hd or o.in_features % hd:
            continue
        n_kv, n_heads = s.module.out_features // hd, o.in_features // hd
        if n_heads % n_kv:
            continue
        pairs[s.name] = _Pair(consumer, hd, n_heads, n_kv)
    return pairs


def _consumer_rotation(r_out: torch.Tensor, pair: _Pair) -> torch.Tensor:
    """The producer's per-KV-head output blocks laid out over the consumer's (query-head) input channels."""
    bph = pair.head_dim // r_out.shape[-1]
    group = pair.n_heads // pair.n_kv
    idx = [(h // group) * bph + k for h in range(pair.n_heads) for k in range(bph)]
    return r_out[torch.tensor(idx, device=r_out.device)]


def replace_linear_layers(
    model: nn.Module, config: DuQuantConfig, *, method: str = "duquant", force: bool = False
) -> list[ReplacedLayer]:
    """Swap the selected Linears of ``model`` for fake-quant layers (in place); return the report.

    ``config.enabled`` false: nothing happens and the log says "DuQuant not enabled" (``force=True`` overrides,
    for benchmarks that build configs directly). ``config.dryrun``: the scan lines are logged and nothing is
    replaced (the caller exits). Per-layer WBITS names are validated against the model here.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (config.enabled or force):
        LOG.info("[GR00T-DUQUANT] DuQuant not enabled (no GR00T_DUQUANT_* variable set); model left in float")
        return []
    selected = select_layers(model, config)
    if config.dryrun:
        for line in scan_lines(selected, config):
            LOG.info("%s", line)
        return []
    for s in selected:
        if s.module.weight.device.type == "meta":
            raise RuntimeError(f"{s.name}: weights are on the meta device; load them first (scan_model needs none)")

    pairs: dict[str, _Pair] = {}
    if method == "duquant" and config.row_rot == "propagate":
        pairs = plan_propagation(model, selected, config.block_out)
        if not pairs:
            raise DuQuantConfigError(
                f"{PREFIX}ROW_ROT=propagate: no selected layer has a next layer that provably absorbs its output "
                "rotation (only self_attn.v_proj -> o_proj of Llama/Qwen2/Qwen3/Mistral attention with BLOCK_OUT "
                "dividing head_dim qualifies); use restore"
            )
        LOG.warning(
            "[GR00T-DUQUANT] ROW_ROT=propagate: %d v_proj->o_proj pairs propagate; the other %d layers have no "
            "absorbing consumer and use restore", len(pairs), len(selected) - len(pairs),
        )
    cache = PackCache(config.packdir) if (config.packdir and method == "duquant") else None
    common = dict(
        act_pct=config.act_pct, calib_steps=config.calib_steps, clip_search=config.clip_search,
        precache=config.precache_weights, profile=config.profile, packed=config.packed, wgroup=config.wgroup,
    )
    step_scope = _step_scopes(model) if config.step_scales_on else []
    if config.profile:
        PROFILER.register(config.profile_sync)

    consumers = {p.consumer: prod for prod, p in pairs.items()}
    # Producers first, so a consumer can fold in its producer's output rotation.
    order = sorted(selected, key=lambda s: 0 if s.name in pairs else 1)
    built: dict[str, FakeQuantLinear] = {}
    report: list[ReplacedLayer] = []
    lines: dict[str, str] = {}
    for s in order:
        lin = s.module
        common["step_scales"] = any(s.name.startswith(prefix + ".") for prefix in step_scope)
        common["act_pct"] = config.act_pct_for(s.name)
        common["act_gran"] = config.act_gran_for(s.name)
        if method == "rtn":
            new: FakeQuantLinear = RTNLinear(lin, s.name, s.wbits, s.abits, **common)
            row_rot = ""
        elif method == "smoothquant":
            new = SmoothQuantLinear(lin, s.name, s.wbits, s.abits, **common)
            row_rot = ""
        else:
            row_rot = "propagate" if s.name in pairs else ("restore" if config.row_rot == "propagate" else config.row_rot)
            pre_rot = None
            if s.name in consumers:
                prod = built[consumers[s.name]]
                r_out = prod.rotation_out() if isinstance(prod, DuQuantLinear) else None
                assert r_out is not None
                pre_rot = _consumer_rotation(r_out, pairs[consumers[s.name]])
            pack = key = None
            if cache is not None:
                w_eff = lin.weight.detach().float()
                if pre_rot is not None:
                    from quant.transforms import rotate_last

                    w_eff = rotate_last(w_eff, pre_rot.to(w_eff.device))
                key = pack_key(
                    s.name, tuple(lin.weight.shape), weight_hash(w_eff), wbits=s.wbits, block=config.block,
                    block_out=config.block_out, permute=config.permute, row_rot=row_rot, rot=config.rot,
                    ls=config.ls, clip_search=config.clip_search, wgroup=config.wgroup,
                )
                pack = cache.load(s.name, key)
            new = DuQuantLinear(
                lin, s.name, s.wbits, s.abits, block=config.block, block_out=config.block_out,
                permute=config.permute, row_rot=row_rot, rot=config.rot, ls=config.ls, pre_rot=pre_rot,
                consumer_ok=s.name in pairs, pack=pack, wopt=config.wopt, gptq_damp=config.gptq_damp,
                gptq_act_order=config.gptq_act_order, **common,
            )
            if cache is not None and key is not None:
                if pack is None:
                    cache.save(s.name, key, new.pack_tensors())
                elif new.w_packed is not None and "w_codes" not in pack and not new.refines_on_freeze:
                    # An entry written without PACKED: its rotations and scales were reused; add the codes.
                    LOG.info("[GR00T-DUQUANT] pack for %s (key sha %s) has no packed codes (written without "
                             "PACKED=1); packed from the float weight and the entry updated", s.name,
                             pack_key_digest(key))
                    cache.save(s.name, key, new.pack_tensors())
        new.gptq_mem_mb = config.gptq_mem_mb
        parent, leaf = _parent(model, s.name)
        setattr(parent, leaf, new)
        built[s.name] = new
        lines[s.name] = layer_line("REPLACED", s, config, method, row_rot)
    for s in selected:  # log and report in model order
        LOG.info("%s", lines[s.name])
        report.append(ReplacedLayer(s.name, s.module.in_features, s.module.out_features, s.wbits, s.abits))
    if cache is not None:
        LOG.info("%s", cache.summary())
    hooked = install_step_hooks(model) if step_scope else 0
    if hooked:
        LOG.info("[GR00T-DUQUANT] DIT_STEP_SCALES: %d layers under %s take one activation scale per denoising step",
                 hooked, ", ".join(step_scope))
    LOG.info("[GR00T-DUQUANT] Total layers replaced: %d", len(report))
    return report


def _timestep_arg(module: nn.Module) -> int | None:
    """Position of a ``timestep`` parameter of ``module.forward`` (GR00T's DiT: ``forward(x, context, timestep,
    ...)``), or None."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("timestep") if "timestep" in params else None


def _step_scopes(model: nn.Module) -> list[str]:
    """Names of the outermost timestep-conditioned submodules (their forward takes ``timestep``)."""
    out: list[str] = []
    for name, mod in model.named_modules():
        if name and _timestep_arg(mod) is not None and not any(name.startswith(o + ".") for o in out):
            out.append(name)
    return out


def install_step_hooks(model: nn.Module) -> int:
    """Tell the step-scale layers inside each timestep-conditioned module which denoising step runs.

    GR00T's Euler loop calls ``action_head.model(seq, vl, t_disc, mask)`` once per step with ``t_disc`` the
    step's discretised time (``int(i / n * buckets)``, distinct per step), so a forward pre-hook reading
    ``timestep`` gives every layer inside a per-step key without touching the model's code; a post-hook clears it.
    Returns how many layers got a hook (0: none, e.g. no DiT). Idempotent.
    """
    count = 0
    for name in _step_scopes(model):
        mod = model.get_submodule(name)
        idx = _timestep_arg(mod)
        if idx is None or getattr(mod, "_duquant_step_hooked", False):
            continue
        layers = [m for m in mod.modules() if isinstance(m, FakeQuantLinear) and m.step_scales]
        if not layers:
            continue

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layers: list = layers,
                idx: int = idx) -> None:
            t = kwargs.get("timestep", args[idx] if len(args) > idx else None)
            key = int(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) and t.numel() else None
            for m in layers:
                m.step_key = key

        def post(_m: nn.Module, _args: tuple[Any, ...], _out: Any, layers: list = layers) -> None:
            for m in layers:
                m.step_key = None

        mod.register_forward_pre_hook(pre, with_kwargs=True)
        mod.register_forward_hook(post)
        mod._duquant_step_hooked = True
        count += len(layers)
    return count


def scan_lines(selected: list[SelectedLayer], config: DuQuantConfig) -> list[str]:
    """Dry-run listing lines for already-selected layers, with the closing total line."""
    lines = [layer_line("DRYRUN", s, config) for s in selected]
    lines.append(f"[GR00T-DUQUANT] Dry-run total layers listed: {len(selected)}")
    return lines


def scan_model(model: nn.Module, config: DuQuantConfig) -> list[str]:
    """Dry-run lines for ``model`` under ``config`` (works on meta-device models; ``enabled`` is not required)."""
    return scan_lines(select_layers(model, config), config)


def quantized_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """All fake-quant layers of a model by name (for calibration, reports and tests)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
