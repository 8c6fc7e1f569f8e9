"""Retrying a killed training run is exactly-once: the flow run's process is SIGKILLed by the
test (after round k, or in the middle of a round), the worker marks the run Crashed, and the
*same* flow run is retried the way users do it (the UI's Retry button, ``prefect flow-run
retry``, ``fedfuse retry``). The retried run must give the model of an uninterrupted run,
byte for byte, with the round history 1..n and no repeats."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from uuid import uuid4

import pytest

from tests.retrying import (
    RETRIES,
    ROUNDS,
    WORKER_DONE,
    checkpoint,
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
    retry_pool: tuple[str, Path],
    clean_model: str,
    tmp_path: Path,
    where: str,
    how: str,
) -> None:
    spec = write_spec(tmp_path / "consortium")
    name = f"retry-{uuid4().hex[:6]}"
    work_pool, log = retry_pool
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
