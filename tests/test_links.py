from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tasks.links import probabilities, sigmoid, softmax

finite = st.floats(allow_nan=False, allow_infinity=False)
moderate = st.floats(min_value=-30, max_value=30, exclude_min=True, exclude_max=True)


@given(st.lists(finite, min_size=1, max_size=50))
def test_sigmoid_lies_in_0_1_and_is_monotone(xs: list[float]) -> None:
    x = np.sort(np.asarray(xs, dtype=np.float64))
    p = sigmoid(x)
    assert p.shape == x.shape
    assert ((p >= 0.0) & (p <= 1.0)).all()
    assert (np.diff(p) >= 0.0).all()


@given(st.lists(moderate, min_size=1, max_size=50))
def test_sigmoid_is_the_logistic_function(xs: list[float]) -> None:
    x = np.asarray(xs, dtype=np.float64)
    np.testing.assert_allclose(sigmoid(x), 1.0 / (1.0 + np.exp(-x)), rtol=0, atol=1e-12)


@st.composite
def score_rows(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """An (n, K) matrix of raw scores and one constant per row."""
    n = draw(st.integers(min_value=1, max_value=20))
    k = draw(st.integers(min_value=2, max_value=6))
    raw = draw(arrays(np.float64, (n, k), elements=st.floats(min_value=-50, max_value=50)))
    shift = draw(arrays(np.float64, (n,), elements=st.floats(min_value=-100, max_value=100)))
    return raw, shift


@given(score_rows())
def test_softmax_rows_sum_to_1_and_ignore_a_constant_per_row(
    rows: tuple[np.ndarray, np.ndarray],
) -> None:
    raw, shift = rows
    probs = softmax(raw)
    assert probs.shape == raw.shape
    assert ((probs >= 0.0) & (probs <= 1.0)).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(softmax(raw + shift[:, None]), probs, rtol=0, atol=1e-12)


def test_probabilities_per_objective() -> None:
    raw = np.array([[-2.0], [0.0], [3.0]])
    np.testing.assert_array_equal(probabilities(raw, "binary", 1), sigmoid(raw.reshape(-1)))
    assert probabilities(raw, "binary", 1)[1] == 0.5
    np.testing.assert_array_equal(probabilities(raw, "regression", 1), raw.reshape(-1))
    multi = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    got = probabilities(multi, "multiclass", 3)
    np.testing.assert_array_equal(got, softmax(multi))
    assert got[1] == pytest.approx([1 / 3] * 3)
