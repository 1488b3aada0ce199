"""A deterministic debugging policy: no model, actions computed from the observation.

It exists so the server, the wire and the LIBERO client can be exercised end to end before (or
without) a trained model, and so tests can check that every reply belongs to its request: the
chunk is a pure function of the observation (see :func:`expected_debug_actions`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from server.policies.base import Policy, PolicyInputError, PolicyOutput

DEBUG_HORIZON = 8
DEBUG_ACTION_DIM = 7
FAIL_INSTRUCTION = "__debug_policy_raise__"


def expected_debug_actions(obs: dict[str, Any], horizon: int = DEBUG_HORIZON) -> np.ndarray:
    """The chunk the debug policy returns for ``obs``: small, smooth, and unique per state.

    ``a[h, j] = 0.01 * tanh(state[j mod n]) + 0.001 * h`` for the 6 motion dims and the gripper held
    open (-1), plus ``image[::8, ::8].mean()/255 * 1e-3`` on dim 0 so a different image changes the reply too.
    """
    state = np.asarray(obs.get("state", np.zeros(1, np.float32)), dtype=np.float64).reshape(-1)
    if state.size == 0:
        state = np.zeros(1)
    motion = DEBUG_ACTION_DIM - 1
    per_dim = 0.01 * np.tanh(state[np.arange(motion) % state.size])
    actions = np.empty((horizon, DEBUG_ACTION_DIM), dtype=np.float64)
    actions[:, :motion] = per_dim[None, :] + 0.001 * np.arange(horizon)[:, None]
    image = obs.get("image")
    if isinstance(image, np.ndarray) and image.size:
        actions[:, 0] += float(image[::8, ::8].mean()) / 255.0 * 1e-3  # subsampled: keep the policy ~free
    actions[:, -1] = -1.0
    return actions.astype(np.float32)


class DebugPolicy(Policy):
    """Deterministic, model-free; named as such in metadata and logs."""

    name = "debug"

    def __init__(self, horizon: int = DEBUG_HORIZON, delay_ms: float = 0.0) -> None:
        self.horizon = horizon
        self.delay_ms = delay_ms  # simulated forward-pass time per batch, for batching/timeout tests
        self.calls = 0

    def validate(self, obs: dict[str, Any]) -> None:
        state = obs.get("state")
        if state is not None and (not isinstance(state, np.ndarray) or state.ndim != 1 or state.dtype.kind != "f"):
            raise PolicyInputError("obs['state'] must be a 1-D float array")
        instruction = obs.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise PolicyInputError("obs['instruction'] must be a string")

    def infer(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        self.calls += 1
        if any(o.get("instruction") == FAIL_INSTRUCTION for o in observations):
            # A deliberate failure, so tests can check that one bad request does not take down the rest.
            raise RuntimeError("debug policy asked to fail")
        if self.delay_ms > 0:
            time.sleep(self.delay_ms / 1000.0)
        return [PolicyOutput(actions=expected_debug_actions(o, self.horizon)) for o in observations]

    def metadata(self) -> dict[str, Any]:
        return {
            "model_id": "debug-deterministic",
            "policy": "debug",
            "kind": "debugging policy (no model; deterministic function of the observation)",
            "action_horizon": self.horizon,
            "action_dim": DEBUG_ACTION_DIM,
            "gripper_convention": "libero",
            "quantization": {"enabled": False},
        }
