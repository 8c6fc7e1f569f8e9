"""Federated training flows against a real Prefect server: export, resume, bad updates."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl
import pytest

from storage.files import read_text
from storage.store import Store, read_manifest
from tasks.horizontal.ensemble import GlobalEnsemble, predict_raw
from tasks.horizontal.rounds import ModelRules, QuorumError
from tasks.horizontal.steps import PartyUpdate, aggregate
from tasks.horizontal.strategies import make_strategy
from tasks.manifest import EnsembleManifest
from tasks.prepare.design import FeatureSchema, design_matrix
from tasks.prepare.steps import FusedOutput
from tasks.types import ENTITY_HASH
from tests.factories import write_synthetic
from tests.prefect_api import task_states

pytestmark = pytest.mark.prefect


def _spec(root: Path, **training: int) -> Path:
    spec = write_synthetic(root, customers=700)
    text = spec.read_text()
    for key, value in training.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        if f"{key} = " not in text:
            text += f"{key} = {value}\n"
    spec.write_text(text)
    return spec


def _ensemble(manifest_uri: str) -> GlobalEnsemble:
    body, texts = read_manifest(manifest_uri)
    return EnsembleManifest.model_validate(body).ensemble(texts)


def assert_export_is_the_ensemble(
    model_text: str, ensemble: GlobalEnsemble, outputs: Iterable[FusedOutput]
) -> None:
    """The exported native model predicts the ensemble's raw scores on every party's rows."""
    exported = lgb.Booster(model_str=model_text)
    schema = FeatureSchema(
        names=ensemble.feature_names, categorical=ensemble.categorical, modality={}, parties={}
    )
    for out in outputs:
        x = design_matrix(pl.read_parquet(out.table.uri), schema)
        np.testing.assert_allclose(
            exported.predict(x, raw_score=True), predict_raw(ensemble, x), rtol=0, atol=1e-9
        )


def test_training_exports_a_model_equal_to_the_ensemble(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.horizontal import federated_training
    from flows.prepare import prepare

    spec = _spec(tmp_path)
    result = federated_training(str(spec))
    assert result.rounds_run >= 1 and 1 <= result.best_round <= result.rounds_run
    assert result.test[result.best_round - 1]["auc"] > 0.65
    ensemble = _ensemble(result.manifest)
    outputs = prepare(str(spec))
    assert_export_is_the_ensemble(read_text(result.model), ensemble, outputs.values())
    # only models, checkpoints and reports reach the coordinator: no tables of rows
    coordinator = tmp_path / "stores" / "coordinator"
    assert not list(coordinator.rglob("*.parquet"))
    assert {p.name for p in coordinator.iterdir()} <= {"models", "checkpoints", "reports"}
    # and no entity id, raw or hashed, is in any of its files
    blobs = [p.read_bytes() for p in coordinator.rglob("*") if p.is_file()]
    assert blobs
    raw_ids = [f"{party}-{i}" for party in ("p0", "p1") for i in range(100, 350)]
    hashed = [h for out in outputs.values() for h in pl.read_parquet(out.table.uri)[ENTITY_HASH]]
    assert len(hashed) > 600
    for blob in blobs:
        assert not [k for k in raw_ids if k.encode() in blob]
        assert not [h for h in hashed if h.encode() in blob]


def test_stopped_run_resumes_from_its_checkpoint(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.horizontal import federated_training

    stopped_dir, full_dir = tmp_path / "stopped", tmp_path / "full"
    stopped_dir.mkdir()
    full_dir.mkdir()
    spec = _spec(stopped_dir, patience=10)
    first = federated_training(str(spec), stop_after=2)
    assert first.rounds_run == 2
    assert Store(str(stopped_dir / "stores" / "coordinator")).exists(
        "checkpoints", f"{first.run_key}-r0002.json"
    )
    resumed = federated_training(str(spec))
    full = federated_training(str(_spec(full_dir, patience=10)))
    assert resumed.run_key == full.run_key
    assert resumed.rounds_run == full.rounds_run == 6
    assert resumed.valid == full.valid
    assert read_text(resumed.model) == read_text(full.model)


def test_bad_update_is_left_out(tmp_path: Path, secret: str) -> None:
    """The coordinator's checks drop an update with a non-finite leaf and apply the quorum."""
    from tasks.horizontal.training import lgb_params, train_update
    from tasks.spec.models import TrainingSpec

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 3)), rng.integers(0, 2, 300).astype(float)
    params = lgb_params(TrainingSpec(), "binary", 1, seed=0)
    names = ["f0", "f1", "f2"]
    store = Store(str(tmp_path / "coordinator"))
    good = train_update(x, y, np.zeros(300), params, 2, [], feature_names=names)
    bad = re.sub(r"^(leaf_value=)(\S+)", r"\1nan", good, count=1, flags=re.M)
    updates = [
        PartyUpdate(
            party="a", round=1, model=store.write_text("models", "a.txt", good), n_train=300
        ),
        PartyUpdate(
            party="b", round=1, model=store.write_text("models", "b.txt", bad), n_train=300
        ),
    ]
    schema = FeatureSchema(names=names, categorical=[], modality={}, parties={})
    rules = ModelRules(
        feature_names=schema.names,
        categorical=[],
        objective="binary",
        num_class=1,
        trees_per_round=2,
    )
    samples = make_strategy("samples", learning_rate=0.1)
    agg = aggregate(updates, round_=1, rules=rules, strategy=samples, min_parties=1)
    assert [m.party for m in agg.members] == ["a"] and agg.members[0].weight == 1.0
    assert "b" in agg.dropped and "finite" in agg.dropped["b"]
    with pytest.raises(QuorumError, match="1 valid update"):
        aggregate(updates, round_=1, rules=rules, strategy=samples, min_parties=2)


def test_failed_party_below_quorum_fails_round_and_a_new_run_skips_finished_work(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.horizontal import federated_training
    from flows.prepare import prepare

    spec = _spec(tmp_path, min_parties=2, rounds=3, patience=10)
    first = federated_training(str(spec), stop_after=1)
    assert first.rounds_run == 1
    fused_p1 = Path(prepare(str(spec))["p1"].table.uri)
    good_bytes = fused_p1.read_bytes()
    fused_p1.write_bytes(b"PAR1 broken disk")  # party p1's store is damaged after round 1
    state = federated_training(str(spec), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="round 2: 1 valid update"):
        state.result()
    fused_p1.write_bytes(good_bytes)  # repaired: retry
    state = federated_training(str(spec), return_state=True)
    assert state.is_completed()
    assert state.result().rounds_run == 3
    trained = task_states(state.state_details.flow_run_id)["train-party"]
    # round 2: p0 finished before the failure and is not recomputed; p1 trains; round 3: both
    assert sorted(trained) == ["Cached", "Completed", "Completed", "Completed"]


def test_score_flow_reproduces_training_features_and_scores(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.horizontal import federated_training
    from flows.prepare import prepare
    from flows.score import score

    spec = _spec(tmp_path, rounds=3)
    result = federated_training(str(spec))
    ref = score(str(spec), "p0", data=str(tmp_path / "raw" / "p0"))
    predictions = pl.read_parquet(ref.uri)
    assert ref.uri.startswith(str(tmp_path / "stores" / "p0" / "scoring" / "reports"))
    fused = pl.read_parquet(prepare(str(spec))["p0"].table.uri)
    assert predictions.height == fused.height
    assert predictions["customer_id"].str.starts_with("p0-").all()  # the party's own keys
    ensemble = _ensemble(result.manifest)
    schema = FeatureSchema(
        names=ensemble.feature_names, categorical=ensemble.categorical, modality={}, parties={}
    )
    expected = predict_raw(ensemble, design_matrix(fused, schema))
    joined = fused.select("entity_hash").with_columns(pl.Series("expected", expected))
    joined = joined.join(predictions, on="entity_hash")
    np.testing.assert_allclose(joined["raw_score"], joined["expected"], atol=1e-12)


@pytest.mark.parametrize("objective", ["multiclass", "regression"])
def test_other_objectives_train_and_export(
    prefect_api: str, tmp_path: Path, secret: str, objective: str
) -> None:
    """Multiclass (plan tier from 3 classes) and regression (age) on the demo consortium."""
    import tomllib

    import tomli_w

    from flows.horizontal import federated_training
    from tasks.demo_data import write_demo_consortium

    spec_path = Path(write_demo_consortium(str(tmp_path), customers=1500, parties=2, seed=4))
    spec = tomllib.loads(spec_path.read_text())
    spec["consortium"]["secret"] = {"env": "FEDFUSE_TEST_SECRET"}
    spec["consortium"]["task"] = objective
    target = "plan" if objective == "multiclass" else "age"
    spec["consortium"]["label"] = {"column": f"{target}_label"}
    if objective == "multiclass":
        spec["consortium"]["label"]["num_classes"] = 3
        spec["vocabularies"]["plan_label"] = spec["vocabularies"]["plan"]
    for party in spec["parties"]:
        columns = party["sources"][0]["columns"]
        del columns["churned"]
        columns[f"{target}_label"] = columns.pop(target)
    spec["training"].update({"rounds": 3, "trees_per_round": 3})
    spec_path.write_text(tomli_w.dumps(spec))
    result = federated_training(str(spec_path))
    metrics = result.test[result.best_round - 1]
    if objective == "multiclass":
        assert set(metrics) == {"logloss", "accuracy", "auc", "auc_bound"}
        assert metrics["accuracy"] > 0.4
        # the pooled one-vs-rest macro AUC, from the parties' per-class score histograms
        assert 0.5 < metrics["auc"] <= 1 and 0 <= metrics["auc_bound"] < 1e-2
    else:
        assert {"rmse", "mse"} <= set(metrics) and 5 < metrics["rmse"] < 20
    ensemble = _ensemble(result.manifest)
    exported = lgb.Booster(model_str=read_text(result.model))
    x = np.random.default_rng(0).normal(size=(50, len(ensemble.feature_names))) * 10
    np.testing.assert_allclose(
        np.asarray(exported.predict(x, raw_score=True)).reshape(50, -1),
        predict_raw(ensemble, x).reshape(50, -1),
        atol=1e-9,
    )
