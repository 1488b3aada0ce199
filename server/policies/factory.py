"""The one policy factory: a small declaration per policy kind and one function that builds any of them.

Every policy is built in the same order by :func:`build_policy`:

1. check the typed options of ``--policy-option KEY=VALUE`` (``server/policies/options.py``) and resolve the
   checkpoint directory (``--model-path``, or the declaration's shipped default);
2. fill in the serving settings the checkpoint carries (``serving.json``, under the user's own flags:
   ``server/policies/serving_defaults.py``) and parse the options that result;
3. read ``GR00T_DUQUANT_*`` (before any weights, so a bad variable fails at once; ``DRYRUN`` raises
   :class:`~server.policies.quantize.DryRunRequested`, the listing being ``python -m quant.scan``'s job);
4. load the model (the declaration's ``load``);
5. quantise it (DuQuant, calibrated on ``calib_data`` when given);
6. wrap it in its :class:`Policy`, the quantisation report passed to the constructor;
7. set what it advertises to LIBERO clients: the image path (``--policy-option libero_preprocess``, else the
   declaration's), the execution horizon (``replan_steps``, at most its chunk) and the checkpoint's digest.

A declaration without ``load`` (the debugging policy) has no model: steps 3-5 are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.libero.protocol import PREPROCESS_NONE
from models.common.digest import checkpoint_digest
from server.policies.options import (
    KIND_DEFAULT,
    CalibrationOptions,
    PolicyOptions,
    describe_options,
    parse_options,
)
from server.policies.serving_defaults import apply_serving_defaults, read_serving_defaults

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.policies.base import Policy

NO_QUANTIZATION: dict[str, Any] = {"enabled": False}
# What the provisional policy that drives start-up calibration reports; it never serves a request.
CALIBRATING: dict[str, Any] = {"enabled": True, "calibrating": True}


@dataclass(frozen=True)
class PolicyContext:
    """What a declaration's ``load`` and ``wrap`` see: the server settings, the parsed options, the checkpoint."""

    config: ServerConfig
    options: Any  # an instance of the declaration's ``options`` class
    model_path: str | None


@dataclass(frozen=True)
class PolicySpec:
    """One policy kind: its name, what it is, its options, how to load its model and how to wrap it.

    ``load(ctx) -> model`` (``None``: the policy has no model); ``wrap(ctx, model, quantization) -> Policy``.
    ``default_checkpoint`` gives the shipped checkpoint used without ``--model-path`` (``None``: the flag is
    required), ``checkpoint_hint`` says how to get it when it is missing. ``preprocess`` is the LIBERO image path
    a released checkpoint of this kind was evaluated with upstream (``client.libero.protocol.PREPROCESS_*``),
    advertised in ``metadata["preprocess"]`` unless the ``libero_preprocess`` option says otherwise.
    """

    name: str
    description: str
    wrap: Callable[[PolicyContext, Any, dict[str, Any]], Policy]
    options: type = PolicyOptions
    load: Callable[[PolicyContext], Any] | None = None
    default_checkpoint: Callable[[], Path] | None = None
    checkpoint_hint: str = ""
    preprocess: str = PREPROCESS_NONE

    def describe(self) -> str:
        """The ``--list-policies`` entry: name, description, then every option with type, default and help."""
        lines = [f"{self.name:16s} {self.description}"]
        options = describe_options(self.options)
        lines += [f"    --policy-option {line}" for line in options] or ["    (no --policy-option options)"]
        return "\n".join(lines)


def resolve_model_path(spec: PolicySpec, config: ServerConfig) -> str | None:
    """``--model-path``, else the shipped default checkpoint; an error says which flag is missing."""
    if spec.load is None:
        return config.model_path
    if config.model_path is not None:
        return config.model_path
    if spec.default_checkpoint is None:
        raise ValueError(f"--policy {spec.name} needs --model-path DIR (a local checkpoint directory)")
    path = spec.default_checkpoint()
    if not (path / "config.json").is_file():
        raise ValueError(f"--policy {spec.name} without --model-path needs the shipped checkpoint at {path}"
                         + (f" ({spec.checkpoint_hint})" if spec.checkpoint_hint else ""))
    return str(path)


def build_policy(spec: PolicySpec, config: ServerConfig) -> Policy:
    """Build the policy ``spec`` declares: options -> checkpoint -> DuQuant settings -> load -> quantise -> wrap."""
    from server.policies.quantize import DryRunRequested, duquant_config_from_env, quantize_model

    parse_options(spec.options, config.policy_options, spec.name)  # the user's own options fail before any file read
    path = resolve_model_path(spec, config)
    config, applied = apply_serving_defaults(config, spec.name, spec.options, read_serving_defaults(path))
    options = parse_options(spec.options, config.policy_options, spec.name)
    ctx = PolicyContext(config, options, path)
    if spec.load is None:
        policy = spec.wrap(ctx, None, dict(NO_QUANTIZATION))
    else:
        dq = duquant_config_from_env(spec.name)
        if dq.dryrun:
            raise DryRunRequested(spec.name, str(path))
        model = spec.load(ctx)
        calib = options if isinstance(options, CalibrationOptions) else None
        report = quantize_model(model, dq, calib, lambda: spec.wrap(ctx, model, dict(CALIBRATING)))
        policy = spec.wrap(ctx, model, report)
    policy.preprocess = spec.preprocess if options.libero_preprocess == KIND_DEFAULT else options.libero_preprocess
    policy.checkpoint_digest = checkpoint_digest(path) if path is not None else None
    policy.serving_defaults = applied
    if options.replan_steps:
        horizon = int(policy.metadata().get("action_horizon") or 0)
        if options.replan_steps > horizon:
            policy.close()
            raise ValueError(f"--policy-option replan_steps={options.replan_steps} is more than the {horizon} "
                             f"actions of a {spec.name} chunk")
        policy.replan_steps = options.replan_steps
    return policy
