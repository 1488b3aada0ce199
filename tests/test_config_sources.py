"""Every component's flags and variables come from its settings dataclass (client.settings), and a bad value
names the flag or variable it came from: server (+ RSD), DuQuant, LIBERO evaluation, the client library."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import quant.config
from client.libero.config import EvalConfig, EvalConfigError, config_from_args
from client.libero.config import build_parser as eval_parser
from client.policy_client import ClientConfig, ClientConfigError
from client.settings import Setting, SettingError, variables
from quant.config import DuQuantConfig, DuQuantConfigError
from rsd.config import RSDConfig, RSDConfigError
from server.config import ENV_PREFIX, ConfigError, ServerConfig, parse_server_config


def _specs(cls: type) -> dict[str, Setting]:
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(cls) if "setting" in f.metadata}


def test_error_classes_share_the_mechanism() -> None:
    for cls in (ConfigError, RSDConfigError, DuQuantConfigError, EvalConfigError, ClientConfigError):
        assert issubclass(cls, SettingError) and issubclass(cls, ValueError)


def test_server_help_lists_every_declared_flag_and_variable() -> None:
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    help_text = " ".join(out.stdout.split())  # argparse wraps lines
    for cls in (ServerConfig, RSDConfig):
        for name, spec in _specs(cls).items():
            assert spec.flags, f"{cls.__name__}.{name} has no flag"
            for flag in spec.flags:
                assert flag in help_text, flag
            assert f"env {spec.env}" in help_text, spec.env
    for extra in ("--server", "--policy-option", "--list-policies"):
        assert extra in help_text


def test_server_variables_keep_their_generated_names() -> None:
    """``VLA_SERVER_<FIELD>``: the names the old parser derived from each flag's destination."""
    for name, spec in _specs(ServerConfig).items():
        assert spec.env == ENV_PREFIX + name.upper()
    assert all(spec.env == "RSD_" + name.upper() for name, spec in _specs(RSDConfig).items())


def test_server_precedence_aliases_and_raw_policy_options() -> None:
    env = {"VLA_SERVER_PORT": "7000", "VLA_SERVER_LOG_REQUESTS": "1", "RSD_MODE": "Relaxed"}
    cfg, ns = parse_server_config(["--max_batch", "3", "--server", "--policy-option", "horizon=8"], env)
    assert (cfg.port, cfg.max_batch, cfg.log_requests, cfg.rsd.mode) == (7000, 3, True, "relaxed")
    assert cfg.policy_options == {"horizon": "8"} and ns.server
    cfg, _ = parse_server_config(["--port", "7001", "--rsd-mode", "exact"], env)
    assert cfg.port == 7001 and cfg.rsd.mode == "exact"
    assert parse_server_config([], {})[0] == ServerConfig()


@pytest.mark.parametrize(("argv", "env", "needles"), [
    ([], {"VLA_SERVER_PORT": "x"}, ["VLA_SERVER_PORT='x'", "--port"]),
    (["--port", "7001"], {"VLA_SERVER_PORT": "x"}, ["VLA_SERVER_PORT='x'"]),  # refused although overridden
    ([], {"VLA_SERVER_MAX_BATCH": "0"}, ["VLA_SERVER_MAX_BATCH='0'", "must be >= 1"]),
    ([], {"VLA_SERVER_BOGUS": "1"}, ["unknown environment variable VLA_SERVER_BOGUS", "VLA_SERVER_PORT"]),
    ([], {"VLA_SERVER_RSD_MODE": "exact"}, ["VLA_SERVER_RSD_MODE"]),
    ([], {"RSD_MODE": "greedy"}, ["RSD_MODE='greedy'", "--rsd-mode"]),
    (["--rsd-relaxed-tau", "2"], {}, ["--rsd-relaxed-tau='2'"]),
    (["--device", "tpu"], {}, ["--device='tpu'"]),
    (["--model_path", "/does/not/exist"], {}, ["--model-path='/does/not/exist'", "not a directory"]),
    (["--log-requests", "maybe"], {}, ["--log-requests='maybe'", "expected a boolean"]),
    (["--policy-option", "novalue"], {}, ["--policy-option expects KEY=VALUE"]),
])
def test_server_errors_name_their_source(argv: list[str], env: dict[str, str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_server_config(argv, env)
    for needle in needles:
        assert needle in str(err.value)


def test_direct_construction_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"port \(--port / VLA_SERVER_PORT\)"):
        ServerConfig(port=0)
    with pytest.raises(RSDConfigError, match=r"relaxed_r \(--rsd-relaxed-r / RSD_RELAXED_R\)"):
        RSDConfig(relaxed_r=-1)
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_CALIB_STEPS"):
        DuQuantConfig(calib_steps=0)


def test_duquant_variables_and_table_come_from_the_fields() -> None:
    assert quant.config.KNOWN_VARIABLES == tuple(v.removeprefix("GR00T_DUQUANT_") for v in variables(DuQuantConfig))
    doc = quant.config.__doc__ or ""
    for name, spec in _specs(DuQuantConfig).items():
        short = spec.env.removeprefix("GR00T_DUQUANT_")
        assert spec.env == "GR00T_DUQUANT_" + name.upper() and f"\n{short} " in doc, short
    assert "\nCALIB_STEPS       32 " in doc and "\nROW_ROT           restore " in doc
    with pytest.raises(DuQuantConfigError, match="GR00T_DUQUANT_ABITS='x': expected an integer"):
        DuQuantConfig.from_env({"GR00T_DUQUANT_ABITS": "x"})
    cfg = DuQuantConfig.from_env({"GR00T_DUQUANT_ROW_ROT": "off", "GR00T_DUQUANT_BLOCK": "8"})
    assert cfg.row_rot == "0" and cfg.block_out == 8 and DuQuantConfig(block=32).block_out == 32


def test_eval_flags_come_from_the_dataclass(monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = " ".join(eval_parser().format_help().split())
    for name, spec in _specs(EvalConfig).items():
        for flag in (*spec.flags, *spec.off):
            assert (spec.label if spec.positional else flag) in help_text, name
    monkeypatch.delenv("DISPLAY", raising=False)
    cfg = config_from_args(["--headless", "libero_goal", "--no-video", "--no-progress", "--timeout", "2"])
    assert (cfg.suite, cfg.headless, cfg.save_video, cfg.progress, cfg.timeout_s) == ("libero_goal", True, False,
                                                                                      False, 2.0)
    with pytest.raises(EvalConfigError, match="--tasks='0,x'"):
        config_from_args(["libero_goal", "--headless", "--tasks", "0,x"])


def test_client_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert variables(ClientConfig) == ["POLICY_SERVER_HOST", "POLICY_SERVER_PORT", "POLICY_SERVER_TIMEOUT"]
    assert ClientConfig.from_env({"POLICY_SERVER_PORT": "6000"}) == ClientConfig(port=6000)
    with pytest.raises(ClientConfigError, match="POLICY_SERVER_TIMEOUT='0': must be > 0"):
        ClientConfig.from_env({"POLICY_SERVER_TIMEOUT": "0"})
    from client.policy_client import client_from_env

    monkeypatch.setenv("POLICY_SERVER_PORT", "6001")
    with client_from_env(timeout_s=2.0) as client:
        assert client.endpoint == "tcp://127.0.0.1:6001" and client.timeout_s == 2.0
