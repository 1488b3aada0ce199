"""``DuQuantConfig``: every ``GR00T_DUQUANT_*`` variable, parsed and validated once.

The published recipe's code read ``os.environ`` from inside each layer, so a typo or a bad value surfaced (if at
all) deep inside model loading. Here the environment is read in one place, at start-up, into a frozen dataclass
whose fields declare their variable, default and check (:mod:`client.settings`); every bad value raises
:class:`DuQuantConfigError` whose message names the variable.

Variables (prefix ``GR00T_DUQUANT_``; defaults from the published recipe, see docs/duquant.md; the table is built
from the fields of :class:`DuQuantConfig`, so each default is written once):

<variables>

``ROT``, ``CLIP_SEARCH``, ``WOPT``, ``GPTQ_*``, ``DIT_STEP_SCALES`` and the per-pattern ``WBITS_RE``, ``ABITS_RE``,
``ACT_PCT_RE`` are additions (the published recipe fixed
them); ROT and CLIP_SEARCH are part of the pack-cache key (WOPT refines weights after calibration, which the pack
cache does not hold).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from client.settings import (
    SettingError,
    at_least,
    check_fields,
    from_sources,
    in_range,
    setting,
    unknown_variables,
    variables,
    variables_table,
)
from quant.patterns import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, POLICY_DEFAULTS

LOG = logging.getLogger("quant")

PREFIX = "GR00T_DUQUANT_"

ROW_ROT_MODES = ("restore", "propagate", "0")
ROT_MODES = ("svd", "hadamard", "none")
WOPT_MODES = ("auto", "clip", "act", "gptq")
STEP_SCALE_MODES = ("auto", "1", "0")
ACT_GRAN_MODES = ("auto", "tensor", "token")


class DuQuantConfigError(SettingError):
    """A ``GR00T_DUQUANT_*`` value is invalid; the message names the variable."""


def _lower(text: str) -> str:
    return text.strip().lower()


def _row_rot(text: str) -> str:
    """``none``/``off``/``false`` are spellings of ``0`` (no output rotation)."""
    low = _lower(text)
    return "0" if low in ("none", "off", "false") else low


def _regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"is not a valid regular expression: {exc}"
    return None


def _wbits_map(text: str, form: str = "layer.name:bits", kind: type = int) -> dict[str, Any]:
    """Parse ``name:bits,name:bits``; names are validated against the model later (see ``selection``)."""
    out: dict[str, Any] = {}
    what = "an integer" if kind is int else "a number"
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, bits = entry.rpartition(":")
        if not sep or not name.strip():
            raise ValueError(f"entry {entry!r} is not of the form {form}")
        try:
            out[name.strip()] = kind(bits.strip())
        except ValueError:
            raise ValueError(f"entry {entry!r}: {form.rpartition(':')[2]} {bits!r} is not {what}") from None
    return out


def _pattern_map(text: str, form: str, kind: type) -> dict[str, Any]:
    """Parse ``regex:value,regex:value`` (a regex may hold ``:``, not ``,``); each regex must compile."""
    out = _wbits_map(text, form, kind)
    for pattern in out:
        if (why := _regex(pattern)) is not None:
            raise ValueError(f"{pattern!r} {why}")
    return out


def _pattern_bits_map(text: str) -> dict[str, int]:
    return _pattern_map(text, "regex:bits", int)


def _pattern_pct_map(text: str) -> dict[str, float]:
    return _pattern_map(text, "regex:percentile", float)


def _pct_map_ok(value: dict[str, float]) -> str | None:
    bad = {k: v for k, v in value.items() if not 0.0 < v <= 100.0}
    return f"percentiles must be in (0, 100], got {bad}" if bad else None


def _wbits_ok(value: dict[str, int]) -> str | None:
    bad = {k: v for k, v in value.items() if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16}
    return f"bits must be in [2, 16], got {bad}" if bad else None


def _abits_ok(value: int) -> str | None:
    return None if value <= 0 or 2 <= value <= 16 else f"must be <= 0 (off) or in [2, 16], got {value}"


def _abits_map_ok(value: dict[str, int]) -> str | None:
    bad = {k: v for k, v in value.items() if isinstance(v, bool) or not isinstance(v, int) or _abits_ok(v)}
    return f"bits must be <= 0 (off) or in [2, 16], got {bad}" if bad else None


def _first_match(patterns: Mapping[str, Any], name: str) -> Any:
    """The value of the first pattern (in the order given) that ``re.search``-matches ``name``, else None."""
    return next((bits for pattern, bits in patterns.items() if re.search(pattern, name)), None)


def _env(name: str) -> str:
    return PREFIX + name


@dataclass(frozen=True)
class DuQuantConfig:
    """Typed, validated DuQuant settings. Build with :meth:`from_env`; tests may construct it directly.

    ``enabled`` is not a variable of its own: :meth:`from_env` derives it from which variables are set.
    """

    enabled: bool = False
    wbits_default: int = setting(4, env=_env("WBITS_DEFAULT"), check=in_range(2, 16),
                                 help="weight bits (2..16; 16 keeps weights in floating point)")
    wbits: dict[str, int] = setting(env=_env("WBITS"), parse=_wbits_map, check=_wbits_ok, default_factory=dict,
                                    help="per-layer override ``name:bits,name:bits`` (names checked against the "
                                         "model at replacement time)")
    wbits_re: dict[str, int] = setting(
        env=_env("WBITS_RE"), parse=_pattern_bits_map, check=_wbits_ok, default_factory=dict,
        help="per-pattern weight bits ``regex:bits,regex:bits``: a selected layer whose name matches a regex "
             "(``re.search``; the first in the list wins; an exact WBITS entry wins over all) gets its bits; "
             "every regex must match a selected layer. Keeps a sensitive kind or block at W8 without naming "
             "each layer (OpenVLA-RSD: ``\\.mlp\\.:8`` halved the W4A8 action error vs full precision, 60 % of "
             "the weights at 8 bits; ``\\.down_proj$:8``, 20 %, is its default: benchmarks/bench_rsd_quant.py)")
    wgroup: int = setting(0, env=_env("WGROUP"), check=at_least(0),
                          help="weight scale granularity: 0 = one scale per output row (the recipe's); g > 0 = one "
                               "scale per g consecutive input columns of each row (in the rotated space; GPTQ/AWQ/"
                               "torchao int4 group size, usually 32-128), +16/g bits a weight in fp16 terms")
    abits: int = setting(8, env=_env("ABITS"), check=_abits_ok,
                         help="activation bits; <= 0 turns activation quantisation off")
    abits_re: dict[str, int] = setting(
        env=_env("ABITS_RE"), parse=_pattern_bits_map, check=_abits_map_ok, default_factory=dict,
        help="per-pattern activation bits ``regex:bits,...``, as WBITS_RE (<= 0: off for those layers, which "
             "also drops their GPTQ refinement, which needs calibrated inputs; 16 keeps it and makes the "
             "activation rounding negligible)")
    block: int = setting(16, env=_env("BLOCK"), check=in_range(1, 4096), help="input-rotation block size")
    block_out: int | None = setting(None, env=_env("BLOCK_OUT"), check=in_range(1, 4096),
                                    help="output-rotation block size (unset: = BLOCK)")
    permute: bool = setting(True, env=_env("PERMUTE"), help="zigzag input permutation from smoothed channel energy")
    row_rot: str = setting("restore", env=_env("ROW_ROT"), parse=_row_rot, choices=ROW_ROT_MODES,
                           help="output rotation: ``restore`` | ``propagate`` | ``0`` (also none/off/false)")
    rot: str = setting("hadamard", env=_env("ROT"), parse=_lower, choices=ROT_MODES,
                       help="how block rotations are built: ``hadamard`` (randomised Hadamard, random orthogonal "
                            "for non-power-of-2 blocks; data free), ``svd`` (the recipe's suggestion: singular "
                            "vectors of the block's weights), ``none``. Hadamard measured better on MiniLM W4A8 "
                            "(final-state rel. error 0.32 vs 0.48 for svd, 0.55 for RTN): an SVD basis "
                            "*concentrates* energy into a few channels, the opposite of what a quantiser wants, "
                            "while a Hadamard spreads any outlier evenly over its block")
    act_gran: str = setting("auto", env=_env("ACT_GRAN"), parse=_lower, choices=ACT_GRAN_MODES,
                            help="activation scale granularity: ``tensor`` (one static scale per layer from "
                                 "calibration, recipe), ``token`` (dynamic per-token absmax, as the DuQuant paper) "
                                 "or ``auto`` (default: ``token`` for a layer quantised to <= 4 activation bits, "
                                 "``tensor`` above. At A4 a static scale clips the outlier tokens: MiniLM W4A4 "
                                 "error 0.671x RTN static vs 0.540x per token; LIBERO W4A4 on the tiny OpenVLA-RSD "
                                 "28/100 static vs 37/100 per token, FP 42/100; at A8 static scales measured "
                                 "as good and cost nothing at run time)")
    act_pct: float = setting(99.9, env=_env("ACT_PCT"), check=in_range(0.0, 100.0, open_low=True),
                             help="percentile of |activation| (over all calibration batches) used as the A-bit "
                                  "scale")
    act_pct_re: dict[str, float] = setting(
        env=_env("ACT_PCT_RE"), parse=_pattern_pct_map, check=_pct_map_ok, default_factory=dict,
        help="per-pattern ACT_PCT ``regex:percentile,...``, matched as WBITS_RE. Why: a static per-tensor scale "
             "from a percentile over all tokens clips the few tokens that are outliers, and those can be the ones "
             "that matter (OpenVLA-RSD: the last prefix token, whose hidden state predicts RFSQ layer 0, had "
             "6-10 % of its down_proj inputs clipped at ACT_PCT=99.9; ``\\.down_proj$:100`` cut the W4A8 action "
             "error vs full precision from 0.0396 to 0.0321 at no memory cost)")
    calib_steps: int = setting(32, env=_env("CALIB_STEPS"), check=at_least(1),
                               help="calibration batches (or first calls, when calibrating lazily)")
    ls: float = setting(0.15, env=_env("LS"), check=in_range(0.0, 1.0),
                        help="lambda smoothing of channel energy, e <- (1-LS) e + LS mean(e)")
    clip_search: bool = setting(True, env=_env("CLIP_SEARCH"), help="per-row clipping-ratio search for weights")
    wopt: str = setting("auto", env=_env("WOPT"), parse=_lower, choices=WOPT_MODES,
                        help="weight refinement: ``auto`` (default: ``gptq`` when a calibration set is given, "
                             "i.e. :func:`quant.calibrate` runs; ``clip`` when there is none, data free), ``clip`` "
                             "(data-free clip search, recipe), ``act`` (clip search weighted by calibration "
                             "E[x^2]), ``gptq`` (``act`` + GPTQ error feedback, run pass by pass, see GPTQ_MEM_MB)")
    gptq_mem_mb: int = setting(0, env=_env("GPTQ_MEM_MB"), check=at_least(0),
                               help="GPTQ runs layer by layer in sequential calibration passes; each pass "
                                    "accumulates the in x in fp32 Hessians of at most this many MiB of layers "
                                    "(a larger layer gets a pass of its own; 0, the default: exactly one layer "
                                    "per pass, one forward of the calibration set per layer, measured best on "
                                    "MiniLM). Later passes see the already-quantised earlier layers")
    gptq_damp: float = setting(0.1, env=_env("GPTQ_DAMP"), check=in_range(0.0, 1.0),
                               help="GPTQ dampening, as a fraction of the mean Hessian diagonal (0.1 measured "
                                    "better than GPTQ's usual 0.01 on MiniLM W4A8 with few calibration batches)")
    gptq_act_order: bool = setting(True, env=_env("GPTQ_ACT_ORDER"),
                                   help="GPTQ quantises columns in decreasing Hessian-diagonal order")
    dit_step_scales: str = setting("auto", env=_env("DIT_STEP_SCALES"), parse=_lower, choices=STEP_SCALE_MODES,
                                   help="one static activation scale per denoising step for layers inside a "
                                        "timestep-conditioned module (GR00T's DiT, ``action_head.model``): "
                                        "``auto`` (on with static per-tensor activation scales), ``1``, ``0``")
    packdir: str | None = setting(None, env=_env("PACKDIR"),
                                  help="directory of the pack cache (safetensors + JSON per layer)")
    scope: str = setting("", env=_env("SCOPE"), help="layer-name prefix")
    include: str = setting(DEFAULT_INCLUDE, env=_env("INCLUDE"), check=_regex,
                           help="regex (``re.search``) a layer name must match (empty = the default, "
                                "quant.patterns.DEFAULT_INCLUDE)")
    exclude: str = setting(DEFAULT_EXCLUDE, env=_env("EXCLUDE"), check=_regex,
                           help="regex (``re.search``) a layer name must not match (empty = the default, "
                                "quant.patterns.DEFAULT_EXCLUDE; to exclude nothing, give a regex that never "
                                "matches, e.g. ``^$``)")
    layers: tuple[str, ...] = setting((), env=_env("LAYERS"),
                                      help="comma-separated exact layer names; overrides INCLUDE/EXCLUDE")
    dryrun: bool = setting(False, env=_env("DRYRUN"), help="list the layers that would be replaced and stop")
    debug: bool = setting(False, env=_env("DEBUG"), help="log every Linear and why it was (not) selected")
    profile: bool = setting(False, env=_env("PROFILE"),
                            help="time each quantised forward; a table is logged at exit")
    profile_sync: bool = setting(False, env=_env("PROFILE_SYNC"),
                                 help="synchronise CUDA around timed sections (true GPU times, slower)")
    precache_weights: bool = setting(True, env=_env("PRECACHE_WEIGHTS"),
                                     help="keep the quantised weight cached (0: re-quantise each call, less memory)")
    packed: bool = setting(False, env=_env("PACKED"),
                           help="store quantised weights packed (W<=4: two int4 codes per byte, W5..8: int8; "
                                "per-row fp32 scales) and drop the float weight; the layer dequantises in row "
                                "blocks at each call. About 0.27x the fp16 weight bytes at W4, same outputs as "
                                "the fake path (see docs/duquant.md)")

    def __post_init__(self) -> None:
        # Direct construction (tests, benchmark) gets the same checks as the environment path.
        if self.block_out is None:
            object.__setattr__(self, "block_out", self.block)
        check_fields(self, DuQuantConfigError)

    @property
    def act_quant(self) -> bool:
        """Activation quantisation is on (ABITS > 0)."""
        return self.abits > 0

    @property
    def step_scales_on(self) -> bool:
        """Per-denoising-step activation scales apply (DIT_STEP_SCALES, ``auto``: static per-tensor scales)."""
        if not self.act_quant or self.dit_step_scales == "0":
            return False
        return self.dit_step_scales == "1" or self.act_gran != "token"

    def act_gran_for(self, name: str) -> str:
        """Activation scale granularity of one layer: ACT_GRAN, with ``auto`` resolved from the layer's A bits
        (``token`` at <= 4 bits, else ``tensor``)."""
        if self.act_gran != "auto":
            return self.act_gran
        bits = self.abits_for(name)
        return "token" if 0 < bits <= 4 else "tensor"

    def bits_for(self, name: str) -> int:
        """Weight bits for one layer (per-layer WBITS override, else the first WBITS_RE match, else
        WBITS_DEFAULT)."""
        if name in self.wbits:
            return self.wbits[name]
        bits = _first_match(self.wbits_re, name)
        return self.wbits_default if bits is None else bits

    def abits_for(self, name: str) -> int:
        """Activation bits for one layer (the first ABITS_RE match, else ABITS)."""
        bits = _first_match(self.abits_re, name)
        return self.abits if bits is None else bits

    def act_pct_for(self, name: str) -> float:
        """Activation-scale percentile for one layer (the first ACT_PCT_RE match, else ACT_PCT)."""
        pct = _first_match(self.act_pct_re, name)
        return self.act_pct if pct is None else float(pct)

    def replace(self, **changes: object) -> DuQuantConfig:
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, policy: str | None = None) -> DuQuantConfig:
        """Read every ``GR00T_DUQUANT_*`` variable once.

        DuQuant is enabled when at least one variable other than ``PACKDIR`` is set (even to an empty string,
        as the published recipe's scripts do with ``SCOPE=""``): a cache directory alone must not silently
        quantise a model. Unknown ``GR00T_DUQUANT_*`` names are refused, because a misspelt variable that is
        silently ignored is the most common way a quantisation experiment measures the wrong thing. A variable set
        to the empty string keeps its default.

        ``policy`` (the server's ``--policy``) adds that policy's recommended values
        (:data:`quant.patterns.POLICY_DEFAULTS`) under the environment: a variable the environment sets, even to
        the empty string (the field's own default), wins. They never enable DuQuant by themselves.
        """
        env = os.environ if environ is None else environ
        unknown = unknown_variables(env, PREFIX, cls)
        if unknown:
            raise DuQuantConfigError(f"unknown variable(s) {', '.join(unknown)}; known: {', '.join(variables(cls))}")
        enabled = any(k.startswith(PREFIX) and k != _env("PACKDIR") for k in env)
        defaults = {_env(k): v for k, v in POLICY_DEFAULTS.get(policy or "", {}).items() if _env(k) not in env}
        if enabled and defaults:
            LOG.info("[GR00T-DUQUANT] --policy %s defaults: %s (set a variable to override; empty: the generic "
                     "default)", policy, ", ".join(f"{k}={v}" for k, v in defaults.items()))
            env = {**defaults, **env}
        cfg = from_sources(cls, None, env, error=DuQuantConfigError, enabled=enabled)
        if not cfg.enabled:
            LOG.info("[GR00T-DUQUANT] DuQuant not enabled (no GR00T_DUQUANT_* variable set)")
        else:
            LOG.info("[GR00T-DUQUANT] %s", cfg.summary())
        return cfg

    def summary(self) -> str:
        """One line for logs and the server's metadata reply."""
        return (
            f"W{self.wbits_default} A{self.abits if self.act_quant else 'off'} wgroup={self.wgroup} block={self.block} "
            f"block_out={self.block_out} permute={int(self.permute)} row_rot={self.row_rot} rot={self.rot} "
            f"wopt={self.wopt} act_gran={self.act_gran} dit_step_scales={self.dit_step_scales} "
            f"act_pct={self.act_pct} calib_steps={self.calib_steps} ls={self.ls} scope={self.scope!r} "
            f"packdir={self.packdir!r} packed={int(self.packed)} layers={len(self.layers)} "
            f"wbits_overrides={len(self.wbits)}"
            + (f" wbits_re={self.wbits_re}" if self.wbits_re else "")
            + (f" abits_re={self.abits_re}" if self.abits_re else "")
            + (f" act_pct_re={self.act_pct_re}" if self.act_pct_re else "")
        )


#: Every variable we understand (without the prefix). Anything else with the prefix is a typo and is refused.
KNOWN_VARIABLES = tuple(v.removeprefix(PREFIX) for v in variables(DuQuantConfig))

__doc__ = (__doc__ or "").replace("<variables>", variables_table(DuQuantConfig, PREFIX))
