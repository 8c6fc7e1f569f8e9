"""One test per kind of bad input: a clear error naming file/column/row, or quarantine with reason."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from storage.sources import SourceError, read_source
from storage.store import FileRef, Store, fingerprint
from tasks.prepare.align import hash_keys
from tasks.prepare.steps import PartyContext, run_party, run_preprocess
from tasks.spec.load import load_spec
from tasks.spec.models import SourceSpec
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
    from tasks.spec.models import SpecError

    with pytest.raises(SpecError) as info:
        load_spec(str(tiny_table_spec))
    assert "parties[0].sources[1].format: " in str(info.value)
    assert "unknown format '.xlsx'" in str(info.value)
    with pytest.raises(SourceError, match="unknown format 'xlsx'"):
        read_source("/x/y.xlsx", "xlsx")


def test_missing_or_renamed_column(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    path.write_text(path.read_text().replace("amt_cents", "amount_cents"))
    from tasks.prepare.preprocess import PreprocessError

    with pytest.raises(PreprocessError) as info:
        _run(tiny_table_spec, "transactions")
    message = str(info.value)
    assert "transactions.csv: column 'amt_cents' (mapped to 'amount') is missing" in message
    # counts the file's columns and names the mapped ones it has; never the header's other
    # cells (a header may be a line of data)
    assert "the file has 4 column(s), of which 3 in the mapping: ['cust', 'when', 'cat']" in message
    assert "amount_cents" not in message
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
    assert row[REASON][0] == "column 'amt_cents' (amount): cannot parse as float"
    assert row["amt_cents"][0] == "3OO"  # the value is kept in its cell, not in the reason
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
        "column 'ts' (timestamp): cannot parse as datetime; "
        "column 'value' (amount): cannot parse as float"
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
    assert bad[REASON][0] == "column 'when' (timestamp): cannot parse as datetime"
    assert out.quality.rejected_by_reason["column 'when' (timestamp): cannot parse"] == 1  # type: ignore[attr-defined]


def test_duplicate_keys_where_one_row_per_entity(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "customers.csv"
    path.write_text(path.read_text() + "C2,yes,B,2025-02-11\n")
    out, _ = _run(tiny_table_spec, "customers")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected["__row"].to_list() == [2, 5]
    assert set(rejected[REASON]) == {
        "duplicate key in column 'CustID' (rows 2, 5): one row per entity required"
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
    assert rejected.select("__row", REASON).rows() == [
        (2, "device not in entity map (column 'dev')")
    ]
    assert rejected["dev"].to_list() == ["zz"]  # the device id stays in its cell


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


# -- encodings, magnitudes, keys ------------------------------------------------------------
def _quality(out: object) -> tuple[int, int, int]:
    q = out.quality  # type: ignore[attr-defined]
    assert q.rows_in == q.rows_out + q.rows_rejected
    return q.rows_in, q.rows_out, q.rows_rejected


def test_utf8_bom_is_stripped_csv_and_jsonl(tiny_spec: Path) -> None:
    csv_path = tiny_spec.parent / "raw" / "a" / "transactions.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    out, _ = _run(tiny_spec, "transactions")
    assert _quality(out) == (6, 5, 1)  # only the exact duplicate is rejected
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert clean["customer_id"].to_list()[0] == "c1"
    jsonl = tiny_spec.parent / "raw" / "a" / "feedback.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + jsonl.read_bytes())
    out, _ = _run(tiny_spec, "feedback")
    assert out.rejected is None  # type: ignore[attr-defined]
    assert _quality(out) == (4, 4, 0)


def test_amount_too_large_is_quarantined_out_of_range(tiny_table_spec: Path, secret: str) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    text = path.read_text().replace("C3,02/14/2026 12:00,300,", "C3,02/14/2026 12:00,1e15,")
    path.write_text(text.replace("C4,12/24/2025 08:00,10000,", "C4,12/24/2025 08:00,1e14,"))
    out, _ = _run(tiny_table_spec, "transactions")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    reason = "column 'amt_cents' (amount): out of range (|amount| > 1e+12 currency units)"
    assert rejected.select("__row", REASON).rows() == [(4, "exact duplicate of row 3"), (5, reason)]
    assert rejected.filter(pl.col("__row") == 5)["amt_cents"].to_list() == ["1e15"]  # the cell
    assert _quality(out) == (6, 4, 2)
    kinds = out.quality.rejected_by_reason  # type: ignore[attr-defined]
    assert kinds["column 'amt_cents' (amount): out of range"] == 1
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert clean["amount"].max() == 1e12  # exactly at the bound (1e14 cents) is kept
    ctx, sources = _ctx(tiny_table_spec)
    fused = pl.read_parquet(run_party(ctx, sources).table.uri)  # features, no crash
    assert fused["txn__monetary"].max() == 1e12


def test_huge_event_reading_is_quarantined_and_fused_features_are_finite(
    tiny_spec: Path, secret: str
) -> None:
    pl.DataFrame(
        {
            "dev": ["d1", "d1", "d2"],
            "ts": pl.Series(["2026-03-01", "2026-03-02", "2026-03-03"]).str.to_datetime(
                "%Y-%m-%d", time_zone="UTC"
            ),
            "wh": [1e308, 5.0, -1e19],  # 1e19 Wh = 1e16 kWh: beyond the bound after conversion
            "status": ["OK", "OK", "OK"],
        }
    ).write_parquet(tiny_spec.parent / "raw" / "a" / "events.parquet")
    out, _ = _run(tiny_spec, "iot")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    reason = "column 'wh' (usage_kwh): out of range (|value| > 1e+15)"
    assert rejected.select("__row", REASON).rows() == [(1, reason), (3, reason)]
    assert _quality(out) == (3, 1, 2)
    ctx, sources = _ctx(tiny_spec)
    fused = pl.read_parquet(run_party(ctx, sources).table.uri)
    floats = fused.select(pl.selectors.float())
    assert not any(floats.select(pl.all().is_infinite().any() | pl.all().is_nan().any()).row(0))


def test_replacement_character_is_valid_text(tiny_spec: Path) -> None:
    path = tiny_spec.parent / "raw" / "a" / "transactions.csv"
    data = path.read_bytes().replace(b"C3,02/14", "C3\ufffd,02/14".encode())
    path.write_bytes(data.replace(b"1250,groc", "1250,groc\ufffd".encode()))
    out, _ = _run(tiny_spec, "transactions")
    assert _quality(out) == (6, 5, 1)  # only the exact duplicate
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert "c3\ufffd" in clean["customer_id"].to_list()
    # with an invalid byte elsewhere in the file: that row only, the genuine U+FFFD kept
    path.write_bytes(path.read_bytes().replace(b"C4,12/24", b"C\xff4,12/24"))
    out, _ = _run(tiny_spec, "transactions")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected.select("__row", REASON).rows() == [
        (4, "exact duplicate of row 3"),
        (6, "column 'cust': invalid UTF-8"),
    ]
    assert rejected["cust"].to_list()[1] == "C\ufffd4"  # lossy text of the invalid cell
    assert _quality(out) == (6, 4, 2)
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert "c3\ufffd" in clean["customer_id"].to_list()
    assert "other" in clean["category"].to_list()  # 'groc\ufffd' is an unknown category
    jsonl = tiny_spec.parent / "raw" / "a" / "feedback.jsonl"
    jsonl.write_text(jsonl.read_text().replace("Terrible service", "Terrible \ufffd service"))
    out, _ = _run(tiny_spec, "feedback")
    assert out.rejected is None  # type: ignore[attr-defined]
    texts = pl.read_parquet(out.clean.uri)["text"].to_list()  # type: ignore[attr-defined]
    assert "Terrible \ufffd service, I am cancelling" in texts


def _invalid_strings(values: list[bytes | None]) -> Any:
    """A Parquet string column holding the raw bytes as given (no UTF-8 check on write)."""
    import pyarrow as pa

    binary = pa.array(values, pa.binary())
    return pa.Array.from_buffers(
        pa.string(), len(binary), binary.buffers(), null_count=binary.null_count
    )


def test_invalid_utf8_in_parquet_is_quarantined_per_row(tiny_table_spec: Path) -> None:
    import pyarrow.parquet as pq

    orders = tiny_table_spec.parent / "raw" / "b" / "orders.parquet"
    table = pq.read_table(orders)
    ids = _invalid_strings([b"b1", b"b\xff2", b"b2", b"b3"])
    pq.write_table(table.set_column(0, "id", ids), orders)
    with pytest.raises(pl.exceptions.ComputeError):
        pl.read_parquet(orders)  # what a plain read makes of it: the whole file fails
    out, _ = _run(tiny_table_spec, "orders", party="b")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected.select("__row", REASON).rows() == [(2, "column 'id': invalid UTF-8")]
    assert rejected["id"].to_list() == ["b\ufffd2"]
    assert "__invalid_utf8" not in rejected.columns
    assert _quality(out) == (4, 3, 1)
    assert out.quality.file.endswith("raw/b/orders.parquet")  # type: ignore[attr-defined]
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert clean["customer_id"].to_list() == ["b1", "b2", "b3"]


def test_invalid_utf8_in_arrow_ipc_is_flagged_per_cell(tmp_path: Path) -> None:
    import pyarrow as pa
    from pyarrow import ipc

    table = pa.table({"id": _invalid_strings([b"a", None, b"\xc3(", b"ok \xef\xbf\xbd"])})
    path = tmp_path / "keys.arrow"
    with ipc.new_file(path, table.schema) as writer:
        writer.write_table(table)
    frame = read_source(str(path), "arrow").frame
    assert frame["id"].to_list() == ["a", None, "\ufffd(", "ok \ufffd"]
    assert frame["__invalid_utf8"].to_list() == [[], [], ["id"], []]  # genuine U+FFFD is valid


def test_duplicate_json_key_quarantines_the_line(tiny_spec: Path) -> None:
    path = tiny_spec.parent / "raw" / "a" / "feedback.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(1, '{"user": "C9", "user": "C8", "comment": "two ids", "stars": 2}')
    path.write_text("\n".join(lines) + "\n")
    out, _ = _run(tiny_spec, "feedback")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected.select("__row", REASON).rows() == [(2, "duplicate JSON key 'user'")]
    assert _quality(out) == (5, 4, 1)
    assert out.quality.rejected_by_reason == {"duplicate JSON key 'user'": 1}  # type: ignore[attr-defined]


def test_jsonl_with_no_valid_line_reports_the_line_errors(tiny_spec: Path) -> None:
    path = tiny_spec.parent / "raw" / "a" / "feedback.jsonl"
    path.write_bytes(b'user,comment\n{"user": "C1", "user": "C2"}\n\n[1, 2]\n\xff\n')
    with pytest.raises(SourceError) as info:
        _run(tiny_spec, "feedback")
    assert str(info.value).endswith(
        "raw/a/feedback.jsonl: no line holds a valid JSON object (4 non-empty line(s), all "
        "invalid: line 1: invalid JSON (Expecting value); line 2: duplicate JSON key 'user'; "
        "line 4: JSON line is not an object; line 5: invalid utf8 (invalid start byte))"
    )
    assert "C1" not in str(info.value)


KEY_REASON = "column 'CustID' (customer_id): key contains control characters"


@pytest.mark.parametrize(
    "key",
    ["C\x002", "C\x012", "C2\x7f", "C\u200b2", "C\u200c2", "C\u200d2", "C\ufeff2", "\u200b"],
    ids=["nul", "soh", "del", "zwsp", "zwnj", "zwj", "bom", "only-zwsp"],
)
def test_control_and_zero_width_characters_in_keys_are_refused(
    tiny_table_spec: Path, key: str
) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "customers.csv"
    path.write_text(path.read_text().replace("C2,no,", f"{key},no,"))
    out, _ = _run(tiny_table_spec, "customers")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    assert rejected.select("__row", REASON).rows() == [(2, KEY_REASON)]
    assert rejected["CustID"].to_list() == [key]  # the cell kept, never the reason
    assert _quality(out) == (4, 3, 1)
    assert out.quality.rejected_by_reason == {  # type: ignore[attr-defined]
        "column 'CustID' (customer_id): key contains control characters": 1
    }


def test_keys_are_nfkc_normalised_so_look_alikes_collide(tiny_table_spec: Path) -> None:
    path = tiny_table_spec.parent / "raw" / "a" / "customers.csv"
    full_width = "\uff23\uff11"  # "Ｃ１": NFKC gives "C1", the same entity as C1
    cyrillic = "\u04212"  # Cyrillic "С" + "2": NFKC keeps the script, not the same as C2
    text = path.read_text() + f"{full_width},no,B,2025-05-01\n{cyrillic},no,B,2025-05-02\n"
    path.write_text(text)
    out, _ = _run(tiny_table_spec, "customers")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    reason = "duplicate key in column 'CustID' (rows 1, 5): one row per entity required"
    assert rejected.select("__row", REASON).rows() == [(1, reason), (5, reason)]
    assert _quality(out) == (6, 4, 2)
    clean = pl.read_parquet(out.clean.uri)  # type: ignore[attr-defined]
    assert sorted(clean["customer_id"].to_list()) == ["c2", "c3", "c4", "\u04412"]


def test_control_characters_in_a_device_key_are_refused(tiny_spec: Path) -> None:
    pl.DataFrame(
        {
            "dev": ["d1", "d\u200b1", "d\x002"],
            "ts": pl.Series(["2026-03-01", "2026-03-02", "2026-03-03"]).str.to_datetime(
                "%Y-%m-%d", time_zone="UTC"
            ),
            "wh": [1.0, 2.0, 3.0],
            "status": ["OK", "OK", "OK"],
        }
    ).write_parquet(tiny_spec.parent / "raw" / "a" / "events.parquet")
    out, _ = _run(tiny_spec, "iot")
    rejected = pl.read_parquet(out.rejected.uri)  # type: ignore[attr-defined]
    reason = "column 'dev' (device_id): key contains control characters"
    assert rejected.select("__row", REASON).rows() == [(2, reason), (3, reason)]
    assert _quality(out) == (3, 1, 2)
