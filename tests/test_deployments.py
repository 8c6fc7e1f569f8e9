"""Deployments on a real Prefect server, run by a real process worker: fedfuse deploy, run
--watch, status and retrying a failed run (finished parties are not run again)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tests.factories import write_synthetic, write_tiny
from tests.prefect_api import task_name, task_states
from tests.workers import running_worker

pytestmark = pytest.mark.prefect

PREFECT = [sys.executable, "-m", "prefect"]
RUN_LINE = re.compile(r"flow run (\S+) ([0-9a-f-]{36})")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # the CLI quiets Prefect through os.environ; keep that inside this test
    for name in (
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "DO_NOT_TRACK",
    ):
        monkeypatch.setenv(name, os.environ.get(name, "WARNING" if "LEVEL" in name else "false"))
    return CliRunner()


@pytest.fixture
def worker_pool(prefect_api: str, tmp_path: Path, secret: str) -> Iterator[str]:
    """A process work pool with a ``prefect worker`` polling it."""
    from flows.ops import ensure_process_pool

    pool = f"fedfuse-test-{uuid4().hex[:8]}"
    assert ensure_process_pool(pool) is True
    assert ensure_process_pool(pool) is False
    with running_worker(pool, tmp_path / "worker-home", secret, prefect_api):
        yield pool


def run_id(output: str) -> UUID:
    match = RUN_LINE.search(output)
    assert match, output
    return UUID(match.group(2))


def read_deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def child_runs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )


def test_deploy_run_watch_and_status(cli: CliRunner, worker_pool: str, tmp_path: Path) -> None:
    from flows.ops import REPO_ROOT, recent_runs

    spec = write_tiny(tmp_path / "consortium", with_text_events=False)
    deployed = cli.invoke(app, ["deploy", str(spec), "--pool", worker_pool, "--name", "ops-run"])
    assert deployed.exit_code == 0, deployed.output
    names = ["prepare/ops-run", "federated-training/ops-run", "score/ops-run"]
    assert [line for line in deployed.stdout.splitlines() if "/" in line] == names

    prepare = read_deployment("prepare/ops-run")
    assert prepare.work_pool_name == worker_pool
    assert prepare.parameters == {"spec_path": str(spec.resolve())}
    assert prepare.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
    ]
    assert prepare.entrypoint == "flows/prepare.py:prepare"
    [daily] = prepare.schedules
    assert (daily.schedule.cron, daily.active) == ("0 2 * * *", True)
    [weekly] = read_deployment("federated-training/ops-run").schedules
    assert (weekly.schedule.cron, weekly.active) == ("0 4 * * 1", True)
    [scoring] = read_deployment("score/ops-run").schedules
    assert (scoring.active, scoring.parameters) == (False, {"party": "a"})
    assert "party" in read_deployment("score/ops-run").parameter_openapi_schema["required"]

    started = time.monotonic()
    ran = cli.invoke(app, ["run", "prepare/ops-run", "--watch", "--poll", "0.5"])
    assert ran.exit_code == 0, ran.output
    assert time.monotonic() - started < 60
    flow_run = run_id(ran.stdout)
    assert "prepare: Completed" in ran.stdout
    assert "party-pipeline[a]: Completed" in ran.stdout
    assert "party-pipeline[b]: Completed" in ran.stdout
    for party in ("a", "b"):
        assert list((spec.parent / "stores" / party / "fused").glob("fused-*.parquet")), party
    # the run ends with a summary read from its result
    assert "final state: Completed" in ran.stdout
    assert "a: fused table fused-" in ran.stdout and "b: fused table fused-" in ran.stdout

    rows = {row.id: row for row in recent_runs(10)}
    row = rows[flow_run]
    assert (row.flow, row.deployment, row.state) == ("prepare", "ops-run", "Completed")
    assert row.duration is not None and row.duration.total_seconds() > 0
    status = cli.invoke(app, ["status", "--limit", "5"])
    assert status.exit_code == 0, status.output
    assert "Completed" in status.stdout and "prepare" in status.stdout
    assert "ops-run" in status.stdout
    # subflow runs carry their party (the party-pipeline runs, from their tags)
    parties = {r.party for r in recent_runs(10, subflows=True) if r.flow == "party-pipeline"}
    assert parties >= {"a", "b"}  # (the session's server also holds other tests' runs)
    subflows = cli.invoke(app, ["status", "--limit", "5", "--subflows"])
    assert subflows.exit_code == 0 and "party" in subflows.stdout and "round" in subflows.stdout

    bad = cli.invoke(app, ["run", "prepare/ops-run", "--param", "refresh=maybe"])
    assert bad.exit_code == 2 and "refresh" in bad.stderr  # checked before a run is created
    missing = cli.invoke(app, ["run", "prepare/no-such-deployment"])
    assert missing.exit_code == 1 and "no deployment" in missing.stderr

    # deploying again updates the deployments: here their schedules go
    again = cli.invoke(
        app, ["deploy", str(spec), "--pool", worker_pool, "--name", "ops-run", "--no-schedules"]
    )
    assert again.exit_code == 0, again.output
    for name in names:
        assert read_deployment(name).schedules == [], name


def test_failed_run_retried_after_the_fix_reruns_only_the_failed_party(
    cli: CliRunner, worker_pool: str, tmp_path: Path
) -> None:
    from flows.ops import watch

    spec = write_tiny(tmp_path / "consortium", with_text_events=False)
    deployed = cli.invoke(
        app, ["deploy", str(spec), "--pool", worker_pool, "--name", "ops-retry", "--no-schedules"]
    )
    assert deployed.exit_code == 0, deployed.output
    assert read_deployment("prepare/ops-retry").schedules == []
    orders = spec.parent / "raw" / "b" / "orders.parquet"
    aside = tmp_path / "orders.parquet"
    shutil.move(orders, aside)

    failed = cli.invoke(app, ["run", "prepare/ops-retry", "--watch", "--poll", "0.5"])
    assert failed.exit_code == 1, failed.output
    flow_run = run_id(failed.stdout)
    assert "party-pipeline[a]: Completed" in failed.stdout
    assert "party-pipeline[b]: Failed" in failed.stdout
    assert "prepare: Failed" in failed.stdout
    first = task_states(flow_run)
    assert first["fuse-party"] == ["Completed"]  # party a only
    assert "Failed" in first["fingerprint-source"]

    shutil.move(aside, orders)
    retried = cli.invoke(app, ["retry", str(flow_run)])
    assert retried.exit_code == 0, retried.output
    events: list[str] = []
    final = watch(flow_run, events.append, poll=0.5, timeout=60)
    assert final.state is not None and final.state.is_completed(), events

    # the same flow run, run again by the worker: party a's finished pipeline is not run
    # again at all; in party b, the accounts source that had finished comes from the cache
    # and only the orders source and the fusion run
    after = task_states(flow_run)
    pipelines = [r.parameters["party"] for r in child_runs(flow_run)]
    assert sorted(pipelines) == ["a", "b", "b"]
    assert sorted(after["preprocess-source"]) == [
        "Cached",
        "Completed",
        "Completed",
        "Completed",
        "Completed",
        "NotReady",
    ]
    assert after["fuse-party"] == ["Completed", "Completed"]  # a (first attempt), b (retry)
    for party in ("a", "b"):
        assert list((spec.parent / "stores" / party / "fused").glob("fused-*.parquet")), party


def test_prefect_yaml_deploys_with_prefect_deploy_all(prefect_api: str, tmp_path: Path) -> None:
    """`prefect deploy --all` on deployments/prefect.yaml, from the repository root."""
    from flows.ops import REPO_ROOT, ensure_process_pool

    for pool in ("fedfuse", "fedfuse-site-a"):
        ensure_process_pool(pool)
    env = dict(os.environ, PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path))
    done = subprocess.run(
        [*PREFECT, "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    prepare = read_deployment("prepare/prepare")
    assert prepare.parameters == {"spec_path": "demo-out/spec.toml"}
    assert (prepare.work_pool_name, prepare.tags) == ("fedfuse", ["fedfuse"])
    assert [(s.schedule.cron, s.active) for s in prepare.schedules] == [("0 2 * * *", True)]
    assert prepare.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
    ]
    training = read_deployment("federated-training/federated-training")
    assert [(s.schedule.cron, s.active) for s in training.schedules] == [("0 4 * * 1", True)]
    assert training.parameter_openapi_schema["properties"]["rounds"]["anyOf"][0] == {
        "type": "integer"
    }
    score = read_deployment("score/score")
    assert score.work_pool_name == "fedfuse-site-a"
    [every] = score.schedules
    assert (every.active, every.parameters) == (False, {"party": "site-a"})
    assert every.schedule.interval.total_seconds() == 6 * 3600


PARTY_TASKS = {
    "fingerprint-source",
    "preprocess-source",
    "extract-features",
    "align-source",
    "fuse-party",
    "compute-party-stats",
    "start-scores",
    "train-party",
    "evaluate-party",
}


def run_tree(flow_run_id: UUID) -> tuple[list[Any], dict[UUID, str], list[Any]]:
    """A run, its nested runs (subflows and dispatched party runs), their flow names and
    all their task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.ops import descendants, flow_names_of

    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(flow_run_id), *descendants(client, flow_run_id)]
        names: dict[UUID, str] = {}
        flow_names_of(client, runs, names)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
        )
    return runs, {r.id: names[r.flow_id] for r in runs}, tasks


def party_of(run: Any) -> str | None:
    params = run.parameters or {}
    if "job" in params:
        return str(params["job"]["setup"]["party"])
    return params.get("party")


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
        final = watch(flow_run, events.append, poll=0.5, timeout=240)
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


def test_planned_deployments_follow_layout_and_party_pools(tmp_path: Path) -> None:
    from flows.ops import plan_deployments
    from tasks.demo_data import write_demo_consortium

    vertical = write_demo_consortium(str(tmp_path / "v"), layout="vertical", customers=200)
    planned = plan_deployments(vertical, work_pool="coord")
    assert [(p.entry.name, p.name, p.work_pool) for p in planned] == [
        ("prepare", "demo-vertical", "coord"),
        ("vertical-training", "demo-vertical", "coord"),
        ("vertical-score", "demo-vertical", "coord"),
    ]
    assert [s.cron for s in planned[1].schedules] == ["0 4 * * 1"]  # type: ignore[attr-defined]

    pooled = write_demo_consortium(str(tmp_path / "h"), parties=2, customers=200, party_pools=True)
    planned = plan_deployments(pooled, work_pool="coord")
    assert [(p.entry.name, p.name, p.work_pool) for p in planned] == [
        ("prepare", "demo-horizontal", "coord"),
        ("federated-training", "demo-horizontal", "coord"),
        ("score", "demo-horizontal", "coord"),
        ("party-pipeline", "demo-horizontal-site-a", "fedfuse-site-a"),
        ("party-step", "demo-horizontal-site-a", "fedfuse-site-a"),
        ("score", "demo-horizontal-site-a", "fedfuse-site-a"),
        ("party-pipeline", "demo-horizontal-site-b", "fedfuse-site-b"),
        ("party-step", "demo-horizontal-site-b", "fedfuse-site-b"),
        ("score", "demo-horizontal-site-b", "fedfuse-site-b"),
    ]
    assert planned[1].parameters["dispatch"] == "demo-horizontal"
    assert "dispatch" not in planned[2].parameters
    assert planned[3].parameters["party"] == "site-a"


def test_vertical_parties_on_their_own_pools(
    cli: CliRunner, prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Vertical training deployment: the label party A runs with the coordinator, B and C on
    their own pools; PSI, rounds and test scores of B and C run only on their workers."""
    from flows.ops import watch
    from tasks.demo_data import write_demo_consortium

    tag = uuid4().hex[:6]
    pools = {"B": f"vert-b-{tag}", "C": f"vert-c-{tag}"}
    coordinator = f"vert-coord-{tag}"
    spec = Path(
        write_demo_consortium(
            str(tmp_path / "consortium"),
            layout="vertical",
            customers=2000,
            seed=3,
            party_pools=True,
        )
    )
    text = spec.read_text().replace('work_pool = "fedfuse-a"\n', "")
    for party, pool in pools.items():
        text = text.replace(f'work_pool = "fedfuse-{party.lower()}"', f'work_pool = "{pool}"')
    text = re.sub(r"^rounds = .*$", "rounds = 2", text, flags=re.M)
    spec.write_text(text)
    monkeypatch.setenv("FEDFUSE_SECRET", secret)

    deployed = cli.invoke(
        app, ["deploy", str(spec), "--pool", coordinator, "--name", "vpools", "--no-schedules"]
    )
    assert deployed.exit_code == 0, deployed.output
    assert [line for line in deployed.stdout.splitlines() if "/" in line] == [
        "prepare/vpools",
        "vertical-training/vpools",
        "vertical-score/vpools",
        "party-pipeline/vpools-B",
        "party-call/vpools-B",
        "party-pipeline/vpools-C",
        "party-call/vpools-C",
    ]
    assert read_deployment("vertical-training/vpools").parameters["dispatch"] == "vpools"

    homes = tmp_path / "workers"
    with (
        running_worker(coordinator, homes / "coordinator", secret, prefect_api) as coord_log,
        running_worker(pools["B"], homes / "B", secret, prefect_api) as log_b,
        running_worker(pools["C"], homes / "C", secret, prefect_api) as log_c,
    ):
        ran = cli.invoke(app, ["run", "vertical-training/vpools", "--watch", "--poll", "0.5"])
        flow_run = run_id(ran.stdout)
        final = watch(flow_run, lambda _: None, poll=0.5, timeout=60)
        assert final.state is not None and final.state.is_completed(), ran.output
        scored = cli.invoke(app, ["run", "vertical-score/vpools", "--watch", "--poll", "0.5"])
        score_run = run_id(scored.stdout)
        final = watch(score_run, lambda _: None, poll=0.5, timeout=60)
        assert final.state is not None and final.state.is_completed(), scored.output
        logs = {"A": coord_log.read_text(), "B": log_b.read_text(), "C": log_c.read_text()}

    # inference: each feature party's pipeline, PSI answers and block scores on its pool
    score_runs, score_names, _ = run_tree(score_run)
    for party, pool in pools.items():
        mine = sorted(
            r.parameters["op"]
            for r in score_runs
            if score_names[r.id] == "party-call" and r.work_pool_name == pool
        )
        assert mine == ["psi-party-answer", "psi-party-receive", "vertical-party-scores"], mine
        assert [
            r.work_pool_name
            for r in score_runs
            if score_names[r.id] == "party-pipeline" and r.parameters["party"] == party
        ] == [pool]
        for r in score_runs:
            if r.work_pool_name == pool:
                assert str(r.id) in logs[party] and str(r.id) not in logs["A"], score_names[r.id]
    predictions = list((spec.parent / "stores" / "A" / "scoring").rglob("*predictions*"))
    assert predictions, "no predictions in the label party's store"

    runs, flow_names, tasks = run_tree(flow_run)
    by_id = {r.id: r for r in runs}
    calls = [r for r in runs if flow_names[r.id] == "party-call"]
    ops = sorted((r.work_pool_name, r.parameters["op"]) for r in calls)
    for pool in pools.values():
        mine = [op for p, op in ops if p == pool]
        assert mine.count("vertical-party-round") == 2, ops
        assert {"psi-party-answer", "psi-party-receive", "vertical-test-scores"} <= set(mine)
        # nothing of the label party's runs on a feature party's pool
        assert not {"psi-label-blind", "vertical-combine", "vertical-gradients"} & set(mine)
    pipelines = {
        (r.parameters["party"], r.work_pool_name)
        for r in runs
        if flow_names[r.id] == "party-pipeline"
    }
    assert pipelines == {("A", None), ("B", pools["B"]), ("C", pools["C"])}  # A in process
    for r in calls + [r for r in runs if r.work_pool_name in pools.values()]:
        party = next(p for p, pool in pools.items() if pool == r.work_pool_name)
        others = [k for k in logs if k != party]
        assert str(r.id) in logs[party], (flow_names[r.id], party)
        assert all(str(r.id) not in logs[k] for k in others), (flow_names[r.id], party)
    # the feature parties' own steps ran only inside their runs
    for t in tasks:
        name = task_name(t)
        if name in ("psi-party-answer", "psi-party-receive"):
            assert flow_names[by_id[t.flow_run_id].id] == "party-call", t.name
    # only blinded values, alignment answers, gradients and score deltas at the coordinator
    customers = (spec.parent / "stores" / "A" / "raw" / "customers.csv").read_text()
    raw_ids = [line.split(",")[0].encode() for line in customers.splitlines()[1:]]
    for path in (spec.parent / "stores" / "coordinator").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not [k for k in raw_ids if len(k) >= 8 and k in blob], path
