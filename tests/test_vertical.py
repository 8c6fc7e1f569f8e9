from __future__ import annotations

import json
import tomllib
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.horizontal.training import evaluate
from tasks.spec.load import parse_spec
from tasks.spec.models import FusionSpec, SpecError, TrainingSpec
from tasks.types import Objective
from tasks.vertical.data import LabelData, PartyBlock
from tasks.vertical.fusion import (
    fixed_fusion,
    fuse_scores,
    fusion_weights,
    join_scores,
    learn_fusion,
    score_table,
)
from tasks.vertical.loop import predict_rounds, train_vertical_rounds
from tasks.vertical.one_shot import train_one_shot
from tasks.vertical.party_model import (
    PartyModel,
    party_model_text,
    rewind,
    score_block,
    train_party_round,
)
from tasks.vertical.rounds import (
    LabelState,
    PartyDelta,
    combine_round,
    gradient_message,
    gradients,
    round_coefficients,
    rounds_fusion,
    start_label_state,
)

KEY = "alignment_id"
SPEC = TrainingSpec(
    rounds=8, trees_per_round=3, learning_rate=0.3, num_leaves=7, min_data_in_leaf=5, patience=3
)


def synthetic(
    objective: Objective = "binary", n: int = 900, seed: int = 0, num_class: int = 1
) -> tuple[LabelData, dict[str, PartyBlock]]:
    """Three parties with two features each; the label depends on every block."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    signal = x[:, 0] - x[:, 2] + x[:, 4] + 0.5 * x[:, 1] * x[:, 3] + 0.3 * rng.normal(size=n)
    if objective == "binary":
        y = (signal > 0).astype(np.float64)
    elif objective == "multiclass":
        y = np.digitize(signal, np.quantile(signal, np.linspace(0, 1, num_class + 1)[1:-1]))
        y = y.astype(np.float64)
    else:
        y = signal
    tr, va = slice(0, n * 3 // 5), slice(n * 3 // 5, n * 4 // 5)
    te = slice(n * 4 // 5, n)
    labels = LabelData(y_train=y[tr], y_valid=y[va], y_test=y[te])
    blocks = {
        p: PartyBlock(
            party=p,
            feature_names=(f"{p}0", f"{p}1"),
            X_train=x[tr, 2 * i : 2 * i + 2],
            X_valid=x[va, 2 * i : 2 * i + 2],
            X_test=x[te, 2 * i : 2 * i + 2],
        )
        for i, p in enumerate("ABC")
    }
    return labels, blocks


# --------------------------------------------------------------------------------------
# Gradients and the party step
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("objective", "k"), [("binary", 1), ("multiclass", 3), ("regression", 1)])
def test_gradients_are_derivatives_of_the_loss(objective: Objective, k: int) -> None:
    rng = np.random.default_rng(1)
    n = 50
    y = rng.integers(0, max(k, 2), n).astype(np.float64)
    raw = rng.normal(size=(n, k)).reshape(n) if k == 1 else rng.normal(size=(n, k))

    def loss(r: np.ndarray) -> float:
        metrics = evaluate(y, r, objective, k)
        return metrics["logloss"] * n if "logloss" in metrics else metrics["mse"] * n / 2

    g, h = gradients(y, raw, objective, k)
    eps = 1e-6
    flat = raw.reshape(-1)
    for i in (0, 7, len(flat) - 1):
        up, down = flat.copy(), flat.copy()
        up[i] += eps
        down[i] -= eps
        numeric = (loss(up.reshape(raw.shape)) - loss(down.reshape(raw.shape))) / (2 * eps)
        assert g.reshape(-1)[i] == pytest.approx(numeric, abs=1e-5)
    assert np.all(h > 0)


def test_one_party_l2_rounds_equal_plain_lightgbm() -> None:
    """L2 is quadratic: the within-round approximation g + h·δ is the exact gradient, so one
    party with every feature boosts exactly like LightGBM's own regression objective."""
    labels, blocks = synthetic("regression")
    spec = SPEC.model_copy(update={"rounds": 3, "patience": 10})
    run = train_vertical_rounds(
        labels, {"A": blocks["A"]}, spec=spec, objective="regression", num_class=1
    )
    assert run.state.progress.round == 3
    params = {
        "objective": "regression",
        "learning_rate": spec.learning_rate,
        "num_leaves": spec.num_leaves,
        "min_data_in_leaf": spec.min_data_in_leaf,
        "boost_from_average": False,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": 1,
        "verbose": -1,
    }
    base = float(labels.y_train.mean())
    booster = lgb.train(
        params,
        lgb.Dataset(blocks["A"].X_train, labels.y_train, init_score=np.full(540, base)),
        num_boost_round=9,
    )
    expected = base + booster.predict(blocks["A"].X_valid, raw_score=True)
    # LightGBM holds gradients as float32: equal up to that precision
    np.testing.assert_allclose(run.state.raw_valid, expected, rtol=0, atol=1e-6)


def test_within_round_approximation_keeps_improving() -> None:
    labels, blocks = synthetic()
    state = start_label_state(labels, parties=["A"], objective="binary", num_class=1, patience=3)
    message = gradient_message(state, labels)
    losses = []
    for trees in (1, 2, 4):
        spec = SPEC.model_copy(update={"trees_per_round": trees})
        _, delta = train_party_round(
            PartyModel(party="A"), blocks["A"], message, spec=spec, objective="binary", num_class=1
        )
        losses.append(
            evaluate(labels.y_train, state.raw_train + delta.train, "binary", 1)["logloss"]
        )
    assert losses[0] > losses[1] > losses[2]


def test_party_returns_only_deltas_and_keeps_one_model() -> None:
    labels, blocks = synthetic()
    state = start_label_state(labels, parties=["A"], objective="binary", num_class=1, patience=3)
    model = PartyModel(party="A")
    deltas = []
    for _ in range(2):
        message = gradient_message(state, labels)
        model, delta = train_party_round(
            model, blocks["A"], message, spec=SPEC, objective="binary", num_class=1
        )
        deltas.append(delta)
        state = combine_round(state, [delta], labels)
    assert model.iterations == [3, 6]
    assert lgb.Booster(model_str=model.model_text).num_trees() == 6
    assert deltas[1].train.shape == labels.y_train.shape
    assert deltas[1].valid.shape == labels.y_valid.shape
    # the one model reproduces the deltas round by round
    first = score_block(party_model_text(model, 1), blocks["A"].X_valid)
    both = score_block(party_model_text(model, 2), blocks["A"].X_valid)
    np.testing.assert_allclose(first, deltas[0].valid, atol=1e-12)
    np.testing.assert_allclose(both - first, deltas[1].valid, atol=1e-12)
    assert score_block(party_model_text(model, 0), blocks["A"].X_valid).tolist() == [0.0] * 180


def test_rewind_and_catch_up() -> None:
    labels, blocks = synthetic()
    state = start_label_state(labels, parties=["A"], objective="binary", num_class=1, patience=3)
    model = PartyModel(party="A")
    model, _ = train_party_round(
        model,
        blocks["A"],
        gradient_message(state, labels),
        spec=SPEC,
        objective="binary",
        num_class=1,
    )
    assert rewind(model, 0).model_text is None
    assert rewind(model, 3).iterations == [3, 3, 3]  # missed rounds 2 and 3
    # a party that ran ahead of the label party redoes the round from the right model
    again, delta = train_party_round(
        model,
        blocks["A"],
        gradient_message(state, labels),
        spec=SPEC,
        objective="binary",
        num_class=1,
    )
    assert again.iterations == [3]
    assert again.model_text == model.model_text
    assert delta.round == 1


# --------------------------------------------------------------------------------------
# Label party: rounds, checkpoints, resume
# --------------------------------------------------------------------------------------


def test_rounds_beat_every_single_block_and_inference_matches_state() -> None:
    labels, blocks = synthetic()
    run = train_vertical_rounds(labels, blocks, spec=SPEC, objective="binary", num_class=1)
    p = run.state.progress
    assert p.stop_reason in {"rounds", "early_stopping"}
    assert 1 <= p.best_round <= p.round
    # party models reproduce the label party's running scores
    valid = {q: b.X_valid for q, b in blocks.items()}
    np.testing.assert_allclose(
        predict_rounds(run.state, run.models, valid, upto_round=p.round), run.state.raw_valid
    )
    assert run.test["auc"] > 0.9
    for block in blocks.values():
        alone = train_one_shot(block, labels, spec=SPEC, objective="binary", num_class=1)
        assert alone.test is not None
        assert run.test["auc"] > evaluate(labels.y_test, alone.test, "binary", 1)["auc"] + 0.05


def test_early_stopping_keeps_the_best_round() -> None:
    labels, blocks = synthetic(n=400)
    spec = SPEC.model_copy(update={"rounds": 40, "learning_rate": 1.0, "patience": 2})
    run = train_vertical_rounds(labels, blocks, spec=spec, objective="binary", num_class=1)
    p = run.state.progress
    assert p.stop_reason == "early_stopping"
    assert p.round - p.best_round == 2
    losses = [r.valid["logloss"] for r in p.history]
    assert p.best_loss == min(losses) == losses[p.best_round - 1]
    test_blocks = {q: b.X_test for q, b in blocks.items() if b.X_test is not None}
    assert labels.y_test is not None
    best = evaluate(labels.y_test, predict_rounds(run.state, run.models, test_blocks), "binary", 1)
    assert best == run.test


def test_multiclass_rounds() -> None:
    labels, blocks = synthetic("multiclass", num_class=3)
    run = train_vertical_rounds(
        labels,
        blocks,
        spec=SPEC.model_copy(update={"rounds": 4}),
        objective="multiclass",
        num_class=3,
    )
    assert run.state.raw_valid.shape == (180, 3)
    assert run.test["accuracy"] > 0.6
    assert run.state.progress.history[0].trees == {"A": 9, "B": 9, "C": 9}


def _roundtrip(state: LabelState) -> LabelState:
    document, arrays = state.checkpoint()
    return LabelState.from_checkpoint(json.loads(json.dumps(document)), dict(arrays))


def test_resume_gives_the_same_model_as_an_uninterrupted_run() -> None:
    labels, blocks = synthetic()
    spec = SPEC.model_copy(update={"rounds": 6})
    whole = train_vertical_rounds(labels, blocks, spec=spec, objective="binary", num_class=1)
    part = train_vertical_rounds(
        labels, blocks, spec=spec, objective="binary", num_class=1, stop_after=2
    )
    assert part.state.progress.round == 2
    assert part.state.progress.stop_reason is None
    models = {
        p: PartyModel.model_validate_json(m.model_dump_json()) for p, m in part.models.items()
    }
    # party C ran one round ahead before the label party's crash: it rewinds itself
    ahead, _ = train_party_round(
        models["C"],
        blocks["C"],
        gradient_message(part.state, labels),
        spec=spec,
        objective="binary",
        num_class=1,
    )
    models["C"] = ahead
    resumed = train_vertical_rounds(
        labels,
        blocks,
        spec=spec,
        objective="binary",
        num_class=1,
        state=_roundtrip(part.state),
        models=models,
    )
    assert resumed.state.progress == whole.state.progress
    np.testing.assert_array_equal(resumed.state.raw_train, whole.state.raw_train)
    np.testing.assert_array_equal(resumed.state.raw_valid, whole.state.raw_valid)
    assert resumed.test == whole.test
    for p in blocks:
        assert resumed.models[p].iterations == whole.models[p].iterations
        np.testing.assert_array_equal(
            score_block(resumed.models[p].model_text, blocks[p].X_valid),
            score_block(whole.models[p].model_text, blocks[p].X_valid),
        )


def test_checkpoint_is_verified() -> None:
    labels, _ = synthetic()
    state = start_label_state(
        labels, parties=["A", "B"], objective="binary", num_class=1, patience=2
    )
    document, arrays = state.checkpoint()
    assert set(arrays) == {"raw_train", "raw_valid"}
    assert all(a.dtype == np.float64 for a in arrays.values())
    bad = dict(arrays, raw_valid=arrays["raw_valid"] + 1.0)
    with pytest.raises(ValueError, match="raw_valid"):
        LabelState.from_checkpoint(document, bad)


def test_combine_round_checks_deltas_and_tolerates_a_missing_party() -> None:
    labels, blocks = synthetic()
    state = start_label_state(
        labels, parties=["A", "B", "C"], objective="binary", num_class=1, patience=2
    )
    zeros = (np.zeros_like(labels.y_train), np.zeros_like(labels.y_valid))
    with pytest.raises(ValueError, match="shape"):
        combine_round(state, [PartyDelta("A", 1, zeros[0][:5], zeros[1])], labels)
    with pytest.raises(ValueError, match="non-finite"):
        combine_round(state, [PartyDelta("A", 1, zeros[0] + np.nan, zeros[1])], labels)
    with pytest.raises(ValueError, match="round 2"):
        combine_round(state, [PartyDelta("A", 2, *zeros)], labels)
    with pytest.raises(ValueError, match="min_parties"):
        combine_round(state, [PartyDelta("A", 1, *zeros)], labels, min_parties=2)
    message = gradient_message(state, labels)
    deltas = [
        train_party_round(
            PartyModel(party=p), blocks[p], message, spec=SPEC, objective="binary", num_class=1
        )[1]
        for p in ("A", "C")
    ]
    after = combine_round(state, deltas, labels)
    assert after.progress.history[0].parties == ["A", "C"]
    expected = state.raw_valid + deltas[0].valid + deltas[1].valid  # sum: c_p = 1
    np.testing.assert_allclose(after.raw_valid, expected)


def test_coefficients_and_weights() -> None:
    assert round_coefficients(["A", "B"], None, "sum") == {"A": 1.0, "B": 1.0}
    assert round_coefficients(["A", "B"], None, "mean") == {"A": 0.5, "B": 0.5}
    assert round_coefficients(["A", "B"], {"A": 3, "B": 1}, "sum") == {"A": 1.5, "B": 0.5}
    assert fusion_weights(["A", "B"], {"A": 0.4, "B": 0.4}) == {"A": 0.5, "B": 0.5}
    with pytest.raises(ValueError, match=r"fusion\.weights"):
        fusion_weights(["A", "B"], {"A": 1.0})
    with pytest.raises(ValueError, match=r"fusion\.weights"):
        fusion_weights(["A"], {"A": 0.0})


def test_fixed_weights_from_the_spec_drive_the_rounds() -> None:
    labels, blocks = synthetic()
    fusion = FusionSpec(weights={"A": 2.0, "B": 1.0, "C": 1.0})
    run = train_vertical_rounds(
        labels,
        blocks,
        spec=SPEC.model_copy(update={"rounds": 1}),
        objective="binary",
        num_class=1,
        fusion=fusion,
    )
    assert run.state.progress.coefficients == {"A": 1.5, "B": 0.75, "C": 0.75}


# --------------------------------------------------------------------------------------
# Score tables and fusion
# --------------------------------------------------------------------------------------


def _ids(*names: str) -> pl.Series:
    return pl.Series(KEY, list(names))


def test_fixed_fusion_renormalises_over_present_parties() -> None:
    tables = {
        "A": score_table(_ids("e1", "e2", "e3"), np.array([1.0, 2.0, 3.0]), key=KEY),
        "B": score_table(_ids("e1", "e3"), np.array([3.0, -1.0]), key=KEY),
    }
    fusion = fixed_fusion(
        ["A", "B"], {"A": 0.75, "B": 0.25}, objective="binary", num_class=1, base=[-1.0]
    )
    out = fuse_scores(tables, fusion, key=KEY, ids=_ids("e1", "e2", "e3", "e4"))
    expected = pl.DataFrame(
        {
            KEY: ["e1", "e2", "e3", "e4"],
            "score": [0.75 * 1 + 0.25 * 3, 2.0, 0.75 * 3 + 0.25 * -1, -1.0],
            "parties": pl.Series([2, 1, 2, 0], dtype=pl.Int32),
        }
    )
    assert_frame_equal(out, expected)


def test_rounds_fusion_absent_party_contributes_zero() -> None:
    labels, blocks = synthetic()
    run = train_vertical_rounds(
        labels, blocks, spec=SPEC.model_copy(update={"rounds": 2}), objective="binary", num_class=1
    )
    n = len(labels.y_valid)
    ids = pl.Series(KEY, [f"v{i}" for i in range(n)])
    best = run.state.progress.best_round
    raw = {p: score_block(party_model_text(run.models[p], best), blocks[p].X_valid) for p in blocks}
    tables = {p: score_table(ids, r, key=KEY) for p, r in raw.items()}
    tables["C"] = tables["C"].head(100)  # C does not know the last 80 entities
    fused = fuse_scores(tables, rounds_fusion(run.state.progress), key=KEY, ids=ids)
    full = predict_rounds(run.state, run.models, {p: b.X_valid for p, b in blocks.items()})
    np.testing.assert_allclose(fused["score"].to_numpy()[:100], full[:100])
    np.testing.assert_allclose(fused["score"].to_numpy()[100:], (full - raw["C"])[100:])
    assert fused["parties"].to_list() == [3] * 100 + [2] * 80


def test_join_scores_refuses_duplicate_keys() -> None:
    table = score_table(_ids("e1", "e1"), np.array([1.0, 2.0]), key=KEY)
    with pytest.raises(pl.exceptions.ComputeError):
        join_scores({"A": table}, key=KEY, ids=_ids("e1"))


@pytest.mark.parametrize(("objective", "k"), [("binary", 1), ("multiclass", 3), ("regression", 1)])
def test_one_shot_and_learned_fusion(objective: Objective, k: int) -> None:
    labels, blocks = synthetic(objective, num_class=k)
    spec = SPEC.model_copy(update={"rounds": 10})
    results = {
        p: train_one_shot(b, labels, spec=spec, objective=objective, num_class=k)
        for p, b in blocks.items()
    }
    for p, r in results.items():
        np.testing.assert_allclose(r.valid, score_block(r.model_text, blocks[p].X_valid, k))
    assert labels.y_test is not None
    valid_ids = pl.Series(KEY, [f"v{i}" for i in range(len(labels.y_valid))])
    test_ids = pl.Series(KEY, [f"t{i}" for i in range(len(labels.y_test))])
    base = [0.0] * k
    fusion = learn_fusion(
        {p: score_table(valid_ids, r.valid, key=KEY, num_class=k) for p, r in results.items()},
        pl.DataFrame({KEY: valid_ids, "label": labels.y_valid}),
        key=KEY,
        objective=objective,
        num_class=k,
        base=base,
    )
    assert fusion.kind == "learned"
    assert len(fusion.coef) == k and len(fusion.coef[0]) == 3 * k
    if objective == "regression":
        assert min(fusion.coef[0]) >= 0
    tables = {
        p: score_table(test_ids, r.test, key=KEY, num_class=k)
        for p, r in results.items()
        if r.test is not None
    }
    fused = fuse_scores(tables, fusion, key=KEY, ids=test_ids)
    cols = ["score"] if k == 1 else [f"score_{c}" for c in range(k)]
    raw = fused.select(cols).to_numpy().reshape(-1) if k == 1 else fused.select(cols).to_numpy()
    metrics = evaluate(labels.y_test, raw, objective, k)
    singles = [evaluate(labels.y_test, r.test, objective, k) for r in results.values()]
    name = {"binary": "logloss", "multiclass": "logloss", "regression": "mse"}[objective]
    assert metrics[name] < min(s[name] for s in singles)
    # an entity no party knows gets the prior under a learned fusion: intercept only
    empty = fuse_scores({p: t.head(0) for p, t in tables.items()}, fusion, key=KEY, ids=_ids("x"))
    assert empty.select(cols).row(0) == pytest.approx(fusion.intercept)


# --------------------------------------------------------------------------------------
# Spec: modes and opt-ins
# --------------------------------------------------------------------------------------


def _vertical(tiny_table_spec: Path, fusion: dict[str, object]) -> dict:
    data = tomllib.loads(tiny_table_spec.read_text())
    data["consortium"]["layout"] = "vertical"
    data["consortium"]["label"]["party"] = "a"
    del data["parties"][1]["sources"][0]["columns"]["churned"]
    data["fusion"] = fusion
    return data


def test_vertical_rounds_need_share_gradients(tiny_table_spec: Path) -> None:
    data = _vertical(tiny_table_spec, {"mode": "rounds"})
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.toml", base="/base")
    assert [p.path for p in info.value.problems] == ["fusion.share_gradients"]
    data["fusion"]["share_gradients"] = True
    assert parse_spec(data, source="spec.toml", base="/base").fusion.mode == "rounds"


def test_vertical_one_shot_needs_share_labels(tiny_table_spec: Path) -> None:
    data = _vertical(tiny_table_spec, {"mode": "one_shot"})
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.toml", base="/base")
    assert [p.path for p in info.value.problems] == ["fusion.share_labels"]
    data["fusion"]["share_labels"] = True
    assert parse_spec(data, source="spec.toml", base="/base").fusion.mode == "one_shot"
    # a vertical spec that has not chosen a mode stays valid (prepared, not trained)
    del data["fusion"]
    unchosen = parse_spec(data, source="spec.toml", base="/base")
    assert unchosen.fusion.mode is None
    from flows.vertical import check_vertical

    with pytest.raises(ValueError, match=r"spec.toml: fusion.mode: vertical training needs one"):
        check_vertical(unchosen, "spec.toml")
