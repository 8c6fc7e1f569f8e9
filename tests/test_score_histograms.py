"""The pooled AUC from the parties' score histograms against sklearn on the pooled scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tasks.horizontal.score_histograms import (
    HISTOGRAM_BINS,
    LabelHistogram,
    ScoreHistogram,
    pooled_auc,
    score_histogram,
    sum_histograms,
)
from tasks.horizontal.training import aggregate_metrics, evaluate
from tasks.links import sigmoid, softmax


def _parties(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four parties' (labels, raw scores) under label skew; party d holds one class only."""
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for party, n, rate, shift in (("a", 900, 0.1, -1.0), ("b", 400, 0.6, 0.5), ("c", 60, 0.3, 0)):
        y = (rng.random(n) < rate).astype(np.float64)
        out[party] = (y, shift + 1.2 * y + rng.normal(size=n))
    out["d"] = (np.zeros(150), rng.normal(size=150) - 0.5)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_auc_matches_sklearn_on_the_pooled_scores_within_its_bound(seed: int) -> None:
    parties = _parties(seed)
    hists = {p: score_histogram(y, raw, "binary", 1) for p, (y, raw) in parties.items()}
    summed = sum_histograms({p: h for p, h in hists.items() if h is not None})
    assert summed is not None
    got = pooled_auc(summed)
    y = np.concatenate([y for y, _ in parties.values()])
    p = sigmoid(np.concatenate([raw for _, raw in parties.values()]))
    exact = float(roc_auc_score(y, p))
    assert 0 <= got["auc_bound"] < 1e-3
    assert abs(got["auc"] - exact) <= got["auc_bound"] + 1e-12
    # the one-class party has no AUC of its own but its rows count in the pooled figure
    assert "auc" not in evaluate(*parties["d"], "binary", 1)
    without_d = {k: v for k, v in parties.items() if k != "d"}
    y3 = np.concatenate([y for y, _ in without_d.values()])
    p3 = sigmoid(np.concatenate([raw for _, raw in without_d.values()]))
    assert abs(exact - float(roc_auc_score(y3, p3))) > 2 * got["auc_bound"]
    # the coordinator's figures: pooled AUC and, labelled apart, the size-weighted mean
    agg = aggregate_metrics(
        {k: (len(y), evaluate(y, raw, "binary", 1)) for k, (y, raw) in parties.items()}, hists
    )
    assert agg["auc"] == got["auc"] and agg["auc_bound"] == got["auc_bound"]
    assert agg["auc_weighted_mean"] != pytest.approx(agg["auc"], abs=1e-3)


def test_the_bound_is_attained_by_ties_and_coarse_bins_still_hold_it() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(3000) < 0.3).astype(np.float64)
    raw = 0.8 * y + rng.normal(size=3000)
    exact = float(roc_auc_score(y, sigmoid(raw)))
    for bins in (1, 2, 16, 256, HISTOGRAM_BINS):
        h = score_histogram(y, raw, "binary", 1, bins=bins)
        assert h is not None
        got = pooled_auc(h)
        assert abs(got["auc"] - exact) <= got["auc_bound"] + 1e-12
    one_bin = score_histogram(y, raw, "binary", 1, bins=1)
    assert one_bin is not None
    assert pooled_auc(one_bin) == {"auc": 0.5, "auc_bound": 0.5}


def test_multiclass_macro_one_vs_rest_matches_sklearn_within_its_bound() -> None:
    rng = np.random.default_rng(3)
    parts = []
    for n, prior in ((500, [0.7, 0.2, 0.1]), (300, [0.1, 0.3, 0.6]), (80, [1.0, 0.0, 0.0])):
        y = rng.choice(3, size=n, p=prior).astype(np.float64)
        raw = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y.astype(int)]
        parts.append((y, raw))
    hists = {str(i): score_histogram(y, raw, "multiclass", 3) for i, (y, raw) in enumerate(parts)}
    summed = sum_histograms({p: h for p, h in hists.items() if h is not None})
    assert summed is not None
    got = pooled_auc(summed)
    y = np.concatenate([y for y, _ in parts])
    probs = softmax(np.concatenate([raw for _, raw in parts]))
    exact = float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert abs(got["auc"] - exact) <= got["auc_bound"] + 1e-12


def test_the_message_holds_counts_only_and_is_checked() -> None:
    y = np.array([0.0, 1.0, 1.0, 0.0])
    raw = np.array([-2.0, 0.5, 0.5, 3.0])
    h = score_histogram(y, raw, "binary", 1)
    assert h is not None
    body = h.model_dump()
    assert set(body) == {"bins", "classes"}
    assert set(body["classes"][0]) == {"index", "positives", "negatives"}
    assert sum(body["classes"][0]["positives"]) == 2 and sum(body["classes"][0]["negatives"]) == 2
    assert all(isinstance(v, int) for c in body["classes"] for vs in c.values() for v in vs)
    assert score_histogram(y, raw, "regression", 1) is None
    with pytest.raises(ValueError, match="strictly ascending"):
        LabelHistogram(index=[3, 3], positives=[1, 1], negatives=[0, 0])
    other = ScoreHistogram(bins=16, classes=[LabelHistogram()])
    with pytest.raises(ValueError, match="score histogram of party b: 16 bins"):
        sum_histograms({"a": h, "b": other})
    outside = ScoreHistogram(
        bins=HISTOGRAM_BINS,
        classes=[LabelHistogram(index=[HISTOGRAM_BINS], positives=[1], negatives=[0])],
    )
    with pytest.raises(ValueError, match="score histogram of party b: bin outside"):
        sum_histograms({"a": h, "b": outside})
