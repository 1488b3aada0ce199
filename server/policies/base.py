"""The one interface every policy implements: a batch of observations in, a batch of chunks out."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from client.libero.protocol import PREPROCESS_NONE


class PolicyInputError(ValueError):
    """An observation the policy cannot use (missing key, wrong shape); answered as ``bad_request``."""


@dataclass
class PolicyOutput:
    """One action chunk plus per-request diagnostics sent back in the reply."""

    actions: np.ndarray  # float32 [H, action_dim], in the convention named by metadata()["gripper_convention"]
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"rsd": {...acceptance stats...}}


class Policy(abc.ABC):
    """A loaded model that maps observations to action chunks.

    ``infer`` receives a *batch* (several clients' requests stacked by the server's dynamic batcher)
    and must return one output per observation, in order. It runs on the server's single inference
    thread, never on the event loop, so it may block.

    These methods are everything the server calls; it calls them directly (no probing for optional ones), so a
    policy that needs nothing for a hook simply inherits the default.
    """

    name: str = "policy"
    #: The LIBERO client image path the checkpoint expects (``client.libero.protocol.PREPROCESS_*``), set by the
    #: policy factory and sent as ``metadata["preprocess"]`` so the evaluation client follows it by default.
    preprocess: str = PREPROCESS_NONE
    #: Content fingerprint of the checkpoint directory (:func:`models.common.digest.checkpoint_digest`), set by the
    #: policy factory; an evaluation records it and ``--resume`` refuses another one. ``None``: no checkpoint.
    checkpoint_digest: str | None = None
    #: Actions of a chunk a LIBERO client executes before asking again (``--policy-option replan_steps``), sent as
    #: ``metadata["replan_steps"]`` when set; ``None``: the whole chunk.
    replan_steps: int | None = None
    #: The settings taken from the checkpoint's ``serving.json`` (``server/policies/serving_defaults.py``), set by
    #: the policy factory and sent as ``metadata["serving_defaults"]`` when any were applied.
    serving_defaults: dict[str, Any] | None = None

    def served_metadata(self) -> dict[str, Any]:
        """:meth:`metadata` plus what the server adds for every policy (``preprocess``, ``checkpoint_digest``,
        ``replan_steps`` and ``serving_defaults`` when set)."""
        meta = {**self.metadata(), "preprocess": self.preprocess, "checkpoint_digest": self.checkpoint_digest}
        if self.replan_steps:
            meta["replan_steps"] = self.replan_steps
        if self.serving_defaults:
            meta["serving_defaults"] = dict(self.serving_defaults)
        return meta

    def validate(self, obs: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PolicyInputError` if ``obs`` is unusable. Called on the event loop: keep it cheap."""

    @abc.abstractmethod
    def infer(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        ...

    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """Model id, kind, action horizon/dim, gripper convention, quantisation summary (fixed at start-up)."""

    def live_metadata(self) -> dict[str, Any]:
        """Entries that change while serving (e.g. running RSD acceptance), merged into every metadata reply."""
        return {}

    def reset(self) -> None:  # noqa: B027 - stateless policies need nothing
        """Forget any per-episode state."""

    def close(self) -> None:  # noqa: B027
        """Release resources at shutdown."""
