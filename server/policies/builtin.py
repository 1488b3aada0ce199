"""Registration of the built-in policies. Model-backed ones import torch lazily inside the factory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.policies.debug import DebugPolicy
from server.policies.registry import register_policy

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.policies.base import Policy


@register_policy("debug", "deterministic debugging policy (no model)")
def _make_debug(config: ServerConfig) -> Policy:
    options = dict(config.policy_options)
    values: dict[str, float] = {}
    for key, default, kind in (("horizon", 8, int), ("delay_ms", 0.0, float)):
        raw = options.pop(key, default)
        try:
            values[key] = kind(raw)
        except ValueError:
            raise ValueError(f"--policy-option {key}={raw!r} is not a valid {kind.__name__}") from None
    horizon, delay_ms = int(values["horizon"]), float(values["delay_ms"])
    if options:
        raise ValueError(f"--policy-option: unknown option(s) for debug: {', '.join(sorted(options))}")
    if horizon <= 0 or delay_ms < 0:
        raise ValueError("--policy-option: horizon must be > 0 and delay_ms >= 0")
    return DebugPolicy(horizon=horizon, delay_ms=delay_ms)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _require_model_path(config: ServerConfig) -> str:
    if config.model_path is None:
        raise ValueError(f"--policy {config.policy} needs --model-path DIR (a local checkpoint directory)")
    return config.model_path


def _option(options: dict[str, Any], key: str, allowed: tuple[str, ...] | None = None) -> str | None:
    value = options.pop(key, None)
    if value is not None and allowed is not None and value not in allowed:
        raise ValueError(f"--policy-option {key}={value!r}: expected one of {', '.join(allowed)}")
    return value


def _no_leftovers(config: ServerConfig, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(f"--policy-option: unknown option(s) for {config.policy}: {', '.join(sorted(options))}")


@register_policy("openvla", "OpenVLA (Prismatic) from a local checkpoint, stock 7-token decoding")
def _make_openvla(config: ServerConfig) -> Policy:
    from server.policies.calibration import pop_calibration_options, quantize_policy
    from server.policies.model_policies import GRIPPER_CONVENTIONS, OpenVLAPolicy
    from server.policies.quantize import dry_run_if_requested, duquant_config_from_env

    path = _require_model_path(config)
    options = dict(config.policy_options)
    unnorm_key = _option(options, "unnorm_key")
    center_crop = _option(options, "center_crop", ("0", "1")) == "1"
    gripper = _option(options, "gripper_convention", GRIPPER_CONVENTIONS)
    calib = pop_calibration_options(options)  # calib_data=GLOB, calib_n=N (server/policies/calibration.py)
    _no_leftovers(config, options)
    dq = duquant_config_from_env()
    import models

    dry_run_if_requested(dq, lambda: models.build_for_scan("openvla", path))
    model = models.load_pretrained("openvla", path, device=config.device, dtype=_torch_dtype(config.dtype))
    policy = OpenVLAPolicy(model, path, unnorm_key, center_crop, gripper, {})
    policy.quantization = quantize_policy(policy, model, dq, calib)
    return policy


GR00T_DATA_CONFIGS = ("libero", "examples.Libero.custom_data_config:LiberoDataConfig")


@register_policy("gr00t", "GR00T N1.5 from a local checkpoint (flow-matching DiT action head)")
def _make_gr00t(config: ServerConfig) -> Policy:
    from server.policies.calibration import pop_calibration_options, quantize_policy
    from server.policies.model_policies import GRIPPER_CONVENTIONS, GR00TPolicy
    from server.policies.quantize import dry_run_if_requested, duquant_config_from_env

    path = _require_model_path(config)
    if config.data_config is not None and config.data_config not in GR00T_DATA_CONFIGS:
        raise ValueError(f"--data-config {config.data_config!r} is not supported (use one of {GR00T_DATA_CONFIGS})")
    options = dict(config.policy_options)
    gripper = _option(options, "gripper_convention", GRIPPER_CONVENTIONS) or "libero"
    calib = pop_calibration_options(options)  # calib_data=GLOB, calib_n=N (server/policies/calibration.py)
    _no_leftovers(config, options)
    dq = duquant_config_from_env()
    import models

    dry_run_if_requested(dq, lambda: models.build_for_scan("gr00t", path))
    model = models.load_pretrained("gr00t", path, device=config.device, dtype=_torch_dtype(config.dtype))
    if config.embodiment_tag is not None:
        tags = model.config.embodiment_tag_mapping
        if config.embodiment_tag not in tags or config.embodiment_tag not in model.metadata:
            raise ValueError(f"--embodiment-tag {config.embodiment_tag!r} is not in this checkpoint "
                             f"(its metadata has: {', '.join(sorted(model.metadata))})")
        model.data_config.embodiment_tag = config.embodiment_tag
    if config.denoising_steps is not None:
        model.denoising_steps = config.denoising_steps
    policy = GR00TPolicy(model, path, gripper, {})
    policy.quantization = quantize_policy(policy, model, dq, calib)
    return policy


@register_policy("openvla-rsd", "OpenVLA + RFSQ layer head with residual speculative decoding (embedded default)")
def _make_openvla_rsd(config: ServerConfig) -> Policy:
    from server.config import EMBEDDED_MODEL_DIR
    from server.policies.calibration import pop_calibration_options, quantize_policy
    from server.policies.model_policies import OpenVLARSDPolicy
    from server.policies.quantize import dry_run_if_requested, duquant_config_from_env

    path = config.model_path or str(EMBEDDED_MODEL_DIR)
    if config.model_path is None and not (EMBEDDED_MODEL_DIR / "config.json").is_file():
        raise ValueError(f"--policy openvla-rsd without --model-path needs the embedded checkpoint at "
                         f"{EMBEDDED_MODEL_DIR} (build it with scripts/train_default_model.sh)")
    options = dict(config.policy_options)
    calib = pop_calibration_options(options)  # calib_data=GLOB, calib_n=N (server/policies/calibration.py)
    _no_leftovers(config, options)
    dq = duquant_config_from_env()
    import models

    dry_run_if_requested(dq, lambda: models.build_for_scan("openvla-rsd", path))
    from rsd.vla import load_openvla_rsd

    model = load_openvla_rsd(path, device=config.device, dtype=_torch_dtype(config.dtype))
    policy = OpenVLARSDPolicy(model, path, config.rsd, {})
    policy.quantization = quantize_policy(policy, model, dq, calib)
    return policy
