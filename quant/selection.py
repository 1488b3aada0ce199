"""Which ``nn.Linear`` modules get quantised: SCOPE prefix, INCLUDE/EXCLUDE regexes, LAYERS, per-layer WBITS.

Rules (in order):

1. only ``nn.Linear`` modules are candidates (GR00T's per-embodiment ``CategorySpecificLinear`` holds raw
   parameters and is never a candidate);
2. the name must start with ``SCOPE`` (empty = whole model);
3. if ``LAYERS`` is set, exactly those names are selected (each must exist, be a Linear and lie inside SCOPE),
   and INCLUDE/EXCLUDE are ignored; otherwise the name must ``re.search``-match INCLUDE and not EXCLUDE;
4. every ``WBITS`` entry must name a selected layer, and every ``WBITS_RE`` / ``ABITS_RE`` / ``ACT_PCT_RE``
   regex must match one, so an override can never silently miss.

Errors raise :class:`~quant.config.DuQuantConfigError` naming the variable. See :mod:`quant.patterns` for the
defaults and why the published recipe's regexes did not fit the real GR00T N1.5 names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from torch import nn

from quant.config import PREFIX, DuQuantConfig, DuQuantConfigError

LOG = logging.getLogger("quant")


@dataclass(frozen=True)
class SelectedLayer:
    """One Linear chosen for quantisation, with its resolved bit widths."""

    name: str
    module: nn.Linear
    wbits: int
    abits: int


def iter_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """All ``nn.Linear`` submodules (already-wrapped layers are skipped: their inner Linear is not re-wrapped)."""
    from quant.linear import (
        FakeQuantLinear,  # local: linear imports nothing from here, but keep the graph light
    )

    out: list[tuple[str, nn.Linear]] = []
    wrapped: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantLinear):
            wrapped.add(name + ".")
            continue
        if isinstance(mod, nn.Linear) and not any(name.startswith(w) for w in wrapped):
            out.append((name, mod))
    return out


def select_layers(model: nn.Module, config: DuQuantConfig) -> list[SelectedLayer]:
    """Apply the selection rules; validate LAYERS and WBITS against the model."""
    linears = iter_linears(model)
    by_name = dict(linears)
    include = re.compile(config.include)
    exclude = re.compile(config.exclude)
    chosen: list[str] = []
    if config.layers:
        for name in config.layers:
            if name not in by_name:
                hint = [n for n in by_name if n.endswith(name) or name.endswith(n)][:3]
                raise DuQuantConfigError(
                    f"{PREFIX}LAYERS names {name!r}, which is not an nn.Linear in this model"
                    + (f" (did you mean {hint}?)" if hint else "")
                )
            if not name.startswith(config.scope):
                raise DuQuantConfigError(
                    f"{PREFIX}LAYERS names {name!r}, which lies outside {PREFIX}SCOPE={config.scope!r}"
                )
        wanted = set(config.layers)
        chosen = [n for n, _ in linears if n in wanted]
    for name, _ in linears:
        if config.layers:
            if config.debug:
                LOG.debug("[GR00T-DUQUANT][DEBUG] %s: %s", name, "LAYERS" if name in chosen else "not in LAYERS")
            continue
        if not name.startswith(config.scope):
            why = "outside SCOPE"
        elif not include.search(name):
            why = "no INCLUDE match"
        elif exclude.search(name):
            why = "EXCLUDE match"
        else:
            why = "selected"
            chosen.append(name)
        if config.debug:
            LOG.info("[GR00T-DUQUANT][DEBUG] %s: Linear(%d->%d) %s", name, by_name[name].in_features,
                     by_name[name].out_features, why)
    chosen_set = set(chosen)
    for name in config.wbits:
        if name not in chosen_set:
            state = "is not an nn.Linear in this model" if name not in by_name else "is not selected for quantisation"
            raise DuQuantConfigError(f"{PREFIX}WBITS names {name!r}, which {state}")
    for var, patterns in (("WBITS_RE", config.wbits_re), ("ABITS_RE", config.abits_re),
                          ("ACT_PCT_RE", config.act_pct_re)):
        for pattern in patterns:
            if not any(re.search(pattern, n) for n in chosen):
                raise DuQuantConfigError(f"{PREFIX}{var} pattern {pattern!r} matches no selected layer "
                                         f"(of {len(chosen)}); give other patterns, or set {PREFIX}{var} to the "
                                         "empty string for none (a --policy default included)")
    LOG.info("[GR00T-DUQUANT] SCOPE filter: %r", config.scope)
    LOG.info("[GR00T-DUQUANT] Matched Linear layers: %d (of %d Linear)", len(chosen), len(linears))
    return [SelectedLayer(n, by_name[n], config.bits_for(n), config.abits_for(n)) for n in chosen]
