"""Aggregation strategies behind one interface, and the new cyclic strategy end to end in
the in-memory loop (the flow calls the same round rules and strategies)."""

from __future__ import annotations

import pytest

from tasks.horizontal.loop import train_federated
from tasks.horizontal.strategies import make_strategy, strategy_names
from tests.test_training import NAMES, _frames, _spec


def test_every_strategy_is_found_by_name() -> None:
    assert {"samples", "uniform", "lr_scaled", "cyclic"} <= set(strategy_names())
    with pytest.raises(ValueError, match="unknown aggregation 'bagging'"):
        make_strategy("bagging", learning_rate=0.1)


def test_cyclic_takes_turns_in_the_spec_order_or_by_seed() -> None:
    n = {"a": 10, "b": 0, "c": 5, "d": 7}
    ordered = make_strategy("cyclic", learning_rate=0.1, order=["d", "b", "a", "c"])
    # b has no training rows: skipped
    assert [ordered.plan(t, n).parties for t in range(1, 5)] == [("d",), ("a",), ("c",), ("d",)]
    assert ordered.plan(1, n).learning_rates == {"d": 0.1}
    assert ordered.weights({"d": 7}) == {"d": 1.0}
    with pytest.raises(ValueError, match="one update per round"):
        ordered.weights({"a": 1, "d": 7})
    seeded = [make_strategy("cyclic", learning_rate=0.1, seed=s).turns(n) for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] and sorted(seeded[0]) == ["a", "c", "d"]


def test_cyclic_training_adds_one_party_per_round() -> None:
    frames = _frames(n=2400, parties=3)
    spec = _spec(aggregation="cyclic", order=["p2", "p0", "p1"], rounds=6, patience=10)
    ensemble, history = train_federated(
        frames, spec=spec, objective="binary", num_class=1, categorical=["cat"], feature_names=NAMES
    )
    assert [[p for p, _, _ in r] for r in ensemble.rounds] == [["p2"], ["p0"], ["p1"]] * 2
    assert all(w == 1.0 for r in ensemble.rounds for _, w, _ in r)
    assert history.stop_reason == "rounds"
    assert history.rounds[-1].valid["auc"] > 0.8


def test_stop_reasons_are_recorded() -> None:
    frames = _frames(n=1500, parties=3)
    common = {"objective": "binary", "num_class": 1, "categorical": ["cat"], "feature_names": NAMES}
    _, budget = train_federated(frames, spec=_spec(max_trees=12, patience=10), **common)  # type: ignore[arg-type]
    assert budget.stop_reason == "max_trees" and len(budget.rounds) == 2  # 6 trees a round
    _, limit = train_federated(frames, spec=_spec(rounds=2, patience=10), **common)  # type: ignore[arg-type]
    assert limit.stop_reason == "rounds"


def test_a_one_class_party_is_left_out_of_training_but_evaluated() -> None:
    import polars as pl

    from tasks.types import LABEL

    frames = _frames(n=2400, parties=3)
    frames["p1"] = frames["p1"].with_columns(pl.lit(0).cast(frames["p1"][LABEL].dtype).alias(LABEL))
    ensemble, history = train_federated(
        frames,
        spec=_spec(rounds=2, patience=10),
        objective="binary",
        num_class=1,
        categorical=["cat"],
        feature_names=NAMES,
    )
    assert history.left_out == {"p1": "one class only in its training rows"}
    assert all(p != "p1" for r in ensemble.rounds for p, _, _ in r)
    assert "p1" in history.rounds[0].party_valid


# --------------------------------------------------------------------------------------
# Aggregation weights and learning rates
# --------------------------------------------------------------------------------------


def test_aggregation_weights() -> None:
    def weights(n: dict[str, int], mode: str) -> dict[str, float]:
        return make_strategy(mode, learning_rate=1.0).weights(n)

    def rates(n: dict[str, int], mode: str) -> dict[str, float]:
        return make_strategy(mode, learning_rate=0.1).learning_rates(n)

    n = {"a": 600, "b": 300, "c": 100}
    samples = weights(n, "samples")
    assert samples == pytest.approx({"a": 0.6, "b": 0.3, "c": 0.1})
    assert sum(samples.values()) == pytest.approx(1.0)
    assert weights(n, "uniform") == pytest.approx(dict.fromkeys(n, 1 / 3))
    assert weights(n, "lr_scaled") == dict.fromkeys(n, 1.0)
    scaled = rates(n, "lr_scaled")
    assert scaled == pytest.approx({"a": 0.06, "b": 0.03, "c": 0.01})
    assert sum(scaled.values()) == pytest.approx(0.1)
    assert rates(n, "samples") == dict.fromkeys(n, 0.1)
    with pytest.raises(ValueError, match="no updates"):
        weights({}, "samples")
    with pytest.raises(ValueError, match="at least one training row"):
        weights({"a": 0}, "samples")
    with pytest.raises(ValueError, match="negative"):
        weights({"a": -1}, "uniform")
