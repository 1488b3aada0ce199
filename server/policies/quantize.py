"""DuQuant hook shared by every model-backed policy: dry-run scan, layer replacement, calibration.

Parsing ``GR00T_DUQUANT_*`` happens once, before any weights are read, so a bad variable stops
start-up immediately. ``GR00T_DUQUANT_DRYRUN=1`` builds the architecture on the meta device (no
weights are loaded), prints the layer listing and ends the process with exit code 0.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)


def duquant_config_from_env() -> Any:
    """The validated ``DuQuantConfig`` (raises ``DuQuantConfigError`` naming the bad variable)."""
    from quant import DuQuantConfig

    return DuQuantConfig.from_env()


def dry_run_if_requested(config: Any, build_meta_model: Callable[[], Any]) -> None:
    """Print ``[GR00T-DUQUANT][DRYRUN]`` lines for the meta-device model and exit 0, if DRYRUN is set."""
    if not getattr(config, "dryrun", False):
        return
    from quant import scan_model

    for line in scan_model(build_meta_model(), config):
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    raise SystemExit(0)


def apply_duquant(model: Any, config: Any, calibration: Iterable[Any] | None = None,
                  forward_fn: Callable[[Any, Any], Any] | None = None) -> dict[str, Any]:
    """Replace the selected Linear layers in place; calibrate on ``calibration`` batches if given.

    Returns the quantisation summary that goes into the server's ``metadata``.
    """
    if not getattr(config, "enabled", False):
        logger.info("DuQuant not enabled")
        return {"enabled": False}
    from quant import calibrate, replace_linear_layers

    report = replace_linear_layers(model, config)
    calibrated = False
    if calibration is not None:
        if forward_fn is None:
            calibrate(model, calibration)
        else:
            calibrate(model, calibration, forward_fn)
        calibrated = True
    return {
        "enabled": True,
        "method": "duquant",
        "layers": len(report),
        "wbits_default": config.wbits_default,
        "abits": config.abits,
        "block": config.block,
        "permute": config.permute,
        "row_rot": config.row_rot,
        "calibrated_at_startup": calibrated,
    }
