"""Name -> policy declaration registry, so the server CLI can load any policy by ``--policy NAME``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.policies.factory import PolicySpec, build_policy

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.policies.base import Policy

_REGISTRY: dict[str, PolicySpec] = {}


def register_policy(spec: PolicySpec) -> PolicySpec:
    """Make ``spec`` loadable as ``--policy spec.name``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"policy {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def available_policies() -> dict[str, str]:
    """``name -> description`` of every registered policy, sorted by name."""
    return {name: spec.description for name, spec in sorted(_REGISTRY.items())}


def policy_spec(name: str) -> PolicySpec:
    """The declaration registered as ``name``; an unknown name lists the registered ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"--policy {name!r} is not registered (available: {', '.join(available_policies())})"
        ) from None


def describe_policies() -> str:
    """What ``--list-policies`` prints: every policy with its ``--policy-option`` options (type, default, help)."""
    return "\n".join(spec.describe() for _, spec in sorted(_REGISTRY.items())) + "\n"


def create_policy(config: ServerConfig) -> Policy:
    """Build ``config.policy`` through the one factory (:func:`server.policies.factory.build_policy`)."""
    return build_policy(policy_spec(config.policy), config)
