"""Retrying a killed vertical training run and a killed lossless run (the *same* flow run,
retried as users do) gives the uninterrupted run's model, byte for byte."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from uuid import uuid4

import pytest

from tests.retrying import (
    ROUNDS,
    WORKER_DONE,
    deployed_run,
    kill_when,
    retry_like_the_ui,
    retry_with_prefect_cli,
    states_of,
    vertical_model,
    wait_final,
    worker_done,
    write_spec,
    write_vertical,
)

pytestmark = pytest.mark.prefect


def test_vertical_retry_after_sigkill_gives_the_uninterrupted_model(
    prefect_api: str, retry_pool: tuple[str, Path], clean_vertical: object, tmp_path: Path
) -> None:
    spec = write_vertical(tmp_path / "consortium")
    work_pool, log = retry_pool
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


def test_lossless_retry_after_sigkill_gives_the_uninterrupted_model(
    prefect_api: str, retry_pool: tuple[str, Path], clean_lossless: str, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path / "consortium", mode="lossless")
    work_pool, log = retry_pool
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
