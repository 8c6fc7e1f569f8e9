"""Two parties on their own work pools, each run by its own worker: every party step runs on
its party's worker only, and a retry after a fix reruns only the failed party."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from uuid import uuid4

import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tests.deploying import PARTY_TASKS, party_of, read_deployment, run_id, run_tree
from tests.factories import write_synthetic
from tests.prefect_api import task_name
from tests.workers import running_worker

pytestmark = pytest.mark.prefect


def test_two_party_pools_each_party_runs_only_on_its_own_worker(
    cli: CliRunner, prefect_api: str, tmp_path: Path, secret: str
) -> None:
    """Training deployment on a coordinator pool; each party's pipeline and training steps
    are dispatched to its own pool and run by that pool's worker only. A party's failed
    pipeline fails the run; after the fix, the retried run does not start the other party's
    finished pipeline again."""
    from flows.ops import watch

    tag = uuid4().hex[:6]
    pools = {"p0": f"party-a-{tag}", "p1": f"party-b-{tag}"}
    coordinator = f"coordinator-{tag}"
    spec = write_synthetic(tmp_path / "consortium", customers=500)
    text = spec.read_text()
    for party, pool in pools.items():
        text = text.replace(
            f'store = "stores/{party}"\n', f'store = "stores/{party}"\nwork_pool = "{pool}"\n'
        )
    spec.write_text(text)

    deployed = cli.invoke(
        app, ["deploy", str(spec), "--pool", coordinator, "--name", "pools", "--no-schedules"]
    )
    assert deployed.exit_code == 0, deployed.output
    assert [line for line in deployed.stdout.splitlines() if "/" in line] == [
        "prepare/pools",
        "federated-training/pools",
        "score/pools",
        "party-pipeline/pools-p0",
        "party-step/pools-p0",
        "score/pools-p0",
        "party-pipeline/pools-p1",
        "party-step/pools-p1",
        "score/pools-p1",
    ]
    training = read_deployment("federated-training/pools")
    assert (training.work_pool_name, training.parameters["dispatch"]) == (coordinator, "pools")
    for party, pool in pools.items():
        for flow_name in ("party-pipeline", "party-step", "score"):
            assert read_deployment(f"{flow_name}/pools-{party}").work_pool_name == pool
        assert read_deployment(f"score/pools-{party}").parameters["party"] == party

    orders = spec.parent / "raw" / "p1" / "orders.parquet"
    aside = tmp_path / "orders.parquet"
    shutil.move(orders, aside)
    homes = tmp_path / "workers"
    with (
        running_worker(coordinator, homes / "coordinator", secret, prefect_api) as coord_log,
        running_worker(pools["p0"], homes / "p0", secret, prefect_api) as log_p0,
        running_worker(pools["p1"], homes / "p1", secret, prefect_api) as log_p1,
    ):
        failed = cli.invoke(
            app,
            ["run", "federated-training/pools", "--param", "rounds=2", "--watch", "--poll", "0.5"],
        )
        assert failed.exit_code == 1, failed.output
        flow_run = run_id(failed.stdout)
        assert "party-pipeline[p0]: Completed" in failed.stdout
        assert "party-pipeline[p1]: Failed" in failed.stdout

        shutil.move(aside, orders)
        retried = cli.invoke(app, ["retry", str(flow_run)])
        assert retried.exit_code == 0, retried.output
        events: list[str] = []
        final = watch(flow_run, events.append, poll=0.5, timeout=420)
        assert final.state is not None and final.state.is_completed(), events
        logs = {
            "coordinator": coord_log.read_text(),
            "p0": log_p0.read_text(),
            "p1": log_p1.read_text(),
        }

    runs, flow_names, tasks = run_tree(flow_run)
    by_id = {r.id: r for r in runs}
    dispatched = [r for r in runs if flow_names[r.id] in ("party-pipeline", "party-step")]
    steps = sorted(
        (party_of(r), r.parameters["job"]["op"])
        for r in dispatched
        if flow_names[r.id] == "party-step"
    )
    # stats and start scores once each, round 1's update, then one run per round: round 1's
    # evaluation also trains round 2's update, round 2's evaluation is the last step
    for party in pools:
        assert [op for p, op in steps if p == party] == sorted(
            ["stats", "start", "train", "evaluate", "evaluate"]
        ), steps
        evaluations = sorted(
            (r.parameters["job"]["round"], r.parameters["job"]["next_learning_rate"])
            for r in dispatched
            if flow_names[r.id] == "party-step"
            and party_of(r) == party
            and r.parameters["job"]["op"] == "evaluate"
        )
        assert [(t, rate is not None) for t, rate in evaluations] == [(1, True), (2, False)]
    # and both rounds averaged both parties' updates
    [latest] = (spec.parent / "stores" / "coordinator" / "checkpoints").glob("*-latest.json")
    rounds = json.loads(latest.read_text())["rounds"]
    assert [sorted(m["party"] for m in r["members"]) for r in rounds] == [sorted(pools)] * 2
    for r in dispatched:
        party = party_of(r)
        assert party in pools, r.parameters
        assert r.work_pool_name == pools[party], (flow_names[r.id], party)
        assert str(r.id) in logs[party], (flow_names[r.id], party)
        others = [k for k in logs if k != party]
        assert all(str(r.id) not in logs[k] for k in others), (flow_names[r.id], party)
    # every task that touches a party's data ran inside that party's runs, on its pool
    party_tasks = [t for t in tasks if task_name(t) in PARTY_TASKS]
    assert {task_name(t) for t in party_tasks} == PARTY_TASKS
    for t in party_tasks:
        home = by_id[t.flow_run_id]
        assert flow_names[home.id] in ("party-pipeline", "party-step"), t.name
        assert home.work_pool_name == pools[str(party_of(home))], t.name
    # the coordinator's own runs hold no party task
    coordinator_runs = [r for r in runs if r not in dispatched]
    assert {flow_names[r.id] for r in coordinator_runs} >= {
        "federated-training",
        "prepare",
        "federated-round",
    }
    # the retry did not start p0's finished pipeline again; p1's ran twice
    pipelines = sorted(str(party_of(r)) for r in dispatched if flow_names[r.id] == "party-pipeline")
    assert pipelines == ["p0", "p1", "p1"], pipelines
    # results came back through the coordinator store, models too
    exchange = spec.parent / "stores" / "coordinator" / "exchange"
    assert {p.stem for p in exchange.glob("*.json")} >= {
        str(r.id) for r in dispatched if r.state and r.state.is_completed()
    }
    raw_ids = [f"{party}-{i}".encode() for party in pools for i in range(100, 250)]
    for path in (spec.parent / "stores" / "coordinator").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not [k for k in raw_ids if k in blob], path
