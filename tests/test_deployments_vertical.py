"""The vertical layout deployed with parties on their own work pools."""

from __future__ import annotations

import re
from pathlib import Path
from uuid import uuid4

import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tests.deploying import read_deployment, run_id, run_tree
from tests.prefect_api import task_name
from tests.workers import running_worker

pytestmark = pytest.mark.prefect


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
