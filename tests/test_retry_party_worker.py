"""A party's worker killed while the party trains: the round falls below the quorum and the
run fails; a UI retry of the same run with a new worker ends with the uninterrupted model."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path
from uuid import uuid4

import pytest

from tests.retrying import (
    CleanRun,
    assert_uninterrupted,
    deployed_run,
    flow_run,
    party_step_runs,
    retry_like_the_ui,
    states_of,
    wait_final,
    write_spec,
)

pytestmark = pytest.mark.prefect


def test_killed_party_worker_fails_the_round_and_a_retry_gives_the_uninterrupted_model(
    prefect_api: str, retry_pool: tuple[str, Path], clean_model: CleanRun, tmp_path: Path
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
    # the timeout counts from a step's submission: on a loaded machine a pooled step's process
    # alone takes 20-30 s to start, and a step that legitimately outlasts it fails the run
    spec.write_text(text + "min_parties = 2\n\n[run]\nparty_timeout = 75\n")
    work_pool, _ = retry_pool
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

        deadline = time.monotonic() + 300  # a loaded machine starts pooled steps slowly
        while not p1_training():
            run = flow_run(run_id)
            assert run.state is None or not run.state.is_final(), (
                "the run ended before p1 trained:\n" + "\n".join(states_of(run_id))
            )
            assert time.monotonic() < deadline, "p1 never trained"
            time.sleep(0.25)  # each look is three requests; a step trains for seconds
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
    assert_uninterrupted(spec, clean_model, run_id)
