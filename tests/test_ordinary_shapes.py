"""Ordinary spec shapes end to end: a label table of the key and the label only, a text
multiclass label, and the export of a vertical run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightgbm as lgb
import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tasks.prepare.align import align_features
from tasks.prepare.steps import StepError, naming_source
from tasks.spec.load import load_spec
from tasks.spec.models import SpecError
from tasks.types import ENTITY_HASH, LABEL
from tests.factories import write_synthetic, write_tiny

ACTIVITIES = ["walking", "sitting", "standing"]
PLAN_MAPPING_A = (
    'plan = { from = "Plan", dtype = "category", values = { B = "basic", P = "plus" } }\n'
)
SIGNUP_MAPPING_A = 'signup = { from = "Joined", dtype = "date" }\n'


# -- a label table of the key and the label only -------------------------------------------


def _label_only(root: Path) -> Path:
    """The synthetic consortium with each party's customers table reduced to the key and
    the label (the orders table gives every feature)."""
    spec = write_synthetic(root, customers=500)
    for party in ("p0", "p1"):
        path = root / "raw" / party / "customers.parquet"
        pl.read_parquet(path).select("id", "churn").write_parquet(path)
    text = spec.read_text()
    text = text.replace('plan = { from = "plan", dtype = "category" }\n', "")
    text = text.replace('age = { from = "age", dtype = "float" }\n', "")
    spec.write_text(text)
    return spec


def test_key_and_label_table_aligns_with_every_row() -> None:
    features = pl.DataFrame({"customer_id": ["c1", "c2", "c3"], "churned": [1.0, 0.0, 1.0]})
    aligned, schema = align_features(
        features,
        entity="customer_id",
        party="a",
        source="labels",
        modality="table",
        prefix="profile",
        secret=b"0123456789abcdef0123456789abcdef",
        vocabularies={},
        label_column="churned",
    )
    assert schema == []
    assert aligned.columns == [ENTITY_HASH, LABEL]
    assert aligned.height == 3 and sorted(aligned[LABEL].to_list()) == [0.0, 1.0, 1.0]


def test_key_and_label_table_beside_text_and_events_prepares(tmp_path: Path, secret: str) -> None:
    """The layout beside a text and an IoT source: the entity table holds the key and the
    label only; the label comes from it, every feature from the other two."""
    from tasks.prepare.steps import PartyContext, run_party

    spec_path = write_tiny(tmp_path)
    text = spec_path.read_text()
    for line in (PLAN_MAPPING_A, SIGNUP_MAPPING_A):
        assert line in text
        text = text.replace(line, "")
    spec_path.write_text(text)
    spec = load_spec(str(spec_path))
    assert list(spec.party("a").sources[0].columns) == ["customer_id", "churned"]
    fused = run_party(PartyContext.from_spec(spec, "a"), spec.party("a").sources)
    table = pl.read_parquet(fused.table.uri)
    assert table.height == 4 and sorted(table[LABEL].to_list()) == [0.0, 0.0, 1.0, 1.0]
    assert {f.source for f in fused.features} == {"transactions", "feedback", "iot"}


def test_an_unforeseen_step_failure_names_party_source_and_step() -> None:
    with pytest.raises(StepError) as info, naming_source("a", "customers", "alignment"):
        pl.DataFrame({"x": [1]}).select("missing")
    message = str(info.value)
    assert message.startswith("a/customers: alignment failed (ColumnNotFoundError)")
    assert "\n" not in message and "missing" not in message


@pytest.mark.prefect
def test_label_table_of_key_and_label_prepares_trains_and_exports(
    prefect_api: str, tmp_path: Path, secret: str, cli: CliRunner
) -> None:
    from flows.horizontal import federated_training
    from flows.prepare import prepare

    spec = _label_only(tmp_path)
    outputs = prepare(str(spec))
    for party in ("p0", "p1"):
        fused = pl.read_parquet(outputs[party].table.uri)
        customers = pl.read_parquet(tmp_path / "raw" / party / "customers.parquet")
        assert fused.height == customers.height
        assert fused[LABEL].sum() == customers["churn"].sum()
        assert not [c for c in fused.columns if c.startswith("profile__")]
        assert {f.source for f in outputs[party].features} == {"orders"}
    result = federated_training(str(spec))
    assert result.test[result.best_round - 1]["auc"] > 0.6

    model = tmp_path / "model.txt"
    exported = cli.invoke(app, ["export", str(spec), "--out", str(model)])
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.startswith(f"wrote {model}: ")
    names = lgb.Booster(model_file=str(model)).feature_name()
    assert sorted(names) == sorted(f.name for f in outputs["p0"].features)


# -- a text multiclass label ---------------------------------------------------------------


def _activity(root: Path, *, vocabulary: list[str] | None) -> Path:
    """The synthetic consortium with a 3-class text label (age band as an activity name)."""
    spec = write_synthetic(root, customers=600)
    for party in ("p0", "p1"):
        path = root / "raw" / party / "customers.parquet"
        frame = pl.read_parquet(path)
        band = pl.when(pl.col("age") < 36).then(0).when(pl.col("age") < 44).then(1).otherwise(2)
        frame.with_columns(
            band.replace_strict(range(3), ACTIVITIES, return_dtype=pl.String).alias("activity")
        ).drop("churn").write_parquet(path)
    text = spec.read_text()
    text = text.replace('task = "binary"', 'task = "multiclass"')
    text = text.replace(
        'label = { column = "churned" }', 'label = { column = "label", num_classes = 3 }'
    )
    text = text.replace(
        'churned = { from = "churn", dtype = "bool" }',
        'label = { from = "activity", dtype = "str" }',
    )
    if vocabulary is not None:
        text = text.replace(
            "[vocabularies]\n", f"[vocabularies]\nlabel = {json.dumps(vocabulary)}\n"
        )
    spec.write_text(text)
    return spec


def test_text_multiclass_label_without_classes_is_refused_at_validate(
    tmp_path: Path, cli: CliRunner
) -> None:
    spec = _activity(tmp_path, vocabulary=None)
    with pytest.raises(SpecError, match=r"vocabularies\.label: .*list its 3 classes in order"):
        load_spec(str(spec))
    result = cli.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 1
    assert "[vocabularies].label" in result.output and "Traceback" not in result.output


def test_text_multiclass_label_needs_as_many_classes_as_declared(tmp_path: Path) -> None:
    spec = _activity(tmp_path, vocabulary=ACTIVITIES[:2])
    with pytest.raises(SpecError, match=r"lists 2 classes but consortium\.label\.num_classes is 3"):
        load_spec(str(spec))


@pytest.mark.prefect
def test_text_multiclass_label_trains_with_classes_in_declared_order(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.horizontal import federated_training
    from flows.prepare import prepare

    spec = _activity(tmp_path, vocabulary=ACTIVITIES)
    outputs = prepare(str(spec))
    for party in ("p0", "p1"):
        fused = pl.read_parquet(outputs[party].table.uri)
        raw = pl.read_parquet(tmp_path / "raw" / party / "customers.parquet")
        want = raw["activity"].replace_strict(ACTIVITIES, [0.0, 1.0, 2.0]).value_counts(sort=True)
        got = fused[LABEL].value_counts(sort=True)
        assert got.rows() == want.rows()
    result = federated_training(str(spec))
    metrics = result.test[result.best_round - 1]
    # the pooled one-vs-rest macro AUC from the parties' score histograms, with its bound
    assert set(metrics) == {"logloss", "accuracy", "auc", "auc_bound"}
    assert metrics["accuracy"] > 0.6 and metrics["auc"] > 0.6


# -- fedfuse export of a vertical run ------------------------------------------------------


@pytest.mark.prefect
def test_export_of_a_vertical_run_writes_party_models_and_the_fusion_rule(
    prefect_api: str,
    tmp_path: Path,
    secret: str,
    monkeypatch: pytest.MonkeyPatch,
    cli: CliRunner,
) -> None:
    from flows.vertical import vertical_training
    from tasks.demo_data import write_demo_consortium

    monkeypatch.setenv("FEDFUSE_SECRET", secret)
    spec = Path(write_demo_consortium(str(tmp_path), layout="vertical", customers=900, seed=3))
    text = spec.read_text()
    for key, value in {"rounds": 2, "trees_per_round": 3}.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    spec.write_text(text)
    result = vertical_training(str(spec))

    out = tmp_path / "exported"
    exported = cli.invoke(app, ["export", str(spec), "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    fusion = json.loads((out / "fusion.json").read_text())
    assert fusion["layout"] == "vertical" and fusion["label_party"] == result.label_party
    assert fusion["upto_round"] == result.best_round
    assert fusion["fusion"]["kind"] == "rounds"
    assert set(fusion["models"]) == set(result.parties)
    files = sorted(p.name for p in out.iterdir())
    with_trees = sorted(f for f in fusion["models"].values() if f)
    assert with_trees and files == sorted([*with_trees, "fusion.json"])
    in_party_order = [fusion["models"][p] for p in result.parties if fusion["models"][p]]
    assert exported.stdout.splitlines() == [
        f"wrote {out / name}" for name in [*in_party_order, "fusion.json"]
    ]
    for party, name in fusion["models"].items():
        if name is None:
            continue
        booster = lgb.Booster(model_file=str(out / name))
        assert booster.feature_name() == fusion["feature_names"][party]
        assert booster.num_trees() >= 1

    refused = cli.invoke(app, ["export", str(spec), "--out", str(out), "--rounds", "1"])
    assert refused.exit_code == 1
    assert "--rounds applies to horizontal ensembles" in refused.output
    assert "Traceback" not in refused.output
