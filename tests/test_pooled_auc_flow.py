"""The federated AUC is the AUC of the pooled test rows (real Prefect server, real files,
real LightGBM), computed at the coordinator from the parties' score counts only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from storage.files import read_text
from storage.store import read_manifest
from tasks.horizontal.ensemble import predict_raw
from tasks.horizontal.score_histograms import bin_of
from tasks.horizontal.training import split_assignments
from tasks.links import sigmoid
from tasks.manifest import EnsembleManifest
from tasks.prepare.design import FeatureSchema, design_matrix, labels
from tasks.types import ENTITY_HASH
from tests.factories import write_synthetic

pytestmark = pytest.mark.prefect


def test_federated_auc_is_the_pooled_auc_under_label_skew(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from typer.testing import CliRunner

    from flows.cli.app import app
    from flows.horizontal import federated_training
    from flows.prepare import prepare

    # label skew: few churners at p0, many at p1, none at all at p2 (left out of training,
    # still evaluated: its rows count in the pooled figure)
    spec = write_synthetic(tmp_path, customers=900, parties=3, label_shift=(-2.0, 2.0, -40.0))
    result = federated_training(str(spec))
    assert set(result.left_out) == {"p2"}
    best = result.test[result.best_round - 1]
    assert {"auc", "auc_bound", "auc_weighted_mean"} <= set(best)

    body, texts = read_manifest(result.manifest)
    ensemble = EnsembleManifest.model_validate(body).ensemble(texts)
    schema = FeatureSchema(
        names=ensemble.feature_names, categorical=ensemble.categorical, modality={}, parties={}
    )
    ys, raws = [], []
    for out in prepare(str(spec)).values():
        fused = pl.read_parquet(out.table.uri)
        test = (
            split_assignments(fused[ENTITY_HASH], validation_fraction=0.2, test_fraction=0.2)
            == "test"
        ).to_numpy()
        ys.append(labels(fused)[test])
        raws.append(
            predict_raw(ensemble, design_matrix(fused, schema)[test], upto_round=result.best_round)
        )
    y, raw = np.concatenate(ys), np.concatenate(raws)
    assert 0 < y.mean() < 1 and not ys[2].any()
    exact = float(roc_auc_score(y, sigmoid(raw)))
    # the reported figure is the pooled AUC within its stated bound ...
    assert abs(best["auc"] - exact) <= best["auc_bound"] + 1e-12
    # the bound is half the share of (positive, negative) pairs whose scores share a bin
    # (here mostly pairs of equal scores: an ensemble of a few small trees gives few values)
    grid = bin_of(sigmoid(raw))
    shared = grid[y == 1][:, None] == grid[y == 0][None, :]
    assert best["auc_bound"] == pytest.approx(0.5 * shared.mean(), rel=1e-9)
    # ... and not the size-weighted mean of the parties' own AUCs (p2 has none)
    weighted = np.average(
        [roc_auc_score(yk, rk) for yk, rk in zip(ys[:2], raws[:2], strict=True)],
        weights=[len(yk) for yk in ys[:2]],
    )
    assert best["auc_weighted_mean"] == pytest.approx(weighted, abs=1e-9)
    assert abs(best["auc"] - best["auc_weighted_mean"]) > 2 * best["auc_bound"]
    assert result.comparison.federated["auc"] == best["auc"]

    # no per-entity score reached the coordinator: none of the test rows' raw scores or
    # probabilities is in any of its files, only counts
    coordinator = tmp_path / "stores" / "coordinator"
    blobs = [p.read_bytes() for p in coordinator.rglob("*") if p.is_file()]
    scores = [repr(float(v)).encode() for v in (*raw, *sigmoid(raw)) if abs(v) > 1e-3]
    assert blobs and scores
    for blob in blobs:
        assert not [s for s in scores if s in blob]

    # shown as such in the report and in the CLI output
    report = read_text(result.report)
    assert "auc (size-weighted mean)" in report and "pooled test rows" in report
    assert f"{best['auc']:.4f}" in report
    shown = CliRunner().invoke(app, ["train", str(spec)])
    assert shown.exit_code == 0, shown.output
    assert "auc (size-weighted mean)" in shown.output and "pooled test rows" in shown.output
    assert f"{best['auc']:.4f}" in shown.output
