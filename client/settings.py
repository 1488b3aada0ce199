"""One configuration mechanism: a dataclass field declares its flag, environment variable, parser and check.

Every component (server, policy options, RSD, DuQuant, LIBERO evaluation, the client) describes its settings as a
frozen dataclass whose fields are made with :func:`setting`. From that one declaration come the CLI flags
(:func:`add_arguments`), the environment variables and the precedence default < environment < flag
(:func:`from_sources`), the validation of a directly constructed object (:func:`check_fields`) and the JSON view
(:func:`to_dict`). A default is written once, in the field; a bad value raises :class:`SettingError` whose message
names the flag or variable it came from, at start-up, never on the first request.

Why here: ``client/`` is the bottom layer (no torch, installable alone), so the server, ``rsd``, ``quant`` and the
LIBERO client can all build on this module without an upward import.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "Setting", "SettingError", "above", "add_arguments", "at_least", "check_fields", "from_sources", "in_range",
    "parse_bool", "setting", "to_dict", "unknown_variables", "variables", "variables_table",
]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NONE = frozenset({"", "none", "null"})
_MISSING = dataclasses.MISSING


class SettingError(ValueError):
    """A setting has an invalid value; the message names the flag or environment variable."""


def parse_bool(text: str) -> bool:
    """The one boolean parser: 1/0, true/false, yes/no, on/off (any case)."""
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")


# -- small shared checks (``check=``): value -> None if fine, else the reason ------------------------------
def at_least(lo: float) -> Callable[[Any], str | None]:
    """``value >= lo`` (e.g. ``at_least(1)`` for a count, ``at_least(0)`` for a duration)."""
    return lambda v: None if v >= lo else f"must be >= {lo}, got {v!r}"


def above(lo: float) -> Callable[[Any], str | None]:
    """``value > lo`` (a temperature, a timeout)."""
    return lambda v: None if v > lo else f"must be > {lo}, got {v!r}"


def in_range(lo: float, hi: float, *, open_low: bool = False) -> Callable[[Any], str | None]:
    """``lo <= value <= hi`` (``lo < value`` with ``open_low``); the message shows the interval."""
    text = f"{'(' if open_low else '['}{lo}, {hi}]"

    def check(v: Any) -> str | None:
        ok = (lo < v if open_low else lo <= v) and v <= hi
        return None if ok else f"must be in {text}, got {v!r}"

    return check


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where one field comes from and what it accepts (stored in the field's metadata)."""

    flags: tuple[str, ...] = ()
    env: str | None = None
    help: str = ""
    parse: Callable[[str], Any] | None = None  # text -> value; raise ValueError with the reason
    check: Callable[[Any], str | None] | None = None  # value -> None if fine, else the reason
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    off: tuple[str, ...] = ()  # flags that turn a boolean field off (``--no-video`` for ``save_video``)

    @property
    def dest(self) -> str | None:
        """The argparse destination: the first long flag, e.g. ``--rsd-mode`` -> ``rsd_mode``."""
        first = (self.flags or self.off or (None,))[0]
        return first.lstrip("-").replace("-", "_") if first else None

    @property
    def positional(self) -> bool:
        """A flag spelled without a dash is a positional argument (``SUITE`` of the LIBERO evaluation)."""
        return bool(self.flags) and not self.flags[0].startswith("-")

    @property
    def label(self) -> str | None:
        """How a message names the command-line source: the first flag, or a positional's metavar."""
        if self.positional:
            return self.metavar or self.flags[0].upper()
        return (self.flags or self.off or (None,))[0]

    def names(self, field: str) -> str:
        """How an error names this setting when the value did not come from a flag or variable."""
        where = " / ".join([*([self.label] if self.label else []), *([self.env] if self.env else [])])
        return f"{field} ({where})" if where else field


def setting(default: Any = _MISSING, *flags: str, env: str | None = None, help: str = "",
            parse: Callable[[str], Any] | None = None, check: Callable[[Any], str | None] | None = None,
            choices: tuple[Any, ...] | None = None, metavar: str | None = None,
            default_factory: Callable[[], Any] | None = None, off: tuple[str, ...] = ()) -> Any:
    """A dataclass field with a flag (any spellings; one without a dash is positional), an environment
    variable, a parser and a check. ``off`` lists flags that set a boolean field false (``--no-video``)."""
    meta = {"setting": Setting(tuple(flags), env, help, parse, check,
                               tuple(choices) if choices is not None else None, metavar, tuple(off))}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _settings(cls: type) -> list[tuple[dataclasses.Field, Setting, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["setting"], hints[f.name]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


def _optional(typ: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (typ, False)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(typ)) == 2:
            return args[0], True
    return typ, False


def _parse_text(text: str, typ: Any, spec: Setting) -> Any:
    base, nullable = _optional(typ)
    if nullable and text.strip().lower() in _NONE:
        return None
    if spec.parse is not None:
        return spec.parse(text)
    if base is bool:
        return parse_bool(text)
    if base is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
    if base is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError("expected a number") from None
    if typing.get_origin(base) is tuple:
        return tuple(s.strip() for s in text.split(",") if s.strip())
    return text.strip()


def _check(value: Any, typ: Any, spec: Setting) -> str | None:
    base, nullable = _optional(typ)
    if value is None:
        return None if nullable else "a value is required"
    if base in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or (base is int and not isinstance(value, int))):
        return f"expected {'an integer' if base is int else 'a number'}, got {value!r}"
    if base is bool and not isinstance(value, bool):
        return f"expected a boolean, got {value!r}"
    if spec.choices is not None and value not in spec.choices:
        return f"must be one of {', '.join(map(str, spec.choices))}; got {value!r}"
    return spec.check(value) if spec.check is not None else None


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, title: str | None = None, *,
                  switches: bool = False) -> None:
    """Register every flag of ``cls`` on ``parser`` (optionally in an argument group titled ``title``).

    Flags default to ``None`` (= not given) and take text, parsed later by :func:`from_sources` so that a bad value
    is reported with the flag's name by the same code that reports a bad environment variable. A boolean flag may
    be given bare (``--log-requests``) or with a value (``--rsd-enabled 0``); with ``switches`` it takes no value
    (for a parser with positionals, where ``--headless SUITE`` would otherwise read SUITE as the flag's value).
    A positional setting (a name without a dash) is required and takes one value.
    """
    target = parser.add_argument_group(title) if title else parser
    for f, spec, typ in _settings(cls):
        if not spec.flags and not spec.off:
            continue
        default = f.default if f.default is not _MISSING else None
        extra = [f"env {spec.env}"] if spec.env else []
        if spec.choices is not None:
            extra.append("one of " + ", ".join(map(str, spec.choices)))
        if default not in (None, "", (), {}) and default is not False and not spec.off:  # an off switch: no note
            extra.append(f"default {int(default) if isinstance(default, bool) else default}")
        text = (spec.help + (f" ({'; '.join(extra)})" if extra else "")).replace("%", "%%")
        if spec.off:
            target.add_argument(*spec.off, dest=spec.dest, action="store_const", const="0", default=None,
                                help=text)
            if not spec.flags:
                continue
        if spec.positional:
            target.add_argument(spec.flags[0], metavar=spec.label, help=text)
            continue
        kwargs: dict[str, Any] = {"dest": spec.dest, "default": None, "help": text}
        if _optional(typ)[0] is bool and switches:
            kwargs.update(action="store_const", const="1")
        elif _optional(typ)[0] is bool:
            kwargs.update(nargs="?", const="1", metavar="0|1")
        elif spec.metavar:
            kwargs["metavar"] = spec.metavar
        target.add_argument(*spec.flags, **kwargs)


def from_sources(cls: type, args: argparse.Namespace | Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, *, error: type[SettingError] = SettingError,
                 label: str = "{name}", **fixed: Any) -> Any:
    """Build ``cls``: field default < environment variable < flag < ``fixed`` keyword values.

    ``args`` is the namespace of a parser filled by :func:`add_arguments`, or a mapping ``dest -> text`` in which
    a field without flags is keyed by its name (typed policy options given as ``--policy-option KEY=VALUE``:
    ``label`` then says how an error names the source, ``{name}`` standing for the key). ``env`` defaults to
    ``os.environ``; a variable set to the empty string counts as unset (``RSD_MODE= cmd`` keeps the default).
    Every value is parsed and checked here, a variable even when a flag overrides it (it is still a mistake in the
    environment); the first bad one raises ``error`` naming its source, e.g.
    ``RSD_RELAXED_TAU='abc': expected a number (variable for --rsd-relaxed-tau)``.
    """
    env = os.environ if env is None else env
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    values: dict[str, Any] = {}
    for f, spec, typ in _settings(cls):
        sources: list[tuple[Any, str, str]] = []  # (raw, where, note), lowest precedence first
        if spec.env and env.get(spec.env) not in (None, ""):
            sources.append((env[spec.env], spec.env, f" (variable for {spec.label})" if spec.label else ""))
        if spec.dest and given.get(spec.dest) is not None:
            sources.append((given[spec.dest], spec.label or spec.dest, ""))
        elif not spec.flags and not spec.off and given.get(f.name) is not None:
            sources.append((given[f.name], label.format(name=f.name), ""))
        if f.name in fixed:
            values[f.name] = fixed.pop(f.name)
            continue
        for raw, where, note in sources:  # a bad variable is refused even when a flag overrides it
            try:
                value = _parse_text(raw, typ, spec) if isinstance(raw, str) else raw
                reason = _check(value, typ, spec)
            except ValueError as exc:
                reason = str(exc)
            if reason:
                raise error(f"{where}={raw!r}: {reason}{note}")
            values[f.name] = value
    values.update(fixed)  # fields without a setting (derived or nested configs)
    return cls(**values)


def check_fields(obj: Any, error: type[SettingError] = SettingError) -> None:
    """Check every setting of a constructed object (call from ``__post_init__``): direct construction in code and
    tests gets the same checks as flags and variables; the message names the field, its flag and variable."""
    for f, spec, typ in _settings(type(obj)):
        value = getattr(obj, f.name)
        try:
            reason = _check(value, typ, spec)
        except ValueError as exc:
            reason = str(exc)
        if reason:
            raise error(f"{spec.names(f.name)}: {reason}")


def variables(*classes: type) -> list[str]:
    """The environment variables the settings of ``classes`` declare, in field order."""
    return [spec.env for cls in classes for _, spec, _ in _settings(cls) if spec.env]


def unknown_variables(env: Mapping[str, str], prefix: str, *classes: type) -> list[str]:
    """Variables starting with ``prefix`` that no setting of ``classes`` declares (a misspelt one is refused)."""
    known = set(variables(*classes))
    return sorted(k for k in env if k.startswith(prefix) and k not in known)


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-friendly view of a settings object (tuples become lists; nested dataclasses become dicts)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def variables_table(cls: type, prefix: str = "", width: int = 110) -> str:
    """The environment variables of ``cls`` as a reStructuredText table (name without ``prefix``, default, help):
    a module docstring can show the defaults of its fields instead of repeating them."""
    rows = []
    for f, spec, _ in _settings(cls):
        if not spec.env:
            continue
        default = f.default if f.default is not _MISSING else (f.default_factory() if f.default_factory
                                                                is not _MISSING else None)
        shown = '""' if default == "" else "" if default in (None, (), {}) else str(
            int(default) if isinstance(default, bool) else default)
        rows.append((spec.env.removeprefix(prefix), shown if len(shown) <= 10 else "(built-in)", spec.help))
    w_name = max(len(r[0]) for r in rows)
    w_default = max(10, *(len(r[1]) for r in rows))
    w_help = width - w_name - w_default - 4
    rule = f"{'=' * w_name}  {'=' * w_default}  {'=' * w_help}"
    lines = [rule]
    for name, shown, text in rows:
        wrapped = textwrap.wrap(text, w_help) or [""]
        lines.append(f"{name:<{w_name}}  {shown:<{w_default}}  {wrapped[0]}".rstrip())
        lines += [f"{'':<{w_name + w_default + 4}}{more}" for more in wrapped[1:]]
    lines.append(rule)
    return "\n".join(lines)
