"""The text party's linear block in the vertical layout: cross-fitted scikit-learn models on
its own TF-IDF rows, out-of-fold scores on training rows, rows looked up by hashed key."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import sparse

from tasks.prepare.text_model import TextModelError, decision, fold_of
from tasks.types import ENTITY_HASH
from tasks.vertical.text_block import (
    block_scores,
    entity_rows,
    fit_cross_fit,
    party_vocabulary,
    rows_for,
    score_names,
    train_text_block,
)

FOLDS = 3


def _data(n: int = 240, terms: int = 12, seed: int = 0) -> tuple[pl.Series, sparse.csr_matrix]:
    rng = np.random.default_rng(seed)
    dense = rng.random((n, terms)) * (rng.random((n, terms)) < 0.4)
    hashes = pl.Series(ENTITY_HASH, [f"{i:064x}" for i in range(n)])
    return hashes, sparse.csr_matrix(dense)


def _target(X: sparse.csr_matrix, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = np.asarray(X[:, 0].todense()).ravel() - np.asarray(X[:, 1].todense()).ravel()
    return signal + 0.1 * rng.standard_normal(X.shape[0])


def test_a_training_rows_score_comes_from_a_model_that_never_saw_its_row() -> None:
    hashes, X = _data()
    y = _target(X)
    fold = fold_of(hashes, FOLDS)
    models = fit_cross_fit(
        X, y, fold, folds=FOLDS, target="gradients", objective="binary", alpha=1e-3
    )
    # fold model j is the same whatever the targets of fold j's rows are
    for j in range(FOLDS):
        moved = y.copy()
        moved[fold == j] += 100.0
        again = fit_cross_fit(
            X, moved, fold, folds=FOLDS, target="gradients", objective="binary", alpha=1e-3
        )
        assert np.allclose(again.folds[j].coef, models.folds[j].coef)
        assert not np.allclose(again.full.coef, models.full.coef)

    text = np.ones(len(y), dtype=bool)
    model = train_text_block(
        hashes,
        X,
        text,
        hashes,
        y,
        party="B",
        vocabulary=party_vocabulary([["a"]] * 3, min_documents=1, max_terms=5, ngram_max=1),
        folds=FOLDS,
        target="gradients",
        objective="binary",
        alpha=1e-3,
    )
    assert model.columns == ["text__model_score"]
    out_of_fold = block_scores(hashes, X, text, hashes, np.ones(len(y), bool), model)[:, 0]
    in_fold = block_scores(hashes, X, text, hashes, np.zeros(len(y), bool), model)[:, 0]
    for j in range(FOLDS):
        rows = fold == j
        expected = decision(X[np.flatnonzero(rows)], model.models.folds[j])[:, 0]
        assert np.allclose(out_of_fold[rows], expected)
    full = decision(X, model.models.full)[:, 0]
    assert np.allclose(in_fold, full)
    assert not np.allclose(out_of_fold, in_fold)
    # out of fold tracks the target, without the full fit's optimism
    fit_err = np.mean((in_fold - y) ** 2)
    oof_err = np.mean((out_of_fold - y) ** 2)
    assert fit_err < oof_err < np.var(y)


def test_class_labels_fit_logistic_models_with_one_output_per_class() -> None:
    hashes, X = _data(seed=2)
    signal = _target(X, seed=3)
    binary = (signal > np.median(signal)).astype(np.float64)
    fold = fold_of(hashes, FOLDS)
    models = fit_cross_fit(
        X, binary, fold, folds=FOLDS, target="labels", objective="binary", alpha=1e-4
    )
    assert np.asarray(models.full.coef).shape == (1, X.shape[1])
    classes = np.digitize(signal, np.quantile(signal, [1 / 3, 2 / 3])).astype(np.float64)
    multi = fit_cross_fit(
        X, classes, fold, folds=FOLDS, target="labels", objective="multiclass", alpha=1e-4
    )
    assert np.asarray(multi.full.coef).shape == (3, X.shape[1])
    grads = np.stack([signal, -signal, signal * 0.5], axis=1)
    ridge = fit_cross_fit(
        X, grads, fold, folds=FOLDS, target="gradients", objective="multiclass", alpha=1e-4
    )
    assert np.asarray(ridge.full.coef).shape == (3, X.shape[1]) and len(ridge.folds) == FOLDS
    assert score_names(3) == [f"text__model_score_{c}" for c in range(3)]
    with pytest.raises(TextModelError, match="one class"):
        fit_cross_fit(
            X,
            np.zeros(X.shape[0]),
            fold,
            folds=FOLDS,
            target="labels",
            objective="binary",
            alpha=1e-4,
        )


def test_rows_follow_the_wanted_keys_and_an_entity_without_text_scores_missing() -> None:
    hashes, X = _data(n=6, terms=3)
    has_text = np.array([True, True, False, True, True, True])
    wanted = pl.Series(ENTITY_HASH, [hashes[3], "f" * 64, hashes[0], hashes[2]])
    rows, texts = rows_for(hashes, X, has_text, wanted)
    assert rows.shape == (4, 3)
    assert np.allclose(rows[0].toarray(), X[3].toarray())
    assert rows[1].nnz == 0 and np.allclose(rows[2].toarray(), X[0].toarray())
    assert texts.tolist() == [True, False, True, False]
    y = _target(X)
    model = train_text_block(
        hashes,
        X,
        has_text,
        hashes,
        y,
        party="B",
        vocabulary=party_vocabulary([["a"]], min_documents=1, max_terms=5, ngram_max=1),
        folds=2,
        target="gradients",
        objective="regression",
        alpha=1e-3,
    )
    scores = block_scores(hashes, X, has_text, wanted, np.zeros(4, bool), model)
    assert np.isnan(scores[[1, 3], 0]).all() and np.isfinite(scores[[0, 2], 0]).all()


def test_several_text_sources_make_one_row_per_entity() -> None:
    a = pl.Series(ENTITY_HASH, ["k1", "k2"])
    b = pl.Series(ENTITY_HASH, ["k2", "k3"])
    xa = sparse.csr_matrix(np.array([[1.0, 0.0], [1.0, 0.0]]))
    xb = sparse.csr_matrix(np.array([[0.0, 1.0], [0.0, 0.0]]))
    hashes, rows, has_text = entity_rows(
        [(a, xa, np.array([True, True])), (b, xb, np.array([True, False]))]
    )
    assert hashes.to_list() == ["k1", "k2", "k3"]
    assert np.allclose(rows.toarray(), [[1, 0], [2**-0.5, 2**-0.5], [0, 0]])
    assert has_text.tolist() == [True, True, False]
