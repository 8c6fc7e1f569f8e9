"""Deployments on a real Prefect server, run by a real process worker: fedfuse deploy, run
--watch, status and retrying a failed run (finished parties are not run again)."""

from __future__ import annotations

import os
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
from tests.deploying import read_deployment, run_id
from tests.factories import write_tiny
from tests.prefect_api import task_states
from tests.workers import running_worker

pytestmark = pytest.mark.prefect

PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture
def worker_pool(prefect_api: str, tmp_path: Path, secret: str) -> Iterator[str]:
    """A process work pool with a ``prefect worker`` polling it."""
    from flows.ops import ensure_process_pool

    pool = f"fedfuse-test-{uuid4().hex[:8]}"
    assert ensure_process_pool(pool) is True
    assert ensure_process_pool(pool) is False
    with running_worker(pool, tmp_path / "worker-home", secret, prefect_api):
        yield pool


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
