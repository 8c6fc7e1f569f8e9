"""``fedfuse register`` through the real CLI: a trained run's exported model in the local
MLflow registry of its coordinator store, predicting what the exported model and
``fedfuse predict`` predict on fused rows, with the run's metrics and model card; a second
registration makes version 2; the one-line error without the extra."""

from __future__ import annotations

import builtins
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tests.factories import write_synthetic

runner = CliRunner()


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if "LEVEL" in name else "false"))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.prefect
def test_register_a_trained_run_and_load_it_from_the_registry(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    import lightgbm as lgb
    import mlflow
    import pandas as pd

    from storage.runs import read_runs
    from storage.store import Store
    from tasks.links import probabilities
    from tasks.prepare.design import design_matrix
    from tasks.scoring import load_ensemble, schema_of

    spec = write_synthetic(tmp_path, customers=200, seed=3)
    spec.write_text(re.sub(r"^rounds = .*$", "rounds = 1", spec.read_text(), flags=re.M))
    _cli("train", str(spec), "--no-baselines")
    coordinator = tmp_path / "stores" / "coordinator"
    (run,) = read_runs(Store(str(coordinator)))

    output = _cli("register", str(spec))
    db = coordinator / "mlflow" / "mlflow.db"
    assert f"registered fedfuse-synthetic version 1 (run {run.run_key})" in output
    assert "mlflow models serve -m models:/fedfuse-synthetic/1 --env-manager local" in (
        output.replace("\n", "")
    )
    assert db.is_file()

    registry = f"sqlite:///{db}"
    mlflow.set_tracking_uri(registry)
    mlflow.set_registry_uri(registry)
    model = mlflow.pyfunc.load_model("models:/fedfuse-synthetic/1")

    ensemble = load_ensemble(run.manifest)
    fused = pl.read_parquet(next((tmp_path / "stores" / "p0" / "fused").glob("*.parquet")))
    matrix = design_matrix(fused.head(8), schema_of(ensemble))
    assert run.model is not None
    exported = lgb.Booster(model_file=run.model)
    frame = pd.DataFrame(matrix, columns=exported.feature_name())
    got = np.asarray(model.predict(frame)).reshape(-1)
    np.testing.assert_allclose(got, exported.predict(matrix), rtol=0, atol=1e-12)
    raw = exported.predict(matrix, raw_score=True)  # what fedfuse predict turns into P(y=1)
    np.testing.assert_allclose(got, probabilities(raw, "binary", 1), rtol=0, atol=1e-12)

    client = mlflow.MlflowClient(tracking_uri=registry, registry_uri=registry)
    version = client.get_model_version("fedfuse-synthetic", "1")
    card = json.loads((coordinator / "models" / f"{run.run_key}-model-card.json").read_text())
    assert version.tags["fedfuse.run_key"] == run.run_key
    assert version.tags["fedfuse.spec_hash"] == card["spec_hash"]
    assert version.tags["fedfuse.code_version"].startswith("fedfuse ")
    logged = client.get_run(version.run_id)
    assert logged.data.metrics["test_auc"] == pytest.approx(card["final_metrics"]["test"]["auc"])
    assert "valid_auc" in logged.data.metrics
    assert logged.data.tags["fedfuse.run_key"] == run.run_key
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "model-card")}
    assert f"model-card/{run.run_key}-model-card.json" in artifacts
    # nothing of a party's rows or ids: no input example, no raw key in the logged files
    artifact_root = coordinator / "mlflow" / "artifacts"
    texts = [p.read_bytes() for p in artifact_root.rglob("*") if p.is_file()]
    assert texts and not any(b"p0-" in t or b"p1-" in t for t in texts)
    assert not any(artifact_root.rglob("input_example*"))

    again = _cli("register", str(spec), "--run", run.run_key)
    assert "registered fedfuse-synthetic version 2" in again
    assert client.get_model_version("fedfuse-synthetic", "2").tags["fedfuse.run_key"] == run.run_key


def test_register_without_the_extra_says_how_to_install_it(
    tiny_table_spec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_mlflow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    result = runner.invoke(app, ["register", str(tiny_table_spec)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: the model registry needs MLflow: pip install 'fedfuse[mlflow]'"]


def test_register_with_an_object_store_coordinator_needs_a_registry() -> None:
    from storage.registry import RegistryError, registry_location

    with pytest.raises(RegistryError, match=r"not local; give the model registry with --registry"):
        registry_location("s3://bucket/coordinator", None)
    given = registry_location("s3://bucket/coordinator", "http://127.0.0.1:5000")
    assert given.uri == "http://127.0.0.1:5000" and given.artifacts is None


def test_card_metrics_and_tags_are_mlflow_safe() -> None:
    from tasks.model_card import CodeVersion, ModelCard
    from tasks.registry import card_metrics, card_tags, default_model_name, metric_key

    card = ModelCard(
        layout="horizontal",
        consortium="acme bank/eu",
        run_key="abc",
        spec_identity="acme-1234",
        spec_hash="f" * 64,
        code=CodeVersion(version="0.1.0", commit="deadbeef"),
        parties=[],
        rounds=[],
        rounds_run=3,
        best_round=2,
        final_metrics={"test": {"auc": 0.8, "auc ± (binned)": 1e-5, "logloss": float("nan")}},
    )
    assert card_metrics(card) == {"test_auc": 0.8, "test_auc_binned": 1e-5}
    assert metric_key("valid", "±") == "valid_metric"
    tags = card_tags(card)
    assert tags["fedfuse.code_version"] == "fedfuse 0.1.0 (commit deadbeef)"
    assert tags["fedfuse.spec_hash"] == "f" * 64
    assert default_model_name("acme bank/eu") == "fedfuse-acme-bank-eu"
