"""Preprocessing's fast paths give what the plain computation gives: keys of ASCII text skip
NFKC, coerced columns are staged once under internal names, exact duplicates are looked up
among the duplicated rows only."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage.store import fingerprint
from tasks.prepare.preprocess import coerce_frame, is_ascii, normalise_key
from tasks.prepare.steps import PartyContext, run_preprocess
from tasks.spec.load import load_spec
from tasks.spec.models import ColumnSpec
from tasks.types import REASON


def test_is_ascii_per_column() -> None:
    frame = pl.DataFrame(
        {
            "plain": ["c1", " C2 ", None, ""],
            "wide": ["c1", "\uff23\uff11", None, "x"],  # a full-width key
            "accent": ["c1", "cafe\u0301", None, "x"],  # a combining mark: NFKC composes it
            "number": [1, 2, None, 4],
            "day": pl.Series(["2026-01-01"] * 4).str.to_date(),
        }
    )
    assert is_ascii(frame, "plain")
    assert not is_ascii(frame, "wide")
    assert not is_ascii(frame, "accent")
    assert is_ascii(frame, "number")
    assert not is_ascii(frame, "day")  # not text, not a number: keeps the general path
    assert is_ascii(pl.DataFrame({"k": pl.Series([], dtype=pl.String)}), "k")


@pytest.mark.parametrize("mode", ["strip", "strip_lower", "none"])
def test_ascii_keys_normalise_as_with_nfkc(mode: str) -> None:
    keys = pl.DataFrame({"k": [" C0001 ", "c0001", "\tAbC-9\n", "", "   ", None, "x|y"]})
    assert is_ascii(keys, "k")
    general = keys.select(normalise_key(pl.col("k"), mode))  # type: ignore[arg-type]
    fast = keys.select(normalise_key(pl.col("k"), mode, ascii=True))  # type: ignore[arg-type]
    assert_frame_equal(fast, general)


def test_non_ascii_key_column_still_nfkc_normalised() -> None:
    raw = pl.DataFrame({"__row": [1, 2, 3], "id": ["C1", "\uff23\uff11", "cafe\u0301"]})
    columns = {"customer_id": ColumnSpec.model_validate({"from": "id", "dtype": "str"})}
    frame, _ = coerce_frame(
        raw,
        columns,
        file="raw.csv",
        key="customer_id",
        normalisation="strip_lower",
        vocabularies={},
    )
    assert frame["customer_id"].to_list() == ["c1", "c1", "caf\u00e9"]


def test_raw_columns_named_like_internal_ones_are_read_as_given() -> None:
    raw = pl.DataFrame(
        {
            "__row": [1, 2, 3],
            "__coerced0": ["a1", "a2", " "],  # the key, under the first internal name
            "__coerced1_present": ["1.5", "x", "2"],
            "__coerced_0": ["2026-01-01", "bad", None],
        }
    )
    spec = {
        "customer_id": {"from": "__coerced0", "dtype": "str"},
        "value": {"from": "__coerced1_present", "dtype": "float"},
        "day": {"from": "__coerced_0", "dtype": "date", "required": True},
    }
    columns = {k: ColumnSpec.model_validate(v) for k, v in spec.items()}
    frame, _ = coerce_frame(
        raw,
        columns,
        file="raw.csv",
        key="customer_id",
        normalisation="strip_lower",
        vocabularies={},
    )
    assert frame.columns == ["__row", "customer_id", "value", "day", REASON]
    assert frame["customer_id"].to_list() == ["a1", "a2", None]
    assert frame["value"].to_list() == [1.5, None, 2.0]
    assert frame[REASON].to_list() == [
        None,
        "column '__coerced1_present' (value): cannot parse as float; "
        "column '__coerced_0' (day): cannot parse as date",
        "column '__coerced0' (customer_id): required value missing; "
        "column '__coerced_0' (day): required value missing",
    ]


def test_exact_duplicates_name_their_first_row_with_missing_cells(tiny_table_spec: Path) -> None:
    """Interleaved groups of duplicates, some with a missing category, through the CSV
    reader and the party's preprocessing step; every duplicate names its group's first row."""
    path = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    path.write_text(
        "cust,when,amt_cents,cat\n"
        "C1,01/05/2026 10:00,1250,\n"  # 1
        "C2,03/20/2026 18:00,4599,elec\n"  # 2
        " c1 ,01/05/2026 10:00,1250,\n"  # 3: row 1 once normalised
        "C2,03/20/2026 18:00,4599,elec\n"  # 4: row 2
        "C1,01/05/2026 10:00,1250,groc\n"  # 5: differs from row 1 in its category
        "C1,01/05/2026 10:00,1250,\n"  # 6: row 1
        "C3,02/14/2026 12:00,300,groc\n"  # 7
    )
    spec = load_spec(str(tiny_table_spec))
    ctx = PartyContext.from_spec(spec, "a")
    source = next(s for s in spec.party("a").sources if s.id == "transactions")
    out = run_preprocess(ctx, source, fingerprint(source.path), None)
    assert out.rejected is not None
    rejected = pl.read_parquet(out.rejected.uri)
    assert rejected.select("__row", REASON).rows() == [
        (3, "exact duplicate of row 1"),
        (4, "exact duplicate of row 2"),
        (6, "exact duplicate of row 1"),
    ]
    assert rejected["cust"].to_list() == [" c1 ", "C2", "C1"]  # the raw cells, as given
    assert out.quality.duplicates_removed == 3
    clean = pl.read_parquet(out.clean.uri)
    assert clean["customer_id"].to_list() == ["c1", "c2", "c1", "c3"]
    assert clean["category"].to_list() == [None, "electronics", "grocery", "grocery"]
