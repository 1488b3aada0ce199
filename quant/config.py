"""``DuQuantConfig``: every ``GR00T_DUQUANT_*`` variable, parsed and validated once.

The seed's published code read ``os.environ`` from inside each layer, so a typo or a bad value surfaced (if at
all) deep inside model loading. Here the environment is read in one place, at start-up, into a frozen dataclass;
every bad value raises :class:`DuQuantConfigError` whose message names the variable.

Variables (prefix ``GR00T_DUQUANT_``; defaults from the seed):

=================  ==========  ==================================================================================
WBITS_DEFAULT      4           weight bits (2..16; 16 keeps weights in floating point)
WBITS              ""          per-layer override ``name:bits,name:bits`` (names checked against the model at
                               replacement time)
ABITS              8           activation bits; <= 0 turns activation quantisation off
BLOCK              16          input-rotation block size
BLOCK_OUT          = BLOCK     output-rotation block size
PERMUTE            1           zigzag input permutation from smoothed channel energy
ROW_ROT            restore     output rotation: ``restore`` | ``propagate`` | ``0``
ROT                hadamard    how block rotations are built: ``hadamard`` (randomised Hadamard, random
                               orthogonal for non-power-of-2 blocks; data free), ``svd`` (the seed's suggestion:
                               singular vectors of the block's weights), ``none``. Hadamard measured better on
                               MiniLM W4A8 (final-state rel. error 0.32 vs 0.48 for svd, 0.55 for RTN): an SVD
                               basis *concentrates* energy into a few channels, the opposite of what a quantiser
                               wants, while a Hadamard spreads any outlier evenly over its block
ACT_GRAN           tensor      activation scale granularity: ``tensor`` (one static scale per layer from
                               calibration, seed) or ``token`` (dynamic per-token absmax, as the DuQuant paper)
ACT_PCT            99.9        percentile of |activation| (over all calibration batches) used as the A-bit scale
CALIB_STEPS        32          calibration batches (or first calls, when calibrating lazily)
LS                 0.15        lambda smoothing of channel energy, e <- (1-LS) e + LS mean(e)
CLIP_SEARCH        1           per-row clipping-ratio search for weights
WOPT               clip        weight refinement: ``clip`` (data-free clip search, seed), ``act`` (clip search
                               weighted by calibration E[x^2]), ``gptq`` (``act`` + GPTQ error feedback; needs
                               an in x in statistic per layer during calibration)
PACKDIR            ""          directory of the pack cache (safetensors + JSON per layer)
SCOPE              ""          layer-name prefix
INCLUDE            (defaults)  regex (``re.search``) a layer name must match (empty = the default)
EXCLUDE            (defaults)  regex (``re.search``) a layer name must not match (empty = the default; to
                               exclude nothing, give a regex that never matches, e.g. ``^$``)
LAYERS             ""          comma-separated exact layer names; overrides INCLUDE/EXCLUDE
DRYRUN             0           list the layers that would be replaced and stop
DEBUG              0           log every Linear and why it was (not) selected
PROFILE            0           time each quantised forward; a table is logged at exit
PROFILE_SYNC       0           synchronise CUDA around timed sections (true GPU times, slower)
PRECACHE_WEIGHTS   1           keep the quantised weight cached (0: re-quantise each call, less memory)
=================  ==========  ==================================================================================

``ROT``, ``CLIP_SEARCH`` and ``WOPT`` are additions (the seed fixed them); ROT and CLIP_SEARCH are part of the
pack-cache key (WOPT refines weights after calibration, which the pack cache does not hold).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from quant.patterns import DEFAULT_EXCLUDE, DEFAULT_INCLUDE

LOG = logging.getLogger("quant")

PREFIX = "GR00T_DUQUANT_"

ROW_ROT_MODES = ("restore", "propagate", "0")
ROT_MODES = ("svd", "hadamard", "none")
WOPT_MODES = ("clip", "act", "gptq")

#: Every variable we understand (without the prefix). Anything else with the prefix is a typo and is refused.
KNOWN_VARIABLES = (
    "WBITS_DEFAULT",
    "WBITS",
    "ABITS",
    "BLOCK",
    "BLOCK_OUT",
    "PERMUTE",
    "ROW_ROT",
    "ROT",
    "ACT_PCT",
    "ACT_GRAN",
    "CALIB_STEPS",
    "LS",
    "CLIP_SEARCH",
    "WOPT",
    "PACKDIR",
    "SCOPE",
    "INCLUDE",
    "EXCLUDE",
    "LAYERS",
    "DRYRUN",
    "DEBUG",
    "PROFILE",
    "PROFILE_SYNC",
    "PRECACHE_WEIGHTS",
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class DuQuantConfigError(ValueError):
    """A ``GR00T_DUQUANT_*`` value is invalid; the message names the variable."""


def _int(name: str, raw: str, lo: int | None = None, hi: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise DuQuantConfigError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise DuQuantConfigError(f"{PREFIX}{name}={value} is out of range [{lo}, {hi}]")
    return value


def _float(name: str, raw: str, lo: float, hi: float) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise DuQuantConfigError(f"{PREFIX}{name}={raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise DuQuantConfigError(f"{PREFIX}{name}={value} is out of range [{lo}, {hi}]")
    return value


def _bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise DuQuantConfigError(f"{PREFIX}{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def _regex(name: str, raw: str) -> str:
    try:
        re.compile(raw)
    except re.error as exc:
        raise DuQuantConfigError(f"{PREFIX}{name}={raw!r} is not a valid regular expression: {exc}") from None
    return raw


def _wbits_map(raw: str) -> dict[str, int]:
    """Parse ``name:bits,name:bits``; names are validated against the model later (see ``selection``)."""
    out: dict[str, int] = {}
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, bits = entry.rpartition(":")
        if not sep or not name.strip():
            raise DuQuantConfigError(f"{PREFIX}WBITS entry {entry!r} is not of the form layer.name:bits")
        out[name.strip()] = _int("WBITS", bits, 2, 16)
    return out


@dataclass(frozen=True)
class DuQuantConfig:
    """Typed, validated DuQuant settings. Build with :meth:`from_env`; tests may construct it directly."""

    enabled: bool = False
    wbits_default: int = 4
    wbits: dict[str, int] = field(default_factory=dict)
    abits: int = 8
    block: int = 16
    block_out: int = 16
    permute: bool = True
    row_rot: str = "restore"
    rot: str = "hadamard"
    act_pct: float = 99.9
    act_gran: str = "tensor"
    calib_steps: int = 32
    ls: float = 0.15
    clip_search: bool = True
    wopt: str = "clip"
    packdir: str | None = None
    scope: str = ""
    include: str = DEFAULT_INCLUDE
    exclude: str = DEFAULT_EXCLUDE
    layers: tuple[str, ...] = ()
    dryrun: bool = False
    debug: bool = False
    profile: bool = False
    profile_sync: bool = False
    precache_weights: bool = True

    def __post_init__(self) -> None:
        # Direct construction (tests, benchmark) gets the same checks as the environment path.
        if self.row_rot not in ROW_ROT_MODES:
            raise DuQuantConfigError(f"{PREFIX}ROW_ROT={self.row_rot!r} must be one of {ROW_ROT_MODES}")
        if self.rot not in ROT_MODES:
            raise DuQuantConfigError(f"{PREFIX}ROT={self.rot!r} must be one of {ROT_MODES}")
        if self.wopt not in WOPT_MODES:
            raise DuQuantConfigError(f"{PREFIX}WOPT={self.wopt!r} must be one of {WOPT_MODES}")
        if not 2 <= self.wbits_default <= 16:
            raise DuQuantConfigError(f"{PREFIX}WBITS_DEFAULT={self.wbits_default} is out of range [2, 16]")
        if self.abits > 16 or self.abits == 1:
            raise DuQuantConfigError(f"{PREFIX}ABITS={self.abits} must be <= 0 (off) or in [2, 16]")
        if self.block < 1 or self.block_out < 1:
            raise DuQuantConfigError(f"{PREFIX}BLOCK/BLOCK_OUT must be >= 1 (got {self.block}, {self.block_out})")
        if self.act_gran not in ("tensor", "token"):
            raise DuQuantConfigError(f"{PREFIX}ACT_GRAN={self.act_gran!r} must be tensor or token")
        if not 0.0 < self.act_pct <= 100.0:
            raise DuQuantConfigError(f"{PREFIX}ACT_PCT={self.act_pct} is out of range (0, 100]")
        if self.calib_steps < 1:
            raise DuQuantConfigError(f"{PREFIX}CALIB_STEPS={self.calib_steps} must be >= 1")
        if not 0.0 <= self.ls <= 1.0:
            raise DuQuantConfigError(f"{PREFIX}LS={self.ls} is out of range [0, 1]")
        _regex("INCLUDE", self.include)
        _regex("EXCLUDE", self.exclude)

    @property
    def act_quant(self) -> bool:
        """Activation quantisation is on (ABITS > 0)."""
        return self.abits > 0

    def bits_for(self, name: str) -> int:
        """Weight bits for one layer (per-layer WBITS override, else WBITS_DEFAULT)."""
        return self.wbits.get(name, self.wbits_default)

    def replace(self, **changes: object) -> DuQuantConfig:
        """A copy with some fields changed (re-validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DuQuantConfig:
        """Read every ``GR00T_DUQUANT_*`` variable once.

        DuQuant is enabled when at least one variable other than ``PACKDIR`` is set (even to an empty string,
        as the seed's scripts do with ``SCOPE=""``): a cache directory alone must not silently quantise a model.
        Unknown ``GR00T_DUQUANT_*`` names are refused, because a misspelt variable that is silently ignored is the
        most common way a quantisation experiment measures the wrong thing.
        """
        env = os.environ if environ is None else environ
        ours = {k[len(PREFIX) :]: v for k, v in env.items() if k.startswith(PREFIX)}
        unknown = sorted(set(ours) - set(KNOWN_VARIABLES))
        if unknown:
            raise DuQuantConfigError(
                f"unknown variable(s) {', '.join(PREFIX + u for u in unknown)}; known: "
                f"{', '.join(PREFIX + k for k in KNOWN_VARIABLES)}"
            )
        enabled = any(k != "PACKDIR" for k in ours)

        def get(name: str, default: str) -> str:
            return ours.get(name, default)

        block = _int("BLOCK", get("BLOCK", "16"), 1, 4096)
        row_rot = get("ROW_ROT", "restore").strip().lower()
        if row_rot in ("none", "off", "false"):
            row_rot = "0"
        if row_rot not in ROW_ROT_MODES:
            raise DuQuantConfigError(f"{PREFIX}ROW_ROT={row_rot!r} must be one of {', '.join(ROW_ROT_MODES)}")
        rot = get("ROT", "hadamard").strip().lower()
        if rot not in ROT_MODES:
            raise DuQuantConfigError(f"{PREFIX}ROT={rot!r} must be one of {', '.join(ROT_MODES)}")
        wopt = get("WOPT", "clip").strip().lower()
        if wopt not in WOPT_MODES:
            raise DuQuantConfigError(f"{PREFIX}WOPT={wopt!r} must be one of {', '.join(WOPT_MODES)}")
        abits = _int("ABITS", get("ABITS", "8"), None, 16)
        if abits == 1:
            raise DuQuantConfigError(f"{PREFIX}ABITS=1 is not supported (use <= 0 for off, or 2..16)")
        layers = tuple(s.strip() for s in get("LAYERS", "").split(",") if s.strip())
        packdir = get("PACKDIR", "").strip() or None
        cfg = cls(
            enabled=enabled,
            wbits_default=_int("WBITS_DEFAULT", get("WBITS_DEFAULT", "4"), 2, 16),
            wbits=_wbits_map(get("WBITS", "")),
            abits=abits,
            block=block,
            block_out=_int("BLOCK_OUT", get("BLOCK_OUT", str(block)), 1, 4096),
            permute=_bool("PERMUTE", get("PERMUTE", "1")),
            row_rot=row_rot,
            rot=rot,
            act_gran=get("ACT_GRAN", "tensor").strip().lower(),
            act_pct=_float("ACT_PCT", get("ACT_PCT", "99.9"), 1e-6, 100.0),
            calib_steps=_int("CALIB_STEPS", get("CALIB_STEPS", "32"), 1, 1_000_000),
            ls=_float("LS", get("LS", "0.15"), 0.0, 1.0),
            clip_search=_bool("CLIP_SEARCH", get("CLIP_SEARCH", "1")),
            wopt=wopt,
            packdir=packdir,
            scope=get("SCOPE", "").strip(),
            include=_regex("INCLUDE", get("INCLUDE", DEFAULT_INCLUDE)) or DEFAULT_INCLUDE,
            exclude=_regex("EXCLUDE", get("EXCLUDE", DEFAULT_EXCLUDE)) or DEFAULT_EXCLUDE,
            layers=layers,
            dryrun=_bool("DRYRUN", get("DRYRUN", "0")),
            debug=_bool("DEBUG", get("DEBUG", "0")),
            profile=_bool("PROFILE", get("PROFILE", "0")),
            profile_sync=_bool("PROFILE_SYNC", get("PROFILE_SYNC", "0")),
            precache_weights=_bool("PRECACHE_WEIGHTS", get("PRECACHE_WEIGHTS", "1")),
        )
        if not cfg.enabled:
            LOG.info("[GR00T-DUQUANT] DuQuant not enabled (no GR00T_DUQUANT_* variable set)")
        else:
            LOG.info("[GR00T-DUQUANT] %s", cfg.summary())
        return cfg

    def summary(self) -> str:
        """One line for logs and the server's metadata reply."""
        return (
            f"W{self.wbits_default} A{self.abits if self.act_quant else 'off'} block={self.block} "
            f"block_out={self.block_out} permute={int(self.permute)} row_rot={self.row_rot} rot={self.rot} "
            f"wopt={self.wopt} act_gran={self.act_gran} "
            f"act_pct={self.act_pct} calib_steps={self.calib_steps} ls={self.ls} scope={self.scope!r} "
            f"packdir={self.packdir!r} layers={len(self.layers)} wbits_overrides={len(self.wbits)}"
        )
