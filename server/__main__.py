"""``python -m server``: parse config, load the policy, serve until SIGINT/SIGTERM (exit 0)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from server.config import ConfigError, parse_server_config

logger = logging.getLogger("server")


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
    curve_setup = None
    if config.curve_keys is not None:
        from server.security import curve_server_setup

        try:
            curve_setup = curve_server_setup(config.curve_keys)
        except (ConfigError, ValueError, OSError) as exc:
            sys.stderr.write(f"python -m server: error: --curve-keys: {exc}\n")
            return 2

    if config.torch_threads and config.policy != "debug":  # the debug policy never loads torch
        import torch

        torch.set_num_threads(config.torch_threads)
    from models.common.errors import CheckpointError

    try:
        policy = create_policy(config)
    except DryRunRequested as exc:  # GR00T_DUQUANT_DRYRUN=1: list the layers (the scan command), serve nothing
        from quant.scan import main as scan

        return scan(exc.scan_argv)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"python -m server: error: {exc}\n")
        return 2
    except CheckpointError as exc:  # a bad checkpoint: one clear line naming the file, not a traceback
        sys.stderr.write(f"python -m server: error: --model-path: {exc}\n")
        return 2
    if config.policy == "debug":
        logger.warning("serving the DEBUGGING policy: deterministic actions from no model")

    from server.app import PolicyServer

    server = PolicyServer(config, policy, curve_setup=curve_setup)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
