"""The vertical-training flow against a real Prefect server: PSI between the parties,
gradient rounds, resume, and what reaches the coordinator store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from tasks.demo_data import write_demo_consortium
from tasks.spec.load import load_spec
from tasks.spec.models import SpecError
from tasks.types import ENTITY_HASH

pytestmark = pytest.mark.prefect


def _spec(root: Path, **training: int) -> Path:
    spec = Path(write_demo_consortium(str(root), layout="vertical", customers=3000, seed=3))
    text = spec.read_text()
    for key, value in training.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    spec.write_text(text)
    return spec


def _hashes(spec: Path) -> dict[str, set[str]]:
    out = {}
    for party in ("A", "B", "C"):
        [fused] = (spec.parent / "stores" / party / "fused").glob("fused-*.parquet")
        out[party] = set(pl.read_parquet(fused)[ENTITY_HASH].to_list())
    return out


def test_vertical_flow_aligns_trains_and_keeps_ids_at_the_parties(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.vertical import vertical_training

    monkeypatch.setenv("FEDFUSE_SECRET", secret)
    spec = _spec(tmp_path, rounds=4, trees_per_round=4)
    result = vertical_training(str(spec), baselines=True)

    hashes = _hashes(spec)
    common = hashes["A"] & hashes["B"] & hashes["C"]
    assert result.overlap == len(common) > 100
    assert result.set_sizes == {p: len(h) for p, h in hashes.items()}
    assert 1 <= result.best_round <= result.rounds_run <= 4
    assert result.test["auc"] > 0.6
    assert set(result.comparison) == {
        "vertical (fused)",
        "A alone",
        "B alone",
        "C alone",
        "centralised (pooled data)",
    }
    # each party's trees stay in its own store
    for party, uri in result.models.items():
        assert uri.startswith(str(spec.parent / "stores" / party / "models")), uri

    # party B's text block ([text] model): fitted on the round-1 gradients, kept in B's
    # store, named in the manifest, its score a feature of B's trees only
    manifest = json.loads(Path(result.manifest).read_text())
    [block] = (spec.parent / "stores" / "B" / "models").glob("*-vertical-text-B.json")
    assert set(manifest["text_models"]) == {"B"}
    assert manifest["text_models"]["B"]["uri"] == str(block)
    body = json.loads(block.read_text())
    assert body["target"] == "gradients" and body["columns"] == ["text__model_score"]
    assert len(body["models"]["folds"]) == 5
    trees = {p: json.loads(Path(uri).read_text())["model_text"] for p, uri in result.models.items()}
    assert "text__model_score" in trees["B"]
    assert "text__model_score" not in trees["A"] + trees["C"]
    block_mtime = block.stat().st_mtime_ns

    # federated inference: every entity of A scored, the overlap with every party's trees
    from flows.vertical import vertical_score

    scored = pl.read_parquet(vertical_score(str(spec), "A").uri)
    assert scored.columns[0] == "customer_id"  # A's own key, in A's own store
    assert scored["customer_id"].null_count() == 0
    assert scored.height == len(hashes["A"])
    assert set(scored[ENTITY_HASH]) == hashes["A"]
    assert int(scored["all_parties"].sum()) == len(common)
    assert scored["probability"].is_between(0, 1).all()
    assert set(scored["prediction"]) <= {"yes", "no"}  # the label party's own values
    # scoring reused B's block (none fitted again) and B's scores use its full model
    assert block.stat().st_mtime_ns == block_mtime
    assert list((spec.parent / "stores" / "B" / "models").glob("*-vertical-text-*")) == [block]
    assert not list((spec.parent / "stores" / "B" / "scoring").rglob("*-vertical-text-*"))

    # the coordinator store holds blinded sets, alignment answers, gradients, deltas and
    # the manifest: no raw id, and no hashed id of any entity
    coordinator = spec.parent / "stores" / "coordinator"
    blobs = [p.read_bytes() for p in coordinator.rglob("*") if p.is_file()]
    assert any(name.suffix == ".arrow" for name in coordinator.rglob("*"))
    every = set().union(*hashes.values())
    customers = (spec.parent / "stores" / "A" / "raw" / "customers.csv").read_text()
    raw_ids = [line.split(",")[0] for line in customers.splitlines()[1:]]
    assert len(raw_ids) > 1000 and all(len(k) >= 8 for k in raw_ids[:10])
    for blob in blobs:
        assert not [h for h in every if h.encode() in blob]
        assert not [k for k in raw_ids if len(k) >= 8 and k.encode() in blob]


def test_vertical_flow_resumes_from_the_label_partys_checkpoint(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.vertical import vertical_training

    monkeypatch.setenv("FEDFUSE_SECRET", secret)
    spec = _spec(tmp_path, rounds=3, trees_per_round=3, patience=5)
    first = vertical_training(str(spec), stop_after=2)
    assert first.rounds_run == 2 and first.stop_reason is None
    resumed = vertical_training(str(spec))
    assert resumed.rounds_run == 3 and resumed.stop_reason == "rounds"
    assert resumed.valid[:2] == first.valid
    fresh = vertical_training(str(spec), refresh=True)
    facts = [(r.run_key, r.overlap, r.trees, r.valid) for r in (first, resumed, fresh)]
    assert fresh.valid == resumed.valid, facts
    assert fresh.test == resumed.test


def test_vertical_rounds_need_the_gradient_opt_in(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace("share_gradients = true", "share_gradients = false"))
    with pytest.raises(SpecError, match=r"fusion\.share_gradients"):
        load_spec(str(spec))


def test_vertical_one_shot_with_learned_fusion_trains_and_scores(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.vertical import vertical_score, vertical_training

    monkeypatch.setenv("FEDFUSE_SECRET", secret)
    spec = _spec(tmp_path, rounds=10, trees_per_round=4)
    text = spec.read_text().replace(
        'mode = "rounds"', 'mode = "one_shot"\nshare_labels = true\nlearned = true'
    )
    spec.write_text(text)
    result = vertical_training(str(spec))
    assert (result.rounds_run, result.best_round) == (1, 1)
    assert result.test["auc"] > 0.6
    manifest = json.loads(Path(result.manifest).read_text())
    assert manifest["mode"] == "one_shot"
    assert manifest["fusion"]["kind"] == "learned"
    assert len(manifest["fusion"]["coef"][0]) == 3  # one coefficient per party
    scored = pl.read_parquet(vertical_score(str(spec), "A").uri)
    assert int(scored["all_parties"].sum()) == result.overlap
    assert scored["probability"].is_between(0, 1).all()
    assert set(scored["prediction"]) <= {"yes", "no"}  # the label party's own values


def test_overlap_below_the_minimum_stops_training_with_the_counts(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.vertical import vertical_training
    from tasks.vertical.psi_curve import PSIError

    monkeypatch.setenv("FEDFUSE_SECRET", secret)
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace("min_overlap = 10\n", "min_overlap = 100000\n"))
    with pytest.raises(PSIError, match=r"fusion\.min_overlap = 100000") as caught:
        vertical_training(str(spec))
    assert re.search(r"\b\d+ entities\b|\boverlap\b", str(caught.value))
    assert not (spec.parent / "stores" / "coordinator" / "models").exists()
