"""Retrying a killed training run is exactly-once: the flow run's process is SIGKILLed by the
test (after round k, or in the middle of a round), the worker marks the run Crashed, and the
*same* flow run is retried the way users do it (the UI's Retry button, ``prefect flow-run
retry``, ``fedfuse retry``), three times over. The retried run must give the model of an
uninterrupted run, byte for byte, with the round history 1..n, no repeats and every round's
updates those of the uninterrupted run."""

from __future__ import annotations

import shutil
from pathlib import Path
from uuid import uuid4

import pytest

from tests.retrying import (
    RETRIES,
    WORKER_DONE,
    CleanRun,
    assert_uninterrupted,
    deployed_run,
    flow_run,
    kill_when,
    round_done,
    round_started,
    states_of,
    wait_final,
    worker_done,
    write_spec,
)

pytestmark = pytest.mark.prefect


#: where the run is killed and how it is retried, in order, all on one flow run: after round
#: 1's checkpoint (the UI's Retry), in the middle of round 3 (``fedfuse retry``), after round 4
#: (``prefect flow-run retry``); each retry resumes where the last attempt left off
KILLS = [("after", 1, "ui"), ("during", 3, "fedfuse"), ("after", 4, "prefect-cli")]


def test_a_run_killed_three_times_and_retried_each_way_gives_the_uninterrupted_model(
    prefect_api: str, retry_pool: tuple[str, Path], clean_model: CleanRun, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path / "consortium")
    name = f"retry-{uuid4().hex[:6]}"
    work_pool, log = retry_pool
    run_id = deployed_run(spec, work_pool, name)
    for kind, k, how in KILLS:
        before = log.read_text().count(WORKER_DONE)
        kill_when(run_id, (round_done if kind == "after" else round_started)(spec, k))
        assert wait_final(run_id) == "CRASHED", f"{kind} round {k}"
        worker_done(log, before)
        RETRIES[how](run_id, prefect_api)
    final = wait_final(run_id)
    assert final == "COMPLETED", "\n".join(states_of(run_id))
    assert_uninterrupted(spec, clean_model, run_id)
    assert flow_run(run_id).run_count >= len(KILLS) + 1
    shutil.rmtree(spec.parent / ".fedfuse", ignore_errors=True)
