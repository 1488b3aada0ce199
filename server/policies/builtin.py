"""Registration of the built-in policies. Model-backed ones import torch lazily inside the factory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.policies.debug import DebugPolicy
from server.policies.registry import register_policy

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.policies.base import Policy


@register_policy("debug", "deterministic debugging policy (no model)")
def _make_debug(config: ServerConfig) -> Policy:
    options = dict(config.policy_options)
    values: dict[str, float] = {}
    for key, default, kind in (("horizon", 8, int), ("delay_ms", 0.0, float)):
        raw = options.pop(key, default)
        try:
            values[key] = kind(raw)
        except ValueError:
            raise ValueError(f"--policy-option {key}={raw!r} is not a valid {kind.__name__}") from None
    horizon, delay_ms = int(values["horizon"]), float(values["delay_ms"])
    if options:
        raise ValueError(f"--policy-option: unknown option(s) for debug: {', '.join(sorted(options))}")
    if horizon <= 0 or delay_ms < 0:
        raise ValueError("--policy-option: horizon must be > 0 and delay_ms >= 0")
    return DebugPolicy(horizon=horizon, delay_ms=delay_ms)
