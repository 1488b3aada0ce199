"""The one configuration mechanism (client.settings): flags and variables from one declaration, errors naming them."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from client.settings import (
    SettingError,
    above,
    add_arguments,
    at_least,
    check_fields,
    from_sources,
    in_range,
    parse_bool,
    setting,
    to_dict,
    unknown_variables,
    variables,
    variables_table,
)


def _port_ok(v: int) -> str | None:
    return None if 1 <= v <= 65535 else f"must be in 1..65535, got {v}"


@dataclass(frozen=True)
class Example:
    port: int = setting(5555, "--port", env="EX_PORT", help="port", check=_port_ok)
    name: str | None = setting(None, "--name", "--the_name", env="EX_NAME")
    on: bool = setting(False, "--on", env="EX_ON")
    tau: float = setting(0.9, "--tau", env="EX_TAU")
    mode: str = setting("a", "--mode", choices=("a", "b"))
    layers: tuple[str, ...] = setting((), "--layers")

    def __post_init__(self) -> None:
        check_fields(self)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p, Example, "example")
    return p


def test_defaults_env_flags_precedence() -> None:
    assert from_sources(Example, _parser().parse_args([]), {}) == Example()
    cfg = from_sources(Example, _parser().parse_args(["--port", "7", "--on", "--the_name", "z", "--layers", "a,b"]),
                       {"EX_TAU": "0.5", "EX_PORT": "9"})
    assert cfg == Example(port=7, name="z", on=True, tau=0.5, layers=("a", "b"))
    assert from_sources(Example, _parser().parse_args(["--on", "0"]), {"EX_ON": "1"}).on is False
    assert from_sources(Example, None, {"EX_NAME": "none"}).name is None
    assert from_sources(Example, None, {}, port=42).port == 42


@pytest.mark.parametrize(("argv", "env", "needle"), [
    (["--port", "0"], {}, "--port='0': must be in 1..65535"),
    ([], {"EX_TAU": "abc"}, "EX_TAU='abc': expected a number"),
    (["--on", "maybe"], {}, "--on='maybe': expected a boolean"),
    (["--mode", "c"], {}, "--mode='c': must be one of a, b"),
    ([], {"EX_PORT": "1.5"}, "EX_PORT='1.5': expected an integer"),
])
def test_bad_values_name_their_source(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        from_sources(Example, _parser().parse_args(argv), env)


def test_direct_construction_is_checked_and_named() -> None:
    with pytest.raises(SettingError, match=r"port \(--port / EX_PORT\): must be in 1..65535"):
        Example(port=0)
    with pytest.raises(SettingError, match="expected a number"):
        Example(tau="x")  # type: ignore[arg-type]


def test_custom_error_type_and_unknown_variables() -> None:
    class MyError(SettingError):
        pass

    with pytest.raises(MyError):
        from_sources(Example, None, {"EX_PORT": "x"}, error=MyError)
    assert unknown_variables({"EX_PORT": "1", "EX_POTR": "2", "OTHER": "3"}, "EX_", Example) == ["EX_POTR"]


def test_parse_bool_and_to_dict() -> None:
    assert [parse_bool(s) for s in ("1", "TRUE", "yes", "On", "0", "false", "No", "off")] == [True] * 4 + [False] * 4
    with pytest.raises(ValueError):
        parse_bool("2")
    assert to_dict(Example(layers=("x",))) == {"port": 5555, "name": None, "on": False, "tau": 0.9, "mode": "a",
                                               "layers": ["x"]}


def test_help_lists_env_and_default() -> None:
    text = _parser().format_help()
    assert "env EX_PORT" in text and "default 5555" in text and "--the_name" in text


@dataclass(frozen=True)
class Options:
    horizon: int = setting(16, help="chunk length", check=lambda v: None if v > 0 else "must be > 0")


def test_name_keyed_mapping_for_options_without_flags() -> None:
    assert from_sources(Options, {"horizon": "8"}, {}).horizon == 8
    with pytest.raises(SettingError, match="--policy-option horizon='0': must be > 0"):
        from_sources(Options, {"horizon": "0"}, {}, label="--policy-option {name}")


# ----------------------------------------------------------------------------- extensions used by the components
def test_shared_checks() -> None:
    assert at_least(1)(1) is None and "must be >= 1" in at_least(1)(0)
    assert above(0)(0.5) is None and "must be > 0" in above(0)(0)
    assert in_range(1, 5)(1) is None and "must be in [1, 5]" in in_range(1, 5)(6)
    assert in_range(0.0, 1.0, open_low=True)(1.0) is None and "(0.0, 1.0]" in in_range(0.0, 1.0, open_low=True)(0.0)


def test_empty_variable_is_unset_and_env_errors_name_the_flag_too() -> None:
    assert from_sources(Example, None, {"EX_PORT": "", "EX_TAU": ""}) == Example()
    with pytest.raises(SettingError, match=r"EX_PORT='x': expected an integer \(variable for --port\)"):
        from_sources(Example, None, {"EX_PORT": "x"})


def test_a_bad_variable_is_refused_even_when_a_flag_overrides_it() -> None:
    with pytest.raises(SettingError, match="EX_PORT='x'"):
        from_sources(Example, _parser().parse_args(["--port", "7"]), {"EX_PORT": "x"})
    assert from_sources(Example, _parser().parse_args(["--port", "7"]), {"EX_PORT": "9"}).port == 7


@dataclass(frozen=True)
class Command:
    suite: str = setting(dataclasses.MISSING, "suite", metavar="SUITE", choices=("x", "y"))
    video: bool = setting(True, off=("--no-video",), help="no videos")
    quiet: bool = setting(False, "--quiet")

    def __post_init__(self) -> None:
        check_fields(self)


def test_positional_off_flags_and_switches() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p, Command, switches=True)
    assert from_sources(Command, p.parse_args(["--quiet", "y", "--no-video"]), {}) == Command("y", False, True)
    assert from_sources(Command, p.parse_args(["x"]), {}) == Command("x", True, False)
    with pytest.raises(SettingError, match="SUITE='z': must be one of x, y"):
        from_sources(Command, p.parse_args(["z"]), {})
    with pytest.raises(SettingError, match=r"suite \(SUITE\)"):
        Command("z")
    assert "--no-video" in p.format_help() and "SUITE" in p.format_help()


def test_variables_and_their_table() -> None:
    assert variables(Example) == ["EX_PORT", "EX_NAME", "EX_ON", "EX_TAU"]
    table = variables_table(Example, "EX_")
    assert table.splitlines()[0].startswith("=") and "PORT" in table and "5555" in table
    assert "EX_PORT" not in table
