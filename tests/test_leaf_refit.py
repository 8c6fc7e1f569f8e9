"""Global leaf values: one party's refit is LightGBM's own fit; several parties' sums pool."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest

from tasks.horizontal.leaf_refit import leaf_sums, refit_leaves, refit_values
from tasks.horizontal.model_text import load_booster


def _data(n: int, seed: int, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(float)
    if classes > 2:
        y = np.digitize(X[:, 0] + 0.3 * rng.normal(size=n), [-0.5, 0.5]).astype(float)
    return X, y


def _fit(X: np.ndarray, y: np.ndarray, init: np.ndarray, objective: str, trees: int, **more) -> str:  # type: ignore[no-untyped-def]
    params = {
        "objective": objective,
        "learning_rate": 0.3,
        "num_leaves": 7,
        "verbose": -1,
        "num_threads": 1,
        "min_data_in_leaf": 5,
        **more,
    }
    data = lgb.Dataset(X, label=y, init_score=init.reshape(-1, order="F"))
    return str(lgb.train(params, data, num_boost_round=trees).model_to_string())


@pytest.mark.parametrize(
    ("objective", "num_class", "trees"),
    [("binary", 1, 1), ("binary", 1, 3), ("regression", 1, 2), ("multiclass", 3, 2)],
)
def test_a_partys_own_refit_gives_lightgbms_leaf_values(
    objective: str, num_class: int, trees: int
) -> None:
    X, y = _data(600, 0, classes=3 if num_class > 1 else 2)
    raw = np.full((len(y), num_class), 0.2) if num_class > 1 else np.full(len(y), 0.2)
    more = {"num_class": num_class} if num_class > 1 else {}
    text = _fit(X, y, raw, objective, trees, **more)
    sums = leaf_sums(text, X, y, raw, objective=objective, num_class=num_class, min_rows=1)  # type: ignore[arg-type]
    values = refit_values([sums], learning_rate=0.3)
    before = load_booster(text).predict(X, raw_score=True)
    after = load_booster(refit_leaves(text, values)).predict(X, raw_score=True)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_parties_sums_pool_to_the_fit_on_all_their_rows() -> None:
    X, y = _data(900, 1)
    raw = np.zeros(len(y))
    text = _fit(X[:300], y[:300], raw[:300], "binary", 1)
    parts = [slice(0, 300), slice(300, 600), slice(600, 900)]
    sums = [
        leaf_sums(text, X[s], y[s], raw[s], objective="binary", num_class=1, min_rows=1)
        for s in parts
    ]
    pooled = leaf_sums(text, X, y, raw, objective="binary", num_class=1, min_rows=1)
    np.testing.assert_allclose(
        np.asarray(refit_values(sums, learning_rate=0.3), dtype=float),
        np.asarray(refit_values([pooled], learning_rate=0.3), dtype=float),
        rtol=1e-12,
    )


def test_a_leaf_with_fewer_than_min_rows_of_a_party_is_reported_empty() -> None:
    X, y = _data(400, 2)
    text = _fit(X, y, np.zeros(len(y)), "binary", 1)
    sums = leaf_sums(text, X[:7], y[:7], np.zeros(7), objective="binary", num_class=1, min_rows=5)
    for tree in sums.trees:
        for count, grad, hess in zip(tree.count, tree.grad, tree.hess, strict=True):
            assert count == 0 or count >= 5
            if count == 0:
                assert grad == 0.0 and hess == 0.0


def test_bad_sums_are_refused() -> None:
    X, y = _data(200, 3)
    text = _fit(X, y, np.zeros(len(y)), "binary", 1)
    good = leaf_sums(text, X, y, np.zeros(len(y)), objective="binary", num_class=1, min_rows=1)
    tree = good.trees[0]
    bad = good.model_copy(
        update={"trees": [tree.model_copy(update={"grad": [float("nan")] * len(tree.grad)})]}
    )
    with pytest.raises(ValueError, match="non-finite"):
        refit_values([good, bad], learning_rate=0.1)
    short = good.model_copy(update={"trees": [tree.model_copy(update={"grad": tree.grad[:-1]})]})
    with pytest.raises(ValueError, match="numbers of leaves"):
        refit_values([good, short], learning_rate=0.1)


# -- in the round -------------------------------------------------------------------------


def test_a_rounds_updates_get_the_leaf_values_of_all_parties_rows() -> None:
    """One round in memory: every accepted tree's leaves are the Newton step over the
    pooled training rows (min_data_in_leaf 1: no leaf is below a party's minimum)."""
    from tasks.horizontal.loop import train_federated
    from tasks.horizontal.training import label_stats, party_data
    from tests.test_training import NAMES, _frames, _spec

    frames = _frames(n=1800, parties=3)
    spec = _spec(rounds=1, trees_per_round=1, min_data_in_leaf=1, leaf_values="consortium")
    common = {"objective": "binary", "num_class": 1, "categorical": ["cat"], "feature_names": NAMES}
    ensemble, _ = train_federated(frames, spec=spec, **common)  # type: ignore[arg-type]
    data = [
        party_data(f, party=p, feature_names=NAMES, validation_fraction=0.2, test_fraction=0.2)
        for p, f in frames.items()
    ]
    X = np.concatenate([d.X_train for d in data])
    y = np.concatenate([d.y_train for d in data])
    raw = np.full(len(y), ensemble.base_score[0])
    assert label_stats(y, "binary", 1).n_train == len(y)
    for _party, _weight, text in ensemble.rounds[0]:
        pooled = leaf_sums(text, X, y, raw, objective="binary", num_class=1, min_rows=1)
        want = refit_values([pooled], learning_rate=spec.learning_rate)
        got = load_booster(text).dump_model()["tree_info"][0]["tree_structure"]
        values = [v for _, v in sorted(_leaves(got))]
        np.testing.assert_allclose(values, want[0], rtol=1e-9, atol=1e-12)  # type: ignore[arg-type]


def _leaves(node: dict[str, object]) -> list[tuple[int, float]]:
    if "leaf_value" in node:
        return [(int(node["leaf_index"]), float(node["leaf_value"]))]  # type: ignore[call-overload]
    return _leaves(node["left_child"]) + _leaves(node["right_child"])  # type: ignore[arg-type]


def test_a_reporter_whose_sums_do_not_fit_is_left_out_of_the_leaf_values() -> None:
    from tasks.horizontal.rounds import Candidate, ModelRules, Review, refit_review

    X, y = _data(300, 4)
    text = _fit(X, y, np.zeros(len(y)), "binary", 1)
    good = leaf_sums(text, X, y, np.zeros(len(y)), objective="binary", num_class=1, min_rows=5)
    tree = good.trees[0]
    review = Review(accepted=[Candidate(party="a", round=1, n_train=300, text=text)])
    rules = ModelRules(
        feature_names=[f"Column_{i}" for i in range(4)],
        categorical=[],
        objective="binary",
        num_class=1,
        trees_per_round=1,
        max_abs_leaf=30.0,
    )
    lying = {
        "nan": good.model_copy(
            update={"trees": [tree.model_copy(update={"grad": [float("nan")] * len(tree.grad)})]}
        ),
        "tiny": good.model_copy(update={"min_rows": 1}),
        "huge": good.model_copy(
            update={"trees": [tree.model_copy(update={"grad": [1e300] * len(tree.grad)})]}
        ),
        "short": good.model_copy(
            update={"trees": [tree.model_copy(update={"hess": tree.hess[:-1]})]}
        ),
    }
    sums = {"a": {"a": good}, "idle": {}} | {k: {"a": v} for k, v in lying.items()}
    out, bad = refit_review(review, sums, rules=rules, learning_rates={"a": 0.3}, min_rows=5)
    assert set(bad) == {"nan", "tiny", "short", "huge"}
    alone, none = refit_review(
        review, {"a": {"a": good}}, rules=rules, learning_rates={"a": 0.3}, min_rows=5
    )
    assert not none and out.accepted[0].text == alone.accepted[0].text
