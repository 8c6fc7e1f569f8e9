"""Runs checked before they start: parameters against the flow's signature (``fedfuse run``,
``fedfuse deploy``), the consortium secret (``fedfuse validate``, ``prepare``, a flow run),
and schedules controlled from the CLI (``deploy --schedule``, ``schedule pause|resume``,
``status``). Deployments are created on the session's server; no worker runs them."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from tests.factories import write_tiny


def _one_line_error(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# -- parameters -------------------------------------------------------------------------


def _schema(flow: Any) -> dict[str, Any]:
    return dict(flow.parameters.model_dump())


def test_parameter_typos_and_types_are_refused_naming_the_allowed_ones() -> None:
    from flows.horizontal import federated_training
    from flows.ops import ParameterError, check_parameters

    schema = _schema(federated_training)
    check_parameters("t", schema, {"spec_path": "s.toml", "rounds": 3, "baselines": True})
    with pytest.raises(ParameterError) as typo:
        check_parameters("federated-training/x", schema, {"spec_path": "s.toml", "round": 3})
    assert str(typo.value) == (
        "federated-training/x: no parameter 'round' (its parameters: spec_path, refresh, "
        "rounds, stop_after, baselines, dispatch)"
    )
    with pytest.raises(ParameterError, match=r"parameter 'rounds': 'three' is not valid"):
        check_parameters("t", schema, {"spec_path": "s.toml", "rounds": "three"})
    with pytest.raises(ParameterError, match="parameter 'refresh': 'maybe' is not of type"):
        check_parameters("t", schema, {"spec_path": "s.toml", "refresh": "maybe"})
    with pytest.raises(ParameterError, match="missing parameter 'spec_path'"):
        check_parameters("t", schema, {"rounds": 2})
    check_parameters("t", schema, {"rounds": 2}, required=False)


def test_deploy_parameters_by_role() -> None:
    from flows.ops import parse_role_params

    assert parse_role_params(["training.rounds=3", "prepare.refresh=true"]) == {
        "training": {"rounds": 3},
        "prepare": {"refresh": True},
    }
    for bad in ("rounds=3", "train.rounds=3", "training.=3"):
        with pytest.raises(ValueError, match="training"):
            parse_role_params([bad])


# -- schedules --------------------------------------------------------------------------


def test_schedule_options() -> None:
    from flows.ops import Schedules

    default = Schedules.from_options()
    assert default.prepare is not None and default.prepare.cron == "0 2 * * *"
    assert default.score is not None and default.score.active is False
    chosen = Schedules.from_options(
        ["training=interval:3600", "score=interval:6h", "prepare=cron:30 1 * * *"],
        active=["score"],
        inactive=["training"],
    )
    assert chosen.training is not None and chosen.training.interval == dt.timedelta(hours=1)
    assert not chosen.training.active
    assert chosen.score is not None and chosen.score.interval == dt.timedelta(hours=6)
    assert chosen.score.active
    assert chosen.prepare is not None and chosen.prepare.cron == "30 1 * * *"
    assert Schedules.from_options(["score=none"]).score is None
    assert Schedules.from_options(none=True) == Schedules(prepare=None, training=None, score=None)
    for items, message in (
        (["train=cron:0 2 * * *"], "ROLE is one of prepare, training, score"),
        (["prepare=cron:0 2 * *"], 'prepare: cron: Invalid cron string: "0 2 * *"'),
        (["prepare=interval:0"], "greater than 0 seconds"),
        (["prepare=interval:soon"], "a duration must be a whole number"),
        (["prepare=interval:inf"], "SECONDS must be a finite number"),
        (["prepare=interval:1e300"], "SECONDS must be a finite number"),
        (["prepare=interval:nan"], "SECONDS must be a finite number"),
        (["prepare=weekly"], "a schedule is cron:EXPRESSION, interval:SECONDS"),
        (["prepare"], "ROLE is one of"),
    ):
        with pytest.raises(ValueError, match=message.replace("*", r"\*")):
            Schedules.from_options(items)
    with pytest.raises(ValueError, match="--active score: the score deployment has no schedule"):
        Schedules.from_options(["score=none"], active=["score"])


# -- against the server -----------------------------------------------------------------


def _deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _runs_of(deployment_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


@pytest.mark.prefect
def test_deploy_schedules_params_run_checks_and_pause_resume(
    prefect_api: str,
    cli: CliRunner,
    tmp_path: Path,
    secret: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prefect.exceptions import ObjectNotFound

    spec = write_tiny(tmp_path / "consortium", with_text_events=False)
    name = f"checks-{uuid4().hex[:6]}"
    pool = f"pool-{name}"
    base = ["deploy", str(spec), "--pool", pool, "--name", name]

    # a misspelt default parameter: refused before anything is registered
    typo = cli.invoke(app, [*base, "-p", "training.round=2"])
    assert typo.exit_code == 1
    line = _one_line_error(typo.stderr)
    assert "federated-training/" + name in line and "no parameter 'round'" in line
    assert "its parameters: spec_path, refresh, rounds, stop_after, baselines, dispatch" in line
    with pytest.raises(ObjectNotFound):
        _deployment(f"prepare/{name}")
    bad = cli.invoke(app, [*base, "--schedule", "training=cron:every day"])
    assert bad.exit_code == 2 and "--schedule training: cron:" in _one_line_error(bad.stderr)

    deployed = cli.invoke(
        app,
        [
            *base,
            "--schedule",
            "training=interval:3600",
            "-s",
            "prepare=cron:15 3 * * *",
            "--active",
            "score",
            "--inactive",
            "prepare",
            "-p",
            "training.rounds=2",
        ],
    )
    assert deployed.exit_code == 0, deployed.output
    prepare = _deployment(f"prepare/{name}")
    [daily] = prepare.schedules
    assert (daily.schedule.cron, daily.active) == ("15 3 * * *", False)
    training = _deployment(f"federated-training/{name}")
    assert training.parameters["rounds"] == 2
    [hourly] = training.schedules
    assert (hourly.schedule.interval, hourly.active) == (dt.timedelta(hours=1), True)
    [scoring] = _deployment(f"score/{name}").schedules
    assert (scoring.schedule.interval, scoring.active) == (dt.timedelta(hours=6), True)
    assert scoring.parameters == {"party": "a"}

    # fedfuse run: a typo or a wrong type is refused in one line, and no run is created
    started = time.monotonic()
    ran = cli.invoke(app, ["run", f"federated-training/{name}", "-p", "round=3"])
    assert time.monotonic() - started < 10
    assert ran.exit_code == 2
    assert _one_line_error(ran.stderr) == (
        f"error: federated-training/{name}: no parameter 'round' (its parameters: "
        "spec_path, refresh, rounds, stop_after, baselines, dispatch)"
    )
    wrong = cli.invoke(app, ["run", f"prepare/{name}", "-p", "refresh=maybe"])
    assert wrong.exit_code == 2 and "'refresh': 'maybe' is not of type 'boolean'" in wrong.stderr
    missing = cli.invoke(app, ["run", f"score/{name}"])  # score runs for one party
    assert missing.exit_code == 2 and "missing parameter 'party'" in missing.stderr
    assert [r for r in _runs_of(training.id) if not r.auto_scheduled] == []
    manual = [r for r in _runs_of(prepare.id) if not r.auto_scheduled]
    assert manual == []
    good = cli.invoke(app, ["run", f"prepare/{name}", "-p", "refresh=true"])
    assert good.exit_code == 0, good.output
    assert len([r for r in _runs_of(prepare.id) if not r.auto_scheduled]) == 1

    # pause and resume; status marks inactive schedules
    paused = cli.invoke(app, ["schedule", "pause", f"federated-training/{name}"])
    assert paused.exit_code == 0, paused.output
    assert "training (every 1:00:00): inactive" in paused.stdout
    assert [s.active for s in _deployment(f"federated-training/{name}").schedules] == [False]
    from flows.cli.console import console

    monkeypatch.setattr(console, "width", 200)  # one table row a line
    status = cli.invoke(app, ["status", "--limit", "1"])
    assert status.exit_code == 0, status.output
    rows = [line for line in status.stdout.splitlines() if name in line]
    assert any(f"federated-training/{name}" in r and "INACTIVE" in r for r in rows), rows
    assert any(f"score/{name}" in r and "active" in r and "INACTIVE" not in r for r in rows)
    resumed = cli.invoke(app, ["schedule", "resume", f"federated-training/{name}"])
    assert resumed.exit_code == 0, resumed.output
    assert [s.active for s in _deployment(f"federated-training/{name}").schedules] == [True]
    one = cli.invoke(app, ["schedule", "resume", f"prepare/{name}", "--slug", "prepare"])
    assert one.exit_code == 0 and [s.active for s in _deployment(f"prepare/{name}").schedules] == [
        True
    ]
    nope = cli.invoke(app, ["schedule", "pause", f"prepare/{name}", "--slug", "hourly"])
    assert nope.exit_code == 1
    assert "has no schedule 'hourly' (its schedules: prepare)" in nope.stderr
    gone = cli.invoke(app, ["schedule", "pause", "prepare/no-such-deployment"])
    assert gone.exit_code == 1 and "no deployment 'prepare/no-such-deployment'" in gone.stderr


# -- the secret -------------------------------------------------------------------------


def test_missing_secret_fails_once_before_anything_starts(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_tiny(tmp_path, with_text_events=False)
    monkeypatch.delenv("FEDFUSE_TEST_SECRET", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # no server, and none is started
    checked = cli.invoke(app, ["validate", str(spec)])
    assert checked.exit_code == 1
    line = _one_line_error(checked.stderr)
    assert line.startswith(f"{spec}: consortium.secret: the consortium secret is read from")
    assert "export FEDFUSE_TEST_SECRET=$(python3 -c 'import secrets;" in line
    assert "valid" not in checked.stdout
    unchecked = cli.invoke(app, ["validate", str(spec), "--no-secret"])
    assert unchecked.exit_code == 0 and "secret: environment variable FEDFUSE_TEST_SECRET (not" in (
        unchecked.stdout
    )
    for command in (["prepare"], ["train", "--no-baselines"], ["predict", "--party", "a"]):
        started = time.monotonic()
        result = cli.invoke(app, [command[0], str(spec), *command[1:]])
        assert time.monotonic() - started < 2.0, command  # about 0.1 s on a quiet machine
        assert result.exit_code == 1, result.output
        assert _one_line_error(result.stderr).startswith(
            "error: the consortium secret is read from environment variable "
            "FEDFUSE_TEST_SECRET, which is not set: set it"
        )
    assert not (tmp_path / "stores").exists()  # no party store touched


@pytest.mark.prefect
def test_a_flow_run_without_the_secret_fails_once_before_any_pipeline(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.prepare import prepare
    from storage.secrets import SecretError

    spec = write_tiny(tmp_path, with_text_events=False)
    monkeypatch.delenv("FEDFUSE_TEST_SECRET", raising=False)
    state = prepare(str(spec), return_state=True)
    assert state.is_failed()
    with pytest.raises(SecretError, match="FEDFUSE_TEST_SECRET, which is not set"):
        state.result()
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
    assert children == []  # no party pipeline started
    assert not (tmp_path / "stores").exists()


@pytest.mark.prefect
def test_validate_names_a_missing_secret_block(
    prefect_api: str, cli: CliRunner, tmp_path: Path
) -> None:
    spec = write_tiny(tmp_path, with_text_events=False)
    block = f"consortium-{uuid4().hex[:6]}"
    spec.write_text(
        spec.read_text().replace(
            'secret = { env = "FEDFUSE_TEST_SECRET" }', f'secret = {{ block = "{block}" }}'
        )
    )
    missing = cli.invoke(app, ["validate", str(spec)])
    assert missing.exit_code == 1
    line = _one_line_error(missing.stderr)
    assert f"Prefect Secret block '{block}', which does not exist" in line
    assert f"Secret(value='...').save('{block}')" in line

    from prefect.blocks.system import Secret

    Secret(value="0123456789abcdef0123456789abcdef").save(block)
    found = cli.invoke(app, ["validate", str(spec)])
    assert found.exit_code == 0, found.output
    assert f"secret: Prefect Secret block '{block}', reachable here" in found.stdout
