"""DuQuant step shared by every model-backed policy: layer replacement and start-up calibration.

Parsing ``GR00T_DUQUANT_*`` happens once, before any weights are read, so a bad variable stops start-up
immediately. ``GR00T_DUQUANT_DRYRUN=1`` asks for the layer listing, which is the scan command's job
(``python -m quant.scan``, ``./test_duquant_dryrun.sh``): building a policy then raises :class:`DryRunRequested`
(a clear error carrying the scan command's arguments) instead of serving, and never ends the process itself;
``python -m server`` answers it by running the scan command.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.policies.base import Policy
    from server.policies.options import CalibrationOptions

logger = logging.getLogger(__name__)


class DryRunRequested(ValueError):
    """``GR00T_DUQUANT_DRYRUN=1`` was set while building a policy: the listing is ``python -m quant.scan``'s job."""

    def __init__(self, policy: str, model_path: str) -> None:
        self.scan_argv = ["--policy", policy, "--model-path", model_path]
        super().__init__(
            f"GR00T_DUQUANT_DRYRUN=1 asks for the DuQuant layer listing, not a policy: run "
            f"`python -m quant.scan {' '.join(self.scan_argv)}` (or ./test_duquant_dryrun.sh with the same "
            "arguments), or unset GR00T_DUQUANT_DRYRUN to serve")


def duquant_config_from_env(policy: str | None = None) -> Any:
    """The validated ``DuQuantConfig`` (raises ``DuQuantConfigError`` naming the bad variable), with ``policy``'s
    recommended values (``quant.patterns.POLICY_DEFAULTS``) under the environment."""
    from quant import DuQuantConfig

    return DuQuantConfig.from_env(policy=policy)


def apply_duquant(model: Any, config: Any, calibration: Iterable[Any] | None = None,
                  forward_fn: Callable[[Any, Any], Any] | None = None) -> dict[str, Any]:
    """Replace the selected Linear layers in place; calibrate on ``calibration`` batches if given.

    Returns the quantisation summary that goes into the server's ``metadata``.
    """
    if not getattr(config, "enabled", False):
        logger.info("DuQuant not enabled")
        return {"enabled": False}
    from quant import calibrate, quantized_layers, replace_linear_layers

    if getattr(config, "wopt", None) == "auto":
        # The default weight rounding: GPTQ when there is a calibration set, data-free RTN (clip search) without.
        config = config.replace(wopt="gptq" if calibration is not None else "clip")
    report = replace_linear_layers(model, config)
    calibrated = False
    if calibration is not None:
        if forward_fn is None:
            calibrate(model, calibration)
        else:
            calibrate(model, calibration, forward_fn)
        calibrated = True
    kinds = sorted({getattr(m, "weights_desc", "RTN") for m in quantized_layers(model).values()})
    if not calibrated:
        logger.info("[GR00T-DUQUANT] weights: RTN (data-free; no calibration set)")
    return {
        "enabled": True,
        "method": "duquant",
        "layers": len(report),
        "wbits_default": config.wbits_default,
        "abits": config.abits,
        "block": config.block,
        "permute": config.permute,
        "row_rot": config.row_rot,
        "wopt": getattr(config, "wopt", None),
        **{k: v for k in ("wbits_re", "abits_re", "act_pct_re") if (v := getattr(config, k, None))},
        "weights": "; ".join(kinds),
        "calibrated_at_startup": calibrated,
    }


def quantize_policy(policy: Policy, model: Any, dq: Any, calib: CalibrationOptions) -> dict[str, Any]:
    """``apply_duquant`` on ``model`` (already wrapped by ``policy``), calibrating through ``policy.infer`` on
    observations from ``calib.calib_data`` when given; returns the quantisation summary for the metadata reply."""
    if calib.calib_data is None or not getattr(dq, "enabled", False):
        if calib.calib_data is not None:
            logger.warning("calib_data=%s given but DuQuant is not enabled (no GR00T_DUQUANT_* set): ignored",
                           calib.calib_data)
        return apply_duquant(model, dq)
    from server.policies.calibration import calibration_observations

    observations = calibration_observations(calib.calib_data, calib.calib_n, calib.calib_seed)
    for obs in observations:
        policy.validate(obs)
    logger.info("[GR00T-DUQUANT] calibrating at start-up on %d demonstration observations from %s",
                len(observations), calib.calib_data)
    summary = apply_duquant(model, dq, calibration=observations, forward_fn=lambda _m, o: policy.infer([o]))
    policy.reset()  # calibration consumed the policy's sampling generator; serving starts from a clean state
    summary.update({"calibration_data": str(calib.calib_data), "calibration_observations": len(observations)})
    return summary


def quantize_model(model: Any, dq: Any, calib: CalibrationOptions | None,
                   calibration_policy: Callable[[], Policy]) -> dict[str, Any]:
    """The factory's quantisation step, between loading the model and wrapping it in its serving policy.

    Calibration observations must reach the model through the policy's own preprocessing (its ``infer``: image
    handling, GR00T's every Euler step), so when there is calibration data a provisional policy is made from
    ``calibration_policy()`` to drive the model, then closed; the serving policy is built afterwards, with the
    final report, on the quantised model (so e.g. RSD's pass-cost timings measure the quantised layers).
    """
    if calib is None or calib.calib_data is None or not getattr(dq, "enabled", False):
        if calib is not None and calib.calib_data is not None:
            logger.warning("calib_data=%s given but DuQuant is not enabled (no GR00T_DUQUANT_* set): ignored",
                           calib.calib_data)
        return apply_duquant(model, dq)
    driver = calibration_policy()
    try:
        return quantize_policy(driver, model, dq, calib)
    finally:
        driver.close()
