"""Link functions: raw scores (LightGBM's ``raw_score``) to probabilities."""

from __future__ import annotations

import numpy as np

from tasks.types import Objective


def sigmoid(raw: np.ndarray) -> np.ndarray:
    """Logistic function, as ``0.5 * (1 + tanh(x / 2))``: never overflows, exactly 0 or 1
    only where the float64 result rounds there."""
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * raw)))


def softmax(raw: np.ndarray) -> np.ndarray:
    """Row-wise softmax of an ``(n, K)`` array, shifted by each row's maximum."""
    z = np.exp(raw - raw.max(axis=1, keepdims=True))
    return np.asarray(z / z.sum(axis=1, keepdims=True))


def probabilities(raw: np.ndarray, objective: Objective, num_class: int) -> np.ndarray:
    """What a prediction reports for raw scores: binary, P(y = 1) of shape ``(n,)``;
    multiclass, the ``(n, num_class)`` class probabilities; regression, the raw score
    itself, of shape ``(n,)``."""
    raw = np.asarray(raw, dtype=np.float64)
    if objective == "binary":
        return sigmoid(raw.reshape(-1))
    if objective == "multiclass":
        return softmax(raw.reshape(-1, num_class))
    return raw.reshape(-1)
