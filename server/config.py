"""``ServerConfig``: every server setting, filled from CLI flags and environment in one place.

Flag spellings follow the user's GR00T command line: ``--model_path`` and ``--model-path`` (and the
other underscore forms) are both accepted; ``--server`` is accepted and ignored (this process is
always a server). Environment variables ``VLA_SERVER_<FLAG>`` (e.g. ``VLA_SERVER_PORT``) provide
defaults that flags override. Any invalid value stops start-up with a message naming the flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsd.config import RSDConfig, RSDConfigError

ENV_PREFIX = "VLA_SERVER_"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The embedded default model: a trained tiny OpenVLA-RSD checkpoint shipped in the repository.
EMBEDDED_MODEL_DIR = REPO_ROOT / "models" / "checkpoints" / "openvla-rsd-libero-spatial"


def default_policy() -> str:
    """``openvla-rsd`` on the embedded checkpoint when it is present, else the debugging policy."""
    return "openvla-rsd" if (EMBEDDED_MODEL_DIR / "config.json").is_file() else "debug"


DEFAULT_POLICY = default_policy()


class ConfigError(ValueError):
    """An invalid setting; the message names the flag or variable."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5555
    policy: str = DEFAULT_POLICY
    model_path: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8
    max_wait_ms: float = 2.0
    max_queue: int = 64
    max_message_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 1024 * 1024
    request_timeout_s: float = 30.0
    data_config: str | None = None
    denoising_steps: int | None = None
    embodiment_tag: str | None = None
    curve_keys: str | None = None
    log_level: str = "INFO"
    policy_options: dict[str, Any] = field(default_factory=dict)
    rsd: RSDConfig = field(default_factory=RSDConfig)
    torch_threads: int = 0
    log_requests: bool = False

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host in ("localhost",):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {value}")
        return value

    return parse


def _non_negative_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {text}")
        return value

    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be an integer, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be in 1..65535, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m server", description="VLA policy inference server (ZeroMQ + msgpack).")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 is explicit)")
    p.add_argument("--port", type=_port, default=5555)
    p.add_argument("--policy", default=DEFAULT_POLICY, help="registered policy name (see --list-policies)")
    p.add_argument("--model-path", "--model_path", dest="model_path", default=None,
                   help="local checkpoint directory (no hub downloads)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-batch", "--max_batch", dest="max_batch", type=_positive_int("--max-batch"), default=8)
    p.add_argument("--max-wait-ms", "--max_wait_ms", dest="max_wait_ms", type=_non_negative_float("--max-wait-ms"),
                   default=2.0, help="how long a batch may wait for more concurrent requests (0 = never wait)")
    p.add_argument("--max-queue", dest="max_queue", type=_positive_int("--max-queue"), default=64,
                   help="queued infer requests beyond which new ones get an 'overloaded' error")
    p.add_argument("--max-message-bytes", dest="max_message_bytes", type=_positive_int("--max-message-bytes"),
                   default=8 * 1024 * 1024)
    p.add_argument("--max-image-pixels", dest="max_image_pixels", type=_positive_int("--max-image-pixels"),
                   default=1024 * 1024)
    p.add_argument("--request-timeout-s", dest="request_timeout_s",
                   type=_non_negative_float("--request-timeout-s"), default=30.0,
                   help="a request still queued after this long is answered with a 'timeout' error")
    p.add_argument("--data-config", "--data_config", dest="data_config", default=None)
    p.add_argument("--denoising-steps", "--denoising_steps", dest="denoising_steps",
                   type=_positive_int("--denoising-steps"), default=None)
    p.add_argument("--embodiment-tag", "--embodiment_tag", dest="embodiment_tag", default=None)
    p.add_argument("--curve-keys", dest="curve_keys", default=None,
                   help="directory with server.key_secret and authorized client keys (enables CURVE)")
    p.add_argument("--server", action="store_true", help="accepted for compatibility with GR00T's command line")
    p.add_argument("--torch-threads", dest="torch_threads", type=_positive_int("--torch-threads"), default=None,
                   help="CPU threads for torch inference (default: torch's choice)")
    p.add_argument("--log-requests", action="store_true",
                   help="log one structured line per infer request at INFO (id, client, batch, latencies)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy-specific option, repeatable (e.g. --policy-option calib_data=GLOB; debug: horizon=16)")
    p.add_argument("--list-policies", action="store_true", help="print the registered policies and exit")
    RSDConfig.add_cli_args(p)
    return p


def _env_args(environ: Mapping[str, str], parser: argparse.ArgumentParser) -> list[str]:
    """Turn ``VLA_SERVER_*`` variables into flags placed before the real ones (flags win)."""
    known = {a.dest: a for a in parser._actions if a.option_strings}
    args: list[str] = []
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        dest = key[len(ENV_PREFIX):].lower()
        action = known.get(dest)
        if action is None or dest in ("list_policies", "policy_option", "help") or dest.startswith("rsd_"):
            raise ConfigError(f"unknown environment variable {key}")
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if value not in ("0", "1", "", "false", "true"):
                raise ConfigError(f"{key} must be 0 or 1, got {value!r}")
            if value in ("1", "true"):
                args.append(flag)
        else:
            args.extend([flag, value])
    return args


def _parse_policy_options(items: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--policy-option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def parse_server_config(argv: Sequence[str] | None = None,
                        environ: Mapping[str, str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """Parse flags + environment into a validated :class:`ServerConfig`."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    argv = list(argv) if argv is not None else []
    try:
        ns = parser.parse_args(_env_args(environ, parser) + argv)
    except argparse.ArgumentTypeError as exc:  # pragma: no cover - argparse routes these to error()
        raise ConfigError(str(exc)) from None
    device = ns.device
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if ns.model_path is not None and not Path(ns.model_path).is_dir():
        raise ConfigError(f"--model-path {ns.model_path!r} is not a directory")
    if ns.curve_keys is not None and not Path(ns.curve_keys).is_dir():
        raise ConfigError(f"--curve-keys {ns.curve_keys!r} is not a directory")
    try:
        rsd = RSDConfig.from_env_and_args(ns, environ)
    except RSDConfigError as exc:
        raise ConfigError(str(exc)) from None
    config = ServerConfig(
        host=ns.host,
        port=ns.port,
        policy=ns.policy,
        model_path=ns.model_path,
        device=device,
        dtype=ns.dtype,
        max_batch=ns.max_batch,
        max_wait_ms=ns.max_wait_ms,
        max_queue=ns.max_queue,
        max_message_bytes=ns.max_message_bytes,
        max_image_pixels=ns.max_image_pixels,
        request_timeout_s=ns.request_timeout_s,
        data_config=ns.data_config,
        denoising_steps=ns.denoising_steps,
        embodiment_tag=ns.embodiment_tag,
        curve_keys=ns.curve_keys,
        log_level=ns.log_level,
        policy_options=_parse_policy_options(ns.policy_option),
        rsd=rsd,
        torch_threads=ns.torch_threads or 0,
        log_requests=ns.log_requests,
    )
    return config, ns
