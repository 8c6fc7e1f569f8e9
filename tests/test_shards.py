"""Entity-hash shards (``[run] shards``, ``engine``): the same fused tables, quarantines and
quality reports whatever the number of shards, on hand-made bad input through the pipeline's
steps and on the 3-party demo through the real prepare flow; a finished shard comes back from
its cache; a party's shards on a local Dask cluster of two worker processes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage.sources import ROW, read_source
from tasks.demo_data import write_demo_consortium
from tasks.prepare.shards import all_shards, shard_filter
from tasks.prepare.steps import FusedOutput, PartyContext, run_party
from tasks.spec.load import load_spec
from tasks.spec.models import SpecError
from tasks.types import REASON
from tests.factories import write_tiny
from tests.prefect_api import task_states

PARTIES = ("site-a", "site-b", "site-c")


def nasty_tiny(root: Path) -> Path:
    """The tiny consortium with bad input in every source of party a: a key twice where one
    row per entity is required (the second spelled differently), a missing key, a row with
    too many fields, an unparsable date and amount, exact duplicates far apart, a malformed
    JSONL line and one repeating a key, an event of a device the map does not know."""
    spec = write_tiny(root)
    raw = root / "raw" / "a"
    with (raw / "customers.csv").open("a", encoding="utf-8") as f:
        f.write("C5,yes,B,2025-05-01\n c5 ,no,P,2025-05-02\n,no,B,2025-01-01\n")
        f.write("C6,no,B,2025-01-01,extra\nC7,no,B,notadate\n")
    with (raw / "transactions.csv").open("a", encoding="utf-8") as f:
        f.write("C7,03/01/2026 09:30,abc,groc\nC5,03/02/2026 09:30,700,groc\n")
        f.write("C1,01/05/2026 10:00,1250,groc\nc5 ,03/03/2026 09:30,100,elec\n")
    with (raw / "feedback.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"user": "C5", "comment": "ok", "stars": 4, "at": "2026-03-05T10:00:00Z"}\n')
        f.write('{"user": "C6", "comment": "broken\n')
        f.write('{"user": "C7", "user": "C1", "comment": "two users"}\n')
    events = pl.read_parquet(raw / "events.parquet")
    extra = events.head(2).with_columns(pl.Series("dev", ["d9", "d2"]))
    pl.concat([events, extra]).write_parquet(raw / "events.parquet")
    return spec


def prepared(spec_path: Path, party: str, shards: int) -> FusedOutput:
    spec = load_spec(str(spec_path))
    return run_party(PartyContext.from_spec(spec, party), spec.party(party).sources, shards)


def rejected_frames(out: FusedOutput, store: Path) -> dict[str, pl.DataFrame]:
    """The quarantine of each source, read from the party's ``rejected/`` layer."""
    frames = {}
    for q in out.quality:
        files = sorted((store / "rejected").glob(f"{q.source}-*.parquet"))
        if q.rows_rejected:
            assert len(files) == 1, q.source
            frames[q.source] = pl.read_parquet(files[0])
    return frames


def test_shards_partition_the_entities_and_put_keyless_rows_first(
    tmp_path: Path, secret: str
) -> None:
    spec = load_spec(str(nasty_tiny(tmp_path)))
    source = spec.party("a").sources[1]  # transactions
    frame = read_source(str(tmp_path / "raw" / "a" / "transactions.csv"), "csv").frame
    keyless = frame.head(1).with_columns(
        pl.lit(None, pl.String).alias("cust"), pl.lit(99).alias(ROW)
    )
    frame = pl.concat([frame, keyless], how="vertical_relaxed")
    seen: list[list[int]] = []
    for shard in all_shards(3):
        keep = shard_filter(source, shard, entity="customer_id", normalisation="strip_lower")
        seen.append(frame.filter(keep)[ROW].to_list())
    rows = sorted(r for part in seen for r in part)
    assert rows == sorted(frame[ROW].to_list())  # every row in exactly one shard
    assert frame[ROW].to_list()[-1] in seen[0]  # the row without a key: the first shard
    keys = frame.select(pl.col(ROW), pl.col("cust").str.strip_chars().str.to_lowercase())
    for part in seen:  # an entity's rows (however spelled) all in one shard
        mine = set(keys.filter(pl.col(ROW).is_in(part))["cust"].drop_nulls())
        rest = set(keys.filter(~pl.col(ROW).is_in(part))["cust"].drop_nulls())
        assert not mine & rest


@pytest.mark.parametrize("shards", [2, 7])
def test_shards_give_the_same_fused_table_quarantine_and_report(
    tmp_path: Path, secret: str, shards: int
) -> None:
    whole_root, sharded_root = tmp_path / "whole", tmp_path / "sharded"
    nasty_tiny(whole_root)
    shutil.copytree(whole_root, sharded_root)
    whole = prepared(whole_root / "spec.toml", "a", 1)
    sharded = prepared(sharded_root / "spec.toml", "a", shards)

    assert sharded.table.sha256 == whole.table.sha256
    assert sharded.features == whole.features
    reports = [q.model_dump(exclude={"file"}) for q in whole.quality]
    assert [q.model_dump(exclude={"file"}) for q in sharded.quality] == reports
    by_source = {r["source"]: r for r in reports}
    # the bad input is there, counted as in the whole file
    assert by_source["customers"]["rejected_by_reason"] == {
        "column 'CustID' (customer_id): required value missing": 1,
        "column 'Joined' (signup): cannot parse": 1,
        "duplicate key (one row per entity required)": 2,
        "expected 4 fields, found 5": 1,
    }
    assert by_source["transactions"]["duplicates_removed"] == 2
    assert by_source["feedback"]["rows_rejected"] == 2
    assert by_source["iot"]["rejected_by_reason"] == {"device not in entity map": 1}
    whole_rejected = rejected_frames(whole, whole_root / "stores" / "a")
    sharded_rejected = rejected_frames(sharded, sharded_root / "stores" / "a")
    assert sorted(sharded_rejected) == sorted(whole_rejected) == sorted(by_source)
    for name, frame in whole_rejected.items():  # the file's row numbers and reasons
        assert_frame_equal(sharded_rejected[name], frame, check_exact=True)
    reasons = whole_rejected["customers"][ROW, REASON].rows()
    assert (5, "duplicate key in column 'CustID' (rows 5, 6): one row per entity required") in [
        (r, why) for r, why in reasons
    ]
    dupes = whole_rejected["transactions"].filter(pl.col(ROW) == 9)
    assert dupes[REASON].to_list() == ["exact duplicate of row 1"]
    layer = sharded_root / "stores" / "a" / "clean"
    assert len(list(layer.glob(f"transactions.shard-*-of-{shards}-*.parquet"))) == shards
    # every file was split once (each shard read its own rows), no part left
    split = sharded_root / "stores" / "a" / "split"
    for name in ("customers", "transactions", "feedback", "iot"):
        assert len(list(split.glob(f"{name}.shard-*-of-{shards}-*.parquet"))) == shards
    assert not list(split.glob("*.part-*")) and not list(split.glob(".*.tmp"))


def write_demo(root: Path, run: str, *, text_model: bool = True) -> Path:
    spec = Path(write_demo_consortium(str(root), parties=3, customers=200, seed=5))
    if not text_model:  # a party's pipeline run alone has no consortium text model to read
        spec.write_text(spec.read_text().replace("[text]\nmodel = true", "[text]\nmodel = false"))
    with spec.open("a", encoding="utf-8") as handle:
        handle.write(f"\n[run]\n{run}\n")
    return spec


@pytest.fixture
def demo_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDFUSE_SECRET", "0123456789abcdef0123456789abcdef")


def same_outputs(a: dict[str, FusedOutput], b: dict[str, FusedOutput]) -> None:
    assert list(a) == list(b) == list(PARTIES)
    for party in PARTIES:
        assert a[party].table.sha256 == b[party].table.sha256, party
        assert a[party].features == b[party].features
        assert [q.model_dump(exclude={"file"}) for q in a[party].quality] == [
            q.model_dump(exclude={"file"}) for q in b[party].quality
        ]


@pytest.mark.prefect
def test_prepare_with_1_and_4_shards_gives_identical_fused_tables_and_a_rerun_is_cached(
    prefect_api: str, tmp_path: Path, demo_secret: None
) -> None:
    from flows.prepare import prepare

    one = write_demo(tmp_path / "one", "shards = 1")
    four = write_demo(tmp_path / "four", "shards = 4")
    whole = prepare(str(one))
    state = prepare(str(four), return_state=True)
    sharded = state.result()
    same_outputs(whole, sharded)
    assert any(q.rows_rejected for out in whole.values() for q in out.quality)
    shards = task_states(state.state_details.flow_run_id)["prepare-shard"]
    assert len(shards) == 3 * 4 * 4 and set(shards) == {"Completed"}  # parties x sources x 4
    for party in PARTIES:
        clean = tmp_path / "four" / "stores" / party / "clean"
        assert len(list(clean.glob("*.shard-4-of-4-*.parquet"))) >= 1
        report = json.loads(
            (tmp_path / "four" / "stores" / party / "reports" / "quality.json").read_text()
        )
        assert [r["rows_in"] for r in report] == [q.rows_in for q in whole[party].quality]

    again = prepare(str(four), return_state=True)  # a new run: every shard from its cache
    same_outputs(again.result(), sharded)
    shards = task_states(again.state_details.flow_run_id)["prepare-shard"]
    assert len(shards) == 3 * 4 * 4 and set(shards) == {"Cached"}


@pytest.mark.prefect
def test_a_partys_shards_run_on_a_local_dask_cluster(
    prefect_api: str, tmp_path: Path, demo_secret: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import Client, LocalCluster, get_task_stream

    from flows.prepare import party_pipeline

    monkeypatch.setenv("PREFECT_API_URL", prefect_api)  # the workers report their task runs
    here = write_demo(tmp_path / "here", "shards = 1", text_model=False)
    expected = prepared(here, "site-c", 1)  # whole sources, in process
    with (
        LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        monkeypatch.setenv("FEDFUSE_TEST_DASK", cluster.scheduler_address)
        there = write_demo(
            tmp_path / "there",
            'shards = 2\nengine = "dask"\ndask_address_env = "FEDFUSE_TEST_DASK"',
            text_model=False,
        )
        with get_task_stream(client) as stream:
            fused = party_pipeline(str(there), "site-c")
    ran = [t for t in stream.data if str(t.get("key", "")).startswith("run_shard-")]
    assert len(ran) == 4 * 2  # every source's two shards, on the cluster's workers
    assert fused.table.sha256 == expected.table.sha256
    assert [q.model_dump(exclude={"file"}) for q in fused.quality] == [
        q.model_dump(exclude={"file"}) for q in expected.quality
    ]


def test_engine_keys_are_checked_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.engines import EngineError, dask_address

    path = write_tiny(tmp_path)
    base = path.read_text()

    def with_run(run: str) -> str:
        path.write_text(base + f"\n[run]\n{run}\n")
        return str(path)

    def problem(run: str) -> str:
        with pytest.raises(SpecError) as err:
            load_spec(with_run(run))
        return str(err.value)

    assert "run" in problem('engine = "dask"') and "dask_address" in problem('engine = "dask"')
    assert "run.shards" in problem("shards = 0")
    assert "run.shards" in problem('shards = "4"')
    assert "run.engine" in problem('engine = "ray"')
    assert "run.dask_address" in problem('engine = "dask"\ndask_address = "http://x"')
    assert "set engine = 'dask'" in problem('dask_address = "tcp://10.0.0.5:8786"')
    spec = load_spec(
        with_run('shards = 8\nengine = "dask"\ndask_address_env = "FEDFUSE_NO_SUCH_VAR"')
    )
    monkeypatch.delenv("FEDFUSE_NO_SUCH_VAR", raising=False)
    with pytest.raises(EngineError, match="FEDFUSE_NO_SUCH_VAR is not set"):
        dask_address(spec.run)
