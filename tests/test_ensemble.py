from __future__ import annotations

import json
import re

import lightgbm as lgb
import numpy as np
import pytest
from sklearn.datasets import make_classification, make_regression

from tasks.ensemble import (
    GlobalEnsemble,
    aggregation_weights,
    check_update,
    count_trees,
    ensemble_from_manifest,
    ensemble_manifest,
    ensemble_size,
    export_model,
    parse_model_text,
    predict_raw,
)
from tasks.spec import TrainingSpec
from tasks.training import lgb_params, party_learning_rates, train_update
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
    weights = aggregation_weights({p: s.stop - s.start for p, s in parts.items()}, "samples")
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
    manifest, texts = ensemble_manifest(ensemble)
    blob = json.dumps(manifest)
    assert "Tree=0" not in blob
    assert len(texts) == 3
    back = ensemble_from_manifest(json.loads(blob), texts)
    assert back == ensemble
    np.testing.assert_array_equal(predict_raw(back, x), predict_raw(ensemble, x))
    bad = {h: t.replace("Tree=0", "Tree=0 ") for h, t in texts.items()}
    with pytest.raises(ValueError, match="does not match its hash"):
        ensemble_from_manifest(manifest, bad)


def test_ensemble_size_counts_all_trees_and_bytes() -> None:
    ensemble, _ = _ensemble("multiclass", rounds=2)
    size = ensemble_size(ensemble)
    assert size.trees == 2 * 3 * 2 * 3  # rounds x parties x trees x classes
    assert size.bytes == sum(len(t.encode()) for row in ensemble.rounds for _, _, t in row)
    assert ensemble_size(ensemble, upto_round=1).trees == size.trees // 2


# --------------------------------------------------------------------------------------
# check_update
# --------------------------------------------------------------------------------------


def _update(objective: Objective = "binary", trees: int = 2) -> str:
    k = 3 if objective == "multiclass" else 1
    x, y = _data(objective, n=400)
    init = np.zeros((len(y), k)) if k > 1 else np.zeros(len(y))
    params = lgb_params(SPEC, objective, k, seed=0)
    return train_update(x, y, init, params, trees, CATEGORICAL, feature_names=NAMES)


def _check(text: str, objective: Objective = "binary", trees_per_round: int = 2) -> list[str]:
    return check_update(
        text,
        feature_names=NAMES,
        objective=objective,
        num_class=3 if objective == "multiclass" else 1,
        trees_per_round=trees_per_round,
        categorical=CATEGORICAL,
    )


@pytest.mark.parametrize("objective", ["binary", "multiclass", "regression"])
def test_check_update_accepts_a_genuine_update(objective: Objective) -> None:
    assert _check(_update(objective), objective) == []


def _first(pattern: str, repl: str, text: str) -> str:
    out, n = re.subn(pattern, repl, text, count=1, flags=re.MULTILINE)
    assert n == 1
    return out


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: "garbage", "not a LightGBM text model"),
        (lambda t: "", "empty model text"),
        (lambda t: t[: len(t) // 3], "truncated"),
        (lambda t: t.replace("num_a num_b", "num_b num_a", 1), "different order"),
        (lambda t: t.replace("num_a", "other", 1), "feature names differ"),
        (lambda t: _first(r"^(leaf_value=)\S+", r"\g<1>nan", t), "non-finite leaf value"),
        (lambda t: _first(r"^(leaf_value=)\S+", r"\g<1>inf", t), "non-finite leaf value"),
        (lambda t: _first(r"^(leaf_value=)\S+", r"\g<1>-inf", t), "non-finite leaf value"),
        (lambda t: _first(r"^(leaf_value=)", r"\g<1>0.5 ", t), "leaf_value has"),
        (lambda t: _first(r"^(left_child=)\S+", r"\g<1>0", t), "bad tree structure"),
        (lambda t: _first(r"^(split_feature=)\S+", r"\g<1>17", t), "split on feature index 17"),
        (lambda t: _first(r"^(is_linear=)0", r"\g<1>1", t), "linear trees"),
    ],
)
def test_check_update_catches(edit: object, expected: str) -> None:
    text = _update()
    assert callable(edit)
    problems = _check(edit(text))
    assert problems, "the edited model was accepted"
    assert any(expected in p for p in problems), problems


def test_check_update_catches_wrong_objective_and_class_count() -> None:
    regression = _update("regression")
    assert any("objective is 'regression'" in p for p in _check(regression, "binary"))
    multi = _update("multiclass")
    problems = check_update(
        multi, feature_names=NAMES, objective="multiclass", num_class=4, trees_per_round=2
    )
    assert any("num_class" in p for p in problems)
    with pytest.raises(ValueError, match="num_class must be 1"):
        check_update(multi, feature_names=NAMES, objective="binary", num_class=3, trees_per_round=2)


def test_check_update_tree_count() -> None:
    text = _update(trees=3)
    assert any("3 trees" in p for p in _check(text, trees_per_round=2))
    assert _check(text, trees_per_round=3) == []
    assert _check(_update(trees=1), trees_per_round=2) == []  # LightGBM may stop early
    no_trees = re.sub(r"^Tree=\d+\n(?:.+\n)*\n*", "", text, flags=re.MULTILINE)
    assert count_trees(no_trees) == 0
    assert any("0 trees" in p for p in _check(no_trees))


def test_check_update_accepts_inf_threshold_but_not_nan() -> None:
    """LightGBM splits "present vs. missing" at threshold=inf: a genuine update has it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (rng.random(400) < 0.5).astype(np.float64)
    x[y == 1, 0] = np.nan  # missingness is the signal
    params = lgb_params(SPEC, "binary", 1, seed=0)
    text = train_update(x, y, np.zeros(400), params, 1, [], feature_names=["a", "b"])
    assert re.search(r"^threshold=inf$", text, flags=re.MULTILINE)
    kw = {"feature_names": ["a", "b"], "objective": "binary", "num_class": 1, "trees_per_round": 1}
    assert check_update(text, **kw) == []  # type: ignore[arg-type]
    nan = text.replace("threshold=inf", "threshold=nan")
    assert any("NaN threshold" in p for p in check_update(nan, **kw))  # type: ignore[arg-type]


def test_check_update_rejects_categorical_split_on_numeric_feature() -> None:
    text = _update()
    renamed = text.replace("cat_x", "zzz").replace("num_a", "cat_x").replace("zzz", "num_a")
    names = ["cat_x", "num_b", "num_c", "num_d", "num_a", "cat_y"]
    problems = check_update(
        renamed,
        feature_names=names,
        objective="binary",
        num_class=1,
        trees_per_round=2,
        categorical=["cat_x", "cat_y"],
    )
    assert any("split on feature" in p for p in problems)


def test_wrong_tree_sizes_do_not_crash_the_loader() -> None:
    """LightGBM aborts the process on a wrong tree_sizes header; we never hand it one."""
    text = _update()
    longer = _first(r"^(leaf_value=)(\S+)", r"\g<1>\g<2>000", text)
    assert _check(longer) == []
    assert np.isfinite(
        predict_raw(
            GlobalEnsemble(
                objective="binary",
                num_class=1,
                base_score=[0.0],
                feature_names=NAMES,
                categorical=CATEGORICAL,
                rounds=[[("a", 1.0, longer)]],
            ),
            _data("binary", n=20)[0],
        )
    ).all()


# --------------------------------------------------------------------------------------
# Aggregation weights and learning rates
# --------------------------------------------------------------------------------------


def test_aggregation_weights() -> None:
    n = {"a": 600, "b": 300, "c": 100}
    samples = aggregation_weights(n, "samples")
    assert samples == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})
    assert sum(samples.values()) == pytest.approx(1.0)
    assert aggregation_weights(n, "uniform") == pytest.approx(dict.fromkeys(n, 1 / 3))
    assert aggregation_weights(n, "lr_scaled") == dict.fromkeys(n, 1.0)
    rates = party_learning_rates(n, 0.1, "lr_scaled")
    assert rates == pytest.approx({"a": 0.06, "b": 0.03, "c": 0.01})
    assert sum(rates.values()) == pytest.approx(0.1)
    assert party_learning_rates(n, 0.1, "samples") == dict.fromkeys(n, 0.1)
    with pytest.raises(ValueError, match="no updates"):
        aggregation_weights({}, "samples")
    with pytest.raises(ValueError, match="at least one training row"):
        aggregation_weights({"a": 0}, "samples")
    with pytest.raises(ValueError, match="negative"):
        aggregation_weights({"a": -1}, "uniform")


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
