"""What leaves a party (error texts, logs, Prefect states, persisted results) holds no raw
or hashed entity id and no raw cell: bad input run through the real ``prepare`` flow on a
real Prefect server, then the server's database, the result folders and every log searched
byte for byte. Also: deterministic failures are not retried, and user text never breaks the
CLI's rich output."""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl
import pytest
from typer.testing import CliRunner

from tasks.types import ENTITY_HASH
from tests.factories import TEXT_A, write_tiny
from tests.prefect_api import task_name

pytestmark = pytest.mark.prefect

# Ids with letters outside hex: they cannot turn up by chance in a UUID, a hash or a file
# name, so any hit is a leak. Keys are normalised by strip_lower (searched case-blind).
CUSTOMERS = {f"C{i}": f"ZqCust-K000{i}" for i in range(1, 5)}
ACCOUNTS = {f"b{i}": f"ZqAcct-V000{i}" for i in range(1, 4)}
DEVICES = {f"d{i}": f"ZqDev-W000{i}" for i in range(1, 4)}
UNKNOWN_DEVICE = "ZqDev-W0009"
BAD_AMOUNT = "12ZQ34"  # an unparsable cell: a raw value, not an id
# the first lines of files that are not what the spec says (as /etc/passwd would be)
NOT_CSV = (
    "ZqCust-K0050:x:1000:1000:ZqCust-K0050:/home/zq:/bin/sh\nZqCust-K0051:x:1001:1001::/h:/bin/sh\n"
)
DUPLICATE_HEADER = "ZqCust-K0060,ZqCust-K0060,Plan,Joined\nZqCust-K0061,yes,B,2025-01-10\n"
NOT_PARQUET = "ZqAcct-V0070,ZqAcct-V0071\nZqAcct-V0072,1\n"
EXTRA_IDS = [
    "ZqCust-K0050",
    "ZqCust-K0051",
    "ZqCust-K0060",
    "ZqCust-K0061",
    "ZqAcct-V0070",
    "ZqAcct-V0071",
    "ZqAcct-V0072",
]
RAW_VALUES = [
    *CUSTOMERS.values(),
    *ACCOUNTS.values(),
    *DEVICES.values(),
    UNKNOWN_DEVICE,
    BAD_AMOUNT,
    *EXTRA_IDS,
]


def _sub(text: str, mapping: dict[str, str]) -> str:
    return re.sub(r"\b(" + "|".join(mapping) + r")\b", lambda m: mapping[m.group(1)], text)


def write_consortium(root: Path) -> Path:
    """The tiny consortium (tables and an IoT source with its device map, no text) with
    distinctive ids."""
    spec = write_tiny(root)
    feedback = TEXT_A.split('\n[[parties.sources]]\nid = "iot"')[0]
    spec.write_text(spec.read_text().replace(feedback, ""))
    raw = root / "raw"
    (raw / "a" / "feedback.jsonl").unlink()
    for name in ("customers.csv", "transactions.csv", "devices.csv"):
        path = raw / "a" / name
        path.write_text(_sub(_sub(path.read_text(), CUSTOMERS), DEVICES))
    events = raw / "a" / "events.parquet"
    pl.read_parquet(events).with_columns(pl.col("dev").replace(DEVICES)).write_parquet(events)
    for name in ("accounts.parquet", "orders.parquet"):
        path = raw / "b" / name
        pl.read_parquet(path).with_columns(pl.col("id").replace(ACCOUNTS)).write_parquet(path)
    return spec


def quarantining(root: Path) -> Path:
    """Bad rows that are quarantined: a duplicate key, an unparsable amount, an event of a
    device missing from the map. The run succeeds."""
    spec = write_consortium(root)
    a = root / "raw" / "a"
    customers = a / "customers.csv"
    customers.write_text(customers.read_text() + f"{CUSTOMERS['C2']},yes,B,2025-02-11\n")
    transactions = a / "transactions.csv"
    text = transactions.read_text()
    assert ",02/14/2026 12:00,300," in text
    transactions.write_text(
        text.replace(",02/14/2026 12:00,300,", f",02/14/2026 12:00,{BAD_AMOUNT},")
    )
    events = pl.read_parquet(a / "events.parquet")
    extra = events.head(1).with_columns(pl.lit(UNKNOWN_DEVICE).alias("dev"))
    pl.concat([events, extra]).write_parquet(a / "events.parquet")
    return spec


def failing(root: Path) -> Path:
    """Bad files that fail their source: a device mapped to two entities, a "CSV" that is
    not one, a header with repeated names, a "Parquet" file that is text, a missing file."""
    spec = write_consortium(root)
    a, b = root / "raw" / "a", root / "raw" / "b"
    devices = a / "devices.csv"
    devices.write_text(devices.read_text() + f"{DEVICES['d1']},{CUSTOMERS['C3']}\n")
    (a / "transactions.csv").write_text(NOT_CSV)
    (a / "customers.csv").write_text(DUPLICATE_HEADER)
    (b / "orders.parquet").write_text(NOT_PARQUET)
    (b / "accounts.parquet").unlink()
    return spec


def hashed_ids(secret: str, roots: list[Path]) -> set[str]:
    """Every hashed id of the run: the party stores' aligned/fused keys, and the hash of
    every raw id (also those whose rows never got that far)."""
    from tasks.prepare.align import hash_keys

    out = set(hash_keys(pl.Series([v.lower() for v in RAW_VALUES]), secret.encode()).to_list())
    for root in roots:
        for layer in ("aligned", "fused"):
            for path in (root / "stores").glob(f"*/{layer}/*.parquet"):
                frame = pl.read_parquet(path)
                if ENTITY_HASH in frame.columns:
                    out |= set(frame[ENTITY_HASH].drop_nulls().to_list())
    return out


class Records(logging.Handler):
    """Every log record of the test, formatted as the API log handler ships it (tracebacks
    included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(), logging.getLogger("prefect")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def flush_logs() -> None:
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


def wait_for_db(home: Path, marker: bytes, timeout: float = 30.0) -> None:
    """Until the server has written ``marker`` (a text of the run) to its database."""
    deadline = time.monotonic() + timeout
    while True:
        if marker in _db_bytes(home):
            time.sleep(1.0)  # the rest of the batch
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{marker!r} never reached the Prefect database in {home}")
        time.sleep(0.5)


def _db_bytes(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(home.glob("prefect.db*")) if p.is_file())


def leaks(blob: bytes, needles: list[bytes]) -> list[bytes]:
    low = blob.lower()
    return [n for n in needles if n in low]


def search(roots: list[Path], needles: list[bytes]) -> dict[str, list[bytes]]:
    hits: dict[str, list[bytes]] = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file():
                found = leaks(path.read_bytes(), needles)
                if found:
                    hits[str(path)] = found
    return hits


def run_tree(flow_run_id: UUID | None) -> tuple[list[Any], list[Any]]:
    """A flow run, its nested subflow runs and all their task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs = list(
            client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        )
        frontier = [flow_run_id]
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
                )
            )
            runs += children
            frontier = [c.id for c in children]
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
        )
    return runs, list(tasks)


def final_task_runs(flow_run_id: UUID | None, timeout: float = 20.0) -> list[Any]:
    """The run's task runs once the server has recorded at least one and each has ended (the
    server records task runs from their events, after the flow has returned)."""
    deadline = time.monotonic() + timeout
    while True:
        _, tasks = run_tree(flow_run_id)
        pending = [t for t in tasks if t.state is None or t.state.name in ("Pending", "Running")]
        if (tasks and not pending) or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def api_logs(flow_run_ids: list[UUID]) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)), limit=200
        )
    return [log.message for log in logs]


# -- the flow: nothing of a party's data in what leaves it -------------------------------------
def test_bad_input_through_prepare_leaves_no_id_or_value_outside_the_party(
    prefect_api: str,
    tmp_path: Path,
    secret: str,
    records: Records,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from prefect.settings import PREFECT_HOME

    from flows.prepare import PrepareError, prepare
    from tasks.types import REASON

    home = Path(PREFECT_HOME.value())
    good_spec = quarantining(tmp_path / "quarantine")
    bad_spec = failing(tmp_path / "failing")

    good = prepare(str(good_spec), return_state=True)
    assert good.is_completed(), good.message
    bad = prepare(str(bad_spec), return_state=True)
    assert bad.is_failed()
    with pytest.raises(PrepareError) as info:
        bad.result()
    message = str(info.value)

    # the quarantined rows keep their values in the party's own rejected/ table
    rejected = {
        p.name.split("-")[0]: pl.read_parquet(p)
        for p in (good_spec.parent / "stores" / "a" / "rejected").glob("*.parquet")
    }
    assert set(rejected["customers"][REASON]) == {
        "duplicate key in column 'CustID' (rows 2, 5): one row per entity required"
    }
    assert CUSTOMERS["C2"] in rejected["customers"]["CustID"].to_list()
    bad_amount = rejected["transactions"].filter(pl.col("amt_cents") == BAD_AMOUNT)
    assert bad_amount[REASON].to_list() == ["column 'amt_cents' (amount): cannot parse as float"]
    assert rejected["iot"][REASON].to_list() == ["device not in entity map (column 'dev')"]
    assert rejected["iot"]["dev"].to_list() == [UNKNOWN_DEVICE]

    # the failures name files, columns, rows and counts only
    bad_tasks = final_task_runs(bad.state_details.flow_run_id)
    bad_runs, _ = run_tree(bad.state_details.flow_run_id)
    failed = {
        (t.name, t.state.message) for t in bad_tasks if t.state is not None and t.state.is_failed()
    }
    texts = " | ".join(m for _, m in failed) + " | " + message
    expected = [
        "devices.csv: 1 device(s) mapped to several entities (2 rows: 1, 4); "
        "one entity per device is required",
        "transactions.csv: column 'cust' (mapped to 'customer_id') is missing; the file has "
        "1 column(s), of which 0 in the mapping: []",
        "customers.csv: duplicate column names in the header (1 of 4 repeat an earlier one, "
        "at column(s) [2])",
        "orders.parquet: not a readable Parquet file (ComputeError)",
        "accounts.parquet: no such file",
    ]
    for text in expected:
        assert text in texts, (text, texts)

    # deterministic failures fail once: no retry of a missing or broken local file
    for task in bad_tasks:
        if task.state is not None and task.state.is_failed():
            assert task.run_count == 1, (task.name, task.run_count, task.state.message)
    assert any(
        task_name(t) == "fingerprint-source" and t.state is not None and t.state.is_failed()
        for t in bad_tasks
    )

    # everything that leaves a party, searched for every raw id, raw value and hashed id
    flush_logs()
    wait_for_db(home, b"device(s) mapped to several entities")
    hashes = hashed_ids(secret, [good_spec.parent, bad_spec.parent])
    fused = pl.read_parquet(next((good_spec.parent / "stores" / "a" / "fused").glob("fused-*")))
    assert set(fused[ENTITY_HASH]) <= hashes  # the needles hold the run's hashed ids
    needles = sorted(
        {v.lower().encode() for v in RAW_VALUES}
        | {h.encode() for h in hashes}
        | {h[:12].encode() for h in hashes}  # a shortened hash is still the entity's
    )
    roots = [home]
    for spec in (good_spec, bad_spec):
        roots += [spec.parent / ".fedfuse", spec.parent / "stores" / "coordinator"]
    assert (good_spec.parent / ".fedfuse" / "results").is_dir()
    assert search(roots, needles) == {}
    runs = [r.id for r in bad_runs] + [r.id for r in run_tree(good.state_details.flow_run_id)[0]]
    shipped = api_logs(runs)
    assert any("quarantined" in line for line in shipped), shipped
    captured = capfd.readouterr()
    logs = "\n".join([*records.lines, *shipped, captured.out, captured.err, message, texts])
    assert any("mapped to several entities" in line for line in records.lines)
    assert leaks(logs.encode(), needles) == []


# -- retries: only for what a second try can fix ------------------------------------------------
def test_retry_condition_retries_only_transient_io() -> None:
    from prefect.states import Failed

    from storage.sources import SourceError
    from tasks.prepare.preprocess import PreprocessError
    from tasks.prepare.steps import (
        IO_RETRIES,
        fingerprint_source,
        is_transient,
        preprocess_source,
        retry_transient,
    )

    for exc in (
        FileNotFoundError("x.csv: no such file"),
        IsADirectoryError("x: is a folder"),
        PermissionError("x.csv"),
        SourceError("x.csv: file is empty"),
        PreprocessError("x.csv: column 'a' is missing"),
        ValueError("bad"),
        KeyError("k"),
    ):
        assert not is_transient(exc), exc
        assert retry_transient(None, None, Failed(data=exc)) is False, exc
    transient: tuple[BaseException, ...] = (
        TimeoutError("read timed out"),
        ConnectionResetError("reset by peer"),
        OSError(errno.EIO, "input/output error"),
    )
    for error in transient:
        assert is_transient(error), error
        assert retry_transient(None, None, Failed(data=error)) is True, error
    assert retry_transient(None, None, Failed(message="no exception")) is False
    for step in (fingerprint_source, preprocess_source):
        assert step.retries == IO_RETRIES and step.retry_condition_fn is retry_transient


def test_missing_local_file_fails_once_and_fast(prefect_api: str, tmp_path: Path) -> None:
    from prefect import flow

    from tasks.prepare.steps import fingerprint_source

    @flow
    def fingerprint_missing(path: str) -> None:
        fingerprint_source(path)

    started = time.monotonic()
    state = fingerprint_missing(str(tmp_path / "gone.csv"), return_state=True)
    assert state.is_failed()
    assert time.monotonic() - started < 6  # retries would wait 1 s, then 5 s
    tasks = final_task_runs(state.state_details.flow_run_id)
    assert [(t.state.name, t.run_count) for t in tasks] == [("Failed", 1)]


# -- the CLI: user text is printed as text, never as rich markup --------------------------------
def _clean_exit(result: Any, code: int) -> str:
    from rich.errors import MarkupError

    output = str(result.output)
    assert not isinstance(result.exception, MarkupError), output
    assert result.exit_code == code, (output, result.exception)
    assert "Traceback" not in output and "MarkupError" not in output, output
    return output


def test_prepare_prints_a_markup_like_column_name_as_text(
    cli: CliRunner, prefect_api: str, tiny_table_spec: Path, secret: str
) -> None:
    from flows.cli.app import app

    text = tiny_table_spec.read_text()
    assert 'from = "amt_cents"' in text
    tiny_table_spec.write_text(text.replace('from = "amt_cents"', 'from = "[/]"'))
    result = cli.invoke(app, ["prepare", str(tiny_table_spec)])
    output = " ".join(_clean_exit(result, 1).split())  # rich wraps long lines
    assert "error:" in output
    assert "column '[/]' (mapped to 'amount') is missing" in output, output


def test_prepare_quality_table_prints_a_markup_like_header_as_text(
    cli: CliRunner, prefect_api: str, tiny_table_spec: Path, secret: str
) -> None:
    from flows.cli.app import app

    path = tiny_table_spec.parent / "raw" / "a" / "transactions.csv"
    path.write_text(path.read_text().replace("amt_cents", "[/]").replace(",300,", ",3OO,"))
    text = tiny_table_spec.read_text()
    tiny_table_spec.write_text(text.replace('from = "amt_cents"', 'from = "[/]"'))
    result = cli.invoke(app, ["prepare", str(tiny_table_spec)], env={"COLUMNS": "400"})
    output = _clean_exit(result, 0)
    # the quarantine reason in the quality table (its cells may be folded over lines)
    assert "'[/]'" in output and "cannot" in output and "1 row:" in output, output


def test_validate_prints_markup_like_names_as_text(
    cli: CliRunner, tmp_path: Path, secret: str
) -> None:
    from flows.cli.app import app

    spec = write_tiny(tmp_path / "in[b]x", with_text_events=False)
    ok = cli.invoke(app, ["validate", str(spec)])
    assert "in[b]x" in _clean_exit(ok, 0)
    text = spec.read_text()
    spec.write_text(
        text.replace(
            'amount = { from = "amt_cents", dtype = "float"',
            '"[/]" = { from = "amt_cents", dtype = "blob"',
        )
    )
    bad = cli.invoke(app, ["validate", str(spec)])
    output = _clean_exit(bad, 1)
    assert "in[b]x" in output and "[/]" in output, output
