"""Retrying a killed training run is exactly-once: the flow run's process is SIGKILLed by the
test (after round k, or in the middle of a round), the worker marks the run Crashed, and the
*same* flow run is retried the way users do it (the UI's Retry button, ``prefect flow-run
retry``, ``fedfuse retry``). The retried run must give the model of an uninterrupted run,
byte for byte, with the round history 1..n and no repeats."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from tests.factories import write_synthetic
from tests.workers import running_worker

pytestmark = pytest.mark.prefect

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
def pool(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
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


@pytest.fixture(scope="module")
def clean_model(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """sha256 of the model an uninterrupted run exports (same data, its own stores)."""
    from flows.horizontal import federated_training

    result = federated_training(str(write_spec(tmp_path_factory.mktemp("clean"))))
    assert result.rounds_run == ROUNDS
    return hashlib.sha256(Path(result.model).read_bytes()).hexdigest()


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
    """SIGKILL the flow run's process as soon as ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    pid = None
    while not ready():
        run = flow_run(run_id)
        assert run.state is None or not run.state.is_final(), f"run ended first: {run.state}"
        assert time.monotonic() < deadline, "the run never got there"
        pid = run.infrastructure_pid or pid
        time.sleep(0.02)
    # the process id is read while waiting, so the kill follows ready() at once (an API call
    # in between can take seconds on a loaded machine, and a short run may finish meanwhile)
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
        time.sleep(0.3)


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


@pytest.mark.parametrize(
    ("where", "how"),
    [
        ("after-1", "ui"),
        ("after-2", "prefect-cli"),
        ("during-3", "fedfuse"),
        ("after-2", "ui"),
    ],
)
def test_retry_after_sigkill_gives_the_uninterrupted_model(
    prefect_api: str,
    pool: tuple[str, Path],
    clean_model: str,
    tmp_path: Path,
    where: str,
    how: str,
) -> None:
    spec = write_spec(tmp_path / "consortium")
    name = f"retry-{uuid4().hex[:6]}"
    work_pool, log = pool
    before = log.read_text().count(WORKER_DONE)
    run_id = deployed_run(spec, work_pool, name)
    kind, k = where.split("-")
    kill_when(run_id, (round_done if kind == "after" else round_started)(spec, int(k)))
    assert wait_final(run_id) == "CRASHED"
    worker_done(log, before)
    killed_at = checkpoint(spec)
    RETRIES[how](run_id, prefect_api)
    final = wait_final(run_id)
    assert final == "COMPLETED", "\n".join(states_of(run_id))
    done = checkpoint(spec)
    assert done is not None and killed_at is not None
    history = [r["round"] for r in done["rounds"]]  # type: ignore[index, union-attr]
    assert history == list(range(1, ROUNDS + 1)), history
    latest = json.loads(
        (spec.parent / "stores" / "coordinator" / "models" / "latest.json").read_text()
    )
    model = Path(latest["model"])
    assert hashlib.sha256(model.read_bytes()).hexdigest() == clean_model
    assert flow_run(run_id).run_count >= 2
    shutil.rmtree(spec.parent / ".fedfuse", ignore_errors=True)


# -- vertical rounds and lossless mode ---------------------------------------------------------


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
    prefect_api: str, pool: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> object:
    from flows.vertical import vertical_training

    spec = write_vertical(tmp_path_factory.mktemp("clean-vertical"))
    result = vertical_training(str(spec))
    assert result.rounds_run == ROUNDS
    return vertical_model(spec)


def test_vertical_retry_after_sigkill_gives_the_uninterrupted_model(
    prefect_api: str, pool: tuple[str, Path], clean_vertical: object, tmp_path: Path
) -> None:
    spec = write_vertical(tmp_path / "consortium")
    work_pool, log = pool
    before = log.read_text().count(WORKER_DONE)
    run_id = deployed_run(spec, work_pool, f"vretry-{uuid4().hex[:6]}", flow="vertical-training")
    folder = spec.parent / "stores" / "A" / "checkpoints"
    kill_when(run_id, lambda: any(folder.glob("*-vertical-r0001.json")))
    assert wait_final(run_id) == "CRASHED"
    worker_done(log, before)
    retry_like_the_ui(run_id, prefect_api)
    final = wait_final(run_id)
    assert final == "COMPLETED", "\n".join(states_of(run_id))
    hashes, history = vertical_model(spec)
    clean_hashes, clean_history = clean_vertical  # type: ignore[misc]
    assert hashes == clean_hashes  # every party's trees, byte for byte
    assert len(history) == len(clean_history) == ROUNDS
    # the validation metrics agree to the last bits (the worker's process and this one may
    # sum in another order); a repeated or skipped round would change them entirely
    for got, want in zip(history, clean_history, strict=True):
        assert got == pytest.approx(want, rel=1e-12)


@pytest.fixture(scope="module")
def clean_lossless(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from flows.horizontal import federated_training

    result = federated_training(
        str(write_spec(tmp_path_factory.mktemp("clean-ll"), mode="lossless"))
    )
    return hashlib.sha256(Path(result.model).read_bytes()).hexdigest()


def test_lossless_retry_after_sigkill_gives_the_uninterrupted_model(
    prefect_api: str, pool: tuple[str, Path], clean_lossless: str, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path / "consortium", mode="lossless")
    work_pool, log = pool
    before = log.read_text().count(WORKER_DONE)
    run_id = deployed_run(spec, work_pool, f"lretry-{uuid4().hex[:6]}")
    fused = spec.parent / "stores"
    # the parties' fused tables exist: training is under way (or about to be)
    kill_when(run_id, lambda: len(list(fused.glob("p*/fused/fused-*.parquet"))) == 2)
    assert wait_final(run_id) == "CRASHED"
    worker_done(log, before)
    retry_with_prefect_cli(run_id, prefect_api)
    final = wait_final(run_id)
    assert final == "COMPLETED", "\n".join(states_of(run_id))
    latest = json.loads((fused / "coordinator" / "models" / "latest.json").read_text())
    assert hashlib.sha256(Path(latest["model"]).read_bytes()).hexdigest() == clean_lossless


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


def test_killed_party_worker_fails_the_round_and_a_retry_gives_the_uninterrupted_model(
    prefect_api: str, pool: tuple[str, Path], clean_model: str, tmp_path: Path
) -> None:
    """Each party on its own pool and worker; p1's worker (and the step it runs) is
    SIGKILLed while p1 trains (a round's update, or an evaluation that trains the next).
    The coordinator gives up on that step after ``run.party_timeout``, the round falls below
    ``min_parties = 2`` and the run fails; with a new worker for p1, a UI retry of the same
    run redoes that round (p0's finished steps come from their cache) and ends with the
    uninterrupted run's model."""
    from tests.workers import start_worker, stop

    spec = write_spec(tmp_path / "consortium")
    tag = uuid4().hex[:6]
    pools = {"p0": f"p0-{tag}", "p1": f"p1-{tag}"}
    text = spec.read_text()
    for party, party_pool in pools.items():
        text = text.replace(
            f'store = "stores/{party}"\n', f'store = "stores/{party}"\nwork_pool = "{party_pool}"\n'
        )
    spec.write_text(text + "min_parties = 2\n\n[run]\nparty_timeout = 45\n")
    work_pool, _ = pool
    name = f"kw-{tag}"
    secret = os.environ["FEDFUSE_TEST_SECRET"]
    homes = tmp_path / "workers"
    p0, _ = start_worker(pools["p0"], homes / "p0", secret, prefect_api)
    p1, _ = start_worker(pools["p1"], homes / "p1", secret, prefect_api)
    try:
        run_id = deployed_run(spec, work_pool, name)

        def p1_training() -> bool:
            # a train step, or an evaluation (which trains the next round in the same run)
            return any(
                r.parameters["job"]["op"] in ("train", "evaluate")  # type: ignore[attr-defined]
                and r.state is not None  # type: ignore[attr-defined]
                and r.state.is_running()  # type: ignore[attr-defined]
                for r in party_step_runs(f"party-step/{name}-p1")
            )

        deadline = time.monotonic() + 600  # a loaded machine starts pooled steps slowly
        while not p1_training():
            assert time.monotonic() < deadline, "p1 never trained"
            time.sleep(0.05)
        os.killpg(p1.pid, signal.SIGKILL)  # the worker
        for r in party_step_runs(f"party-step/{name}-p1"):  # and the step it was running
            pid = getattr(r, "infrastructure_pid", None)
            if pid and r.state is not None and r.state.is_running():  # type: ignore[attr-defined]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(str(pid).rsplit(":", 1)[-1]), signal.SIGKILL)
        p1.wait()
        assert wait_final(run_id) == "FAILED"
        # p1's step (an update, or an evaluation with the next update) never came back:
        # that round falls below the quorum
        message = str(flow_run(run_id).state.message)
        assert re.search(
            r"round \d+: 1 (valid update\(s\)|evaluation\(s\)), min_parties is 2", message
        ), message
        p1, _ = start_worker(pools["p1"], homes / "p1-again", secret, prefect_api)
        retry_like_the_ui(run_id, prefect_api)
        final = wait_final(run_id)
        assert final == "COMPLETED", "\n".join(states_of(run_id))
    finally:
        stop(p0)
        stop(p1)
    done = checkpoint(spec)
    assert done is not None
    rounds = done["rounds"]  # type: ignore[index]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))  # type: ignore[index]
    assert all(sorted(m["party"] for m in r["members"]) == ["p0", "p1"] for r in rounds)  # type: ignore[index]
    latest = json.loads(
        (spec.parent / "stores" / "coordinator" / "models" / "latest.json").read_text()
    )
    assert hashlib.sha256(Path(latest["model"]).read_bytes()).hexdigest() == clean_model
