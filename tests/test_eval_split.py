"""Evaluation splits decided by the data: a split column of the label source
(``training.split_column``) or a label source's external test file (``test_path``)."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from storage.store import fingerprint
from tasks.horizontal.training import frame_splits
from tasks.prepare.align import hash_keys
from tasks.prepare.preprocess import PreprocessError
from tasks.prepare.steps import CleanOutput, PartyContext, run_party, run_preprocess
from tasks.spec.load import load_spec
from tasks.spec.models import SpecError
from tasks.types import ENTITY_HASH, LABEL, REASON, SPLIT
from tests.factories import LABEL_MAPPING_A, write_synthetic

SECRET = "0123456789abcdef0123456789abcdef"
SPLIT_MAPPING = 'fold = { from = "Set", dtype = "str" }\n'


def _with_split_column(spec_path: Path, sets: list[str], *, training: str = "") -> Path:
    """The tiny consortium with a ``Set`` column in party a's customers file, mapped to the
    canonical ``fold`` and named by ``training.split_column``."""
    path = spec_path.parent / "raw" / "a" / "customers.csv"
    head, *rows = path.read_text().splitlines()
    lines = [f"{head},Set", *(f"{r},{s}" for r, s in zip(rows, sets, strict=True))]
    path.write_text("\n".join(lines) + "\n")
    text = spec_path.read_text()
    churn = LABEL_MAPPING_A + "\n"
    assert churn in text
    text = text.replace(churn, churn + SPLIT_MAPPING, 1)
    spec_path.write_text(text + f'\n[training]\nsplit_column = "fold"\n{training}')
    return spec_path


def _problems(spec_path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(str(spec_path))
    return str(info.value)


def _preprocess(spec_path: Path, party: str = "a") -> tuple[CleanOutput, PartyContext]:
    spec = load_spec(str(spec_path))
    ctx = PartyContext.from_spec(spec, party)
    source = spec.party(party).sources[0]
    test = fingerprint(source.test_path) if source.test_path else None
    return run_preprocess(ctx, source, fingerprint(source.path), None, test), ctx


# -- spec validation -----------------------------------------------------------------------


def test_split_column_and_values_validate(tiny_table_spec: Path) -> None:
    spec_path = _with_split_column(
        tiny_table_spec,
        ["T", "V", "X", "T"],
        training='split_values = { train = "T", validation = ["V", "v2"], test = "X" }\n',
    )
    spec = load_spec(str(spec_path))
    assert spec.training.split_column == "fold"
    assert spec.training.split_values.mapping() == {
        "T": "train",
        "V": "valid",
        "v2": "valid",
        "X": "test",
    }


def test_validate_names_who_decides_each_split(tiny_table_spec: Path, secret: str) -> None:
    spec_path = _with_split_column(tiny_table_spec, ["train", "valid", "test", "train"])
    result = CliRunner().invoke(app, ["validate", str(spec_path)])
    assert result.exit_code == 0, result.output
    assert (
        "  splits: a by column 'fold'; the others by hashed key (validation 0.2, test 0.2)"
        in result.output.splitlines()
    )
    spec_path.write_text(spec_path.read_text().replace('split_column = "fold"\n', ""))
    hashed = CliRunner().invoke(app, ["validate", str(spec_path)])  # the mapping alone: unused
    assert hashed.exit_code == 0, hashed.output
    assert "  splits: hashed key (validation 0.2, test 0.2)" in hashed.output.splitlines()


def test_split_column_no_label_source_maps_is_refused(tiny_table_spec: Path) -> None:
    tiny_table_spec.write_text(
        tiny_table_spec.read_text() + '\n[training]\nsplit_column = "fold"\n'
    )
    message = _problems(tiny_table_spec)
    assert "training.split_column: no label source maps the column 'fold'" in message


def test_split_column_must_be_text(tiny_table_spec: Path) -> None:
    spec_path = _with_split_column(tiny_table_spec, ["train", "valid", "test", "train"])
    spec_path.write_text(
        spec_path.read_text().replace(SPLIT_MAPPING, SPLIT_MAPPING.replace('"str"', '"int"'))
    )
    assert "parties[0].sources[0].columns.fold.dtype: the split column is compared as text" in (
        _problems(spec_path)
    )


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ('split_values = { train = "a", validation = "a" }\n', "training.split_values"),
        ("split_values = { test = [] }\n", "'test' lists no value"),
        ('split_values = { test = " " }\n', "'test' holds an empty value"),
    ],
)
def test_bad_split_values_are_refused(tiny_table_spec: Path, training: str, expected: str) -> None:
    spec_path = _with_split_column(tiny_table_spec, ["a", "b", "c", "d"], training=training)
    assert expected in _problems(spec_path)


def test_split_values_without_split_column_or_on_the_label(tiny_table_spec: Path) -> None:
    text = tiny_table_spec.read_text()
    tiny_table_spec.write_text(text + '\n[training]\nsplit_values = { test = "holdout" }\n')
    assert "training.split_values: needs training.split_column" in _problems(tiny_table_spec)
    tiny_table_spec.write_text(text + '\n[training]\nsplit_column = "churned"\n')
    assert "training.split_column: 'churned' is the entity key or the label" in _problems(
        tiny_table_spec
    )


def test_the_derived_split_name_is_not_a_column(tiny_table_spec: Path) -> None:
    spec_path = _with_split_column(tiny_table_spec, ["train", "valid", "test", "train"])
    text = spec_path.read_text().replace(SPLIT_MAPPING, SPLIT_MAPPING.replace("fold", SPLIT))
    spec_path.write_text(text.replace('split_column = "fold"', f'split_column = "{SPLIT}"'))
    assert f"parties[0].sources[0].columns.{SPLIT}: is the name of the split fedfuse derives" in (
        _problems(spec_path)
    )


def test_test_path_checks(tiny_table_spec: Path) -> None:
    text = tiny_table_spec.read_text()
    label_line = 'path = "raw/a/customers.csv"\n'
    orders_line = 'path = "raw/b/orders.parquet"\n'
    cases = {
        label_line: (
            label_line + 'test_path = "raw/a/customers-test.parquet"\n',
            "parties[0].sources[0].test_path: is parquet but path is csv",
        ),
        orders_line: (
            orders_line + 'test_path = "raw/b/orders-test.parquet"\n',
            "parties[1].sources[1].test_path: only the party's label source takes a test_path",
        ),
    }
    for line, (replacement, expected) in cases.items():
        tiny_table_spec.write_text(text.replace(line, replacement))
        assert expected in _problems(tiny_table_spec)
    tiny_table_spec.write_text(
        text.replace(label_line, label_line + 'test_path = "raw/b/customers-test.csv"\n')
    )
    message = _problems(tiny_table_spec)
    assert "parties[0].sources[0].test_path: " in message
    assert "to read it from elsewhere, list its folder in parties[0].imports" in message


def test_vertical_layout_refuses_split_column_and_test_path(tmp_path: Path) -> None:
    from tasks.demo_data import write_demo_consortium

    spec_path = Path(write_demo_consortium(str(tmp_path), layout="vertical", customers=60, seed=1))
    text = spec_path.read_text()
    spec_path.write_text(text.replace("[training]\n", '[training]\nsplit_column = "fold"\n', 1))
    assert "training.split_column: the vertical layout splits the overlap by the hashed key" in (
        _problems(spec_path)
    )


# -- preprocessing: the split column and the test file -------------------------------------


def test_split_values_map_and_quarantine_without_the_value(
    tiny_table_spec: Path, secret: str
) -> None:
    spec_path = _with_split_column(
        tiny_table_spec,
        ["T", "secret-fold", "X", ""],
        training='split_values = { train = "T", validation = "V", test = "X" }\n',
    )
    out, _ = _preprocess(spec_path)
    clean = pl.read_parquet(out.clean.uri).sort("customer_id")
    assert clean.select("customer_id", SPLIT).rows() == [("c1", "train"), ("c3", "test")]
    assert out.rejected is not None
    rejected = pl.read_parquet(out.rejected.uri).sort("__row")
    assert rejected.select("__row", REASON).rows() == [
        (2, "column 'Set' (split): not one of training.split_values"),
        (4, "column 'Set' (split): missing split value"),
    ]
    assert out.quality.rejected_by_reason == {
        "column 'Set' (split): missing split value": 1,
        "column 'Set' (split): not one of training.split_values": 1,
    }
    assert "secret-fold" not in str(out.quality.model_dump())


def test_an_entity_with_two_split_values_is_quarantined(tiny_table_spec: Path, secret: str) -> None:
    spec_path = _with_split_column(tiny_table_spec, ["train", "valid", "test", "train"])
    path = spec_path.parent / "raw" / "a" / "customers.csv"
    path.write_text(path.read_text() + "C1,yes,B,2025-01-10,test\n")
    out, _ = _preprocess(spec_path)
    clean = pl.read_parquet(out.clean.uri)
    assert "c1" not in clean["customer_id"].to_list()
    assert out.rejected is not None
    reasons = pl.read_parquet(out.rejected.uri).sort("__row").select("__row", REASON).rows()
    assert [r for r, _ in reasons] == [1, 5]
    assert all("duplicate key in column 'CustID'" in reason for _, reason in reasons)


def _with_test_file(spec_path: Path, test_rows: str) -> Path:
    raw = spec_path.parent / "raw" / "a"
    (raw / "customers-test.csv").write_text("CustID,Churn,Plan,Joined\n" + test_rows)
    line = 'path = "raw/a/customers.csv"\n'
    spec_path.write_text(
        spec_path.read_text().replace(line, line + 'test_path = "raw/a/customers-test.csv"\n')
    )
    return spec_path


def test_test_file_rows_are_the_test_split_and_shared_entities_are_refused(
    tiny_table_spec: Path, secret: str
) -> None:
    spec_path = _with_test_file(
        tiny_table_spec,
        "C5,yes,B,2025-05-01\nC2,no,P,2025-02-11\nC6,maybe,P,2025-06-01\nC7,no,B,2025-07-01\n"
        "C3,no,B,2025-03-12\nC3,yes,B,2025-03-12\n",
    )
    out, _ = _preprocess(spec_path)
    clean = pl.read_parquet(out.clean.uri).sort("customer_id")
    assert clean.select("customer_id", SPLIT).rows() == [
        ("c1", "train"),
        ("c4", "train"),
        ("c5", "test"),
        ("c7", "test"),
    ]
    assert out.rejected is not None
    rejected = pl.read_parquet(out.rejected.uri)
    shared = "entity is in both path and test_path (refused in both)"
    twice = "test_path: duplicate key in column 'CustID' (rows 5, 6): one row per entity required"
    # C3 is refused in the main file too, though the test file's rows of it are refused for
    # another reason
    assert sorted(rejected.select("__row", REASON).rows()) == [
        (2, shared),
        (2, "test_path: " + shared),
        (3, shared),
        (3, "test_path: column 'Churn' (label): cannot parse as bool"),
        (5, twice),
        (6, twice),
    ]
    assert out.quality.rows_in == 10 and out.quality.rows_out == 4
    assert out.quality.rows_rejected == 6
    assert out.quality.rejected_by_reason[shared] == 2


def test_a_missing_test_file_names_it(tiny_table_spec: Path, secret: str) -> None:
    spec_path = _with_test_file(tiny_table_spec, "C5,yes,B,2025-05-01\n")
    (spec_path.parent / "raw" / "a" / "customers-test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"raw/a/customers-test.csv"):
        _preprocess(spec_path)


def test_a_test_file_without_a_mapped_column_names_the_test_file(
    tiny_table_spec: Path, secret: str
) -> None:
    spec_path = _with_test_file(tiny_table_spec, "C5,yes,B,2025-05-01\n")
    path = spec_path.parent / "raw" / "a" / "customers-test.csv"
    path.write_text(path.read_text().replace("Plan", "Tier"))
    with pytest.raises(PreprocessError) as info:
        _preprocess(spec_path)
    message = str(info.value)
    assert "raw/a/customers-test.csv: column 'Plan' (mapped to 'plan') is missing" in message
    assert "\n" not in message


def test_split_travels_with_the_fused_table(tiny_table_spec: Path, secret: str) -> None:
    spec_path = _with_test_file(tiny_table_spec, "C5,yes,B,2025-05-01\n")
    spec = load_spec(str(spec_path))
    fused = run_party(PartyContext.from_spec(spec, "a"), spec.party("a").sources)
    table = pl.read_parquet(fused.table.uri)
    assert table.columns[:3] == [ENTITY_HASH, LABEL, SPLIT]
    assert SPLIT not in [f.name for f in fused.features]
    test_hash = hash_keys(pl.Series(["c5"]), SECRET.encode())[0]
    assert table.filter(pl.col(SPLIT) == "test")[ENTITY_HASH].to_list() == [test_hash]


def test_lossless_party_rows_follow_the_test_file(tiny_table_spec: Path, secret: str) -> None:
    from tasks.horizontal.lossless import FusedSource
    from tasks.prepare.design import consortium_schema

    spec_path = _with_test_file(tiny_table_spec, "C5,yes,B,2025-05-01\nC6,no,P,2025-06-01\n")
    spec = load_spec(str(spec_path))
    fused = run_party(PartyContext.from_spec(spec, "a"), spec.party("a").sources)
    source = FusedSource(
        party="a",
        fused=fused.table,
        schema=consortium_schema({"a": fused.features}),
        validation_fraction=0.2,
        test_fraction=0.2,
    )
    data = source.load()
    assert len(data.y_test) == 2 and sorted(data.y_test) == [0.0, 1.0]
    assert len(data.y_train) + len(data.y_valid) == 4


# -- the split of each row -----------------------------------------------------------------


def test_frame_splits_keep_decided_splits_and_carve_validation_from_train() -> None:
    hashes = hash_keys(pl.Series([f"c{i}" for i in range(400)]), SECRET.encode())
    decided = ["test" if i < 100 else "train" for i in range(400)]
    frame = pl.DataFrame({ENTITY_HASH: hashes, SPLIT: decided})
    split = frame_splits(frame, validation_fraction=0.25, test_fraction=0.2)
    assert (split.head(100) == "test").all()
    tail = split.tail(300).value_counts().sort("split").rows()
    assert [s for s, _ in tail] == ["train", "valid"] and 40 < dict(tail)["valid"] < 110
    with_valid = frame.with_columns(pl.Series(SPLIT, ["valid", *decided[1:]]))
    split = frame_splits(with_valid, validation_fraction=0.25, test_fraction=0.2)
    assert split.value_counts().sort("split").rows() == [("test", 99), ("train", 300), ("valid", 1)]
    hashed = frame_splits(frame.drop(SPLIT), validation_fraction=0.25, test_fraction=0.2)
    assert set(hashed.unique()) == {"train", "valid", "test"}


# -- end to end: a split column at one party, a test file at the other ---------------------


def _csv_consortium(root: Path) -> tuple[Path, int, int]:
    """The synthetic consortium with CSV label tables: p0's has a ``set`` column (values
    ``fit``, ``es``, ``holdout``), p1's test entities are in a separate test file. Returns the
    spec and the two parties' test row counts."""
    spec = write_synthetic(root, customers=700)
    text = spec.read_text()
    p0 = pl.read_parquet(root / "raw" / "p0" / "customers.parquet")
    sets = ["holdout" if i % 4 == 0 else "es" if i % 4 == 1 else "fit" for i in range(p0.height)]
    p0.with_columns(pl.Series("set", sets)).write_csv(root / "raw" / "p0" / "customers.csv")
    p1 = pl.read_parquet(root / "raw" / "p1" / "customers.parquet")
    p1.slice(0, 250).write_csv(root / "raw" / "p1" / "customers.csv")
    p1.slice(250).write_csv(root / "raw" / "p1" / "customers-test.csv")
    for pid in ("p0", "p1"):
        (root / "raw" / pid / "customers.parquet").unlink()
        text = text.replace(f"raw/{pid}/customers.parquet", f"raw/{pid}/customers.csv")
    text = text.replace(
        'path = "raw/p1/customers.csv"\n',
        'path = "raw/p1/customers.csv"\ntest_path = "raw/p1/customers-test.csv"\n',
    )
    mapping = 'churned = { from = "churn", dtype = "bool" }\n'
    first = text.index(mapping) + len(mapping)
    text = text[:first] + 'fold = { from = "set", dtype = "str" }\n' + text[first:]
    text += (
        'split_column = "fold"\n'
        'split_values = { train = "fit", validation = "es", test = "holdout" }\n'
    )
    spec.write_text(text)
    return spec, sets.count("holdout"), p1.height - 250


@pytest.mark.prefect
def test_split_column_and_test_file_prepare_train_and_predict(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.horizontal import federated_training
    from flows.prepare import prepare

    spec, p0_test, p1_test = _csv_consortium(tmp_path)
    outputs = prepare(str(spec))
    for party in ("p0", "p1"):
        fused = pl.read_parquet(outputs[party].table.uri)
        assert SPLIT in fused.columns and fused[SPLIT].null_count() == 0
    fused = pl.read_parquet(outputs["p1"].table.uri)
    split = frame_splits(fused, validation_fraction=0.2, test_fraction=0.2)
    test_ids = pl.read_csv(tmp_path / "raw" / "p1" / "customers-test.csv")["id"]
    want = set(hash_keys(test_ids, SECRET.encode()).to_list())
    assert set(fused.filter(split == "test")[ENTITY_HASH].to_list()) == want
    result = federated_training(str(spec), baselines=True)
    sizes = result.split_sizes
    assert sizes["p0"]["test"] == p0_test
    assert sizes["p1"]["test"] == p1_test  # exactly the test file's rows
    # p0's validation rows are its "es" rows; p1 has none decided: carved from its train rows
    assert sizes["p0"]["valid"] == sum(1 for i in range(sum(sizes["p0"].values())) if i % 4 == 1)
    assert sizes["p1"]["valid"] > 0 and sizes["p1"]["train"] + sizes["p1"]["valid"] == 250
    assert result.test[result.best_round - 1]["auc"] > 0.6
    # the baselines are scored on the same decided test rows
    assert not result.warnings
    assert result.comparison.centralised["auc"] > 0.6
    assert set(result.comparison.local_only) == {"p0", "p1"}
    report = Path(result.report).read_text()
    p1 = sizes["p1"]
    assert "## Rows per split" in report
    assert f"| p1 | {p1['train']} | {p1['valid']} | {p1['test']} |" in report

    # scoring new exports: no split column and no test file needed
    for name in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DO_NOT_TRACK"):
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if "LEVEL" in name else "false"))
    new = tmp_path / "raw" / "p0" / "new"
    new.mkdir()
    customers = pl.read_csv(tmp_path / "raw" / "p0" / "customers.csv").drop("set", "churn")
    customers.head(20).write_csv(new / "customers.csv")
    orders = pl.read_parquet(tmp_path / "raw" / "p0" / "orders.parquet")
    orders.filter(pl.col("id").is_in(customers["id"].head(20).implode())).write_parquet(
        new / "orders.parquet"
    )
    out = tmp_path / "predictions.csv"
    scored = CliRunner().invoke(
        app, ["predict", str(spec), "--party", "p0", "--data", str(new), "--out", str(out)]
    )
    assert scored.exit_code == 0, scored.output
    predictions = pl.read_csv(out)
    assert sorted(predictions["customer_id"]) == sorted(customers["id"].head(20))
