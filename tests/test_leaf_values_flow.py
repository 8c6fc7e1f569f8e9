"""Consortium leaf values through the training flow (a real Prefect server)."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest

from storage.files import read_text
from storage.store import read_manifest
from tasks.manifest import EnsembleManifest
from tasks.types import ENTITY_HASH
from tests.factories import write_synthetic
from tests.prefect_api import task_states
from tests.test_training_flow import assert_export_is_the_ensemble

pytestmark = pytest.mark.prefect


@pytest.mark.parametrize("aggregation", ["samples", "cyclic"])
def test_training_with_consortium_leaf_values(
    prefect_api: str, tmp_path: Path, secret: str, aggregation: str
) -> None:
    """Averaging (every party's trees each round) and cyclic (one party's tree a round,
    every party's sums setting its leaves) with the consortium's leaf values."""
    from flows.horizontal import federated_training
    from flows.prepare import prepare

    spec = write_synthetic(tmp_path, customers=700)
    text = re.sub(r"^rounds = .*$", "rounds = 3", spec.read_text(), flags=re.M)
    spec.write_text(text + f'leaf_values = "consortium"\naggregation = "{aggregation}"\n')
    state = federated_training(str(spec), return_state=True)
    assert state.is_completed()
    result = state.result()
    body, texts = read_manifest(result.manifest)
    ensemble = EnsembleManifest.model_validate(body).ensemble(texts)
    models = tmp_path / "stores" / "coordinator" / "models"
    refit = sorted(p.name for p in models.glob(f"{result.run_key}-r*-refit.txt"))
    assert len(refit) == sum(len(r) for r in ensemble.rounds) >= 2
    if aggregation == "cyclic":
        assert [len(r) for r in ensemble.rounds] == [1] * result.rounds_run
    # the members are the refitted texts: none equals its party's own update
    for t, members in enumerate(ensemble.rounds, start=1):
        for party, _, member in members:
            own = (models / f"{result.run_key}-r{t:04d}-{party}.txt").read_text()
            assert member != own
    # every party reported its sums in every round, and the export is the ensemble
    sums = task_states(state.state_details.flow_run_id)["leaf-sums"]
    assert sums == ["Completed"] * (2 * result.rounds_run)
    outputs = prepare(str(spec))
    assert_export_is_the_ensemble(read_text(result.model), ensemble, outputs.values())
    # the sums are aggregates: no entity id, raw or hashed, reaches the coordinator
    hashed = [h for out in outputs.values() for h in pl.read_parquet(out.table.uri)[ENTITY_HASH]]
    raw_ids = [f"{party}-{i}" for party in ("p0", "p1") for i in range(100, 350)]
    for path in (tmp_path / "stores" / "coordinator").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not [k for k in raw_ids if k.encode() in blob]
            assert not [h for h in hashed if h.encode() in blob]
