"""Typed configuration of the RSD (residual speculative decoding) engine.

One dataclass, filled in one place from CLI flags and ``RSD_*`` environment variables and validated there, so
that a bad value fails at start-up with a message naming the flag or variable (house rule), never deep inside a
decoding loop on the first request.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

MODES: tuple[str, ...] = ("exact", "sampling", "relaxed", "relaxed-action")

# field name -> (environment variable, CLI flag)
_ENV_AND_FLAGS: dict[str, tuple[str, str]] = {
    "mode": ("RSD_MODE", "--rsd-mode"),
    "relaxed_r": ("RSD_RELAXED_R", "--rsd-relaxed-r"),
    "relaxed_tau": ("RSD_RELAXED_TAU", "--rsd-relaxed-tau"),
    "draft_layers": ("RSD_DRAFT_LAYERS", "--rsd-draft-layers"),
    "temperature": ("RSD_TEMPERATURE", "--rsd-temperature"),
    "seed": ("RSD_SEED", "--rsd-seed"),
    "enabled": ("RSD_ENABLED", "--rsd-enabled"),
    "decode_layers": ("RSD_DECODE_LAYERS", "--rsd-decode-layers"),
    "action_eps_mm": ("RSD_ACTION_EPS_MM", "--rsd-action-eps-mm"),
    "action_eps_deg": ("RSD_ACTION_EPS_DEG", "--rsd-action-eps-deg"),
    "adaptive": ("RSD_ADAPTIVE", "--rsd-adaptive"),
    "max_rounds": ("RSD_MAX_ROUNDS", "--rsd-max-rounds"),
    "probe_every": ("RSD_PROBE_EVERY", "--rsd-probe-every"),
    "jacobi": ("RSD_JACOBI", "--rsd-jacobi"),
}


class RSDConfigError(ValueError):
    """A configuration value is invalid; the message names the flag or environment variable."""


@dataclass(frozen=True)
class RSDConfig:
    """Settings of the speculative decoder.

    Attributes:
        mode: ``exact`` (greedy, bit-identical to main-only greedy decoding), ``sampling`` (speculative sampling,
            an exact sample of the main model's distribution) or ``relaxed`` (lossy: ordered-level tolerance).
        relaxed_r: in ``relaxed`` mode a code is accepted when ``|draft - argmax main| <= r`` (levels are ordered).
        relaxed_tau: in ``relaxed`` mode a layer is accepted when the fraction of accepted codes is ``>= tau``
            (``tau = 1`` means every code must pass). Default 0.9 with r = 1: on libero_spatial (10 tasks x 10
            trials, embedded default) it scored 9% vs main-only 3% with 5.5 main passes per chunk instead of 7.
        draft_layers: most layers drafted per speculation round (k). 0 = as many as the draft can propose: every
            remaining layer for a deep draft (rsd.draft.DeepDraftModel), its heads for the seed-shaped draft.
        temperature: softmax temperature of both models in ``sampling`` mode (ignored by greedy modes).
        seed: seed of the engine's random generator (sampling mode) so a run is reproducible.
        enabled: when false the engine decodes with the main model only (the baseline); useful for A/B.
        decode_layers: decode only the first l RFSQ layers ("anytime" decoding: a residual code's prefix is a
            coarser chunk; l - 1 fewer decoding steps). 0 = all layers. Applies to main-only and RSD alike.
        action_eps_mm / action_eps_deg: ``relaxed-action`` tolerance per drafted layer: the chunk decoded with
            the draft's layer may differ from the chunk decoded with main's choice by at most this end-effector
            displacement (mm) and rotation (degrees) at every step, in LIBERO's OSC_POSE units
            (rsd.action_space); the gripper sign must agree.
        adaptive: choose the draft depth per round and batch from measured pass costs and per-layer acceptance
            (k = 0 is a plain main step), so speculation runs only where it is expected to save time. Applies
            to deep drafts; the seed-shaped draft always speculates once with its fixed k.
        max_rounds: most speculation rounds per chunk (0 = no limit; 1 = speculate once, then main steps).
        probe_every: under ``adaptive``, every n-th call speculates at full depth so acceptance estimates of
            layers the planner stopped drafting stay current (0 = never).
        jacobi: after a rejection, propose the layers past it from main's own logits of the last pass (computed
            on the rejected prefix; Jacobi / fixed-point iteration) instead of calling the draft again.
    """

    mode: str = "exact"
    relaxed_r: int = 1
    relaxed_tau: float = 0.9
    draft_layers: int = 0
    temperature: float = 1.0
    seed: int = 0
    enabled: bool = True
    decode_layers: int = 0
    action_eps_mm: float = 0.5
    action_eps_deg: float = 0.5
    adaptive: bool = True
    max_rounds: int = 0
    probe_every: int = 16
    jacobi: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, origin: Mapping[str, str] | None = None) -> None:
        """Check every field; ``origin`` maps a field to the flag/variable it came from, for the message."""

        def where(name: str) -> str:
            if origin and name in origin:
                return origin[name]
            env, flag = _ENV_AND_FLAGS[name]
            return f"{name} ({flag} / {env})"

        if self.mode not in MODES:
            raise RSDConfigError(f"{where('mode')}: unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if not isinstance(self.relaxed_r, int) or self.relaxed_r < 0:
            raise RSDConfigError(f"{where('relaxed_r')}: must be an integer >= 0, got {self.relaxed_r!r}")
        if not (0.0 < float(self.relaxed_tau) <= 1.0):
            raise RSDConfigError(f"{where('relaxed_tau')}: must be in (0, 1], got {self.relaxed_tau!r}")
        if not isinstance(self.draft_layers, int) or self.draft_layers < 0:
            raise RSDConfigError(f"{where('draft_layers')}: must be an integer >= 0 (0 = as deep as the draft "
                                 f"proposes), got {self.draft_layers!r}")
        for name in ("decode_layers", "max_rounds", "probe_every"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 0:
                raise RSDConfigError(f"{where(name)}: must be an integer >= 0, got {val!r}")
        for name in ("action_eps_mm", "action_eps_deg"):
            val = getattr(self, name)
            if not isinstance(val, (int, float)) or not float(val) >= 0.0:
                raise RSDConfigError(f"{where(name)}: must be a number >= 0, got {val!r}")
        if not (float(self.temperature) > 0.0):
            raise RSDConfigError(f"{where('temperature')}: must be > 0, got {self.temperature!r}")
        if not isinstance(self.seed, int):
            raise RSDConfigError(f"{where('seed')}: must be an integer, got {self.seed!r}")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """Register the ``--rsd-*`` flags (defaults ``None`` so env/defaults apply when a flag is absent)."""
        group = parser.add_argument_group("RSD (residual speculative decoding)")
        group.add_argument("--rsd-mode", default=None, help=f"one of {', '.join(MODES)} (env RSD_MODE)")
        group.add_argument("--rsd-relaxed-r", default=None, help="relaxed: max level distance (env RSD_RELAXED_R)")
        group.add_argument(
            "--rsd-relaxed-tau", default=None, help="relaxed: min fraction of passing codes (env RSD_RELAXED_TAU)"
        )
        group.add_argument("--rsd-draft-layers", default=None, help="drafted layers k (env RSD_DRAFT_LAYERS)")
        group.add_argument("--rsd-temperature", default=None, help="sampling temperature (env RSD_TEMPERATURE)")
        group.add_argument("--rsd-seed", default=None, help="random seed (env RSD_SEED)")
        group.add_argument("--rsd-enabled", default=None, help="1/0: speculative or main-only (env RSD_ENABLED)")
        group.add_argument("--rsd-decode-layers", default=None,
                           help="decode only the first l RFSQ layers; 0 = all (env RSD_DECODE_LAYERS)")
        group.add_argument("--rsd-action-eps-mm", default=None,
                           help="relaxed-action: max end-effector deviation per drafted layer, mm (env RSD_ACTION_EPS_MM)")
        group.add_argument("--rsd-action-eps-deg", default=None,
                           help="relaxed-action: max rotation deviation per drafted layer, degrees "
                                "(env RSD_ACTION_EPS_DEG)")
        group.add_argument("--rsd-adaptive", default=None,
                           help="1/0: choose the draft depth from measured costs and acceptance (env RSD_ADAPTIVE)")
        group.add_argument("--rsd-max-rounds", default=None,
                           help="most speculation rounds per chunk; 0 = no limit (env RSD_MAX_ROUNDS)")
        group.add_argument("--rsd-jacobi", default=None,
                           help="1/0: re-propose layers past a rejection from main's last logits (env RSD_JACOBI)")
        group.add_argument("--rsd-probe-every", default=None,
                           help="adaptive: full-depth probe every n calls; 0 = never (env RSD_PROBE_EVERY)")

    @classmethod
    def from_env_and_args(
        cls,
        args: argparse.Namespace | Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        base: RSDConfig | None = None,
    ) -> RSDConfig:
        """Build a config: defaults < environment (``RSD_*``) < CLI flags (``--rsd-*``).

        Every string is parsed here and any bad value raises :class:`RSDConfigError` naming its source, e.g.
        ``RSD_RELAXED_TAU='abc': expected a number``.
        """
        env = os.environ if env is None else env
        if args is None:
            arg_map: Mapping[str, Any] = {}
        elif isinstance(args, argparse.Namespace):
            arg_map = vars(args)
        else:
            arg_map = args
        cfg = base or cls()
        values: dict[str, Any] = {}
        origin: dict[str, str] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, (env_name, flag) in _ENV_AND_FLAGS.items():
            attr = flag.lstrip("-").replace("-", "_")
            raw: Any = None
            source = ""
            if env.get(env_name) not in (None, ""):
                raw, source = env[env_name], env_name
            if arg_map.get(attr) is not None:
                raw, source = arg_map[attr], flag
            if raw is None:
                continue
            values[name] = _parse(raw, types[name], source)
            origin[name] = f"{source}={raw!r}"
        merged = {f.name: getattr(cfg, f.name) for f in fields(cls)} | values
        # validate with the origin names first, so the message says where a bad value came from
        unchecked = object.__new__(cls)
        for key, val in merged.items():
            object.__setattr__(unchecked, key, val)
        unchecked.validate(origin)
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (reported in server metadata and benchmark output)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _parse(raw: Any, typ: Any, source: str) -> Any:
    """Parse one raw CLI/env value to the field's type, naming ``source`` on failure."""
    typ_name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if typ_name == "int":
            return int(text)
        if typ_name == "float":
            return float(text)
        if typ_name == "bool":
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return text.lower()
    except ValueError:
        raise RSDConfigError(f"{source}={raw!r}: expected {typ_name}") from None


def parse_cli(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> RSDConfig:
    """Convenience: parse only the ``--rsd-*`` flags from ``argv`` (unknown flags ignored)."""
    parser = argparse.ArgumentParser(add_help=False)
    RSDConfig.add_cli_args(parser)
    ns, _ = parser.parse_known_args(argv)
    return RSDConfig.from_env_and_args(ns, env=env)
