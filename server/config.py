"""``ServerConfig``: every server setting, declared once as a field with its flag and variable.

Each field says its flag spellings, its ``VLA_SERVER_<NAME>`` environment variable, its default and its check
(:mod:`client.settings`); flags override variables, which override the field's default. Flag spellings follow the
user's GR00T command line: ``--model_path`` and ``--model-path`` (and the other underscore forms) are both
accepted; ``--server`` is accepted and ignored (this process is always a server). An unknown ``VLA_SERVER_*``
variable or any invalid value stops start-up with a message naming the flag or variable.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.settings import (
    SettingError,
    add_arguments,
    at_least,
    check_fields,
    from_sources,
    in_range,
    setting,
    unknown_variables,
    variables,
)
from models import shipped_checkpoint
from rsd.config import RSDConfig, RSDConfigError

ENV_PREFIX = "VLA_SERVER_"
# The embedded default model: a trained tiny OpenVLA-RSD checkpoint shipped inside the models package.
EMBEDDED_MODEL_DIR = shipped_checkpoint()


def default_policy() -> str:
    """``openvla-rsd`` on the embedded checkpoint when it is present, else the debugging policy."""
    return "openvla-rsd" if (EMBEDDED_MODEL_DIR / "config.json").is_file() else "debug"


DEFAULT_POLICY = default_policy()


class ConfigError(SettingError):
    """An invalid setting; the message names the flag or variable."""


def _device(value: str) -> str | None:
    return None if value == "cpu" or value.startswith("cuda") else "must be cpu, cuda or cuda:N"


def _directory(value: str) -> str | None:
    return None if Path(value).is_dir() else "is not a directory"


def _endpoints(value: str) -> str | None:
    for item in value.split(","):
        item = item.strip()
        host, _, port = item.removeprefix("tcp://").rpartition(":")
        if not item.startswith("tcp://") or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            return f"expects tcp://HOST:PORT[,tcp://HOST:PORT...], got {item!r}"
    return None


def replica_endpoint_list(value: str | None) -> list[str]:
    """The endpoints of ``--replica-endpoints`` (empty when not given)."""
    return [item.strip() for item in (value or "").split(",") if item.strip()]


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of one server process (built by :func:`parse_server_config`; tests may construct it)."""

    host: str = setting("127.0.0.1", "--host", env="VLA_SERVER_HOST",
                        help="bind address (0.0.0.0, every interface, must be asked for)")
    port: int = setting(5555, "--port", env="VLA_SERVER_PORT", check=in_range(1, 65535), help="TCP port")
    ws_port: int | None = setting(None, "--ws-port", "--ws_port", env="VLA_SERVER_WS_PORT", check=in_range(1, 65535),
                                  help="also serve openpi's websocket protocol on this TCP port (same host, "
                                       "same batcher; see docs/openpi_protocol.md)")
    policy: str = setting(DEFAULT_POLICY, "--policy", env="VLA_SERVER_POLICY",
                          help="registered policy name (see --list-policies)")
    model_path: str | None = setting(None, "--model-path", "--model_path", env="VLA_SERVER_MODEL_PATH",
                                     check=_directory, help="local checkpoint directory (no hub downloads)")
    device: str = setting("cpu", "--device", env="VLA_SERVER_DEVICE", check=_device, help="cpu | cuda | cuda:N")
    dtype: str = setting("float32", "--dtype", env="VLA_SERVER_DTYPE", choices=("float32", "bfloat16", "float16"),
                         help="model dtype")
    max_batch: int = setting(8, "--max-batch", "--max_batch", env="VLA_SERVER_MAX_BATCH", check=at_least(1),
                             help="most requests served by one forward pass")
    max_wait_ms: float = setting(2.0, "--max-wait-ms", "--max_wait_ms", env="VLA_SERVER_MAX_WAIT_MS",
                                 check=at_least(0.0),
                                 help="how long a batch may wait for more concurrent requests (0 = never wait)")
    max_queue: int = setting(64, "--max-queue", env="VLA_SERVER_MAX_QUEUE", check=at_least(1),
                             help="queued infer requests beyond which new ones get an 'overloaded' error")
    max_message_bytes: int = setting(8 * 1024 * 1024, "--max-message-bytes", env="VLA_SERVER_MAX_MESSAGE_BYTES",
                                     check=at_least(1), help="largest request accepted")
    max_image_pixels: int = setting(1024 * 1024, "--max-image-pixels", env="VLA_SERVER_MAX_IMAGE_PIXELS",
                                    check=at_least(1), help="largest image (height x width) accepted")
    request_timeout_s: float = setting(30.0, "--request-timeout-s", env="VLA_SERVER_REQUEST_TIMEOUT_S",
                                       check=at_least(0.0),
                                       help="a request still queued after this long is answered with a 'timeout' "
                                            "error")
    data_config: str | None = setting(None, "--data-config", "--data_config", env="VLA_SERVER_DATA_CONFIG",
                                      help="GR00T data config name")
    denoising_steps: int | None = setting(None, "--denoising-steps", "--denoising_steps",
                                          env="VLA_SERVER_DENOISING_STEPS", check=at_least(1),
                                          help="GR00T flow-matching steps (default: the checkpoint's)")
    embodiment_tag: str | None = setting(None, "--embodiment-tag", "--embodiment_tag",
                                         env="VLA_SERVER_EMBODIMENT_TAG", help="GR00T embodiment tag")
    serving_defaults: bool = setting(True, "--serving-defaults", off=("--no-serving-defaults",),
                                     env="VLA_SERVER_SERVING_DEFAULTS",
                                     help="apply the serving settings the checkpoint carries in serving.json "
                                          "(denoising steps, policy options), under this server's own flags; "
                                          "--no-serving-defaults ignores the file "
                                          "(server/policies/serving_defaults.py)")
    curve_keys: str | None = setting(None, "--curve-keys", env="VLA_SERVER_CURVE_KEYS", check=_directory,
                                     help="directory with server.key_secret and authorized client keys "
                                          "(enables CURVE)")
    log_level: str = setting("INFO", "--log-level", env="VLA_SERVER_LOG_LEVEL",
                             choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="logging level")
    torch_threads: int = setting(0, "--torch-threads", env="VLA_SERVER_TORCH_THREADS", check=at_least(0),
                                 help="CPU threads for torch inference (0 = torch's choice)")
    log_requests: bool = setting(False, "--log-requests", env="VLA_SERVER_LOG_REQUESTS",
                                 help="log one structured line per infer request at INFO (id, client, batch, "
                                      "latencies)")
    protocol: str = setting("auto", "--protocol", env="VLA_SERVER_PROTOCOL", choices=("auto", "vla", "gr00t"),
                            help="wire protocol(s) on --port: auto (ours and Isaac-GR00T's, told apart per "
                                 "message), vla (ours only) or gr00t (Isaac-GR00T's only; docs/gr00t_protocol.md)")
    api_token: str | None = setting(None, "--api-token", "--api_token", env="VLA_SERVER_API_TOKEN",
                                    help="token every GR00T-protocol request must carry (GR00T's api_token)")
    allow_kill: bool = setting(False, "--allow-kill", env="VLA_SERVER_ALLOW_KILL",
                               help="honour the GR00T protocol's 'kill' endpoint (refused by default)")
    gr00t_api: str = setting("n1.5", "--gr00t-api", env="VLA_SERVER_GR00T_API", choices=("n1.5", "n1.6"),
                             help="GR00T client generation get_modality_config answers (N1.5: as_json strings "
                                  "and action.* keys; N1.6: maps and bare keys); get_action accepts both")
    replicas: int = setting(1, "--replicas", env="VLA_SERVER_REPLICAS", check=at_least(1),
                            help="serve N replica processes of this server behind --port (one per GPU with "
                                 "--device cuda: replica k on cuda:k; on CPU each gets --torch-threads, by "
                                 "default an equal share of the cores); see docs/replicas.md")
    replica_endpoints: str | None = setting(None, "--replica-endpoints", env="VLA_SERVER_REPLICA_ENDPOINTS",
                                            check=_endpoints,
                                            help="comma-separated tcp://host:port of already-running servers "
                                                 "(other machines) to serve behind --port instead of local "
                                                 "replicas; see docs/replicas.md")
    # Raw ``--policy-option KEY=VALUE`` text; each policy parses its own typed options from it.
    policy_options: dict[str, str] = field(default_factory=dict)
    rsd: RSDConfig = field(default_factory=RSDConfig)

    def __post_init__(self) -> None:
        check_fields(self, ConfigError)

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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The flags of :class:`ServerConfig` and :class:`RSDConfig`, plus the few that are actions, not settings."""
    p = _Parser(prog="python -m server", description="VLA policy inference server (ZeroMQ + msgpack).")
    add_arguments(p, ServerConfig)
    p.add_argument("--server", action="store_true", help="accepted for compatibility with GR00T's command line")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the chosen policy, repeatable; each policy's options (type, default, "
                        "meaning) are printed by --list-policies")
    p.add_argument("--list-policies", action="store_true", help="print the registered policies and exit")
    RSDConfig.add_cli_args(p)
    return p


def _parse_policy_options(items: Sequence[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--policy-option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    return options


def parse_server_config(argv: Sequence[str] | None = None,
                        environ: Mapping[str, str] | None = None) -> tuple[ServerConfig, argparse.Namespace]:
    """Parse flags + environment into a validated :class:`ServerConfig` (raises :class:`ConfigError`)."""
    environ = os.environ if environ is None else environ
    unknown = unknown_variables(environ, ENV_PREFIX, ServerConfig)
    if unknown:
        raise ConfigError(f"unknown environment variable {', '.join(unknown)}; known: "
                          f"{', '.join(variables(ServerConfig))} (RSD reads RSD_*)")

    ns = build_parser().parse_args(list(argv) if argv is not None else [])
    try:
        rsd = RSDConfig.from_env_and_args(ns, environ)
    except RSDConfigError as exc:
        raise ConfigError(str(exc)) from None
    config = from_sources(ServerConfig, ns, environ, error=ConfigError,
                          policy_options=_parse_policy_options(ns.policy_option), rsd=rsd)
    return config, ns
