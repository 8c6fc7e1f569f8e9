"""The AUC over the pooled test rows of every party, from per-label histograms of scores.

Each party counts its predicted probabilities on a fixed grid of :data:`HISTOGRAM_BINS`
equal bins on [0, 1], separately for positive and negative rows (:func:`score_histogram`):
counts only, no score of any entity. The coordinator sums the parties' counts
(:func:`sum_histograms`) and computes the AUC of the pooled rows from the sums
(:func:`binned_auc`): a (positive, negative) pair in different bins is ordered by its bins,
a pair in the same bin counts 1/2.

Error bound: a pair in different bins is ordered exactly as its scores are (the bins are
intervals of the scores, in order), so only pairs sharing a bin can be miscounted, each by
at most 1/2. The binned AUC therefore differs from the exact AUC of the pooled scores by at
most half the fraction of (positive, negative) pairs that share a bin,
``0.5 * sum_b pos_b * neg_b / (P * N)``, which the histograms themselves give
(``auc_bound``).

Multiclass: one histogram per class of that class's probability (rows of the class
positive, the rest negative); the pooled one-vs-rest macro AUC is the mean of the classes'
binned AUCs over the classes with both positive and negative rows, its bound the mean of
their bounds.

Grid: 2**14 bins of width 6.1e-5. For scores with a smooth density the tied fraction is
about (1 / bins) times the overlap of the two label densities, so even scores crowded near
0 or 1 (densities around 10) give a bound near 1e-4, and typically the bound is far below
the fourth decimal the figures are shown with; the message stays small because only
non-empty bins are sent (at most one entry per test row). A coarser grid would say less
about the distribution of a party's scores but would widen the bound at the same rate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.links import probabilities
from tasks.types import Objective

#: Equal bins on [0, 1] every party counts its scores in.
HISTOGRAM_BINS = 2**14


class LabelHistogram(BaseModel):
    """Counts of positive and negative rows per non-empty score bin (ascending bins)."""

    model_config = ConfigDict(frozen=True)

    index: list[int] = Field(default_factory=list, description="Non-empty bins, ascending")
    positives: list[int] = Field(default_factory=list, description="Positive rows per bin")
    negatives: list[int] = Field(default_factory=list, description="Negative rows per bin")

    @model_validator(mode="after")
    def _counts(self) -> LabelHistogram:
        if not len(self.index) == len(self.positives) == len(self.negatives):
            raise ValueError("index, positives and negatives differ in length")
        if any(b <= a for a, b in zip(self.index, self.index[1:], strict=False)):
            raise ValueError("bins are not strictly ascending")
        if any(c < 0 for c in (*self.positives, *self.negatives)):
            raise ValueError("negative count")
        return self

    def dense(self, bins: int) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives) per bin, every bin."""
        if self.index and not 0 <= self.index[0] <= self.index[-1] < bins:
            raise ValueError(f"bin outside 0..{bins - 1}")
        pos = np.zeros(bins, dtype=np.int64)
        neg = np.zeros(bins, dtype=np.int64)
        pos[self.index] = self.positives
        neg[self.index] = self.negatives
        return pos, neg

    @classmethod
    def of_dense(cls, pos: np.ndarray, neg: np.ndarray) -> LabelHistogram:
        nonempty = np.flatnonzero((pos > 0) | (neg > 0))
        return cls(
            index=[int(i) for i in nonempty],
            positives=[int(c) for c in pos[nonempty]],
            negatives=[int(c) for c in neg[nonempty]],
        )


class ScoreHistogram(BaseModel):
    """A party's message for the pooled AUC of one split: per-label counts of its predicted
    probabilities on ``bins`` equal bins of [0, 1] (binary: P(y = 1); multiclass: one
    histogram per class, one-vs-rest). Counts only."""

    model_config = ConfigDict(frozen=True)

    bins: int = Field(default=HISTOGRAM_BINS, ge=1, le=2**20)
    classes: list[LabelHistogram] = Field(min_length=1)


def bin_of(p: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """The bin of each probability: ``floor(p * bins)``, 1.0 in the last bin."""
    return np.clip(np.floor(np.asarray(p, dtype=np.float64) * bins), 0, bins - 1).astype(np.int64)


def label_histogram(p: np.ndarray, positive: np.ndarray, bins: int) -> LabelHistogram:
    idx = bin_of(p, bins)
    positive = np.asarray(positive, dtype=bool)
    pos = np.bincount(idx[positive], minlength=bins)
    neg = np.bincount(idx[~positive], minlength=bins)
    return LabelHistogram.of_dense(pos, neg)


def score_histogram(
    y: np.ndarray,
    raw: np.ndarray,
    objective: Objective,
    num_class: int,
    *,
    bins: int = HISTOGRAM_BINS,
) -> ScoreHistogram | None:
    """Party side: the histogram message of raw scores ``raw`` with labels ``y`` (None for
    regression, which has no AUC). A split with one class, or no rows, still sends its
    counts: its rows count in the pooled figure."""
    if objective == "regression":
        return None
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    probs = probabilities(np.asarray(raw, dtype=np.float64), objective, num_class)
    if objective == "binary":
        return ScoreHistogram(bins=bins, classes=[label_histogram(probs, y == 1, bins)])
    probs = probs.reshape(len(y), num_class)
    return ScoreHistogram(
        bins=bins, classes=[label_histogram(probs[:, c], y == c, bins) for c in range(num_class)]
    )


def sum_histograms(histograms: Mapping[str, ScoreHistogram]) -> ScoreHistogram | None:
    """Coordinator side: the parties' counts summed bin by bin (None without any)."""
    if not histograms:
        return None
    first = next(iter(histograms.values()))
    bins, k = first.bins, len(first.classes)
    pos = np.zeros((k, bins), dtype=np.int64)
    neg = np.zeros((k, bins), dtype=np.int64)
    for party, h in histograms.items():
        if h.bins != bins or len(h.classes) != k:
            raise ValueError(
                f"score histogram of party {party}: {h.bins} bins x {len(h.classes)} classes, "
                f"expected {bins} x {k}"
            )
        for c, label in enumerate(h.classes):
            try:
                p, n = label.dense(bins)
            except ValueError as exc:
                raise ValueError(f"score histogram of party {party}: {exc}") from None
            pos[c] += p
            neg[c] += n
    return ScoreHistogram(
        bins=bins, classes=[LabelHistogram.of_dense(pos[c], neg[c]) for c in range(k)]
    )


def binned_auc(label: LabelHistogram, bins: int) -> tuple[float, float] | None:
    """(AUC, bound) of one label histogram: pairs in different bins ordered, pairs in the
    same bin counting 1/2; the bound is half the fraction of pairs sharing a bin. None
    without both positive and negative rows."""
    pos, neg = label.dense(bins)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    below = np.cumsum(neg) - neg  # negatives in lower bins
    wins = float(np.dot(pos, below)) + 0.5 * float(np.dot(pos, neg))
    pairs = float(n_pos) * float(n_neg)
    return wins / pairs, 0.5 * float(np.dot(pos, neg)) / pairs


def pooled_auc(histogram: ScoreHistogram) -> dict[str, float]:
    """``auc`` (binary; multiclass: one-vs-rest macro over the classes with both kinds of
    rows) and ``auc_bound`` from a summed histogram; empty when no class has both."""
    found = [binned_auc(c, histogram.bins) for c in histogram.classes]
    defined = [f for f in found if f is not None]
    if not defined:
        return {}
    return {
        "auc": float(np.mean([a for a, _ in defined])),
        "auc_bound": float(np.mean([b for _, b in defined])),
    }
