"""Typed ``--policy-option KEY=VALUE`` options: one frozen dataclass per policy, parsed by ``client.settings``.

Why typed: the options arrive as text (``ServerConfig.policy_options`` is the raw ``KEY -> VALUE`` mapping of the
repeatable flag). Declaring each option once, as a :func:`client.settings.setting` field without flags, gives its
parser, check, default and help from one place: a bad value or an unknown key stops start-up with a message naming
the option (``--policy-option calib_n='many': expected an integer``), and ``--list-policies`` prints the same
declarations. The DuQuant start-up calibration options are shared by every model-backed policy
(:class:`CalibrationOptions`, the base of their option classes).
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import typing
from collections.abc import Mapping
from typing import Any

from client.libero.protocol import PREPROCESS_CHOICES
from client.settings import at_least, check_fields, from_sources, setting
from server.config import ConfigError
from server.policies.calibration import DEFAULT_CALIB_N

LABEL = "--policy-option {name}"
KIND_DEFAULT = "default"  # libero_preprocess: the policy kind's own (PolicySpec.preprocess)


def _calib_data_ok(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.strip():
        return "empty; give a glob of LIBERO demonstration HDF5 files"
    return None if globlib.glob(value, recursive=True) else "no files match"


@dataclasses.dataclass(frozen=True)
class PolicyOptions:
    """Base of every policy's options: direct construction (tests, code) is checked like parsed text.

    ``libero_preprocess`` is what the server advertises to LIBERO clients as ``metadata["preprocess"]``: the image
    path the checkpoint was trained with, which ``run_libero_eval.sh`` follows by default (``--preprocess auto``).
    Each policy kind has its own default (``PolicySpec.preprocess``: the upstream harness of a released checkpoint
    of that kind); a checkpoint fine-tuned on this project's own client images says ``none`` here.
    ``replan_steps`` is likewise the execution horizon advertised as ``metadata["replan_steps"]`` (checked against
    the policy's action horizon at start-up).
    """

    libero_preprocess: str = setting(KIND_DEFAULT, choices=(KIND_DEFAULT, *PREPROCESS_CHOICES),
                                     help="the LIBERO client's image path this checkpoint expects, advertised in "
                                          "metadata['preprocess'] ('default': the policy kind's own: "
                                          "openvla/openvla-oft 'openvla', gr00t 'gr00t', others 'none')")
    replan_steps: int = setting(0, check=at_least(0),
                                help="actions of each returned chunk a LIBERO client executes before asking again, "
                                     "advertised in metadata['replan_steps'] (the client's --replan default); 0: "
                                     "the whole chunk. The shipped tiny GR00T solves more with 8 of its 16")

    def __post_init__(self) -> None:
        check_fields(self, ConfigError)


@dataclasses.dataclass(frozen=True)
class CalibrationOptions(PolicyOptions):
    """DuQuant start-up calibration on LIBERO demonstration frames (used only when ``GR00T_DUQUANT_*`` enables it)."""

    calib_data: str | None = setting(None, metavar="GLOB", check=_calib_data_ok,
                                     help="LIBERO demonstration HDF5 files (glob) to calibrate DuQuant on at start-up")
    calib_n: int = setting(DEFAULT_CALIB_N, check=at_least(1),
                           help="calibration observations drawn from calib_data")
    calib_seed: int = setting(0, help="seed of the draw of calibration frames")


def option_names(cls: type) -> list[str]:
    """The keys ``cls`` accepts, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def parse_options(cls: type, options: Mapping[str, str], policy: str) -> Any:
    """``cls`` from the raw option mapping; an unknown key or a bad value raises :class:`ConfigError` naming it."""
    known = option_names(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = ", ".join(known) if known else "none"
        raise ConfigError(f"--policy-option: unknown option(s) for {policy}: {', '.join(unknown)} "
                          f"(known: {accepted}; see --list-policies)")
    return from_sources(cls, options, env={}, error=ConfigError, label=LABEL)


def _type_name(typ: Any) -> str:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if args and len(args) < len(typing.get_args(typ)):
        return f"{_type_name(args[0])}, optional"
    return getattr(typ, "__name__", str(typ))


def describe_options(cls: type) -> list[str]:
    """One line per option, ``KEY=<type>  help (default D; one of ...)``, for ``--list-policies``."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("setting")
        extra = [f"default {f.default}"] if f.default not in (None, dataclasses.MISSING) else []
        if spec is not None and spec.choices is not None:
            extra.append("one of " + ", ".join(map(str, spec.choices)))
        text = (spec.help if spec is not None else "") + (f" ({'; '.join(extra)})" if extra else "")
        lines.append(f"{f.name + '=<' + _type_name(hints[f.name]) + '>':36s} {text}".rstrip())
    return lines
