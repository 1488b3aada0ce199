"""``python -m server``: validate the config, bind, load the policy while answering ping, serve until SIGINT/SIGTERM.

Order matters for readiness: every flag and policy option is checked synchronously first (a bad one exits 2
before anything binds), then the socket is bound and the policy is built on the inference thread; meanwhile ping
says ``"status": "loading"``. A policy that fails to load still exits 2 with the same one-line message.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.config import ConfigError, ServerConfig, parse_server_config

if TYPE_CHECKING:
    from server.policies import Policy

logger = logging.getLogger("server")
#: Test-only: seconds the policy build sleeps first, so the "loading" readiness state can be observed.
LOAD_DELAY_ENV = "VLA_TESTING_LOAD_DELAY_S"


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config, ns = parse_server_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"python -m server: error: {exc}\n")
        return 2
    logging.basicConfig(
        level=getattr(logging, config.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from server.policies import DryRunRequested, available_policies, create_policy, describe_policies

    if ns.list_policies:
        sys.stdout.write(describe_policies())
        return 0
    if config.policy not in available_policies():
        sys.stderr.write(
            f"python -m server: error: --policy {config.policy!r} is not registered "
            f"(available: {', '.join(available_policies())})\n"
        )
        return 2
    if not config.is_loopback and config.curve_keys is None:
        logger.warning(
            "binding %s without authentication: anyone who can reach this port can drive the policy; "
            "use --curve-keys DIR on shared networks", config.endpoint,
        )
    if config.api_token is not None and (config.protocol != "gr00t" or config.ws_port is not None):
        # The token is GR00T's own mechanism; our protocol authenticates with CURVE and openpi's has none.
        logger.warning(
            "--api-token guards the GR00T protocol only: %s still serve without it (use --protocol gr00t%s)",
            " and ".join(([] if config.protocol == "gr00t" else ["this server's own protocol on the main port"])
                         + (["the websocket port"] if config.ws_port is not None else [])),
            "" if config.ws_port is None else " and no --ws-port",
        )
    if config.replicas > 1 or config.replica_endpoints is not None:
        from server.replicas import check_combination

        try:
            check_combination(config)
        except ConfigError as exc:
            sys.stderr.write(f"python -m server: error: {exc}\n")
            return 2
    curve_setup = None
    if config.curve_keys is not None:
        from server.security import curve_server_setup

        try:
            curve_setup = curve_server_setup(config.curve_keys)
        except (ConfigError, ValueError, OSError) as exc:
            sys.stderr.write(f"python -m server: error: --curve-keys: {exc}\n")
            return 2

    if config.replica_endpoints is not None:  # a front for servers elsewhere: no policy here
        return _serve_replicas(config, argv, curve_setup)
    # Everything that can be checked without loading weights is checked now, before anything binds: a bad
    # --policy-option, a missing checkpoint or a bad GR00T_DUQUANT_* variable exits 2 at once.
    from models.common.errors import CheckpointError
    from server.policies import parse_options, policy_spec
    from server.policies.factory import resolve_model_path
    from server.policies.quantize import duquant_config_from_env

    try:
        spec = policy_spec(config.policy)
        parse_options(spec.options, config.policy_options, spec.name)
        model_path = resolve_model_path(spec, config)
        if spec.load is not None and duquant_config_from_env().dryrun:
            # GR00T_DUQUANT_DRYRUN=1: list the layers (the scan command), serve nothing
            from quant.scan import main as scan

            return scan(DryRunRequested(spec.name, str(model_path)).scan_argv)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"python -m server: error: {exc}\n")
        return 2
    if config.policy == "debug":
        logger.warning("serving the DEBUGGING policy: deterministic actions from no model")
    if config.replicas > 1:
        return _serve_replicas(config, argv, curve_setup)

    def build() -> Policy:
        """Runs on the inference thread while the socket already answers ping with status "loading"."""
        delay = float(os.environ.get(LOAD_DELAY_ENV, "0") or 0)
        if delay > 0:  # tests of the loading state: a slow load without a big model
            time.sleep(delay)
        if config.torch_threads and config.policy != "debug":  # the debug policy never loads torch
            import torch

            torch.set_num_threads(config.torch_threads)
        return create_policy(config)

    from server.app import PolicyServer

    server = PolicyServer(config, curve_setup=curve_setup, policy_factory=build)
    try:
        import uvloop

        uvloop.run(server.serve())
    except ImportError:  # pragma: no cover - uvloop is a hard dependency of the server extra
        import asyncio

        logger.warning("uvloop is not installed; falling back to the default asyncio loop")
        asyncio.run(server.serve())
    except OSError as exc:
        sys.stderr.write(f"python -m server: error: cannot serve on {config.endpoint}: {exc}\n")
        return 1
    exc = server.load_error
    if exc is None:
        return 0
    if isinstance(exc, (ConfigError, ValueError, FileNotFoundError)):
        sys.stderr.write(f"python -m server: error: {exc}\n")
        return 2
    if isinstance(exc, CheckpointError):  # a bad checkpoint: one clear line naming the file, not a traceback
        sys.stderr.write(f"python -m server: error: --model-path: {exc}\n")
        return 2
    logger.error("loading the policy failed", exc_info=exc)
    return 1


def _serve_replicas(config: ServerConfig, argv: Sequence[str], curve_setup: object) -> int:
    """``--replicas N`` / ``--replica-endpoints``: the front process of :mod:`server.replicas`."""
    import zmq

    from server.replicas import ReplicaBroker, build_replicas

    try:
        replicas = build_replicas(config, argv)
    except ConfigError as exc:
        sys.stderr.write(f"python -m server: error: {exc}\n")
        return 2
    try:
        return ReplicaBroker(config, replicas, curve_setup=curve_setup).serve()
    except zmq.ZMQError as exc:
        sys.stderr.write(f"python -m server: error: cannot serve on {config.endpoint}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
