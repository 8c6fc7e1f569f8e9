"""One test per kind of bad input: a clear error naming file/column/row, or quarantine with reason."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

from storage.sources import SourceError, read_source
from storage.store import FileRef, Store, fingerprint
from tasks.align import hash_keys
from tasks.spec import SourceSpec, load_spec
from tasks.steps import PartyContext, run_party, run_preprocess
from tasks.types import ENTITY_HASH, LABEL, REASON
from tests.factories import set_label_cells


def _ctx(spec_path: Path, party: str = "a") -> tuple[PartyContext, list[SourceSpec]]:
    spec = load_spec(str(spec_path))
    return PartyContext.from_spec(spec, party), spec.party(party).sources


def _run(spec_path: Path, source_id: str, party: str = "a") -> tuple[object, PartyContext]:
    ctx, sources = _ctx(spec_path, party)
    source = next(s for s in sources if s.id == source_id)
    raw = fingerprint(source.path)
    emap: FileRef | None = fingerprint(source.entity_map.path) if source.entity_map else None
    return run_preprocess(ctx, source, raw, emap), ctx


def _outputs(store: str, layer: str) -> list[str]:
    return Store(store).list(layer)  # type: ignore[arg-type]


def test_missing_file(tiny_table_spec: Path) -> None:
    (tiny_table_spec.parent / "raw" / "a" / "transactions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"raw/a/transactions.csv: no such file"):
        _run(tiny_table_spec, "transactions")


def test_unknown_format(tiny_table_spec: Path) -> None:
    text = tiny_table_spec.read_text().replace("raw/a/transactions.csv", "raw/a/transactions.xlsx")
    tiny_table_spec.write_text(text)
    from tasks.spec import SpecError

    with pytest.raises(SpecError) as info:
        load_spec(str(tiny_table_spec))
    assert "parties[0].sources[1].format: " in str(info.value)
    assert "unknown format '.xlsx'" in str(info.value)
    with pytest.raises(SourceError, match="unknown format 'xlsx'"):
        read_source("/x/y.xlsx", "xlsx")


def test_missing_or_renamed_column(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    path.write_text(path.read_text().replace("amt_cents", "amount_cents"))
    from tasks.preprocess import PreprocessError

    with pytest.raises(PreprocessError) as info:
        _run(tiny_table_spec, "transactions")
    message = str(info.value)
    assert "transactions.csv: column 'amt_cents' (mapped to 'amount') is missing" in message
    assert "'amount_cents'" in message  # lists what the file has
    ctx, _ = _ctx(tiny_table_spec)
    assert _outputs(ctx.store, "clean") == []  # nothing half-written


def test_wrong_dtype_is_quarantined_with_row_and_column(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    path.write_text(
        path.read_text().replace("C3,02/14/2026 12:00,300,groc", "C3,02/14/2026 12:00,3OO,groc")
    )
    out, _ = _run(tiny_table_spec, "transactions")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    row = rejected.filter(pl.col("__row") == 5)
    assert row[REASON][0] == "column 'amt_cents' (amount): cannot parse 3OO as float"
    assert row["amt_cents"][0] == "3OO"
    assert out.quality.rows_out == 4  # type: ignore[attr-defined]  # 6 rows - 1 duplicate - 1 bad


def test_parquet_wrong_dtype_column(tmp_path: Path, secret: str) -> None:
    from tests.factories import write_tiny

    spec_path = write_tiny(tmp_path, with_text_events=False)
    pl.DataFrame(
        {"id": ["b1", "b2"], "ts": ["2026-01-01T00:00:00Z", "yesterday"], "value": ["1.5", "abc"]}
    ).write_parquet(tmp_path / "raw" / "b" / "orders.parquet")
    out, _ = _run(spec_path, "orders", party="b")
    reasons = pl.read_parquet(out.rejected.uri)[REASON].to_list()  # type: ignore[attr-defined]
    assert reasons == [
        "column 'ts' (timestamp): cannot parse yesterday as datetime; "
        "column 'value' (amount): cannot parse abc as float"
    ]


def test_empty_file(tiny_table_spec: Path) -> None:
    (tiny_table_spec.parent / "raw" / "a" / "transactions.csv").write_text("")
    with pytest.raises(SourceError, match=r"transactions.csv: file is empty"):
        _run(tiny_table_spec, "transactions")
    (tiny_table_spec.parent / "raw" / "a" / "transactions.csv").write_text(
        "cust,when,amt_cents,cat\n"
    )
    with pytest.raises(SourceError, match=r"transactions.csv: file holds no data rows"):
        _run(tiny_table_spec, "transactions")


def test_unparsable_timestamps(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    path.write_text(path.read_text().replace("03/20/2026 18:00,4599", "2026-03-20T18:00,4599", 1))
    out, _ = _run(tiny_table_spec, "transactions")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    bad = rejected.filter(pl.col(REASON).str.contains("timestamp"))
    assert bad["__row"].to_list() == [3]
    assert bad[REASON][0] == "column 'when' (timestamp): cannot parse 2026-03-20T18:00 as datetime"
    assert out.quality.rejected_by_reason["column 'when' (timestamp): cannot parse"] == 1  # type: ignore[attr-defined]


def test_duplicate_keys_where_one_row_per_entity(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "customers.csv"
    path.write_text(path.read_text() + "C2,yes,B,2025-02-11\n")
    out, _ = _run(tiny_table_spec, "customers")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected["__row"].to_list() == [2, 5]
    assert set(rejected[REASON]) == {
        "duplicate key 'c2' in column 'CustID' (rows 2, 5): one row per entity required"
    }
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert "c2" not in clean["customer_id"].to_list()
    assert clean.height == 3


def test_invalid_utf8_csv_row_is_quarantined(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    data = path.read_bytes().replace(b"C3,02/14", b"C\xff3,02/14")
    path.write_bytes(data)
    out, _ = _run(tiny_table_spec, "transactions")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    row = rejected.filter(pl.col(REASON).str.contains("UTF-8"))
    assert row["__row"].to_list() == [5]
    assert row[REASON][0] == "column 'cust': invalid UTF-8"


def test_invalid_utf8_and_broken_json_lines(tiny_spec: Path) -> None:
    path = tiny_spec.parent / "raw" / "a" / "feedback.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines.insert(1, b'{"user": "C9", "comment": "caf\xe9 latte", "stars": 4}')
    lines.insert(2, b'{"user": "C8", "comment": "unterminated')
    path.write_bytes(b"\n".join(lines))
    out, _ = _run(tiny_spec, "feedback")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected["__row"].to_list() == [2, 3]
    assert rejected[REASON][0].startswith("invalid utf8")
    assert rejected[REASON][1].startswith("invalid JSON")
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert clean.height == 4
    assert "服务很好，非常满意" in clean["text"].to_list()  # Chinese intact


def test_unknown_device_is_quarantined(tiny_spec: Path) -> None:
    pl.DataFrame(
        {
            "dev": ["d1", "zz"],
            "ts": pl.Series(["2026-03-01", "2026-03-02"]).str.to_datetime(
                "%Y-%m-%d", time_zone="UTC"
            ),
            "wh": [1.0, 2.0],
            "status": ["OK", "OK"],
        }
    ).write_parquet(tiny_spec.parent / "raw" / "a" / "events.parquet")
    out, _ = _run(tiny_spec, "iot")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected.select("__row", REASON).rows() == [(2, "device 'zz' not in entity map")]


def test_timezones_and_units_are_normalised(tiny_table_spec: Path) -> None:
    out, _ = _run(tiny_table_spec, "transactions")
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    first = clean.row(0, named=True)
    # 01/05/2026 10:00 New York (EST, UTC-5) -> 15:00 UTC; 1250 cents -> 12.5
    assert first["timestamp"] == dt.datetime(2026, 1, 5, 15, 0, tzinfo=dt.UTC)
    assert first["amount"] == 12.5
    assert first["customer_id"] == "c1"
    assert first["category"] == "grocery"
    assert out.quality.duplicates_removed == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("cell", "reason"),
    [
        ("", "missing label"),
        ("NaN", "label is not a number"),
        ("inf", "label is not finite"),
        ("2", "not 0 or 1 for a binary task"),
    ],
    ids=["empty", "nan", "inf", "two-in-binary"],
)
def test_bad_label_is_quarantined_and_not_fused(
    tiny_table_spec: Path, secret: str, cell: str, reason: str
) -> None:
    set_label_cells(tiny_table_spec, {"C2": cell})  # C2 is data row 2
    out, ctx = _run(tiny_table_spec, "customers")
    expected = f"column 'Churn' (label): {reason}"
    assert not cell or cell.lower() not in expected.lower()  # the reason never shows the value
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected.select("__row", REASON).rows() == [(2, expected)]
    assert rejected["CustID"].to_list() == ["C2"]  # original cells kept as text
    quality = out.quality  # type: ignore[attr-defined]
    assert (quality.rows_in, quality.rows_out, quality.rows_rejected) == (4, 3, 1)
    assert quality.rows_in == quality.rows_out + quality.rows_rejected
    assert quality.rejected_by_reason == {expected: 1}
    stored = Store(ctx.store).read_json("reports", "quality-customers.json")
    assert (stored["rows_in"], stored["rows_out"], stored["rows_rejected"]) == (4, 3, 1)
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert clean["customer_id"].to_list() == ["c1", "c3", "c4"]

    ctx, sources = _ctx(tiny_table_spec)
    fused_out = run_party(ctx, sources)
    fused = pl.read_parquet(fused_out.table.uri)
    assert fused[LABEL].null_count() == 0
    assert fused[LABEL].is_finite().all()
    assert set(fused[LABEL]) <= {0.0, 1.0}
    c2 = hash_keys(pl.Series(["c2"]), secret.encode())[0]
    assert c2 not in fused[ENTITY_HASH].to_list()  # quarantined, not fused
    assert fused.height == 3
    customers = next(q for q in fused_out.quality if q.source == "customers")
    assert (customers.rows_in, customers.rows_out, customers.rows_rejected) == (4, 3, 1)


def _set_task(spec_path: Path, task: str, label: str = 'label = { column = "churned" }') -> None:
    text = spec_path.read_text().replace('task = "binary"', f'task = "{task}"')
    spec_path.write_text(text.replace('label = { column = "churned" }', label))


def test_multiclass_label_outside_classes_is_quarantined(tiny_table_spec: Path) -> None:
    _set_task(tiny_table_spec, "multiclass", 'label = { column = "churned", num_classes = 3 }')
    set_label_cells(tiny_table_spec, {"C1": "1.5", "C2": "3", "C3": "-1", "C4": "2.0"})
    out, _ = _run(tiny_table_spec, "customers")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    reason = "column 'Churn' (label): not an integer 0..2 for a multiclass task"
    assert rejected.select("__row", REASON).rows() == [(1, reason), (2, reason), (3, reason)]
    quality = out.quality  # type: ignore[attr-defined]
    assert (quality.rows_in, quality.rows_out, quality.rows_rejected) == (4, 1, 3)
    assert quality.rejected_by_reason == {reason: 3}
    assert pl.read_parquet(out.clean.uri)["churned"].to_list() == [2.0]  # type: ignore[attr-defined]


def test_regression_label_must_be_finite(tiny_table_spec: Path) -> None:
    _set_task(tiny_table_spec, "regression")
    set_label_cells(tiny_table_spec, {"C1": "-inf", "C2": " ", "C3": "x", "C4": "7.25"})
    out, _ = _run(tiny_table_spec, "customers")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected.select("__row", REASON).rows() == [
        (1, "column 'Churn' (label): label is not finite"),
        (2, "column 'Churn' (label): missing label"),
        (3, "column 'Churn' (label): cannot parse as float"),
    ]
    quality = out.quality  # type: ignore[attr-defined]
    assert (quality.rows_in, quality.rows_out, quality.rows_rejected) == (4, 1, 3)
    assert pl.read_parquet(out.clean.uri)["churned"].to_list() == [7.25]  # type: ignore[attr-defined]


def test_bool_label_reason_hides_the_value(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "customers.csv"
    path.write_text(path.read_text().replace("C2,no,", "C2,maybe,").replace("C3,no,", "C3,,"))
    out, _ = _run(tiny_table_spec, "customers")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected.select("__row", REASON).rows() == [
        (2, "column 'Churn' (label): cannot parse as bool"),
        (3, "column 'Churn' (label): missing label"),
    ]
    assert rejected["Churn"].to_list()[0] == "maybe"


def test_label_not_checked_outside_the_label_source(tiny_table_spec: Path) -> None:
    ctx, sources = _ctx(tiny_table_spec)
    scoring = ctx.model_copy(update={"label_source": None})
    source = next(s for s in sources if s.id == "customers")
    path = tiny_table_spec.parent / "raw" / "a" / "customers.csv"
    path.write_text(path.read_text().replace("C2,no,", "C2,,"))
    out = run_preprocess(scoring, source, fingerprint(source.path), None)
    assert out.rejected is None
    assert out.quality.rows_out == 4
