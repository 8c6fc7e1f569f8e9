"""The global ensemble: prediction, export as one LightGBM model, manifest and size."""

from __future__ import annotations

import json

import lightgbm as lgb
import numpy as np
import pytest
from sklearn.datasets import make_classification, make_regression

from tasks.horizontal.ensemble import (
    GlobalEnsemble,
    ensemble_size,
    export_model,
    predict_raw,
)
from tasks.horizontal.model_text import parse_model_text
from tasks.horizontal.strategies import make_strategy
from tasks.horizontal.training import lgb_params, train_update
from tasks.manifest import EnsembleManifest
from tasks.spec.models import TrainingSpec
from tasks.types import Objective

NAMES = ["num_a", "num_b", "num_c", "num_d", "cat_x", "cat_y"]
CATEGORICAL = ["cat_x", "cat_y"]
SPEC = TrainingSpec(num_leaves=7, min_data_in_leaf=10, trees_per_round=2)


def _data(objective: Objective, n: int = 900, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four numeric features (with NaNs) and two categorical codes (with NaNs)."""
    if objective == "regression":
        x, y = make_regression(n, 6, n_informative=4, noise=5.0, random_state=seed)
    else:
        classes = 3 if objective == "multiclass" else 2
        x, y = make_classification(
            n, 6, n_informative=4, n_redundant=0, n_classes=classes, random_state=seed
        )
    x = x.astype(np.float64)
    x[:, 4] = np.digitize(x[:, 4], [-1.0, -0.3, 0.3, 1.0])  # 5 categories
    x[:, 5] = np.digitize(x[:, 5], [-0.5, 0.5]) * 3  # sparse codes 0, 3, 6
    rng = np.random.default_rng(seed)
    x[rng.random(n) < 0.05, 0] = np.nan
    x[rng.random(n) < 0.05, 4] = np.nan
    return x, y.astype(np.float64)


def _ensemble(
    objective: Objective, *, rounds: int = 2, base: list[float] | None = None
) -> tuple[GlobalEnsemble, np.ndarray]:
    """A 3-party ensemble built by hand, with unequal party sizes (weights != 1)."""
    k = 3 if objective == "multiclass" else 1
    x, y = _data(objective)
    if base is None:
        base = [0.4, -0.25, 0.1] if k == 3 else [0.7 if objective == "binary" else 12.5]
    parts = {"a": slice(0, 450), "b": slice(450, 750), "c": slice(750, 900)}
    weights = make_strategy("samples", learning_rate=1.0).weights(
        {p: s.stop - s.start for p, s in parts.items()}
    )
    ensemble = GlobalEnsemble(
        objective=objective,
        num_class=k,
        base_score=base,
        feature_names=NAMES,
        categorical=CATEGORICAL,
        trees_per_round=SPEC.trees_per_round,
    )
    params = lgb_params(SPEC, objective, k, seed=1)
    for _ in range(rounds):
        running = predict_raw(ensemble, x, upto_round=len(ensemble.rounds))
        members = [
            (
                p,
                weights[p],
                train_update(x[s], y[s], running[s], params, 2, CATEGORICAL, feature_names=NAMES),
            )
            for p, s in parts.items()
        ]
        ensemble = ensemble.with_round(members)
    return ensemble, x


@pytest.mark.parametrize("objective", ["binary", "multiclass", "regression"])
def test_export_reproduces_predict_raw(objective: Objective) -> None:
    ensemble, x = _ensemble(objective)
    assert all(w != 1.0 for row in ensemble.rounds for _, w, _ in row)
    assert any(code in x[:, 5] for code in (3.0, 6.0))
    for upto in (None, 1, 2):
        exported = export_model(ensemble, upto_round=upto)
        booster = lgb.Booster(model_str=exported)  # tree_sizes is used: it must be exact
        got = np.asarray(booster.predict(x, raw_score=True))
        want = predict_raw(ensemble, x, upto_round=upto)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
        assert booster.feature_name() == NAMES
        k = ensemble.num_class
        assert booster.num_trees() == ensemble_size(ensemble, upto_round=upto).trees
        assert booster.num_trees() % k == 0
    # The export is itself a well-formed update-like model with the right header.
    parsed = parse_model_text(export_model(ensemble))
    assert parsed.header["num_tree_per_iteration"] == str(ensemble.num_class)
    assert [t.index for t in parsed.trees] == list(range(len(parsed.trees)))


def test_export_of_base_score_only_and_best_round_default() -> None:
    ensemble, x = _ensemble("multiclass", rounds=2)
    base_only = lgb.Booster(model_str=export_model(ensemble, upto_round=0))
    np.testing.assert_allclose(
        base_only.predict(x, raw_score=True), np.tile(ensemble.base_score, (len(x), 1)), atol=1e-12
    )
    best = ensemble.model_copy(update={"best_round": 1})
    np.testing.assert_allclose(predict_raw(best, x), predict_raw(ensemble, x, upto_round=1))
    assert export_model(best) == export_model(ensemble, upto_round=1)
    assert len(best.truncated().rounds) == 1
    with pytest.raises(ValueError, match="upto_round"):
        predict_raw(ensemble, x, upto_round=3)


def test_export_merges_feature_infos_and_folds_base_into_first_trees() -> None:
    ensemble, _ = _ensemble("binary", rounds=1)
    header = parse_model_text(export_model(ensemble)).header
    infos = header["feature_infos"].split()
    assert len(infos) == len(NAMES)
    assert infos[0].startswith("[")
    assert set(infos[5].split(":")) >= {"0", "3", "6"}
    # Shifting the base score moves every prediction by the same amount.
    shifted = ensemble.model_copy(update={"base_score": [ensemble.base_score[0] + 1.5]})
    x, _ = _data("binary")

    def raw(e: GlobalEnsemble) -> np.ndarray:
        return np.asarray(lgb.Booster(model_str=export_model(e)).predict(x, raw_score=True))

    np.testing.assert_allclose(raw(shifted) - raw(ensemble), 1.5, atol=1e-9)


def test_ensemble_json_and_manifest_round_trip() -> None:
    ensemble, x = _ensemble("binary", rounds=1)
    ensemble = ensemble.with_metrics(1, {"logloss": 0.5}).model_copy(update={"best_round": 1})
    again = GlobalEnsemble.model_validate_json(ensemble.model_dump_json())
    assert again == ensemble
    manifest, texts = EnsembleManifest.of(ensemble)
    blob = manifest.model_dump_json()
    assert "Tree=0" not in blob
    assert len(texts) == 3
    back = EnsembleManifest.model_validate(json.loads(blob)).ensemble(texts)
    assert back == ensemble
    np.testing.assert_array_equal(predict_raw(back, x), predict_raw(ensemble, x))
    bad = {h: t.replace("Tree=0", "Tree=0 ") for h, t in texts.items()}
    with pytest.raises(ValueError, match="does not match its hash"):
        manifest.ensemble(bad)


def test_ensemble_size_counts_all_trees_and_bytes() -> None:
    ensemble, _ = _ensemble("multiclass", rounds=2)
    size = ensemble_size(ensemble)
    assert size.trees == 2 * 3 * 2 * 3  # rounds x parties x trees x classes
    assert size.bytes == sum(len(t.encode()) for row in ensemble.rounds for _, _, t in row)
    assert ensemble_size(ensemble, upto_round=1).trees == size.trees // 2


def test_ensemble_validates_its_shape() -> None:
    kw = {"feature_names": NAMES, "categorical": CATEGORICAL}
    with pytest.raises(ValueError, match="base_score has 1 values"):
        GlobalEnsemble(objective="multiclass", num_class=3, base_score=[0.0], **kw)
    with pytest.raises(ValueError, match="num_class must be 1"):
        GlobalEnsemble(objective="binary", num_class=2, base_score=[0.0, 0.0], **kw)
    with pytest.raises(ValueError, match="not in feature_names"):
        GlobalEnsemble(
            objective="binary",
            num_class=1,
            base_score=[0.0],
            feature_names=["a"],
            categorical=["b"],
        )
