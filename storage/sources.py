"""Reading raw party sources (CSV, Parquet, JSONL, Arrow IPC) with errors that name the file.

Every frame returned carries a ``__row`` column: the 1-based data row (CSV: record after the
header; JSONL: line number; Parquet/Arrow: row index + 1), so rejections can name the row.
Invalid UTF-8 never raises mid-file: CSV bytes are decoded lossily and rows holding U+FFFD are
quarantined by preprocessing; undecodable JSONL lines come back in ``bad_lines``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import filesystem, is_uri

ROW = "__row"


class SourceError(ValueError):
    """A raw source cannot be read at all (missing, empty, unknown format, broken file)."""


@dataclass
class RawSource:
    frame: pl.DataFrame
    #: (row number, raw text, reason) for lines that could not be parsed at all
    bad_lines: list[tuple[int, str, str]] = field(default_factory=list)


def _open_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    if not fs.exists(path):
        raise SourceError(f"{location}: source file not found")
    if fs.isdir(path):
        raise SourceError(f"{location}: is a folder, expected a file")
    with fs.open(path, "rb") as handle:
        data: bytes = handle.read()
    return data


def read_source(location: str, fmt: str, *, encoding: str = "utf8") -> RawSource:
    """Read a raw source file into a frame of its own columns plus ``__row``."""
    if fmt == "parquet":
        return RawSource(_read_parquet(location))
    if fmt == "arrow":
        return RawSource(_read_arrow(location))
    if fmt == "csv":
        return _read_csv(location, encoding)
    if fmt == "jsonl":
        return _read_jsonl(location, encoding)
    raise SourceError(f"{location}: unknown format {fmt!r} (csv, parquet, jsonl, arrow)")


def _empty_check(location: str, frame: pl.DataFrame) -> pl.DataFrame:
    if frame.height == 0:
        raise SourceError(f"{location}: file holds no data rows")
    return frame.with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))


def _read_parquet(location: str) -> pl.DataFrame:
    if not is_uri(location):
        fs, path = filesystem(location)
        if not fs.exists(path):
            raise SourceError(f"{location}: source file not found")
        try:
            return _empty_check(location, pl.read_parquet(path))
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise SourceError(f"{location}: not a readable Parquet file ({exc})") from exc
    data = _open_bytes(location)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{location}: not a readable Parquet file ({exc})") from exc
    return _empty_check(location, pl.DataFrame(pl.from_arrow(table)))


def _read_arrow(location: str) -> pl.DataFrame:
    data = _open_bytes(location)
    try:
        frame = pl.read_ipc(io.BytesIO(data))
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SourceError(f"{location}: not a readable Arrow IPC file ({exc})") from exc
    return _empty_check(location, frame)


def _read_csv(location: str, encoding: str) -> RawSource:
    """All cells as text; rows with the wrong number of fields come back in ``bad_lines``."""
    import csv

    import numpy as np
    import pyarrow.csv as pacsv

    data = _open_bytes(location)
    if not data.strip():
        raise SourceError(f"{location}: file is empty")
    if encoding.lower().replace("-", "") in ("utf8", "utf8lossy"):
        # invalid bytes become U+FFFD: preprocessing quarantines those rows, naming the column
        data = data.decode("utf-8", errors="replace").encode()
    else:
        try:
            data = data.decode(encoding).encode()
        except (UnicodeDecodeError, LookupError) as exc:
            raise SourceError(f"{location}: cannot decode as {encoding} ({exc})") from exc
    header_line = data.split(b"\n", 1)[0].decode().rstrip("\r")
    names = next(csv.reader([header_line]))
    if len(set(names)) != len(names):
        raise SourceError(f"{location}: duplicate column names in the header {names}")
    bad: list[tuple[int, str, str]] = []

    def invalid(row: Any) -> str:
        number = int(row.number) - 1 if row.number is not None else -1
        bad.append(
            (
                number,
                str(row.text),
                f"expected {row.expected_columns} fields, found {row.actual_columns}",
            )
        )
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=True,
                null_values=[""],
            ),
        )
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{location}: malformed CSV ({exc})") from exc
    frame = pl.DataFrame(pl.from_arrow(table))
    if frame.height == 0 and not bad:
        raise SourceError(f"{location}: file holds no data rows")
    skipped = np.array(sorted(n for n, _, _ in bad), dtype=np.int64)
    rows = np.setdiff1d(np.arange(1, frame.height + len(bad) + 1, dtype=np.int64), skipped)
    frame = frame.with_columns(pl.Series(ROW, rows, dtype=pl.Int64)).select(ROW, *names)
    return RawSource(frame, bad)


def _read_jsonl(location: str, encoding: str) -> RawSource:
    data = _open_bytes(location)
    records: list[dict[str, object]] = []
    rows: list[int] = []
    bad: list[tuple[int, str, str]] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError as exc:
            bad.append(
                (number, line.decode("utf-8", "replace"), f"invalid {encoding} ({exc.reason})")
            )
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            bad.append((number, text, f"invalid JSON ({exc.msg})"))
            continue
        if not isinstance(record, dict):
            bad.append((number, text, "JSON line is not an object"))
            continue
        records.append(record)
        rows.append(number)
    if not records and not bad:
        raise SourceError(f"{location}: file holds no data rows")
    columns: dict[str, list[object]] = {}
    for i, record in enumerate(records):
        for key in record:
            columns.setdefault(key, [None] * len(records))
        for key, value in record.items():
            columns[key][i] = (
                value
                if value is None or isinstance(value, str)
                else json.dumps(value, ensure_ascii=False)
            )
    frame = pl.DataFrame(
        {key: pl.Series(key, values, dtype=pl.String) for key, values in columns.items()}
        | {ROW: pl.Series(ROW, rows, dtype=pl.Int64)}
    )
    return RawSource(frame.select(ROW, *columns), bad)
