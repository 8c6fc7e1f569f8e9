"""The global federated ensemble: its members, raw-score prediction and export.

Horizontal federated training grows one *global raw score*::

    F_0(x) = base score                      (one value per class)
    F_t(x) = F_{t-1}(x) + Σ_k w_k · f_k(x)   (f_k: the trees party k fitted in round t)

:class:`GlobalEnsemble` holds exactly that: the base score and, per round, the accepted
``(party, weight, model_text)`` members. :func:`round_increment` combines one round's members,
:func:`predict_raw` the whole ensemble (:func:`tasks.links.probabilities` turns raw scores
into probabilities), :func:`export_model` writes it as one native LightGBM model. Model texts
are LightGBM's own text format, checked and loaded only through
:mod:`tasks.horizontal.model_text`; the weights w_k come from the round's aggregation
strategy (:mod:`tasks.horizontal.strategies`). Everything here is pure: no files, no clock.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.horizontal.model_text import check_task, count_trees, load_booster, merge_model_texts
from tasks.types import Aggregation, Objective

#: One accepted update of a round: (party, weight, LightGBM model text).
MemberTuple = tuple[str, float, str]


class GlobalEnsemble(BaseModel):
    """Base score plus, per round, the accepted weighted party updates.

    ``num_class`` is the number of raw-score columns: 1 for binary and regression, K for
    multiclass. ``rounds[t-1]`` is round ``t``; ``metrics[t-1]`` its aggregated validation
    metrics. ``best_round`` (0 = base score only) is what :func:`predict_raw` and
    :func:`export_model` use when no round limit is given; ``None`` means "all rounds".
    """

    model_config = ConfigDict(frozen=True)

    objective: Objective
    num_class: int = Field(ge=1)
    base_score: list[float]
    feature_names: list[str]
    categorical: list[str] = Field(default_factory=list)
    rounds: list[list[MemberTuple]] = Field(default_factory=list)
    metrics: list[dict[str, float]] = Field(default_factory=list)
    best_round: int | None = None
    aggregation: Aggregation = "samples"
    trees_per_round: int = Field(
        default=1, ge=1, description="Update size limit that aggregate/check_update enforce"
    )

    @model_validator(mode="after")
    def _consistent(self) -> GlobalEnsemble:
        check_task(self.objective, self.num_class)
        if len(self.base_score) != self.num_class:
            raise ValueError(
                f"base_score has {len(self.base_score)} values, num_class={self.num_class}"
            )
        unknown = [c for c in self.categorical if c not in self.feature_names]
        if unknown:
            raise ValueError(f"categorical features {unknown} are not in feature_names")
        if not all(math.isfinite(w) for row in self.rounds for _, w, _ in row):
            raise ValueError("non-finite member weight")
        return self

    def with_round(
        self, members: Sequence[MemberTuple], metrics: Mapping[str, float] | None = None
    ) -> GlobalEnsemble:
        """A new ensemble with one more round appended (this one is unchanged)."""
        return self.model_copy(
            update={
                "rounds": [*self.rounds, list(members)],
                "metrics": [*self.metrics, dict(metrics or {})],
            }
        )

    def with_metrics(self, round_: int, metrics: Mapping[str, float]) -> GlobalEnsemble:
        """Set the aggregated metrics of round ``round_`` (1-based)."""
        if not 1 <= round_ <= len(self.rounds):
            raise IndexError(f"no round {round_}; the ensemble has {len(self.rounds)}")
        out = [*self.metrics] + [{} for _ in range(len(self.rounds) - len(self.metrics))]
        out[round_ - 1] = dict(metrics)
        return self.model_copy(update={"metrics": out})

    def resolve_round(self, upto_round: int | None = None) -> int:
        """The number of rounds to use: ``upto_round``, else ``best_round``, else all."""
        if upto_round is None:
            upto_round = len(self.rounds) if self.best_round is None else self.best_round
        if not 0 <= upto_round <= len(self.rounds):
            raise ValueError(f"upto_round={upto_round}; the ensemble has {len(self.rounds)} rounds")
        return upto_round

    def truncated(self, upto_round: int | None = None) -> GlobalEnsemble:
        """Only the first rounds (default: up to the best round)."""
        r = self.resolve_round(upto_round)
        return self.model_copy(
            update={
                "rounds": self.rounds[:r],
                "metrics": self.metrics[:r],
                "best_round": None if self.best_round is None else min(self.best_round, r),
            }
        )


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------


def feature_matrix(X: pl.DataFrame | np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
    """Float64 matrix in the ensemble's feature order; nulls become NaN (missing)."""
    if isinstance(X, pl.DataFrame):
        missing = [c for c in feature_names if c not in X.columns]
        if missing:
            raise ValueError(f"frame lacks feature columns {missing[:5]}")
        return X.select(pl.col(c).cast(pl.Float64) for c in feature_names).to_numpy()
    matrix = np.asarray(X, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(feature_names):
        raise ValueError(f"expected a (n, {len(feature_names)}) matrix, got {matrix.shape}")
    return matrix


def _shape(raw: np.ndarray, n: int, num_class: int) -> np.ndarray:
    return raw.reshape(n) if num_class == 1 else raw.reshape(n, num_class)


def member_raw(model_text: str, X: np.ndarray, num_class: int) -> np.ndarray:
    """Raw score of one update's trees alone (no base score).

    Single-threaded, like the local fits: a round predicts many small updates, and OpenMP
    threads per call made that 1.5-2x slower on a busy 2-core machine (bench_federated).
    """
    booster = load_booster(model_text)
    raw = np.asarray(booster.predict(X, raw_score=True, num_threads=1), dtype=np.float64)
    return _shape(raw, X.shape[0], num_class)


def round_increment(members: Sequence[MemberTuple], X: np.ndarray, num_class: int) -> np.ndarray:
    """Σ_k w_k f_k(X): what one round adds to every raw score."""
    total = np.zeros((X.shape[0], num_class) if num_class > 1 else X.shape[0])
    for _party, weight, text in members:
        total += weight * member_raw(text, X, num_class)
    return total


def predict_raw(
    ensemble: GlobalEnsemble, X: pl.DataFrame | np.ndarray, *, upto_round: int | None = None
) -> np.ndarray:
    """Raw scores F_r(X): shape (n,) for binary/regression, (n, K) for multiclass.

    ``upto_round`` defaults to the ensemble's best round, else all rounds.
    """
    matrix = feature_matrix(X, ensemble.feature_names)
    r = ensemble.resolve_round(upto_round)
    base = np.asarray(ensemble.base_score, dtype=np.float64)
    out = np.tile(base, (matrix.shape[0], 1))
    out = _shape(out, matrix.shape[0], ensemble.num_class)
    for members in ensemble.rounds[:r]:
        out = out + round_increment(members, matrix, ensemble.num_class)
    return out


class EnsembleSize(NamedTuple):
    trees: int
    bytes: int


def ensemble_size(ensemble: GlobalEnsemble, *, upto_round: int | None = None) -> EnsembleSize:
    """LightGBM trees (all classes) and model-text bytes in the first rounds (default: all)."""
    r = len(ensemble.rounds) if upto_round is None else ensemble.resolve_round(upto_round)
    members = [m for row in ensemble.rounds[:r] for m in row]
    return EnsembleSize(
        trees=sum(count_trees(text) for _, _, text in members),
        bytes=sum(len(text.encode()) for _, _, text in members),
    )


def export_model(ensemble: GlobalEnsemble, *, upto_round: int | None = None) -> str:
    """One native LightGBM text model whose raw predictions equal :func:`predict_raw`: the
    members of the first rounds (default: up to the best round) in round/party order,
    merged by :func:`tasks.horizontal.model_text.merge_model_texts`."""
    r = ensemble.resolve_round(upto_round)
    return merge_model_texts(
        [member for members in ensemble.rounds[:r] for member in members],
        base_score=ensemble.base_score,
        objective=ensemble.objective,
        num_class=ensemble.num_class,
        feature_names=ensemble.feature_names,
        categorical=ensemble.categorical,
    )
