"""Readable run names and tags, the model card and the ``--watch`` summary: the pure
functions, then one small training read back from a real Prefect server."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from flows.names import consortium_of, party_and_round, spec_run_name
from flows.ops import summary_lines
from flows.publish import TrainingResult
from flows.transport import PartyJob, StepCall
from storage.code_version import git_commit, package_version
from storage.store import FileRef, TableRef
from tasks.horizontal.steps import Member, RoundAggregate, TrainSetup
from tasks.model_card import CodeVersion, card_markdown, horizontal_card, vertical_card
from tasks.report import Comparison
from tasks.spec.load import load_spec
from tests.factories import write_synthetic
from tests.prefect_api import task_name


def _table(party: str, rows: int) -> TableRef:
    return TableRef(uri=f"/s/{party}/fused.parquet", sha256=party * 8, rows=rows, columns={})


def _member(party: str, weight: float) -> Member:
    return Member(party=party, weight=weight, model=FileRef(uri="m", sha256="0", size=1), trees=3)


# -- names and tags ----------------------------------------------------------------------------


def test_party_and_round_come_from_tags_then_parameters() -> None:
    assert party_and_round(["fedfuse", "party:site-b", "round:3"], {}) == ("site-b", 3)
    assert party_and_round([], {"party": "a", "spec_path": "x"}) == ("a", None)
    job = {"op": "train", "round": 2, "setup": {"party": "p1"}}
    assert party_and_round([], {"job": job}) == ("p1", 2)
    assert party_and_round([], {"state": {"round": 4}}) == (None, 4)
    assert party_and_round(["round:x", "party:"], None) == ("", None)
    assert party_and_round([], {"job": {"op": "stats", "round": 0}}) == (None, None)


def test_step_titles_name_party_step_and_round(tmp_path: Path) -> None:
    spec = load_spec(str(write_synthetic(tmp_path, customers=40)))
    setup = TrainSetup.model_construct(party="site-b")
    agg = RoundAggregate(round=3, members=[])
    assert PartyJob.model_construct(op="train", setup=setup, round=3).title() == (
        "site-b: train round 3"
    )
    evaluate = PartyJob.model_construct(op="evaluate", setup=setup, round=3, aggregates=[agg])
    assert evaluate.title() == "site-b: evaluate round 3"
    assert PartyJob.model_construct(op="stats", setup=setup).title() == "site-b: label statistics"
    call = StepCall(
        op="vertical-party-round", args=[{"party": "B"}, {}, None, {}, 3], coordinator="c"
    )
    assert (call.party(), call.round(), call.title()) == ("B", 3, "B: vertical-party-round 3")
    blind = StepCall(op="psi-label-blind", args=[{"party": "A"}, ["B"]], coordinator="c")
    assert (blind.round(), blind.title()) == (None, "A: psi-label-blind")
    assert consortium_of(tmp_path / "spec.toml") == spec.consortium.name == "synthetic"
    assert consortium_of(tmp_path / "gone" / "retail.toml") == "retail"  # the flow fails itself
    assert spec_run_name("train").__name__ == "train_run_name"


# -- the model card ----------------------------------------------------------------------------


def test_horizontal_card_lists_hashes_rounds_and_reasons(tmp_path: Path) -> None:
    spec = load_spec(str(write_synthetic(tmp_path, customers=40)))
    rounds = [
        RoundAggregate(round=1, members=[_member("p0", 0.4), _member("p1", 0.6)]),
        RoundAggregate(
            round=2, members=[_member("p1", 1.0)], dropped={"p0": "tree_sizes | broken\nx"}
        ),
    ]
    valid = [{"auc": 0.7, "logloss": 0.6}, {"auc": 0.75, "logloss": 0.55}]
    card = horizontal_card(
        spec=spec,
        identity="synthetic-abc",
        code=CodeVersion(version="0.1.0", commit=None),
        run_key="k1",
        lossless=False,
        fused={"p0": _table("p0", 20), "p1": _table("p1", 57)},
        split_rows={"p0": {"train": 14, "valid": 3, "test": 3}},
        left_out={},
        rounds=rounds,
        valid=valid,
        best_round=2,
        rounds_run=2,
        stop_reason="rounds",
        test={"auc": 0.74},
    )
    assert [(p.party, p.fused_sha256, p.fused_rows) for p in card.parties] == [
        ("p0", "p0" * 8, 20),
        ("p1", "p1" * 8, 57),
    ]
    assert [(r.round, r.accepted, r.rejected) for r in card.rounds] == [
        (1, ["p0", "p1"], {}),
        (2, ["p1"], {"p0": "tree_sizes | broken\nx"}),
    ]
    assert card.final_metrics == {"valid": valid[1], "test": {"auc": 0.74}}
    assert card.stop_text == "round limit reached" and len(card.spec_hash) == 64
    text = card_markdown(card, files={"model": "models/k1-model.txt"})
    assert "| 2 (best) | p1 (1.000) | p0: tree_sizes \\| broken x |" in text
    assert f"`{'p0' * 8}` | 20 | 14 / 3 / 3" in text
    assert "fedfuse 0.1.0" in text and "`models/k1-model.txt`" in text
    assert "0.7400" in text  # the final test metrics, four decimals


def test_vertical_card_marks_rounds_of_an_earlier_call(tmp_path: Path) -> None:
    spec = load_spec(str(write_synthetic(tmp_path, customers=40)))
    card = vertical_card(
        spec=spec,
        identity="synthetic-abc",
        code=CodeVersion(),
        run_key="v1",
        label_party="p0",
        mode="rounds",
        fused={"p0": _table("p0", 20)},
        overlap=18,
        accepted={2: ["p0", "p1"], 3: ["p0"]},
        rejected={3: {"p1": "training task failed"}},
        valid=[{"auc": 0.6}, {"auc": 0.65}, {"auc": 0.64}],
        best_round=2,
        rounds_run=3,
        stop_reason="early_stopping",
        test={"auc": 0.66},
    )
    assert [(r.round, r.accepted) for r in card.rounds] == [
        (1, []),
        (2, ["p0", "p1"]),
        (3, ["p0"]),
    ]
    assert card.rounds[2].rejected == {"p1": "training task failed"}
    assert any("rounds 1-1 ran in an earlier call" in n for n in card.notes)
    assert card.parties[1].fused_sha256 is None  # p1 gave no table here: shown as "-"
    assert "fedfuse unknown version" in card_markdown(card)


def test_code_version_never_fails(tmp_path: Path) -> None:
    assert package_version() is not None and package_version("no-such-package-xyz") is None
    assert git_commit(tmp_path) is None  # not a checkout
    (tmp_path / ".git").mkdir()
    assert git_commit(tmp_path) is None  # a broken one


# -- the --watch summary -----------------------------------------------------------------------


def _result(**fields: Any) -> TrainingResult:
    base: dict[str, Any] = {
        "run_key": "k1",
        "rounds_run": 3,
        "best_round": 2,
        "valid": [{"auc": 0.7}, {"auc": 0.8}, {"auc": 0.79}],
        "test": [{"auc": 0.71}, {"auc": 0.81234}, {"auc": 0.8}],
        "manifest": "/c/models/k1-manifest.json",
        "model": "/c/models/k1-model.txt",
        "trees": 6,
        "model_bytes": 100,
        "parties": ["p0"],
        "dropped": {},
        "comparison": Comparison(federated={}),
        "report": "/c/reports/k1-report.md",
        "stop_reason": "early_stopping",
        "model_card": "/c/models/k1-model-card.json",
    }
    return TrainingResult(**(base | fields))


def test_summary_names_metrics_best_round_stop_and_files() -> None:
    lines = summary_lines("Completed", None, _result())
    assert lines[0] == "final state: Completed"
    assert "best round: 2 of 3; stopped: early stopping" in lines[2]
    assert lines[3] == "final metrics (test, best round): auc 0.8123"
    assert "model: /c/models/k1-model.txt" in lines and "report: /c/reports/k1-report.md" in lines
    assert "model card: /c/models/k1-model-card.json" in lines
    no_rounds = summary_lines("Completed", None, _result(best_round=0, valid=[], test=[]))
    assert "final metrics (test, best round): -" in no_rounds
    assert summary_lines("Failed", "boom", None) == ["final state: Failed (boom)"]


# -- through the flow --------------------------------------------------------------------------


def _runs(root: UUID) -> tuple[list[Any], list[Any]]:
    """Every flow run under ``root`` (itself included) and their task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs, frontier = [client.read_flow_run(root)], [root]
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
    return runs, tasks


@pytest.mark.prefect
def test_training_runs_read_by_party_and_round_with_a_model_card(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.horizontal import federated_training
    from flows.ops import recent_runs, run_summary

    spec = write_synthetic(tmp_path, customers=300)
    text = spec.read_text().replace("rounds = 6", "rounds = 2")
    spec.write_text(text)
    state = federated_training(str(spec), return_state=True)
    assert state.is_completed(), state.message
    result: TrainingResult = state.result()  # type: ignore[assignment]
    root = state.state_details.flow_run_id
    assert root is not None
    runs, tasks = _runs(root)

    names = {r.name for r in runs}
    assert "synthetic: train" in names and "synthetic: prepare" in names
    assert {"round 1", "round 2", "party-pipeline p0", "party-pipeline p1"} <= names
    rounds = {r.name: r for r in runs if r.name.startswith("round ")}
    assert "round:2" in rounds["round 2"].tags
    by_name = {t.name: t for t in tasks}
    for wanted in (
        "p0 / customers: preprocess",
        "p1 / orders: align",
        "p0: fuse",
        "p1: pipeline",
        "p0: label statistics",
        "p1: train round 1",
        "p0: evaluate round 2",
        "aggregate round 2",
    ):
        assert wanted in by_name, (wanted, sorted(by_name))
    train = by_name["p1: train round 2"]
    assert {"party:p1", "round:2"} <= set(train.tags), train.tags
    assert "party:p0" in by_name["p0 / orders: preprocess"].tags
    assert task_name(train) == "train-party"
    # names come from spec ids and round numbers only: no entity id, raw or hashed
    assert not [n for n in names | set(by_name) if "p0-1" in n or "p1-1" in n]

    rows = {row.id: row for row in recent_runs(200, subflows=True)}
    [round2] = [r for r in runs if r.name == "round 2"]
    [pipe] = [r for r in runs if r.name == "party-pipeline p1"]
    assert (rows[round2.id].round, rows[pipe.id].party) == (2, "p1")

    card = json.loads(Path(result.model_card).read_text())
    coordinator = tmp_path / "stores" / "coordinator" / "models"
    assert Path(result.model_card).parent == coordinator == Path(result.model).parent
    assert (coordinator / f"{result.run_key}-model-card.md").exists()
    assert card["run_key"] == result.run_key and card["layout"] == "horizontal"
    assert card["rounds_run"] == result.rounds_run == 2
    assert [r["round"] for r in card["rounds"]] == [1, 2]
    assert all(sorted(r["accepted"]) == ["p0", "p1"] for r in card["rounds"])
    checkpoint = json.loads(
        (
            tmp_path / "stores" / "coordinator" / "checkpoints" / f"{result.run_key}-latest.json"
        ).read_text()
    )
    assert card["best_round"] == checkpoint["best_round"]
    p0 = card["parties"][0]
    [fused] = (tmp_path / "stores" / "p0" / "fused").glob(f"*-{p0['fused_sha256'][:12]}.parquet")
    assert hashlib.sha256(fused.read_bytes()).hexdigest() == p0["fused_sha256"]
    assert p0["fused_rows"] == sum(p0["split_rows"].values()) > 0
    assert card["final_metrics"]["test"] == result.test[result.best_round - 1]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        final = client.read_flow_run(root)
    summary = run_summary(final)
    assert summary[0] == "final state: Completed"
    assert f"model: {result.model}" in summary and f"manifest: {result.manifest}" in summary
    assert f"model card: {result.model_card}" in summary


def test_planned_names_are_the_names_the_flows_give_their_runs(tmp_path: Path) -> None:
    from flows.names import planned_run_name
    from flows.party import party_call, party_step
    from flows.prepare import party_pipeline, prepare

    spec = str(write_synthetic(tmp_path, customers=40))
    assert planned_run_name(prepare.flow_run_name, {"spec_path": spec}) == "synthetic: prepare"
    assert planned_run_name(party_pipeline.flow_run_name, {"party": "p1"}) == "party-pipeline p1"
    assert planned_run_name(party_step.flow_run_name, {"job": {"op": "x"}}) == "party-step"
    call = {"op": "psi-label-blind", "args": [{"party": "A"}, ["B"]], "coordinator": "c"}
    assert planned_run_name(party_call.flow_run_name, call) == "A: psi-label-blind"
    assert planned_run_name(party_call.flow_run_name, {"op": "nope"}) == "party-call"
    assert planned_run_name("round {state.round}", {"state": {"round": 2}}) is None
    assert planned_run_name(None, {}) is None
    # the coordinator's flows name their runs with the table ``fedfuse run`` names them by
    import importlib

    from flows.names import FLOW_RUN_NAMES
    from flows.ops import FLOWS, VERTICAL_FLOWS, run_name_of

    for entry in (*FLOWS, *VERTICAL_FLOWS):
        module = importlib.import_module(entry.module)
        flow_object = getattr(module, entry.entrypoint.rsplit(":", 1)[1])
        assert flow_object.flow_run_name is FLOW_RUN_NAMES[entry.name], entry.name
    assert run_name_of("score/x", {"spec_path": spec, "party": "p0"}) == "synthetic: score p0"
    assert run_name_of("party-step/x-p0", {}) is None


@pytest.mark.prefect
def test_a_run_started_for_a_deployment_is_named_before_a_worker_takes_it(
    prefect_api: str, tmp_path: Path
) -> None:
    """No worker polls the pool: the run waits, Scheduled, under its flow's own name."""
    from uuid import uuid4

    from flows.ops import deploy, start_run

    spec = write_synthetic(tmp_path, customers=40)
    name = f"named-{uuid4().hex[:6]}"
    deploy(spec, pool=f"nobody-{name}", name=name, schedules=None)
    run = start_run(f"federated-training/{name}", {"rounds": 2})
    assert run.state is not None and run.state.is_scheduled()
    assert run.name == "synthetic: train"


@pytest.mark.prefect
def test_a_dispatched_party_run_is_named_while_it_waits_for_the_partys_worker(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    """``prepare`` dispatches p1's pipeline to p1's pool, which no worker polls: the run
    waits, Scheduled, as ``party-pipeline p1``, until the coordinator gives up on it."""
    import contextvars
    import threading
    from uuid import uuid4

    from flows.ops import deploy
    from flows.prepare import prepare
    from tests.retrying import party_step_runs

    spec = write_synthetic(tmp_path, customers=40)
    name = f"waits-{uuid4().hex[:6]}"
    text = spec.read_text().replace(
        'store = "stores/p1"\n', f'store = "stores/p1"\nwork_pool = "nobody-{name}"\n'
    )
    spec.write_text(text + "\n[run]\nparty_timeout = 20\n")
    deployed = deploy(spec, pool=f"coordinator-{name}", name=name, schedules=None)
    assert f"party-pipeline/{name}-p1" in deployed, deployed
    states: list[Any] = []
    context = contextvars.copy_context()  # the settings pointing at the test's server
    coordinator = threading.Thread(
        target=context.run,
        args=(lambda: states.append(prepare(str(spec), dispatch=name, return_state=True)),),
    )
    coordinator.start()
    try:
        waiting: list[Any] = []
        deadline = time.monotonic() + 60
        while not waiting and time.monotonic() < deadline:
            waiting = party_step_runs(f"party-pipeline/{name}-p1")
            time.sleep(0.5)
        assert [(r.name, r.state.name) for r in waiting] == [("party-pipeline p1", "Scheduled")]
    finally:
        coordinator.join(timeout=120)
    [state] = states
    assert state.is_failed() and "is a worker polling" in str(state.message), state.message


@pytest.mark.prefect
def test_a_party_deployment_that_was_never_registered_is_named_in_the_error(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.prepare import prepare

    spec = write_synthetic(tmp_path, customers=40)
    text = spec.read_text().replace(
        'store = "stores/p1"\n', 'store = "stores/p1"\nwork_pool = "p1-pool"\n'
    )
    spec.write_text(text)
    state = prepare(str(spec), dispatch="never-deployed", return_state=True)
    assert state.is_failed()
    assert "p1: party-pipeline/never-deployed-p1: no such deployment on the Prefect server" in str(
        state.message
    ), state.message
