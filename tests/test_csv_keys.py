"""CSV layout options, row-number and composite entity keys, and the label's positive class
or value map: real CSV files written here, read through ``read_source`` and the party
pipeline's own steps, the ``prepare`` flow (one ``party-pipeline`` subflow per party) and
``fedfuse predict`` showing the party's raw key as exported."""

from __future__ import annotations

import os
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from storage.sources import ROW, CsvLayout, SourceError, read_source
from storage.store import read_table
from tasks.prepare.steps import PartyContext, run_preprocess, run_raw_keys
from tasks.scoring import entity_keys, label_values
from tasks.spec.load import load_spec
from tasks.spec.models import SpecError
from tasks.types import ENTITY_HASH, LABEL, REASON
from tests.factories import SPEC_HEAD, write_synthetic

runner = CliRunner()

# party a: semicolons, a preamble line, comment lines, '?' for missing, a quoted field holding
# the delimiter, a composite key (branch, account_no); its label is "Yes" or anything else
CUSTOMERS_A = (
    "Export of 2026-03-31, branch accounts\n"
    "branch;account_no;Churn;Plan\n"
    "# accounts opened before 2025\n"
    "N1;001;Yes;B\n"
    "N1;002;No;P\n"
    '"S;2";001;Yes;B\n'
    "S2;001;?;P\n"
    "S2;;No;B\n"
    "# closed accounts follow\n"
    "S|3;004;No;B\n"
    "N1;003;Maybe;P\n"
    "N1;009;No\n"
)
TRANSACTIONS_A = (
    "branch,account_no,when,amount\n"
    "N1,001,2026-03-01T10:00:00,12.50\n"
    "N1,002,2026-03-02T10:00:00,8.00\n"
    "S;2,001,2026-03-03T10:00:00,45.99\n"
    "N1,003,2026-02-01T10:00:00,3.00\n"
)
# party b: no header; the row number is the entity id
ACCOUNTS_B = "Yes\tplus\nNo\tbasic\nno\tplus\n\nYes\tbasic\n"

PARTIES = """
[[parties]]
id = "a"
store = "stores/a"
imports = ["raw/a"]

[[parties.sources]]
id = "customers"
kind = "table"
grain = "entity"
path = "raw/a/customers.csv"
key = { columns = ["branch", "account_no"] }
csv = { delimiter = ";", skip_rows = 1, comment_prefix = "#", null_values = ["?"] }
[parties.sources.columns]
churned = { from = "Churn", dtype = "str" }
plan = { from = "Plan", dtype = "category", values = { B = "basic", P = "plus" } }

[[parties.sources]]
id = "transactions"
kind = "table"
grain = "transaction"
path = "raw/a/transactions.csv"
key = { columns = ["branch", "account_no"] }
[parties.sources.columns]
timestamp = { from = "when", dtype = "datetime", required = true }
amount = { from = "amount", dtype = "float", unit = "currency", required = true }

[[parties]]
id = "b"
store = "stores/b"
imports = ["raw/b"]

[[parties.sources]]
id = "accounts"
kind = "table"
grain = "entity"
path = "raw/b/accounts.csv"
key = { row_number = true }
csv = { header = false, names = ["left", "tier"], delimiter = "\\t" }
[parties.sources.columns]
churned = { from = "left", dtype = "str" }
plan = { from = "tier", dtype = "category" }
"""


def _spec(root: Path, *, label: str = 'label = { column = "churned", positive = "Yes" }') -> Path:
    for party, name, text in (
        ("a", "customers.csv", CUSTOMERS_A),
        ("a", "transactions.csv", TRANSACTIONS_A),
        ("b", "accounts.csv", ACCOUNTS_B),
    ):
        (root / "raw" / party).mkdir(parents=True, exist_ok=True)
        (root / "raw" / party / name).write_text(text)
    head = SPEC_HEAD.format().replace('label = { column = "churned" }', label)
    spec = root / "spec.toml"
    spec.write_text(head + PARTIES)
    return spec


def _problems(spec: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(str(spec))
    return [str(p) for p in info.value.problems]


# -- the reader ------------------------------------------------------------------------------


def test_semicolons_preamble_comments_missing_text_and_quoted_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "customers.csv"
    path.write_text(CUSTOMERS_A)
    layout = CsvLayout(delimiter=";", skip_rows=1, comment_prefix="#", null_values=("?",))
    raw = read_source(str(path), "csv", csv=layout)
    assert raw.frame.columns == [ROW, "branch", "account_no", "Churn", "Plan"]
    # __row counts data records: neither the preamble, the header nor comment lines
    assert raw.frame[ROW].to_list() == [1, 2, 3, 4, 5, 6, 7]
    assert raw.frame["branch"].to_list()[2] == "S;2"
    assert raw.frame["Churn"].to_list()[3] is None  # "?" reads as missing
    assert raw.bad_lines == [(8, "N1;009;No", "expected 4 fields, found 3")]


def test_header_less_file_with_names_and_a_ragged_line(tmp_path: Path) -> None:
    path = tmp_path / "accounts.csv"
    path.write_text("1,2\n3,4,5\n6,7\n")
    raw = read_source(str(path), "csv", csv=CsvLayout(header=False, names=("x", "y")))
    assert raw.frame.rows() == [(1, "1", "2"), (3, "6", "7")]
    assert [(n, why) for n, _, why in raw.bad_lines] == [(2, "expected 2 fields, found 3")]


def test_names_of_the_wrong_length_and_empty_files_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "accounts.csv"
    path.write_text("1,2\n3,4\n")
    for layout, what in (
        (CsvLayout(header=False, names=("x", "y", "z")), "first data row"),
        (CsvLayout(names=("x",)), "header"),
    ):
        with pytest.raises(SourceError) as info:
            read_source(str(path), "csv", csv=layout)
        assert str(info.value) == (
            f"{path}: csv.names gives {len(layout.names or ())} column(s) but the {what} has "
            "2 field(s)"
        )
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SourceError, match=r"empty\.csv: file is empty$"):
        read_source(str(empty), "csv", csv=CsvLayout(header=False, names=("x",)))
    preamble_only = tmp_path / "preamble.csv"
    preamble_only.write_text("# a comment\nexported today\n# another\n")
    for layout in (
        CsvLayout(skip_rows=5),
        CsvLayout(skip_rows=1, comment_prefix="#"),
        CsvLayout(header=False, names=("x",), skip_rows=2, comment_prefix="#"),
    ):
        with pytest.raises(SourceError, match=r"preamble\.csv: file holds no data rows$"):
            read_source(str(preamble_only), "csv", csv=layout)


def test_names_replace_a_header_with_duplicate_cells(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("id,x,x\nc1,1,2\n")
    with pytest.raises(SourceError, match="duplicate column names"):
        read_source(str(path), "csv")
    raw = read_source(str(path), "csv", csv=CsvLayout(names=("id", "x1", "x2")))
    assert raw.frame.rows() == [(1, "c1", "1", "2")]


def test_no_quote_char_keeps_quotes_as_text(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('id|note\nc1|"a\nc2|b"\n')
    raw = read_source(str(path), "csv", csv=CsvLayout(delimiter="|", quote_char=""))
    assert raw.frame["note"].to_list() == ['"a', 'b"']


# -- spec checks -----------------------------------------------------------------------------


def test_bad_csv_options_and_keys_are_refused_at_their_key_paths(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    load_spec(str(spec))  # the spec above is valid
    base = spec.read_text()
    at_b = "parties[1].sources[0]"
    cases = {
        'delimiter = "\\t"': ('delimiter = "::"', f"{at_b}.csv.delimiter"),
        'names = ["left", "tier"]': ('names = ["left", "left"]', f"{at_b}.csv.names"),
        "header = false, names": ("header = false, nameless", f"{at_b}.csv"),
        "key = { row_number = true }": (
            'key = { row_number = true, columns = ["x"] }',
            f"{at_b}.key",
        ),
    }
    for old, (new, path) in cases.items():
        spec.write_text(base.replace(old, new).replace("nameless = [", "names_ = ["))
        problems = _problems(spec)
        assert any(p.startswith(path) for p in problems), (new, problems)
    # CSV options on a Parquet source; a key beside an entity column; an unknown part
    spec.write_text(
        base.replace('path = "raw/b/accounts.csv"', 'path = "raw/b/accounts.parquet"').replace(
            'plan = { from = "tier", dtype = "category" }',
            'plan = { from = "tier", dtype = "category" }\n'
            'customer_id = { from = "id", dtype = "str" }',
        )
    )
    problems = _problems(spec)
    assert f"{at_b}.csv: CSV options apply to CSV sources only; this source is parquet" in problems
    assert any(
        p.startswith(f"{at_b}.columns.customer_id: the source gives a 'key'") for p in problems
    )
    spec.write_text(base.replace("key = { row_number = true }", 'key = { columns = ["id"] }'))
    assert _problems(spec) == [f"{at_b}.key.columns: ['id'] not among the columns in csv.names"]


def test_label_positive_and_values_are_checked(tmp_path: Path) -> None:
    spec = _spec(tmp_path, label='label = { column = "churned", values = { Yes = 1, No = 2 } }')
    assert _problems(spec) == ["consortium.label.values: ['No']: not 0 or 1 for a binary task"]
    spec = _spec(
        tmp_path, label='label = { column = "churned", positive = "Yes", values = { Yes = 1 } }'
    )
    assert any("give 'positive' or 'values', not both" in p for p in _problems(spec))
    spec = _spec(tmp_path, label='label = { column = "churned", values = { Yes = nan } }')
    assert any("must be finite numbers" in p for p in _problems(spec))
    spec = _spec(tmp_path)
    spec.write_text(
        spec.read_text().replace(
            'churned = { from = "left", dtype = "str" }',
            'churned = { from = "left", dtype = "bool" }',
        )
    )
    assert _problems(spec) == [
        "parties[1].sources[0].columns.churned.dtype: consortium.label.positive/values compare "
        'the raw text: map the label as dtype = "str", not bool'
    ]
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace('task = "binary"', 'task = "regression"'))
    assert "consortium.label.positive: applies to a binary task, not regression; use 'values'" in (
        _problems(spec)
    )


# -- preprocessing through the party's steps -------------------------------------------------


def _clean(spec_path: Path, party: str, source: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    from storage.store import fingerprint

    spec = load_spec(str(spec_path))
    ctx = PartyContext.from_spec(spec, party)
    src = spec.party(party).sources[source]
    out = run_preprocess(ctx, src, fingerprint(src.path), None)
    rejected = read_table(out.rejected) if out.rejected else pl.DataFrame()
    assert out.quality.rows_in == out.quality.rows_out + out.quality.rows_rejected
    return read_table(out.clean), rejected


def test_composite_key_and_positive_label_through_preprocess(tmp_path: Path, secret: str) -> None:
    clean, rejected = _clean(_spec(tmp_path), "a", 0)
    assert clean.columns == ["customer_id", "churned", "plan"]
    assert clean.rows() == [
        ("n1|001", 1.0, "basic"),
        ("n1|002", 0.0, "plus"),
        ("s;2|001", 1.0, "basic"),
        ("n1|003", 0.0, "plus"),  # "Maybe" is not "Yes": class 0
    ]
    reasons = dict(zip(rejected[ROW].to_list(), rejected[REASON].to_list(), strict=True))
    assert reasons == {
        4: "column 'Churn' (label): missing label",
        5: "column 'account_no' (part of customer_id): required value missing",
        6: "column 'branch' (part of customer_id): key part contains the separator '|'",
        8: "expected 4 fields, found 3",
    }
    assert rejected.filter(pl.col(ROW) == 6)["branch"].to_list() == ["S|3"]


def test_label_value_map_quarantines_a_value_outside_it(tmp_path: Path, secret: str) -> None:
    spec = _spec(tmp_path, label='label = { column = "churned", values = { Yes = 1, No = 0 } }')
    clean, rejected = _clean(spec, "a", 0)
    assert clean["churned"].to_list() == [1.0, 0.0, 1.0]
    reasons = dict(zip(rejected[ROW].to_list(), rejected[REASON].to_list(), strict=True))
    assert (
        reasons[7] == "column 'Churn' (label): not one of the 2 values of consortium.label.values"
    )
    assert "Maybe" not in reasons[7]


def test_row_number_key_and_composite_duplicates(tmp_path: Path, secret: str) -> None:
    spec = _spec(tmp_path)
    clean, rejected = _clean(spec, "b", 0)
    # the blank line is not a data row: the ids are the data row numbers 1..4
    assert clean.rows() == [
        ("1", 1.0, "plus"),
        ("2", 0.0, "basic"),
        ("3", 0.0, "plus"),
        ("4", 1.0, "basic"),
    ]
    assert rejected.height == 0
    (tmp_path / "raw" / "a" / "customers.csv").write_text(
        "x\nbranch;account_no;Churn;Plan\nN1;001;Yes;B\n n1 ;001;No;P\n"
    )
    _, rejected = _clean(spec, "a", 0)
    assert (
        rejected[REASON].to_list()
        == [
            "duplicate key in columns 'branch', 'account_no' (rows 1, 2): one row per entity required"
        ]
        * 2
    )


def test_a_missing_key_column_names_the_file_and_column(tmp_path: Path, secret: str) -> None:
    from tasks.prepare.preprocess import PreprocessError

    spec = _spec(tmp_path)
    (tmp_path / "raw" / "a" / "customers.csv").write_text("x\nbranch;Churn;Plan\nN1;Yes;B\n")
    with pytest.raises(PreprocessError) as info:
        _clean(spec, "a", 0)
    assert str(info.value) == (
        "raw/a/customers.csv: key column 'account_no' (part of 'customer_id') is missing; "
        "the file has 3 column(s), of which 1 of the key's: ['branch']"
    ).replace("raw/a/", str(tmp_path / "raw" / "a") + "/")


def test_raw_keys_show_the_part_columns_as_exported(tmp_path: Path, secret: str) -> None:
    from storage.store import fingerprint

    spec = load_spec(str(_spec(tmp_path)))
    tables = {}
    for party in ("a", "b"):
        ctx = PartyContext.from_spec(spec, party)
        src = spec.party(party).sources[0]
        tables[party] = read_table(run_raw_keys(ctx, src, fingerprint(src.path), None))
    keys = entity_keys([tables["a"]], entity="customer_id", secret=secret.encode())
    assert keys.columns == ["branch", "account_no", ENTITY_HASH]
    assert keys.select("branch", "account_no").rows() == [
        ("N1", "001"),
        ("N1", "002"),
        ("N1", "003"),
        ("S2", "001"),
        ("S;2", "001"),
    ]
    keys = entity_keys([tables["b"]], entity="customer_id", secret=secret.encode())
    assert keys.columns == ["customer_id", ENTITY_HASH]
    assert keys["customer_id"].to_list() == ["1", "2", "3", "4"]


def test_predict_label_values_with_positive_or_values() -> None:
    assert label_values(None, task="binary", classes=2, positive="Yes") == ["not Yes", "Yes"]
    values = {"Yes": 1.0, "No": 0.0, "Maybe": 0.0}
    assert label_values(None, task="binary", classes=2, values=values) == ["No|Maybe", "Yes"]
    three = {"low": 0.0, "mid": 1.0, "high": 2.0}
    assert label_values(None, task="multiclass", classes=3, values=three) == ["low", "mid", "high"]


# -- the flows -------------------------------------------------------------------------------


@pytest.mark.prefect
def test_composite_and_row_number_keys_through_the_party_pipeline(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.prepare import prepare

    outputs = prepare(str(_spec(tmp_path)))
    fused_a = pl.read_parquet(outputs["a"].table.uri)
    assert fused_a.height == 4 and sorted(fused_a[LABEL].to_list()) == [0.0, 0.0, 1.0, 1.0]
    # the transactions join the customers on the composite key
    spend = [c for c in fused_a.columns if c.startswith("txn__") and "monetary" in c]
    assert spend and fused_a[spend[0]].null_count() == 0
    fused_b = pl.read_parquet(outputs["b"].table.uri)
    assert fused_b.height == 4 and sorted(fused_b[LABEL].to_list()) == [0.0, 0.0, 1.0, 1.0]
    for party in ("a", "b"):  # no raw key, composite or row number, in the fused table
        text = pl.read_parquet(outputs[party].table.uri)[ENTITY_HASH].to_list()
        assert not any("|" in k or k.isdigit() for k in text)


@pytest.mark.prefect
def test_predict_shows_the_composite_key_parts_as_exported(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if "LEVEL" in name else "false"))
    spec = write_synthetic(tmp_path, customers=500)
    # party p0 exports CSV keyed by branch and account number, its label as Yes/No
    raw = tmp_path / "raw" / "p0"
    parts = pl.col("id").str.split("-")
    customers = pl.read_parquet(raw / "customers.parquet")
    customers.select(
        parts.list.get(0).str.to_uppercase().alias("Branch"),
        parts.list.get(1).str.zfill(5).alias("Account"),
        pl.when(pl.col("churn")).then(pl.lit("Yes")).otherwise(pl.lit("No")).alias("Churn"),
        "plan",
        "age",
    ).write_csv(raw / "customers.csv", separator=";")
    orders = pl.read_parquet(raw / "orders.parquet")
    orders.select(
        parts.list.get(0).str.to_uppercase().alias("Branch"),
        parts.list.get(1).str.zfill(5).alias("Account"),
        "ts",
        "value",
    ).write_csv(raw / "orders.csv")
    text = spec.read_text()
    text = text.replace(
        'label = { column = "churned" }', 'label = { column = "churned", positive = "Yes" }'
    )
    p0, p1 = text.split('id = "p1"')
    p0 = p0.replace(
        'path = "raw/p0/customers.parquet"',
        (
            'path = "raw/p0/customers.csv"\n'
            'key = { columns = ["Branch", "Account"] }\n'
            'csv = { delimiter = ";" }'
        ),
    ).replace(
        'path = "raw/p0/orders.parquet"',
        ('path = "raw/p0/orders.csv"\nkey = { columns = ["Branch", "Account"] }'),
    )
    p0 = p0.replace('customer_id = { from = "id", dtype = "str" }\n', "")
    p0 = p0.replace('customer_id = { from = "id", dtype = "str", required = true }\n', "")
    p0 = p0.replace(
        'churned = { from = "churn", dtype = "bool" }',
        'churned = { from = "Churn", dtype = "str" }',
    )
    # party p1 keeps its Parquet exports; its bool label reads "true" / "false"
    p1 = p1.replace(
        'churned = { from = "churn", dtype = "bool" }',
        'churned = { from = "churn", dtype = "str" }',
    )
    pl.read_parquet(tmp_path / "raw" / "p1" / "customers.parquet").with_columns(
        pl.when(pl.col("churn")).then(pl.lit("Yes")).otherwise(pl.lit("No")).alias("churn")
    ).write_parquet(tmp_path / "raw" / "p1" / "customers.parquet")
    text = re.sub(r"^rounds = .*$", "rounds = 2", p0 + 'id = "p1"' + p1, flags=re.M)
    spec.write_text(text)
    load_spec(str(spec))

    result = runner.invoke(app, ["train", str(spec), "--no-baselines"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(spec), "--party", "p0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pl.read_csv(out, schema_overrides={"Account": pl.String})
    assert frame.columns[:2] == ["Branch", "Account"]
    assert "customer_id" not in frame.columns
    exported = pl.read_csv(
        raw / "customers.csv", separator=";", schema_overrides={"Account": pl.String}
    )
    assert sorted(frame.select("Branch", "Account").rows()) == sorted(
        exported.select("Branch", "Account").rows()
    )
    assert set(frame["Account"].to_list()) <= set(exported["Account"].to_list())
    assert frame["Account"].str.len_chars().min() == 5  # leading zeros as exported
    assert set(frame["prediction"]) <= {"Yes", "not Yes"}


def test_a_key_on_a_source_not_keyed_by_the_entity_is_refused(tmp_path: Path) -> None:
    from tests.factories import write_tiny

    spec = write_tiny(tmp_path)
    text = spec.read_text()
    spec.write_text(
        text.replace(
            'path = "raw/a/events.parquet"',
            'path = "raw/a/events.parquet"\nkey = { row_number = true }',
        )
    )
    assert _problems(spec) == [
        "parties[0].sources[3].key: a source of kind 'events' is not keyed by the entity "
        "(it reaches it otherwise); leave 'key' out"
    ]


def test_key_parts_named_like_prediction_columns_are_kept_apart() -> None:
    from tasks.scoring import with_raw_keys

    composite = pl.DataFrame(
        {"customer_id": ["n1|7"], "__raw_key:prediction": ["N1"], "__raw_key:customer_id": ["7"]}
    )
    plain = pl.DataFrame({"customer_id": ["c9"], "__raw_key": ["C9"]})
    keys = entity_keys([composite, plain], entity="customer_id", secret=b"k" * 32)
    assert keys.columns == ["customer_id", "prediction", "customer_id (key)", ENTITY_HASH]
    out = keys.select(ENTITY_HASH).with_columns(pl.lit("yes").alias("prediction"))
    shown = with_raw_keys(out, keys, entity="customer_id")
    assert shown.columns[:3] == ["customer_id", "prediction (key)", "customer_id (key)"]
    assert shown["prediction"].to_list() == ["yes", "yes"]  # the score, not the key part
    assert sorted(shown["prediction (key)"].drop_nulls().to_list()) == ["N1"]
