from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.datasets import make_classification, make_regression

from tasks.horizontal.baselines import train_centralised, train_local_only
from tasks.horizontal.ensemble import GlobalEnsemble, ensemble_size, predict_raw
from tasks.horizontal.loop import (
    RoundUpdate,
    aggregate_updates,
    run_round,
    start_state,
    train_federated,
)
from tasks.horizontal.rounds import ModelRules, RoundError
from tasks.horizontal.strategies import make_strategy
from tasks.horizontal.training import (
    EarlyStopping,
    LabelStats,
    aggregate_metrics,
    base_score,
    evaluate,
    label_stats,
    lgb_params,
    party_data,
    party_seed,
    split_assignments,
    train_update,
)
from tasks.spec.models import TrainingSpec
from tasks.types import ENTITY_HASH, LABEL, Objective

NAMES = [f"x{i}" for i in range(7)] + ["cat"]


def _hash(i: int) -> str:
    return hashlib.sha256(f"entity-{i}".encode()).hexdigest()


def _frames(
    objective: Objective = "binary", *, n: int = 3000, parties: int = 3, seed: int = 0
) -> dict[str, pl.DataFrame]:
    """IID split of a synthetic problem across parties; one categorical feature."""
    if objective == "regression":
        x, y = make_regression(n, 8, n_informative=5, noise=10.0, random_state=seed)
    else:
        classes = 3 if objective == "multiclass" else 2
        x, y = make_classification(
            n, 8, n_informative=5, n_redundant=1, n_classes=classes, random_state=seed
        )
    columns: dict[str, pl.Series] = {
        ENTITY_HASH: pl.Series([_hash(i) for i in range(n)]),
        LABEL: pl.Series(y.astype(np.int64) if objective != "regression" else y),
    }
    rng = np.random.default_rng(seed)
    for j, name in enumerate(NAMES[:-1]):
        values = x[:, j].copy()
        values[rng.random(n) < 0.03] = np.nan
        columns[name] = pl.Series(values).fill_nan(None)
    columns["cat"] = pl.Series(np.digitize(x[:, 7], [-1.0, 0.0, 1.0]), dtype=pl.Int32)
    frame = pl.DataFrame(columns)
    return {f"p{k}": frame[k::parties] for k in range(parties)}


def _spec(**kw: object) -> TrainingSpec:
    base: dict[str, object] = {
        "rounds": 8,
        "trees_per_round": 2,
        "learning_rate": 0.2,
        "num_leaves": 7,
        "min_data_in_leaf": 10,
        "patience": 3,
        "test_fraction": 0.2,
    }
    base.update(kw)
    return TrainingSpec.model_validate(base)


def _k(objective: Objective) -> int:
    return 3 if objective == "multiclass" else 1


# --------------------------------------------------------------------------------------
# Splits, params, base score
# --------------------------------------------------------------------------------------


def test_split_assignments_deterministic_and_proportional() -> None:
    hashes = pl.Series(ENTITY_HASH, [_hash(i) for i in range(20000)])
    split = split_assignments(hashes, validation_fraction=0.2, test_fraction=0.1)
    assert split.dtype == pl.String
    again = split_assignments(hashes.reverse(), validation_fraction=0.2, test_fraction=0.1)
    assert again.reverse().to_list() == split.to_list()  # per key, not per position
    shares = split.value_counts(normalize=True).to_dict(as_series=False)
    share = dict(zip(shares["split"], shares["proportion"], strict=True))
    assert share["test"] == pytest.approx(0.1, abs=0.01)
    assert share["valid"] == pytest.approx(0.2, abs=0.01)
    assert share["train"] == pytest.approx(0.7, abs=0.01)
    # The first 8 hex digits decide: 0x00000000 is test, 0xffffffff train.
    fixed = pl.Series(["00000000aa", "1c000000", "ffffffff00"])
    assert split_assignments(fixed, validation_fraction=0.2, test_fraction=0.1).to_list() == [
        "test",
        "valid",
        "train",
    ]
    no_test = split_assignments(hashes, validation_fraction=0.2, test_fraction=0.0)
    assert "test" not in no_test.to_list()


def test_split_assignments_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="null"):
        split_assignments(pl.Series(["ab" * 32, None]), validation_fraction=0.2, test_fraction=0.1)
    with pytest.raises(ValueError, match="non-hex"):
        split_assignments(pl.Series(["zzzzzzzzzz"]), validation_fraction=0.2, test_fraction=0.1)
    with pytest.raises(ValueError, match="shorter"):
        split_assignments(pl.Series(["abc"]), validation_fraction=0.2, test_fraction=0.1)


def test_lgb_params() -> None:
    spec = _spec(params={"lambda_l2": 1.0, "num_threads": 2})
    params = lgb_params(spec, "multiclass", 3, seed=7, learning_rate=0.01)
    assert params["objective"] == "multiclass"
    assert params["num_class"] == 3
    assert params["learning_rate"] == 0.01
    assert params["deterministic"] is True
    assert params["seed"] == 7
    assert params["verbose"] == -1
    assert params["lambda_l2"] == 1.0
    assert params["num_threads"] == 2
    assert "num_class" not in lgb_params(spec, "binary", 1, seed=7)
    assert lgb_params(spec, "binary", 1, seed=7)["learning_rate"] == 0.2
    with pytest.raises(ValueError, match="boosting"):
        lgb_params(_spec(params={"boosting": "dart"}), "binary", 1, seed=0)
    with pytest.raises(ValueError, match="n_estimators"):
        lgb_params(_spec(params={"n_estimators": 5}), "binary", 1, seed=0)
    assert party_seed(0, "a", 1) == party_seed(0, "a", 1) != party_seed(0, "b", 1)


def test_base_score_from_aggregates_only() -> None:
    y_a, y_b = np.array([1.0, 0, 0, 0]), np.array([1.0, 1, 0, 1, 1, 0])
    stats = {"a": label_stats(y_a, "binary", 1), "b": label_stats(y_b, "binary", 1)}
    p = np.concatenate([y_a, y_b]).mean()
    assert base_score(stats, "binary") == pytest.approx([math.log(p / (1 - p))])
    assert base_score(list(stats.values()), "binary") == base_score(stats, "binary")
    m = {
        "a": label_stats(np.array([0, 0, 1]), "multiclass", 3),
        "b": label_stats(np.array([2, 1, 0, 0]), "multiclass", 3),
    }
    assert base_score(m, "multiclass", 3) == pytest.approx(np.log([4 / 7, 2 / 7, 1 / 7]).tolist())
    r = {"a": label_stats(np.array([1.0, 2.0]), "regression", 1), "b": LabelStats(n_train=0)}
    assert base_score(r, "regression") == [1.5]
    only_ones = {"a": label_stats(np.ones(5), "binary", 1)}
    assert math.isfinite(base_score(only_ones, "binary")[0])
    with pytest.raises(ValueError, match="no training rows"):
        base_score({"a": LabelStats(n_train=0)}, "binary")
    with pytest.raises(ValueError, match="binary labels"):
        label_stats(np.array([0.0, 2.0]), "binary", 1)
    with pytest.raises(ValueError, match="multiclass labels"):
        label_stats(np.array([0.0, 3.0]), "multiclass", 3)


def test_evaluate_and_aggregate_metrics() -> None:
    y = np.array([0.0, 1, 1, 0])
    raw = np.array([-2.0, 1.5, 0.3, 0.5])
    m = evaluate(y, raw, "binary", 1)
    assert m["auc"] == pytest.approx(0.75)
    p = 1 / (1 + np.exp(-raw))
    assert m["logloss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert "auc" not in evaluate(np.ones(3), np.zeros(3), "binary", 1)
    assert evaluate(np.array([]), np.array([]), "binary", 1) == {}
    multi = evaluate(np.array([0, 2]), np.array([[2.0, 0, 0], [0, 1, 0]]), "multiclass", 3)
    assert multi["accuracy"] == 0.5
    reg = evaluate(np.array([1.0, 3.0]), np.array([2.0, 2.0]), "regression", 1)
    assert reg == {"mse": 1.0, "rmse": 1.0}
    agg = aggregate_metrics(
        {
            "a": (100, {"auc": 0.9, "logloss": 0.3}),
            "b": (300, {"auc": 0.7, "logloss": 0.5}),
            "c": (50, {"logloss": 0.1}),
            "d": (0, {}),
        }
    )
    assert agg["auc_weighted_mean"] == pytest.approx((90 + 210) / 400)
    assert "auc" not in agg  # the pooled AUC needs the parties' score histograms
    assert agg["logloss"] == pytest.approx((30 + 150 + 5) / 450)
    pooled = aggregate_metrics(
        {"a": (1, {"mse": 1.0, "rmse": 1.0}), "b": (1, {"mse": 9.0, "rmse": 3.0})}
    )
    assert pooled["rmse"] == pytest.approx(math.sqrt(5.0))


def test_early_stopping_keeps_the_best_round() -> None:
    stopper = EarlyStopping(patience=2)
    losses = [0.9, 0.7, 0.75, 0.65, 0.66, 0.7, 0.5]
    stops = [stopper.should_stop(v) for v in losses[:6]]
    assert stops == [False, False, False, False, False, True]
    assert (stopper.best_round, stopper.best_loss) == (4, 0.65)
    # Resume from a checkpoint, explicit rounds.
    resumed = EarlyStopping(patience=2, best_round=4, best_loss=0.65)
    assert resumed.update(5, 0.66) is False
    assert resumed.update(6, 0.64) is False
    assert resumed.best_round == 6
    assert EarlyStopping.from_losses([math.nan, math.nan], patience=2).best_round == 0


# --------------------------------------------------------------------------------------
# Rounds
# --------------------------------------------------------------------------------------


def _states(frames: dict[str, pl.DataFrame], objective: Objective, spec: TrainingSpec):  # type: ignore[no-untyped-def]
    k = _k(objective)
    data = {
        p: party_data(
            f,
            party=p,
            feature_names=NAMES,
            validation_fraction=spec.validation_fraction,
            test_fraction=spec.test_fraction,
        )
        for p, f in frames.items()
    }
    stats = {p: label_stats(d.y_train, objective, k) for p, d in data.items()}
    base = base_score(stats, objective, k)
    ensemble = GlobalEnsemble(
        objective=objective,
        num_class=k,
        base_score=base,
        feature_names=NAMES,
        categorical=["cat"],
        aggregation=spec.aggregation,
        trees_per_round=spec.trees_per_round,
    )
    rates = make_strategy(spec.aggregation, learning_rate=spec.learning_rate).learning_rates(
        {p: s.n_train for p, s in stats.items()}
    )
    return ensemble, {p: start_state(d, base, k) for p, d in data.items()}, rates


@pytest.mark.parametrize(
    ("objective", "aggregation"),
    [("binary", "samples"), ("multiclass", "uniform"), ("regression", "lr_scaled")],
)
def test_running_scores_equal_a_fresh_prediction(objective: Objective, aggregation: str) -> None:
    spec = _spec(aggregation=aggregation)
    ensemble, states, rates = _states(_frames(objective, n=1500), objective, spec)
    for t in (1, 2, 3):
        ensemble, states, record = run_round(
            ensemble, states, round_=t, spec=spec, learning_rates=rates
        )
        assert record.rejected == {}
        assert record.trees == ensemble_size(ensemble).trees
        for state in states.values():
            d = state.data
            np.testing.assert_allclose(
                state.raw_train, predict_raw(ensemble, d.X_train, upto_round=t), atol=1e-9
            )
            np.testing.assert_allclose(
                state.raw_valid, predict_raw(ensemble, d.X_valid, upto_round=t), atol=1e-9
            )
    weights = record.weights
    if aggregation == "lr_scaled":
        assert weights == dict.fromkeys(states, 1.0)
    else:
        assert sum(weights.values()) == pytest.approx(1.0)


def test_lr_scaled_equals_samples_with_one_tree_per_round() -> None:
    """Leaf values are linear in the learning rate, so with one tree per round the two modes
    build the same function (the documented difference is within-round local steps)."""
    frames = _frames(n=1500)
    out = {}
    for mode in ("samples", "lr_scaled"):
        spec = _spec(aggregation=mode, trees_per_round=1, rounds=3)
        ensemble, _ = train_federated(
            frames,
            spec=spec,
            objective="binary",
            num_class=1,
            categorical=["cat"],
            feature_names=NAMES,
        )
        out[mode] = predict_raw(ensemble, frames["p0"], upto_round=3)
    np.testing.assert_allclose(out["samples"], out["lr_scaled"], atol=1e-9)


def test_bad_update_is_rejected_and_weights_renormalised() -> None:
    spec = _spec(min_parties=2)
    ensemble, states, rates = _states(_frames(n=1500), "binary", spec)
    from tasks.horizontal.loop import train_party

    updates = [
        train_party(
            s,
            round_=1,
            spec=spec,
            objective="binary",
            num_class=1,
            categorical=["cat"],
            feature_names=NAMES,
            learning_rate=rates[p],
        )
        for p, s in states.items()
    ]
    poisoned = updates[0].model_copy(
        update={"model_text": updates[0].model_text.replace("leaf_value=", "leaf_value=nan ", 1)}
    )
    rules = ModelRules.for_spec(
        spec, feature_names=NAMES, categorical=["cat"], objective="binary", num_class=1
    )
    kw = {"rules": rules, "strategy": make_strategy("samples", learning_rate=spec.learning_rate)}
    new, rejected = aggregate_updates(
        ensemble, [poisoned, *updates[1:]], round_=1, min_parties=2, **kw
    )
    assert list(rejected) == ["p0"]
    assert [p for p, _, _ in new.rounds[0]] == ["p1", "p2"]
    assert sum(w for _, w, _ in new.rounds[0]) == pytest.approx(1.0)
    with pytest.raises(RoundError, match="min_parties is 3"):
        aggregate_updates(ensemble, [poisoned, *updates[1:]], round_=1, min_parties=3, **kw)
    with pytest.raises(RoundError, match="does not follow"):
        aggregate_updates(ensemble, updates, round_=2, min_parties=1, **kw)
    late = RoundUpdate(**{**updates[1].model_dump(), "round": 5})
    _, rejected = aggregate_updates(ensemble, [late, updates[2]], round_=1, min_parties=1, **kw)
    assert "p1" in rejected


def test_train_update_accepts_categorical_names_or_indices() -> None:
    frames = _frames(n=900)
    frame = frames["p0"]
    x = frame.select(NAMES)
    y = frame[LABEL].to_numpy().astype(float)
    params = lgb_params(_spec(), "binary", 1, seed=0)
    by_name = train_update(x, y, np.zeros(len(y)), params, 2, ["cat"])
    by_index = train_update(x.to_numpy(), y, np.zeros(len(y)), params, 2, [7], feature_names=NAMES)
    assert by_name == by_index
    assert "num_cat=" in by_name
    with pytest.raises(ValueError, match="feature_names is required"):
        train_update(x.to_numpy(), y, np.zeros(len(y)), params, 2, [7])


# --------------------------------------------------------------------------------------
# Whole loops
# --------------------------------------------------------------------------------------


def test_federated_close_to_centralised_on_iid_split() -> None:
    frames = _frames(n=6000, seed=1)
    spec = _spec(rounds=25, trees_per_round=2, learning_rate=0.1, num_leaves=15, patience=5)
    kw = {"objective": "binary", "num_class": 1, "categorical": ["cat"], "feature_names": NAMES}
    fed, fed_hist = train_federated(frames, spec=spec, **kw)  # type: ignore[arg-type]
    cen, cen_hist = train_centralised(frames, spec=spec, **kw)  # type: ignore[arg-type]
    local = train_local_only(frames, spec=spec, **kw)  # type: ignore[arg-type]
    assert fed_hist.test["auc"] > 0.9
    assert abs(fed_hist.test["auc"] - cen_hist.test["auc"]) < 0.01
    assert [p for p, _, _ in cen.rounds[0]] == ["pooled"]
    assert set(local) == set(frames)
    assert fed.best_round == fed_hist.best_round >= 1
    assert len(fed.metrics) == len(fed.rounds)


def test_training_is_deterministic() -> None:
    frames = _frames("multiclass", n=1200)
    spec = _spec(rounds=2)
    kw = {"objective": "multiclass", "num_class": 3, "categorical": ["cat"], "feature_names": NAMES}
    a, ha = train_federated(frames, spec=spec, **kw)  # type: ignore[arg-type]
    b, hb = train_federated(frames, spec=spec, **kw)  # type: ignore[arg-type]
    assert a == b
    assert ha == hb


def test_early_stopping_in_the_loop_keeps_best_round() -> None:
    frames = _frames(n=900)
    # Large learning rate and tiny leaves: validation loss bottoms out, then rises.
    spec = _spec(
        rounds=40,
        trees_per_round=1,
        learning_rate=0.5,
        num_leaves=31,
        min_data_in_leaf=2,
        patience=2,
    )
    ensemble, history = train_federated(
        frames, spec=spec, objective="binary", num_class=1, categorical=["cat"], feature_names=NAMES
    )
    losses = [r.valid["logloss"] for r in history.rounds]
    assert history.stop_reason == "early_stopping"
    assert 1 < history.best_round < len(losses)
    assert history.best_round == int(np.argmin(losses)) + 1
    assert len(ensemble.rounds) == history.best_round + spec.patience
    assert ensemble.best_round == history.best_round
    x = frames["p0"]
    np.testing.assert_array_equal(
        predict_raw(ensemble, x), predict_raw(ensemble, x, upto_round=history.best_round)
    )


def test_max_trees_caps_the_ensemble() -> None:
    frames = _frames(n=900)
    spec = _spec(rounds=10, trees_per_round=2, max_trees=20)  # 3 parties x 2 trees per round
    ensemble, history = train_federated(
        frames, spec=spec, objective="binary", num_class=1, categorical=["cat"], feature_names=NAMES
    )
    assert history.stop_reason == "max_trees"
    assert len(ensemble.rounds) == 3
    assert ensemble_size(ensemble).trees <= 20


def test_regression_loop_reports_pooled_rmse() -> None:
    frames = _frames("regression", n=1500)
    ensemble, history = train_federated(
        frames,
        spec=_spec(rounds=5),
        objective="regression",
        num_class=1,
        categorical=["cat"],
        feature_names=NAMES,
    )
    assert history.rounds[-1].valid["rmse"] == pytest.approx(
        math.sqrt(history.rounds[-1].valid["mse"])
    )
    assert history.rounds[-1].valid["rmse"] < history.rounds[0].valid["rmse"]
    assert ensemble.base_score[0] == pytest.approx(
        np.mean(
            np.concatenate(
                [s.data.y_train for s in _states(frames, "regression", _spec())[1].values()]
            )
        )
    )


def test_baselines_score_the_federated_model_on_each_partys_rows(tmp_path: Path) -> None:
    """A party's local-only model is scored on that party's test rows; the comparison puts
    the federated model on the same rows beside it, and those per-party figures add up
    (size-weighted) to the federated model's overall test metrics."""
    from storage.store import Store
    from tasks.horizontal.baselines import compare
    from tasks.prepare.design import FeatureSchema
    from tasks.report import comparison_rows

    frames = _frames(n=3000, seed=2)
    spec = _spec(rounds=6)
    kw = {"objective": "binary", "num_class": 1, "categorical": ["cat"], "feature_names": NAMES}
    fed, history = train_federated(frames, spec=spec, **kw)  # type: ignore[arg-type]
    store = Store(str(tmp_path))
    fused = {p: store.write_table(f, "fused", p) for p, f in frames.items()}
    schema = FeatureSchema(
        names=NAMES,
        categorical=["cat"],
        modality=dict.fromkeys(NAMES, "table"),
        parties=dict.fromkeys(frames, NAMES),
    )
    comparison = compare(
        fused,
        schema=schema,
        training=spec,
        objective="binary",
        num_class=1,
        federated=history.test,
        ensemble=fed,
    )
    assert set(comparison.federated_by_party) == set(comparison.local_only) == set(frames)
    sizes = {
        p: len(
            party_data(
                f,
                party=p,
                feature_names=NAMES,
                validation_fraction=spec.validation_fraction,
                test_fraction=spec.test_fraction,
            ).y_test
        )
        for p, f in frames.items()
    }
    overall = aggregate_metrics(
        {p: (sizes[p], m) for p, m in comparison.federated_by_party.items()}
    )
    assert overall["logloss"] == pytest.approx(history.test["logloss"], rel=1e-9)
    names = [row["model"] for row in comparison_rows(comparison, "binary")]
    assert names[:3] == [
        "federated",
        "local-only (per party)",
        "centralised (pools data; comparison only)",
    ]
    assert names[3:5] == ["p0: federated", "p0: local-only"]
