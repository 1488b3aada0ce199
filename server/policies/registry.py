"""Name → factory registry, so the server CLI can load any policy by ``--policy NAME``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.policies.base import Policy

PolicyFactory = Callable[["ServerConfig"], "Policy"]
_REGISTRY: dict[str, tuple[PolicyFactory, str]] = {}


def register_policy(name: str, description: str = "") -> Callable[[PolicyFactory], PolicyFactory]:
    def decorator(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} is registered twice")
        _REGISTRY[name] = (factory, description)
        return factory

    return decorator


def available_policies() -> dict[str, str]:
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def create_policy(config: ServerConfig) -> Policy:
    try:
        factory, _ = _REGISTRY[config.policy]
    except KeyError:
        raise ValueError(
            f"--policy {config.policy!r} is not registered (available: {', '.join(available_policies())})"
        ) from None
    return factory(config)
