"""Temporal ensembling of overlapping action chunks (ACT's, Zhao et al. 2023), client side.

A chunked policy asked every ``replan`` steps returns ``horizon`` actions each time, so with ``replan < horizon``
every step is predicted by up to ``ceil(horizon / replan)`` queries made from different observations. Executing
only the newest prediction (the plain ``--replan`` loop) throws the older ones away; ensembling executes their
weighted mean instead, ``w_k = exp(-m * k)`` over the predictions of one step with ``k = 0`` the oldest (ACT's
rule: ``m > 0`` favours older predictions, ``m = 0`` weighs them equally, ``m < 0`` favours the newest). The
mean smooths the jitter between independent samples of a stochastic decoder (GR00T's flow matching) and of a
discrete one (RFSQ codes) while every query still corrects drift. The gripper is averaged like the arm: LIBERO's
Panda gripper acts on the sign of its command only, so the mean is a weighted vote.

Nothing here touches the server: it is one more way for the client to execute the chunks it already gets.
"""

from __future__ import annotations

import math

import numpy as np


class TemporalEnsemble:
    """The chunks of one episode, keyed by the step their first action is for; :meth:`actions` mixes them."""

    def __init__(self, decay: float) -> None:
        if not math.isfinite(decay):
            raise ValueError(f"ensemble decay must be finite, got {decay}")
        self.decay = float(decay)
        self._chunks: list[tuple[int, np.ndarray]] = []  # (first step, chunk [H, D]), oldest first

    def reset(self) -> None:
        self._chunks.clear()

    def add(self, step: int, chunk: np.ndarray) -> None:
        """Record ``chunk`` (``[H, D]``, in the env's convention) as predicted at ``step`` for steps ``step..``."""
        a = np.asarray(chunk, dtype=np.float64)
        if a.ndim != 2 or len(a) == 0:
            raise ValueError(f"expected a non-empty [horizon, dim] chunk, got shape {a.shape}")
        if self._chunks and (step < self._chunks[-1][0] or a.shape[1] != self._chunks[-1][1].shape[1]):
            raise ValueError("chunks must come in step order with one action dimension")
        # chunks that no longer cover this step or any later one are dropped, so memory stays O(horizon / replan)
        self._chunks = [(s, c) for s, c in self._chunks if s + len(c) > step]
        self._chunks.append((int(step), a))

    def action(self, step: int) -> np.ndarray:
        """The weighted mean of every recorded prediction for ``step``."""
        preds = [c[step - s] for s, c in self._chunks if s <= step < s + len(c)]
        if not preds:
            raise ValueError(f"no recorded chunk covers step {step}")
        w = np.exp(-self.decay * np.arange(len(preds), dtype=np.float64))
        return (np.tensordot(w / w.sum(), np.stack(preds), axes=1)).astype(np.float32)

    def actions(self, step: int, n: int) -> list[np.ndarray]:
        """The ensembled actions for steps ``step .. step + n - 1``."""
        return [self.action(step + i) for i in range(n)]
