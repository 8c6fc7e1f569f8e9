"""The text party's linear block in the vertical layout (``[text] model``): a linear model
on its own TF-IDF vectors whose score joins the party's feature block before its LightGBM
trains.

In the vertical layout one party holds an entity's texts and another its label, so the
consortium vocabulary and FedAvg of the horizontal layout (:mod:`tasks.prepare.text_model`)
have nothing to average. The text party instead builds a vocabulary from its own
thresholded document frequencies (:func:`party_vocabulary`: the horizontal merge with one
party) and fits a scikit-learn linear model on what its mode already lets it receive:

* gradient rounds (opt-in ``fusion.share_gradients``): ridge regression of the round-1
  negative gradients −g (one output per class), the direction the first trees follow;
* one-shot mode (opt-in ``fusion.share_labels``): logistic regression of the shared labels
  (ridge for regression).

Cross-fitting as in the horizontal layout: entities fall in folds by a hash of their hashed
key (:func:`~tasks.prepare.text_model.fold_of`); fold model j is fitted on the training
rows outside fold j, the full model on every training row. A training row's score comes
from its fold's model, so the party's trees never see a score fitted on its own target;
validation, test and new rows get the full model's score (:func:`block_scores`). The model
(vocabulary and weights) stays in the party's store. Nothing here reads files or the clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from tasks.prepare.text_model import (
    CrossFitModels,
    DocumentCounts,
    LinearWeights,
    TextModelError,
    TextVocabulary,
    cross_fit_scores,
    document_frequencies,
    entity_matrix,
    fold_of,
    merge_document_frequencies,
    ngram_terms,
)
from tasks.types import ENTITY_HASH, Objective

#: What the linear block is fitted on: the round-1 gradients or the shared labels.
TextTarget = Literal["gradients", "labels"]
#: Feature name prefix of the block's score columns.
SCORE_PREFIX = "text__"
#: Logit of a class no training row of a fold holds (multiclass labels).
ABSENT_CLASS_LOGIT = -30.0


class VerticalTextModel(BaseModel):
    """A text party's linear block, as its store keeps it (JSON)."""

    party: str
    target: TextTarget = Field(description="What the models were fitted on")
    vocabulary: TextVocabulary
    models: CrossFitModels
    columns: list[str] = Field(description="Feature names of the score columns")


def score_names(outputs: int) -> list[str]:
    """Feature names of the block's score: one, or one per class."""
    if outputs == 1:
        return [f"{SCORE_PREFIX}model_score"]
    return [f"{SCORE_PREFIX}model_score_{c}" for c in range(outputs)]


def party_vocabulary(
    documents: Sequence[list[str]], *, min_documents: int, max_terms: int, ngram_max: int
) -> TextVocabulary:
    """The party's own vocabulary: its terms held by at least ``min_documents`` of its
    texts, the ``max_terms`` most frequent, with smoothed IDF (the consortium merge of
    :func:`~tasks.prepare.text_model.merge_document_frequencies` over one party)."""
    counts: DocumentCounts = document_frequencies(documents, min_documents=min_documents)
    return merge_document_frequencies(
        [counts], min_parties=1, max_terms=max_terms, ngram_max=ngram_max
    )


def entity_rows(
    parts: Sequence[tuple[pl.Series, Any, np.ndarray]],
) -> tuple[pl.Series, Any, np.ndarray]:
    """One TF-IDF row per entity hash over several text sources' (hashes, rows, has_text):
    the l2-normalised sum of its rows, and whether any source holds a text of it. Hashes
    come out sorted."""
    from scipy import sparse

    if not parts:
        raise TextModelError("text.model: the party has no text source")
    hashes = pl.concat([h for h, _, _ in parts]).unique().sort()
    index = pl.DataFrame({ENTITY_HASH: hashes, "_owner": pl.int_range(hashes.len(), eager=True)})
    owners = [
        pl.DataFrame({ENTITY_HASH: h})
        .join(index, on=ENTITY_HASH, how="left", maintain_order="left")["_owner"]
        .to_numpy()
        for h, _, _ in parts
    ]
    stacked = sparse.vstack([x for _, x, _ in parts]).tocsr()
    owner = np.concatenate(owners).astype(np.int64)
    has_text = np.zeros(hashes.len(), dtype=bool)
    for o, (_, _, has) in zip(owners, parts, strict=True):
        has_text[o[has]] = True
    return hashes.alias(ENTITY_HASH), entity_matrix(stacked, owner, hashes.len()), has_text


def rows_for(hashes: pl.Series, rows: Any, has_text: np.ndarray, wanted: pl.Series) -> Any:
    """The TF-IDF rows of the entities ``wanted`` (in their order; an unknown entity gets
    an empty row) and whether each has a text."""
    from scipy import sparse

    index = pl.DataFrame({ENTITY_HASH: hashes, "_row": pl.int_range(hashes.len(), eager=True)})
    found = (
        pl.DataFrame({ENTITY_HASH: wanted})
        .join(index, on=ENTITY_HASH, how="left", maintain_order="left")["_row"]
        .to_numpy()
    )
    known = ~np.isnan(found.astype(np.float64))
    at = np.flatnonzero(known)
    pick = sparse.csr_matrix(
        (np.ones(len(at)), (at, found[known].astype(np.int64))),
        shape=(wanted.len(), hashes.len()),
        dtype=np.float64,
    )
    texts = np.zeros(wanted.len(), dtype=bool)
    texts[at] = has_text[found[known].astype(np.int64)]
    return (pick @ rows).tocsr(), texts


def _settled(weights: LinearWeights) -> LinearWeights:
    """The weights rounded to float32 precision: a refit in another process (another BLAS,
    thread count or summation order) differs in the last bits of float64, which would move
    the party's split thresholds; rounded, it gives the same scores, so a retried run grows
    the same trees as an uninterrupted one."""
    coef, intercept = weights.arrays()
    return LinearWeights.of(
        coef.astype(np.float32).astype(np.float64),
        intercept.astype(np.float32).astype(np.float64),
    )


def _fit_one(
    X: Any, y: np.ndarray, *, target: TextTarget, objective: Objective, alpha: float
) -> LinearWeights:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):  # one summation order, like the party's LightGBM
        return _settled(_fit_raw(X, y, target=target, objective=objective, alpha=alpha))


def _fit_raw(
    X: Any, y: np.ndarray, *, target: TextTarget, objective: Objective, alpha: float
) -> LinearWeights:
    """One linear model on (X, y): ridge for gradients (y: rows × outputs) and regression
    labels, logistic regression for class labels. ``alpha`` is the L2 penalty per row, as
    in the horizontal model's SGD (ridge's penalty is ``alpha`` × rows)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    n = X.shape[0]
    if target == "labels" and objective != "regression":
        classes = np.unique(y)
        if len(classes) < 2:
            raise TextModelError("text.model: the training rows hold one class only")
        clf = LogisticRegression(C=1.0 / (alpha * n), max_iter=1000)
        clf.fit(X, y.astype(np.int64))
        coef, intercept = clf.coef_, clf.intercept_
        if objective == "multiclass" and coef.shape[0] != int(classes.max()) + 1:
            full_coef = np.zeros((int(classes.max()) + 1, X.shape[1]))
            full_int = np.full(int(classes.max()) + 1, ABSENT_CLASS_LOGIT)
            full_coef[classes.astype(np.int64)] = coef
            full_int[classes.astype(np.int64)] = intercept
            coef, intercept = full_coef, full_int
        return LinearWeights.of(coef, intercept)
    reg = Ridge(alpha=alpha * n)
    target_y = y.reshape(n, -1)
    reg.fit(X, target_y)
    return LinearWeights.of(
        np.asarray(reg.coef_).reshape(target_y.shape[1], -1), np.atleast_1d(reg.intercept_)
    )


def fit_cross_fit(
    X: Any,
    y: np.ndarray,
    fold: np.ndarray,
    *,
    folds: int,
    target: TextTarget,
    objective: Objective,
    alpha: float,
) -> CrossFitModels:
    """Fold model j on the rows outside fold j, the full model on every row (all rows of
    ``X`` train; a fold without rows outside it gets the full model)."""
    if X.shape[0] < 2:
        raise TextModelError("text.model: fewer than 2 training rows with a text")
    full = _fit_one(X, y, target=target, objective=objective, alpha=alpha)
    models = []
    for j in range(folds):
        outside = np.flatnonzero(fold != j)
        if len(outside) < 2 or (
            target == "labels" and objective != "regression" and len(np.unique(y[outside])) < 2
        ):
            models.append(full)
            continue
        models.append(
            _fit_one(X[outside], y[outside], target=target, objective=objective, alpha=alpha)
        )
    return CrossFitModels(folds=models, full=full)


def train_text_block(
    hashes: pl.Series,
    rows: Any,
    has_text: np.ndarray,
    train: pl.Series,
    y: np.ndarray,
    *,
    party: str,
    vocabulary: TextVocabulary,
    folds: int,
    target: TextTarget,
    objective: Objective,
    alpha: float,
) -> VerticalTextModel:
    """The text party's block model: fitted (:func:`fit_cross_fit`) on the training
    entities ``train`` (hashed keys, in the order of ``y``: rows × outputs or labels) that
    hold a text."""
    X, texts = rows_for(hashes, rows, has_text, train)
    keep = np.flatnonzero(texts)
    fold = fold_of(train, folds)
    models = fit_cross_fit(
        X[keep],
        y[keep],
        fold[keep],
        folds=folds,
        target=target,
        objective=objective,
        alpha=alpha,
    )
    outputs = len(models.full.intercept)
    return VerticalTextModel(
        party=party,
        target=target,
        vocabulary=vocabulary,
        models=models,
        columns=score_names(outputs),
    )


def block_scores(
    hashes: pl.Series,
    rows: Any,
    has_text: np.ndarray,
    wanted: pl.Series,
    in_fold: np.ndarray,
    model: VerticalTextModel,
) -> np.ndarray:
    """Score columns (rows × outputs) of the entities ``wanted``: a row with ``in_fold``
    (a training row) from its fold's model, every other row from the full model; missing
    (NaN) for an entity without a text."""
    X, texts = rows_for(hashes, rows, has_text, wanted)
    fold = fold_of(wanted, len(model.models.folds))
    raw = cross_fit_scores(X, fold, np.asarray(in_fold, dtype=bool), model.models)
    raw[~texts] = np.nan
    return raw


def entity_documents(token_lists: Sequence[list[str]], ngram_max: int) -> list[list[str]]:
    """The terms of each text (its 1- to ``ngram_max``-grams)."""
    return [ngram_terms(tokens, ngram_max) for tokens in token_lists]
