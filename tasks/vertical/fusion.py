"""Score-level fusion: per-party scores keyed by the alignment id, joined and combined
into one raw score by fixed, learned or gradient-round coefficients.

Scores are joined on the alignment id (:func:`join_scores`, 1:1 joins). With the party's
*delta* δ_p (its raw score minus the prior F_0 for full-model scores, or its model output in
rounds mode), every fusion is F = F_0 + Σ_p c_p δ_p, in three kinds (:class:`Fusion`):

* ``fixed``   -- c_p = normalised spec weights: a weighted mean of the parties' raw scores;
* ``learned`` -- the label party fits the combination on validation scores: logistic
  stacking (binary; multinomial for multiclass on all P·K score columns) or non-negative
  least squares (regression) (:func:`learn_fusion`);
* ``rounds``  -- c_p of the gradient rounds (additive components;
  :func:`tasks.vertical.rounds.rounds_fusion`).

Rule for an entity a party does not know: that party contributes δ_p = 0, i.e. the prior.
For ``fixed`` weights (a mean of estimates of the same quantity) the weights are in
addition renormalised over the parties present, so the fused score is the weighted mean of
the scores that exist; an entity no party knows gets F_0. ``learned`` and ``rounds``
coefficients are not renormalised: there each delta is a separate piece of evidence fitted
jointly, and a missing piece is "no evidence" (stacking is fitted with the same zero
imputation on validation entities some party lacks, so it learns under the same rule).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.linear_model import LinearRegression, LogisticRegression

from tasks.horizontal.model_text import check_task
from tasks.horizontal.training import check_labels
from tasks.types import Objective
from tasks.vertical.data import raw_shape

FusionKind = Literal["fixed", "learned", "rounds"]
#: Score columns hold full raw scores (one-shot) or deltas from the prior (rounds).
ScoreKind = Literal["raw", "delta"]

SCORE = "score"


def fusion_weights(parties: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Normalised weights per party: ``fusion.weights`` or uniform."""
    if not parties:
        raise ValueError("no parties")
    if weights is None:
        return {p: 1.0 / len(parties) for p in parties}
    missing = [p for p in parties if p not in weights]
    if missing:
        raise ValueError(f"fusion.weights has no weight for parties {missing}")
    values = {p: float(weights[p]) for p in parties}
    total = sum(values.values())
    if any(w < 0 or not math.isfinite(w) for w in values.values()) or total <= 0:
        raise ValueError(f"fusion.weights must be non-negative with a positive sum: {values}")
    return {p: w / total for p, w in values.items()}


def score_columns(num_class: int) -> list[str]:
    return [SCORE] if num_class == 1 else [f"{SCORE}_{k}" for k in range(num_class)]


def score_table(ids: pl.Series, raw: np.ndarray, *, key: str, num_class: int = 1) -> pl.DataFrame:
    """A party's scores keyed by the alignment id: ``key`` + score column(s), Float64."""
    raw = np.asarray(raw, dtype=np.float64).reshape(len(ids), num_class)
    columns = {name: raw[:, k] for k, name in enumerate(score_columns(num_class))}
    return pl.DataFrame({key: ids}).hstack(pl.DataFrame(columns))


def join_scores(
    tables: Mapping[str, pl.DataFrame],
    *,
    key: str,
    num_class: int = 1,
    ids: pl.Series | None = None,
) -> pl.DataFrame:
    """One row per id (``ids``, default: every id of any table in first-seen order) with
    ``{party}:{score column}`` columns, null where the party does not know the entity.

    Keys must be unique in every table (1:1 joins fail loudly otherwise).
    """
    if ids is None:
        ids = pl.concat([t[key] for t in tables.values()]).unique(maintain_order=True)
    out = pl.DataFrame({key: ids})
    if out[key].is_duplicated().any():
        raise ValueError(f"duplicate ids in '{key}'")
    cols = score_columns(num_class)
    for party, table in tables.items():
        missing = [c for c in [key, *cols] if c not in table.columns]
        if missing:
            raise ValueError(f"score table of {party!r} lacks columns {missing}")
        renamed = table.select(
            pl.col(key), *[pl.col(c).cast(pl.Float64).alias(f"{party}:{c}") for c in cols]
        )
        out = out.join(renamed, on=key, how="left", validate="1:1", maintain_order="left")
    return out


class Fusion(BaseModel):
    """How per-party scores become one raw score (see the module docstring for the rule)."""

    model_config = ConfigDict(frozen=True)

    kind: FusionKind
    objective: Objective
    num_class: int = Field(ge=1)
    parties: list[str]
    base_score: list[float]
    score_kind: ScoreKind = "raw"
    weights: list[float] = Field(default_factory=list, description="c_p (fixed, rounds)")
    renormalise: bool = False
    coef: list[list[float]] = Field(default_factory=list, description="learned: K x P·K")
    intercept: list[float] = Field(default_factory=list, description="learned: K")

    @model_validator(mode="after")
    def _consistent(self) -> Fusion:
        check_task(self.objective, self.num_class)
        if len(self.base_score) != self.num_class:
            raise ValueError(f"base_score has {len(self.base_score)} values")
        if self.kind == "learned":
            width = len(self.parties) * self.num_class
            if len(self.coef) != self.num_class or any(len(r) != width for r in self.coef):
                raise ValueError(f"coef must be {self.num_class} x {width}")
            if len(self.intercept) != self.num_class:
                raise ValueError(f"intercept must have {self.num_class} values")
        elif len(self.weights) != len(self.parties):
            raise ValueError("weights must have one value per party")
        return self


def fixed_fusion(
    parties: Sequence[str],
    weights: Mapping[str, float] | None,
    *,
    objective: Objective,
    num_class: int,
    base: Sequence[float],
) -> Fusion:
    """Weighted mean of the parties' raw scores (renormalised over present parties)."""
    w = fusion_weights(parties, weights)
    return Fusion(
        kind="fixed",
        objective=objective,
        num_class=num_class,
        parties=list(parties),
        base_score=list(base),
        weights=[w[p] for p in parties],
        renormalise=True,
    )


def _deltas(joined: pl.DataFrame, fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    """(n, P, K) deltas with 0 where absent, and the (n, P) presence mask."""
    k = fusion.num_class
    cols = score_columns(k)
    n = joined.height
    deltas = np.zeros((n, len(fusion.parties), k))
    present = np.zeros((n, len(fusion.parties)), dtype=bool)
    offset = np.zeros(k) if fusion.score_kind == "delta" else np.asarray(fusion.base_score)
    for j, party in enumerate(fusion.parties):
        names = [f"{party}:{c}" for c in cols]
        if not all(name in joined.columns for name in names):
            continue
        values = joined.select(names).to_numpy().astype(np.float64)
        ok = np.all(np.isfinite(values), axis=1)
        present[:, j] = ok
        deltas[ok, j, :] = values[ok] - offset
    return deltas, present


def apply_fusion(joined: pl.DataFrame, fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    """Fused raw scores ((n,) or (n, K)) and the number of parties present per row, from
    a :func:`join_scores` table. A null or non-finite score counts as absent."""
    k = fusion.num_class
    deltas, present = _deltas(joined, fusion)
    n = joined.height
    if fusion.kind == "learned":
        coef = np.asarray(fusion.coef, dtype=np.float64)
        raw = deltas.reshape(n, -1) @ coef.T + np.asarray(fusion.intercept)
    else:
        c = np.asarray(fusion.weights, dtype=np.float64)
        total = (deltas * c[None, :, None]).sum(axis=1)
        if fusion.renormalise:
            mass = present @ c
            scale = np.divide(c.sum(), mass, out=np.zeros(n), where=mass > 0)
            total = total * scale[:, None]
        raw = np.asarray(fusion.base_score)[None, :] + total
    return raw_shape(raw, n, k), present.sum(axis=1)


def fuse_scores(
    tables: Mapping[str, pl.DataFrame],
    fusion: Fusion,
    *,
    key: str,
    ids: pl.Series | None = None,
) -> pl.DataFrame:
    """Join the parties' score tables and fuse them: ``key``, score column(s), ``parties``."""
    joined = join_scores(tables, key=key, num_class=fusion.num_class, ids=ids)
    raw, count = apply_fusion(joined, fusion)
    out = score_table(joined[key], raw, key=key, num_class=fusion.num_class)
    return out.with_columns(pl.Series("parties", count, dtype=pl.Int32))


def learn_fusion(
    tables: Mapping[str, pl.DataFrame],
    labels: pl.DataFrame,
    *,
    key: str,
    objective: Objective,
    num_class: int,
    base: Sequence[float],
    score_kind: ScoreKind = "raw",
    label: str = "label",
    C: float = 1.0,
) -> Fusion:
    """Label party: fit the fusion on held-out (validation) scores of its labelled entities.

    Binary: logistic regression on the parties' deltas; multiclass: multinomial logistic
    regression on all P·K delta columns; regression: least squares with non-negative
    coefficients. Absent scores are zero deltas, as when the fusion is applied.
    """
    check_task(objective, num_class)
    parties = list(tables)
    joined = join_scores(tables, key=key, num_class=num_class, ids=labels[key])
    y = labels[label].cast(pl.Float64).to_numpy()
    check_labels(y, objective, num_class)
    template = Fusion(
        kind="learned",
        objective=objective,
        num_class=num_class,
        parties=parties,
        base_score=list(base),
        score_kind=score_kind,
        coef=[[0.0] * (len(parties) * num_class) for _ in range(num_class)],
        intercept=[0.0] * num_class,
    )
    deltas, _ = _deltas(joined, template)
    X = deltas.reshape(len(y), -1)
    if objective == "regression":
        reg = LinearRegression(positive=True).fit(X, y)
        coef = [[float(v) for v in np.ravel(reg.coef_)]]
        intercept = [float(reg.intercept_)]
    else:
        classes = np.unique(y)
        want = np.arange(2 if objective == "binary" else num_class)
        if not np.array_equal(classes, want):
            raise ValueError(f"learned fusion needs every class in the labels, got {classes}")
        clf = LogisticRegression(C=C, max_iter=2000).fit(X, y.astype(np.int64))
        coef = [[float(v) for v in row] for row in np.atleast_2d(clf.coef_)]
        intercept = [float(v) for v in np.ravel(clf.intercept_)]
    return template.model_copy(update={"coef": coef, "intercept": intercept})
