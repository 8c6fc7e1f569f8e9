"""Parties prepared side by side (``[run] max_parallel_parties``, ``max_parallel_sources``)
through the real prepare flow on a demo consortium: the same fused tables as one party at a
time, pipelines that really overlap, one failing party named while the others finish, and a
retry of the same flow run that takes the finished parties back whatever order they ran in."""

from __future__ import annotations

import hashlib
import itertools
import math
import time
import tomllib
from pathlib import Path
from typing import Any
from uuid import UUID

import polars as pl
import pytest

from tasks.demo_data import write_demo_consortium
from tasks.spec.load import load_spec, parse_spec
from tasks.spec.models import SpecError, default_parallelism
from tests.prefect_api import task_name, task_states

PARTIES = ("site-a", "site-b", "site-c")


@pytest.fixture
def demo_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFUSE_SECRET", "0123456789abcdef0123456789abcdef")


def write_demo(root: Path, run: str) -> Path:
    """The 3-party demo consortium (tables, texts, events) with a ``[run]`` section."""
    spec = Path(write_demo_consortium(str(root), parties=3, customers=900, seed=5))
    with spec.open("a", encoding="utf-8") as handle:
        handle.write(f"\n[run]\n{run}\n")
    return spec


def pipeline_runs(prepare_run: UUID) -> list[Any]:
    """The party-pipeline flow runs under a prepare flow run (every attempt)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[prepare_run])
            )
        )
    return [r for r in runs if r.name.startswith("party-pipeline ")]


def dispatch_spans(prepare_run: UUID, *, timeout: float = 30) -> list[tuple[Any, Any]]:
    """(start, end) of the prepare run's dispatch-party-pipeline task runs, once the server
    has recorded them (task run states reach it as events, a moment after the flow ends)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[prepare_run]))
            )
        spans = sorted(
            (r.start_time, r.end_time) for r in runs if task_name(r) == "dispatch-party-pipeline"
        )
        recorded = all(s is not None and e is not None for s, e in spans)
        if recorded or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def file_hash(uri: str) -> str:
    return hashlib.sha256(Path(uri).read_bytes()).hexdigest()


@pytest.mark.prefect
def test_parallel_and_one_at_a_time_give_identical_fused_tables(
    prefect_api: str, tmp_path: Path, demo_secret: None
) -> None:
    from flows.prepare import prepare

    one = write_demo(tmp_path / "one", "max_parallel_parties = 1\nmax_parallel_sources = 1")
    many = write_demo(tmp_path / "many", "max_parallel_parties = 3\nmax_parallel_sources = 8")
    assert load_spec(str(many)).run.parallel_parties() == 3
    seq_state = prepare(str(one), return_state=True)
    par_state = prepare(str(many), return_state=True)
    seq, par = seq_state.result(), par_state.result()

    assert list(par) == list(seq) == list(PARTIES)
    for party in PARTIES:
        assert par[party].party == party
        assert par[party].table.sha256 == seq[party].table.sha256, party
        assert file_hash(par[party].table.uri) == file_hash(seq[party].table.uri), party
        assert par[party].features == seq[party].features
        # the quality reports too, but for the file's location
        assert [q.model_dump(exclude={"file"}) for q in par[party].quality] == [
            q.model_dump(exclude={"file"}) for q in seq[party].quality
        ]

    # one at a time: each party's pipeline ends before the next starts; side by side: one
    # dispatch task per party (whether they overlap is measured by benchmarks/bench_parallel)
    seq_runs = pipeline_runs(seq_state.state_details.flow_run_id)
    assert sorted(r.name for r in seq_runs) == [f"party-pipeline {p}" for p in PARTIES]
    seq_spans = sorted((r.start_time, r.end_time) for r in seq_runs)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(seq_spans))
    par_spans = dispatch_spans(par_state.state_details.flow_run_id)
    assert len(par_spans) == 3


@pytest.mark.prefect
def test_a_failing_party_is_named_the_others_finish_and_a_retry_reuses_them(
    prefect_api: str, tmp_path: Path, demo_secret: None
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import AwaitingRetry

    from flows.prepare import PrepareError, prepare

    root = tmp_path / "run"
    spec = write_demo(root, "max_parallel_parties = 3")
    export = root / "stores" / "site-a" / "raw" / "transactions.csv"
    aside = root / "transactions.csv.aside"
    export.rename(aside)  # the first party in the spec fails; the others run beside it

    state = prepare(str(spec), return_state=True)
    assert state.is_failed()
    with pytest.raises(PrepareError) as failed:
        state.result()
    message = str(failed.value)
    assert message.startswith("1 of 3 parties failed: site-a: ")
    assert "transactions.csv" in message and "\n" not in message
    assert "site-b" not in message and "site-c" not in message
    # the others finished whole: one fused table each, readable; nothing half-written
    for party in ("site-b", "site-c"):
        fused = list((root / "stores" / party / "fused").glob("*.parquet"))
        assert len(fused) == 1 and pl.read_parquet(fused[0]).height > 0
    assert not (root / "stores" / "site-a" / "fused").exists()
    assert not [p for p in (root / "stores").rglob("*") if p.name.endswith(".tmp")]

    # retry the same flow run (what the UI's Retry does), with the export back in place
    aside.rename(export)
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, AwaitingRetry(message="retry"), force=True)
        flow_run = client.read_flow_run(run_id)
    retried = run_flow(prepare, flow_run=flow_run, return_type="state")
    assert retried.is_completed(), retried.message  # type: ignore[union-attr]
    outputs = retried.result()  # type: ignore[union-attr]
    assert list(outputs) == list(PARTIES)
    assert all(outputs[p].party == p for p in PARTIES)

    # site-b and site-c came back from the first attempt; only site-a ran again, as itself
    runs = pipeline_runs(run_id)
    assert sorted(r.name for r in runs) == sorted(
        [f"party-pipeline {p}" for p in PARTIES] + ["party-pipeline site-a"]
    )
    states = task_states(run_id)["dispatch-party-pipeline"]
    assert sorted(states) == sorted(["Completed"] * 3 + ["Failed"] + ["Cached"] * 2)

    fresh = write_demo(tmp_path / "fresh", "max_parallel_parties = 1")
    expected = prepare(str(fresh))
    for party in PARTIES:
        assert outputs[party].table.sha256 == expected[party].table.sha256, party


@pytest.mark.parametrize("key", ["max_parallel_parties", "max_parallel_sources"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "Input should be greater than or equal to 1"),
        (-3, "Input should be greater than or equal to 1"),
        (65, "Input should be less than or equal to 64"),
        (10**30, "Input should be less than or equal to 64"),
        (2.5, "Input should be a valid integer"),
        (math.nan, "Input should be a valid integer"),
        ("", "Input should be a valid integer"),
        ("3", "Input should be a valid integer"),
        (True, "Input should be a valid integer"),
    ],
)
def test_parallel_limits_are_bounded_and_named(
    tiny_table_spec: Path, key: str, value: object, message: str
) -> None:
    data = tomllib.loads(tiny_table_spec.read_text())
    data["run"] = {key: value}
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="spec.toml", base="/base")
    assert [str(p) for p in info.value.problems] == [f"run.{key}: {message}"]


def test_parallel_limits_default_to_the_cpu_count(tiny_table_spec: Path) -> None:
    data = tomllib.loads(tiny_table_spec.read_text())
    run = parse_spec(data, source="spec.toml", base="/base").run
    assert run.parallel_parties() == run.parallel_sources() == default_parallelism()
    assert 1 <= default_parallelism() <= 64
    data["run"] = {"max_parallel_parties": 64, "max_parallel_sources": 1}
    run = parse_spec(data, source="spec.toml", base="/base").run
    assert (run.parallel_parties(), run.parallel_sources()) == (64, 1)
