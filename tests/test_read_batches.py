"""CSV and JSONL sources are read in line-aligned batches (``read_source(batch_bytes=)``):
whatever the batch size, the frame, its row numbers and the unparsable lines are those of a
read in one batch, and a shard's rows (``keep``) are the whole read's rows filtered."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from storage.sources import ROW, CsvLayout, RawSource, read_source

#: From one byte (every line its own batch) to larger than the file (one batch).
SIZES = [1, 5, 17, 64, 200, 1 << 20]

CSV_LINES = [
    "id,name,amount",
    "c1,alpha,1.5",
    "c2,beta",  # too few fields
    'c3,"gamma, delta",2',  # a quoted delimiter
    "c4,epsilon,3,extra",  # too many fields
    "c5,,4",  # an empty cell
    "c6,zeta-\xe9\u4e2d\u6587,5",  # non-ASCII text
    "c7,eta,NA",
    "c8,theta,6",
]


def _csv(path: Path, *, bad_utf8: bool = False) -> Path:
    data = ("\n".join(CSV_LINES) + "\n").encode()
    if bad_utf8:
        data = data.replace(b"eta,NA", b"e\xfft\xc3a,NA")
    path.write_bytes(b"\xef\xbb\xbf" + data)
    return path


def _jsonl(path: Path) -> Path:
    lines = [
        json.dumps({"id": "c1", "text": "first"}),
        "",  # a blank line
        "{not json",
        json.dumps({"id": "c2", "text": "second", "late": 1}),  # a column first seen here
        "[1, 2]",  # not an object
        '{"id": "c3", "id": "c3b", "text": "repeated key"}',  # refused: a key twice
        json.dumps({"id": "c4", "text": "fourth \u4e2d\u6587"}),
        b"\xff\xfe".decode("latin-1"),  # bytes that are not UTF-8 (written below)
        json.dumps({"id": "c5", "text": "fifth"}),
    ]
    body = "\n".join(lines).encode("utf-8").replace("ÿþ".encode(), b'{"id": "c\xff"}') + b"\n"
    path.write_bytes(body)
    return path


def _same(got: RawSource, want: RawSource) -> None:
    assert_frame_equal(got.frame, want.frame)
    assert got.bad_lines == want.bad_lines


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bad_utf8", [False, True])
def test_csv_batches_read_as_one(tmp_path: Path, size: int, bad_utf8: bool) -> None:
    path = str(_csv(tmp_path / "t.csv", bad_utf8=bad_utf8))
    layout = CsvLayout(null_values=("NA",))
    whole = read_source(path, "csv", csv=layout)
    assert whole.frame.height == 6 and len(whole.bad_lines) == 2
    _same(read_source(path, "csv", csv=layout, batch_bytes=size), whole)


@pytest.mark.parametrize("size", SIZES)
def test_jsonl_batches_read_as_one(tmp_path: Path, size: int) -> None:
    path = str(_jsonl(tmp_path / "t.jsonl"))
    whole = read_source(path, "jsonl")
    assert whole.frame[ROW].to_list() == [1, 4, 7, 9]
    assert [n for n, _, _ in whole.bad_lines] == [3, 5, 6, 8]
    _same(read_source(path, "jsonl", batch_bytes=size), whole)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_shard_is_the_whole_read_filtered(tmp_path: Path, size: int, fmt: str) -> None:
    path = str(_csv(tmp_path / "t.csv") if fmt == "csv" else _jsonl(tmp_path / "t.jsonl"))
    keep = pl.col("id").is_in(["c2", "c4", "c5"])
    whole = read_source(path, fmt)
    part = read_source(path, fmt, keep=keep, batch_bytes=size)
    assert part.selected
    assert_frame_equal(part.frame, whole.frame.filter(keep))
    assert part.bad_lines == whole.bad_lines


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_table_files_in_batches_read_as_one(tmp_path: Path, fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import ipc

    from storage.sources import read_batches

    table = pa.table({"id": [f"c{i}" for i in range(10)], "v": [float(i) for i in range(10)]})
    path = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=3)
    else:
        with ipc.new_file(path, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=4):
                writer.write_batch(batch)
    whole = read_source(str(path), fmt)
    _same(read_batches(str(path), fmt).collect(None), whole)


def test_invalid_utf8_parquet_is_not_batched(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.sources import NotBatchable, read_batches

    cells = pa.array([b"ok", b"bad\xff"], pa.binary()).view(pa.string())
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["c1", "c2"], "name": cells}), path)
    with pytest.raises(NotBatchable):
        list(read_batches(str(path), "parquet").frames)
    assert read_source(str(path), "parquet").frame.height == 2  # read whole, cells flagged


def test_a_split_sweeps_the_parts_a_killed_split_left(tmp_path: Path) -> None:
    import os

    from storage.sources import read_batches
    from storage.splits import read_split, split_batches
    from storage.store import STALE_TMP_SECONDS, Store

    store = Store(str(tmp_path / "store"))
    stale = store.write_table(pl.DataFrame({"x": [1]}), "split", "t.part-0-1")
    old = Path(stale.uri).stat().st_mtime - STALE_TMP_SECONDS - 1
    os.utime(stale.uri, (old, old))
    path = str(_csv(tmp_path / "t.csv"))
    route = pl.when(pl.col("id").is_in(["c1", "c3"])).then(1).otherwise(0)
    split = split_batches(read_batches(path, "csv", batch_bytes=17), route, 2, store, "t")
    assert not Path(stale.uri).exists()
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "store" / "split").iterdir()) == [
        "t.bad",
        "t.shard",
        "t.shard",
    ]
    whole = read_source(path, "csv")
    got = pl.concat([read_split(split, 0).frame, read_split(split, 1).frame]).sort(ROW)
    assert_frame_equal(got, whole.frame)
    assert read_split(split, 0).bad_lines == whole.bad_lines
    assert read_split(split, 1).bad_lines == []
