"""Declarations of the built-in policies. Model-backed ones import torch and their model code lazily in ``load``.

Each declaration says what the policy is, which ``--policy-option`` options it takes (a typed dataclass), how its
model is loaded and how it is wrapped; :func:`server.policies.factory.build_policy` does the rest in the same
order for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import models
from client.libero.protocol import PREPROCESS_GR00T, PREPROCESS_OPENVLA
from client.settings import at_least, setting
from models.gr00t.action_head import INITIAL_NOISE
from models.gr00t.prompt import INSTRUCTION_LIST_REPR, INSTRUCTION_TEXTS
from models.openvla.data_config import GRIPPER_CONVENTIONS
from server.policies.base import Policy
from server.policies.debug import DEBUG_HORIZON, DebugPolicy
from server.policies.factory import PolicyContext, PolicySpec
from server.policies.options import CalibrationOptions, PolicyOptions
from server.policies.registry import register_policy

GR00T_DATA_CONFIGS = ("libero", "examples.Libero.custom_data_config:LiberoDataConfig")


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class DebugOptions(PolicyOptions):
    horizon: int = setting(DEBUG_HORIZON, check=at_least(1), help="chunk length of every reply")
    delay_ms: float = setting(0.0, check=at_least(0.0), help="simulated forward-pass time per batch")


@dataclass(frozen=True)
class OpenVLAOptions(CalibrationOptions):
    unnorm_key: str | None = setting(None, help="dataset statistics to unnormalise with (needed when the "
                                                "checkpoint has several)")
    center_crop: bool = setting(False, help="centre-crop 90% of the image area (for models trained with "
                                            "random crops)")
    gripper_convention: str | None = setting(None, choices=GRIPPER_CONVENTIONS,
                                             help="gripper convention of the actions (default: read from the "
                                                  "checkpoint's action statistics)")


@dataclass(frozen=True)
class OpenVLAOFTOptions(OpenVLAOptions):
    unnorm_key: str | None = setting(None, help="dataset statistics to unnormalise with (e.g. libero_spatial_no_noops;"
                                                " 'libero_spatial' finds its _no_noops key)")
    center_crop: bool = setting(True, help="centre-crop 90% of every image's area (upstream's LIBERO harness does, "
                                           "the released fine-tunes were trained with random crops)")
    num_images: int = setting(2, choices=(1, 2), help="images per observation: image (+ wrist_image)")
    chunk: int = setting(8, check=at_least(1), help="actions per chunk (NUM_ACTIONS_CHUNK the head was trained "
                                                    "with: 8 for LIBERO)")


@dataclass(frozen=True)
class GR00TOptions(CalibrationOptions):
    gripper_convention: str = setting("libero", choices=GRIPPER_CONVENTIONS,
                                      help="gripper convention of the actions")
    instruction_text: str = setting(INSTRUCTION_LIST_REPR, choices=INSTRUCTION_TEXTS,
                                    help="the instruction as the prompt's text item: 'list_repr' = \"['...']\" as "
                                         "upstream's Gr00tPolicy.get_action renders it (Isaac-GR00T 267e2dc..4af2b62,"
                                         " the LIBERO harness's numbers), 'plain' = the bare instruction as upstream "
                                         "trains (and serves at the N1.5 release 5e3ef5e)")
    initial_noise: str = setting("gaussian", choices=INITIAL_NOISE,
                                 help="where the Euler sampler starts: 'gaussian' = a fresh N(0, I) draw per chunk "
                                      "(upstream), 'zero' = the prior's mean, one deterministic chunk per "
                                      "observation (the shipped tiny GR00T is served with it: 196/300 "
                                      "libero_spatial episodes vs 146/300 with gaussian, paired 80 vs 30)")


@dataclass(frozen=True)
class OpenVLARSDOptions(CalibrationOptions):
    """RSD decoding is configured by the ``--rsd-*`` flags / ``RSD_*`` variables, not here."""


# ---------------------------------------------------------------------------------------------- load / wrap
def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_openvla(ctx: PolicyContext) -> Any:
    return models.load_pretrained("openvla", ctx.model_path, device=ctx.config.device,
                                  dtype=_torch_dtype(ctx.config.dtype))


def _wrap_openvla(ctx: PolicyContext, model: Any, quantization: dict[str, Any]) -> Policy:
    from server.policies.model_policies import OpenVLAPolicy

    o: OpenVLAOptions = ctx.options
    return OpenVLAPolicy(model, str(ctx.model_path), o.unnorm_key, o.center_crop, o.gripper_convention,
                         quantization)


def _load_openvla_oft(ctx: PolicyContext) -> Any:
    from models.openvla.oft import load

    return load(ctx.model_path, device=ctx.config.device, dtype=_torch_dtype(ctx.config.dtype),
                num_images=ctx.options.num_images, chunk=ctx.options.chunk)


def _wrap_openvla_oft(ctx: PolicyContext, model: Any, quantization: dict[str, Any]) -> Policy:
    from server.policies.openvla_oft import OpenVLAOFTPolicy

    o: OpenVLAOFTOptions = ctx.options
    return OpenVLAOFTPolicy(model, str(ctx.model_path), o.unnorm_key, o.center_crop, o.gripper_convention,
                            quantization)


def _load_gr00t(ctx: PolicyContext) -> Any:
    config = ctx.config
    if config.data_config is not None and config.data_config not in GR00T_DATA_CONFIGS:
        raise ValueError(f"--data-config {config.data_config!r} is not supported (use one of {GR00T_DATA_CONFIGS})")
    model = models.load_pretrained("gr00t", ctx.model_path, device=config.device, dtype=_torch_dtype(config.dtype))
    if config.embodiment_tag is not None:
        tags = model.config.embodiment_tag_mapping
        if config.embodiment_tag not in tags or config.embodiment_tag not in model.metadata:
            raise ValueError(f"--embodiment-tag {config.embodiment_tag!r} is not in this checkpoint "
                             f"(its metadata has: {', '.join(sorted(model.metadata))})")
        model.data_config.embodiment_tag = config.embodiment_tag
    if config.denoising_steps is not None:
        model.denoising_steps = config.denoising_steps
    model.instruction_text = ctx.options.instruction_text
    model.initial_noise = ctx.options.initial_noise
    return model


def _wrap_gr00t(ctx: PolicyContext, model: Any, quantization: dict[str, Any]) -> Policy:
    from server.policies.model_policies import GR00TPolicy

    return GR00TPolicy(model, str(ctx.model_path), ctx.options.gripper_convention, quantization)


def _load_openvla_rsd(ctx: PolicyContext) -> Any:
    from rsd.vla import load_openvla_rsd

    return load_openvla_rsd(ctx.model_path, device=ctx.config.device, dtype=_torch_dtype(ctx.config.dtype))


def _wrap_openvla_rsd(ctx: PolicyContext, model: Any, quantization: dict[str, Any]) -> Policy:
    from server.policies.model_policies import OpenVLARSDPolicy

    return OpenVLARSDPolicy(model, str(ctx.model_path), ctx.config.rsd, quantization)


def _wrap_debug(ctx: PolicyContext, model: Any, quantization: dict[str, Any]) -> Policy:
    return DebugPolicy(horizon=ctx.options.horizon, delay_ms=ctx.options.delay_ms)


# ---------------------------------------------------------------------------------------------- declarations
DEBUG = register_policy(PolicySpec(
    "debug", "deterministic debugging policy (no model)", _wrap_debug, DebugOptions))
OPENVLA = register_policy(PolicySpec(
    "openvla", "OpenVLA (Prismatic) from a local checkpoint, stock 7-token decoding", _wrap_openvla,
    OpenVLAOptions, load=_load_openvla, preprocess=PREPROCESS_OPENVLA))
OPENVLA_OFT = register_policy(PolicySpec(
    "openvla-oft", "OpenVLA-OFT from a local checkpoint (parallel decoding, L1-regression head, 8-step chunks; "
    "image + wrist_image + state)", _wrap_openvla_oft, OpenVLAOFTOptions, load=_load_openvla_oft,
    preprocess=PREPROCESS_OPENVLA))
GR00T = register_policy(PolicySpec(
    "gr00t", "GR00T N1.5 from a local checkpoint (flow-matching DiT action head)", _wrap_gr00t, GR00TOptions,
    load=_load_gr00t, preprocess=PREPROCESS_GR00T))
OPENVLA_RSD = register_policy(PolicySpec(
    "openvla-rsd", "OpenVLA + RFSQ layer head with residual speculative decoding (embedded default; decoding "
    "is set by the --rsd-* flags)",
    _wrap_openvla_rsd, OpenVLARSDOptions, load=_load_openvla_rsd,
    default_checkpoint=lambda: models.shipped_checkpoint(models.EMBEDDED_OPENVLA_RSD),
    checkpoint_hint="build it with scripts/train_default_model.sh"))
