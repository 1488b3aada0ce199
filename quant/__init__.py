"""DuQuant W4A8 fake quantisation for any torch model, configured by ``GR00T_DUQUANT_*`` variables.

Typical use (the server does this right after loading a model)::

    from quant import DuQuantConfig, replace_linear_layers, calibrate, scan_model
    cfg = DuQuantConfig.from_env()            # raises DuQuantConfigError naming a bad variable
    if cfg.dryrun:
        print("\\n".join(scan_model(model, cfg))); raise SystemExit(0)
    replace_linear_layers(model, cfg)          # logs [GR00T-DUQUANT][REPLACED] ... and the total
    calibrate(model, batches, forward_fn)      # optional: otherwise layers calibrate lazily on first use
"""

from quant.calibration import calibrate
from quant.config import DuQuantConfig, DuQuantConfigError
from quant.linear import DuQuantLinear, FakeQuantLinear, RTNLinear, SmoothQuantLinear
from quant.replace import ReplacedLayer, quantized_layers, replace_linear_layers, scan_model

__all__ = [
    "DuQuantConfig",
    "DuQuantConfigError",
    "DuQuantLinear",
    "FakeQuantLinear",
    "RTNLinear",
    "ReplacedLayer",
    "SmoothQuantLinear",
    "calibrate",
    "quantized_layers",
    "replace_linear_layers",
    "scan_model",
]
