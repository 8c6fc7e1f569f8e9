"""Lossless mode across machines: each party's LightGBM process on its own pool, run by its
own process worker; the parties join through the coordinator store and learn each other's
addresses there. Three workers, started once for the module."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from tests.factories import write_synthetic
from tests.workers import start_worker, stop

pytestmark = pytest.mark.prefect

PARTIES = ("p0", "p1", "p2")
SECRET = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def party_pools(
    prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """Party -> its work pool, each polled by a process worker of its own."""
    from flows.ops import ensure_process_pool

    tag = uuid4().hex[:6]
    pools = {p: f"ll-{p}-{tag}" for p in PARTIES}
    os.environ["FEDFUSE_TEST_SECRET"] = SECRET
    homes = tmp_path_factory.mktemp("lossless-workers")
    workers = []
    try:
        for party, pool in pools.items():
            ensure_process_pool(pool)
            workers.append(start_worker(pool, homes / party, SECRET, prefect_api)[0])
        yield pools
    finally:
        for proc in workers:
            stop(proc)


def write_spec(root: Path, pools: dict[str, str]) -> Path:
    """Three small parties, lossless mode with consortium bins; each party on its pool, its
    LightGBM on a free port of this machine."""
    spec = write_synthetic(root, customers=600, parties=3)
    text = spec.read_text()
    for party, pool in pools.items():
        text = text.replace(
            f'store = "stores/{party}"\n',
            f'store = "stores/{party}"\nwork_pool = "{pool}"\nlossless_address = "127.0.0.1:0"\n',
        )
    text = re.sub(r"^rounds = .*$", "rounds = 3", text, flags=re.M)
    text += 'mode = "lossless"\nbins = "consortium"\nmin_sketch_rows = 50\n'
    # one results folder for the workers and this process: the sketches are cached steps
    text += f'\n[run]\nresults = "{root / "results"}"\n'
    spec.write_text(text)
    return spec


def party_runs(prefix: str, party: str) -> list[object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        return list(
            client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[f"{prefix}-{party}"])
                )
            )
        )


def test_parties_on_three_pools_train_the_in_process_lossless_model(
    party_pools: dict[str, str], tmp_path: Path
) -> None:
    from flows.horizontal import federated_training
    from flows.ops import deploy

    spec = write_spec(tmp_path / "consortium", party_pools)
    prefix = f"llp-{uuid4().hex[:6]}"
    deploy(spec, pool=f"{prefix}-coordinator", name=prefix, schedules=None)

    pooled = federated_training(str(spec), dispatch=prefix)
    pooled_model = Path(pooled.model).read_text()
    assert 1 <= pooled.best_round <= pooled.rounds_run <= 3
    # every party's lossless step ran on its own pool, once
    for party, pool in party_pools.items():
        steps = [
            r
            for r in party_runs(prefix, party)
            if (r.parameters.get("job") or {}).get("op") == "lossless"  # type: ignore[attr-defined]
        ]
        assert [r.work_pool_name for r in steps] == [pool], party  # type: ignore[attr-defined]
        assert steps[0].state.is_completed(), party  # type: ignore[attr-defined]
    # the mailbox in the coordinator store holds addresses, counts and the model; no rows
    coordinator = tmp_path / "consortium" / "stores" / "coordinator"
    mailbox = list((coordinator / "exchange").glob("lossless-*.json"))
    assert {m.name.split("-")[2] for m in mailbox} == set(PARTIES)
    raw_ids = [f"{p}-{i}".encode() for p in PARTIES for i in range(100, 237)]
    for path in mailbox:
        blob = path.read_bytes()
        assert not [k for k in raw_ids if k in blob], path
    assert not list(coordinator.rglob("*.parquet"))

    # the same spec with every party beside the flow: the very same model
    local = federated_training(str(spec))
    assert Path(local.model).read_text() == pooled_model
    assert (local.best_round, local.rounds_run) == (pooled.best_round, pooled.rounds_run)


def test_a_party_that_never_joins_fails_the_run_with_its_name(
    party_pools: dict[str, str], tmp_path: Path
) -> None:
    """p2's pool has no worker: its step never starts. After the join timeout the run fails
    naming p2 and p2's scheduled run is cancelled, so nothing waits on (that the parties
    which joined are stopped: ``tests/test_lossless.py``). No data is needed: p2 never
    reads any."""
    from flows.common import threads
    from flows.lossless import lossless_parties
    from flows.ops import deploy
    from storage.store import TableRef
    from tasks.horizontal.steps import TrainSetup
    from tasks.prepare.design import FeatureSchema
    from tasks.spec.load import load_spec

    spec_path = write_spec(tmp_path / "consortium", {"p2": f"nobody-{uuid4().hex[:6]}"})
    prefix = f"llj-{uuid4().hex[:6]}"
    deploy(spec_path, pool=f"{prefix}-coordinator", name=prefix, schedules=None)
    spec = load_spec(str(spec_path))
    setup = TrainSetup(
        party="p2",
        store=spec.party("p2").store,
        coordinator=spec.coordinator.store,
        run_key="join-test",
        fused=TableRef(uri=str(tmp_path / "none.parquet"), sha256="0" * 64, rows=0, columns={}),
        schema_=FeatureSchema(names=["x"], categorical=[], modality={}, parties={}),
        objective="binary",
        num_class=1,
        training=spec.training,
    )
    with pytest.raises(Exception, match=r"^party p2 did not join within 3 s$"):
        lossless_parties.with_options(task_runner=threads(1))(
            [setup], {"p2": prefix}, {"p2": "127.0.0.1:0"}, join_timeout=3
        )
    [run] = party_runs(prefix, "p2")
    assert run.state.is_cancelled()  # type: ignore[attr-defined]
