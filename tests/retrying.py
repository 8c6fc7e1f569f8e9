"""What the retry tests share: the consortia they run, a process worker on its own pool,
the uninterrupted run's model, killing a run's process and retrying it the way users do
(the UI's Retry, ``prefect flow-run retry``, ``fedfuse retry``).

The module-scoped fixtures are imported by each retry test file, so each file (one xdist
worker) has its own worker process and reference model."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid4

import pytest

from tests.factories import write_synthetic
from tests.workers import running_worker

ROUNDS = 5


def write_spec(root: Path, *, mode: str = "averaging") -> Path:
    """Synthetic two-party consortium, every round run (no early stopping)."""
    spec = write_synthetic(root, customers=700)
    text = spec.read_text()
    text = re.sub(r"^rounds = .*$", f"rounds = {ROUNDS}", text, flags=re.M)
    text = re.sub(r"^patience = .*$", "patience = 50", text, flags=re.M)
    if mode != "averaging":
        text += f'mode = "{mode}"\n'
    spec.write_text(text)
    return spec


@pytest.fixture(scope="module")
def retry_pool(
    prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    from flows.ops import ensure_process_pool

    name = f"fedfuse-retry-{uuid4().hex[:8]}"
    ensure_process_pool(name)
    secret = "0123456789abcdef0123456789abcdef"
    os.environ["FEDFUSE_TEST_SECRET"] = secret
    # the vertical demo spec reads FEDFUSE_SECRET: the worker inherits it
    os.environ.setdefault("FEDFUSE_SECRET", "0123456789abcdef0123456789abcdef")
    with running_worker(
        name, tmp_path_factory.mktemp("retry") / "worker", secret, prefect_api
    ) as log:
        yield name, log


@dataclass(frozen=True)
class CleanRun:
    """What an uninterrupted run ends with: the exported model's sha256 and, per round, the
    sha256 of every member's update (by party), which say where a retried run went apart."""

    model: str
    rounds: list[dict[str, str]]


def round_members(spec: Path) -> list[dict[str, str]]:
    """Per round of the latest checkpoint: party -> sha256 of its update."""
    done = checkpoint(spec)
    assert done is not None, "no checkpoint"
    rounds = cast("list[dict[str, Any]]", done["rounds"])
    return [{m["party"]: m["model"]["sha256"] for m in r["members"]} for r in rounds]


def exported_model(spec: Path) -> str:
    """sha256 of the model the run's ``latest.json`` points at."""
    latest = json.loads(
        (spec.parent / "stores" / "coordinator" / "models" / "latest.json").read_text()
    )
    return hashlib.sha256(Path(latest["model"]).read_bytes()).hexdigest()


def assert_uninterrupted(spec: Path, clean: CleanRun, run_id: UUID) -> None:
    """The run's rounds 1..n hold the uninterrupted run's updates, round by round, and it
    exports the same model, byte for byte (on failure: the first round that differs and the
    run's states)."""
    rounds = round_members(spec)
    assert [sorted(r) for r in rounds] == [sorted(r) for r in clean.rounds], rounds
    for k, (got, want) in enumerate(zip(rounds, clean.rounds, strict=True), start=1):
        assert got == want, f"round {k} differs: {got} vs {want}\n" + "\n".join(states_of(run_id))
    assert exported_model(spec) == clean.model, "\n".join(states_of(run_id))


@pytest.fixture(scope="module")
def clean_model(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> CleanRun:
    """The uninterrupted run (same data, its own stores)."""
    from flows.horizontal import federated_training

    spec = write_spec(tmp_path_factory.mktemp("clean"))
    result = federated_training(str(spec))
    assert result.rounds_run == ROUNDS
    clean = CleanRun(exported_model(spec), round_members(spec))
    assert len(clean.rounds) == ROUNDS
    return clean


def deployed_run(spec: Path, pool: str, name: str, flow: str = "federated-training") -> UUID:
    from flows.ops import deploy, start_run

    deploy(spec, pool=pool, name=name, schedules=None)
    run = start_run(f"{flow}/{name}")
    return run.id


def flow_run(run_id: UUID):  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def kill_when(run_id: UUID, ready: Callable[[], bool], *, timeout: float = 240) -> None:
    """SIGKILL the flow run's process as soon as ``ready()`` (a look at the stores) holds."""
    deadline = time.monotonic() + timeout
    pid = None
    asked = 0.0
    while not ready():
        # the API is asked twice a second, the stores fifty times: a tight loop of requests
        # would cost the server (and the machine) more than the run it watches
        if time.monotonic() - asked > 0.5:
            run = flow_run(run_id)
            assert run.state is None or not run.state.is_final(), f"run ended first: {run.state}"
            pid = run.infrastructure_pid or pid
            asked = time.monotonic()
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.02)
    # the process id is read while waiting, so the kill follows ready() at once (an API call
    # in between can take seconds on a loaded machine, and a short run may finish meanwhile);
    # an attempt's process keeps its id, read once the attempt runs
    pid = pid or flow_run(run_id).infrastructure_pid
    assert pid, "the worker recorded no process id"
    os.kill(int(str(pid).rsplit(":", 1)[-1]), signal.SIGKILL)


def wait_final(run_id: UUID, *, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while True:
        run = flow_run(run_id)
        if run.state is not None and run.state.is_final():
            return str(run.state.type.value)
        assert time.monotonic() < deadline, f"still {run.state} after {timeout} s"
        time.sleep(0.5)


WORKER_DONE = "prefect.flow_runs.worker - Check whether the flow run exceeded"


def worker_done(log: Path, before: int, *, timeout: float = 30) -> None:
    """Wait until the worker has finished with the killed process. It reports the crash
    twice (its process monitor, then, ~2 s later, its submission), and a retry taken in
    between is crashed again by the second report; the worker logs a hint after it."""
    deadline = time.monotonic() + timeout
    while log.read_text().count(WORKER_DONE) <= before:
        assert time.monotonic() < deadline, "the worker did not finish with the killed run"
        time.sleep(0.2)


def states_of(run_id: UUID) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [f"{s.name}: {s.message}" for s in client.read_flow_run_states(run_id)]


def retry_like_the_ui(run_id: UUID, api: str) -> None:
    """The request the UI's Retry button sends (prefect-ui-library ``retryFlowRun``)."""
    import httpx

    response = httpx.post(
        f"{api}/flow_runs/{run_id}/set_state",
        json={
            "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"},
            "force": False,
        },
        timeout=30,
    )
    response.raise_for_status()
    assert response.json()["status"] == "ACCEPT", response.json()


def retry_with_prefect_cli(run_id: UUID, api: str) -> None:
    env = {**os.environ, "PREFECT_API_URL": api}
    subprocess.run(
        [sys.executable, "-m", "prefect", "flow-run", "retry", str(run_id)],
        env=env,
        check=True,
        capture_output=True,
    )


def retry_with_fedfuse(run_id: UUID, api: str) -> None:
    from typer.testing import CliRunner

    from flows.cli.app import app

    out = CliRunner().invoke(app, ["retry", str(run_id)])
    assert out.exit_code == 0, out.output


def checkpoint(spec: Path) -> dict[str, object] | None:
    found = sorted((spec.parent / "stores" / "coordinator" / "checkpoints").glob("*-latest.json"))
    return json.loads(found[0].read_text()) if found else None


def round_done(spec: Path, k: int) -> Callable[[], bool]:
    def ready() -> bool:
        folder = spec.parent / "stores" / "coordinator" / "checkpoints"
        return any(folder.glob(f"*-r{k:04d}.json"))

    return ready


def round_started(spec: Path, k: int) -> Callable[[], bool]:
    """A party's update of round k is in (the round is under way)."""

    def ready() -> bool:
        folder = spec.parent / "stores" / "coordinator" / "models"
        return any(folder.glob(f"*-r{k:04d}-*.txt"))

    return ready


RETRIES = {
    "ui": retry_like_the_ui,
    "prefect-cli": retry_with_prefect_cli,
    "fedfuse": retry_with_fedfuse,
}


def write_vertical(root: Path) -> Path:
    from tasks.demo_data import write_demo_consortium

    spec = Path(write_demo_consortium(str(root), layout="vertical", customers=3000, seed=3))
    text = spec.read_text()
    text = re.sub(r"^rounds = .*$", f"rounds = {ROUNDS}", text, flags=re.M)
    text = re.sub(r"^patience = .*$", "patience = 50", text, flags=re.M)
    text = re.sub(r"^trees_per_round = .*$", "trees_per_round = 3", text, flags=re.M)
    spec.write_text(text)
    return spec


def vertical_model(spec: Path) -> tuple[dict[str, str], list[dict[str, float]]]:
    """Per-party model hashes of the latest vertical manifest, and the round history."""
    models = spec.parent / "stores" / "coordinator" / "models"
    latest = json.loads((models / "latest.json").read_text())
    body = json.loads(Path(latest["manifest"]).read_text())
    hashes = {p: m["sha256"] for p, m in body["models"].items() if m}
    [state] = (spec.parent / "stores" / "A" / "checkpoints").glob("*-vertical-latest.json")
    return hashes, json.loads(state.read_text())["history"]


@pytest.fixture(scope="module")
def clean_vertical(
    prefect_api: str, retry_pool: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> object:
    from flows.vertical import vertical_training

    spec = write_vertical(tmp_path_factory.mktemp("clean-vertical"))
    result = vertical_training(str(spec))
    assert result.rounds_run == ROUNDS
    return vertical_model(spec)


@pytest.fixture(scope="module")
def clean_lossless(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from flows.horizontal import federated_training

    result = federated_training(
        str(write_spec(tmp_path_factory.mktemp("clean-ll"), mode="lossless"))
    )
    return hashlib.sha256(Path(result.model).read_bytes()).hexdigest()


def party_step_runs(deployment: str) -> list[object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        return list(
            client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    deployment_id=FlowRunFilterDeploymentId(any_=[found.id])
                )
            )
        )
