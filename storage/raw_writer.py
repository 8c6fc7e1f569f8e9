"""Writers for raw party exports (demo data): chunked CSV / Parquet / JSONL, atomic on close."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import tomli_w


class ChunkedWriter:
    """Append frames to one file; it appears under its final name only when closed cleanly."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.fmt = fmt
        self.tmp = path.with_name(f".{path.name}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: BinaryIO | None = None
        self._parquet: pq.ParquetWriter | None = None
        self._rows = 0

    def write(self, frame: pl.DataFrame) -> None:
        if self.fmt == "parquet":
            table = frame.to_arrow()
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.tmp, table.schema, compression="zstd")
            self._parquet.write_table(table.cast(self._parquet.schema))
        else:
            if self._handle is None:
                self._handle = self.tmp.open("wb")
            if self.fmt == "csv":
                frame.write_csv(self._handle, include_header=self._rows == 0)
            else:
                for row in frame.iter_rows(named=True):
                    record = {k: v for k, v in row.items() if not k.startswith("__")}
                    line = json.dumps(record, ensure_ascii=False, default=str)
                    self._handle.write(line.encode() + b"\n")
        self._rows += frame.height

    def write_lines(self, lines: list[bytes]) -> None:
        """Raw lines (CSV or JSONL) as exported, e.g. malformed ones."""
        if self._handle is None:
            self._handle = self.tmp.open("wb")
        for line in lines:
            self._handle.write(line.rstrip(b"\n") + b"\n")

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._handle is not None:
            self._handle.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._handle is not None:
            self._handle.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ChunkedWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_frame(path: Path, frame: pl.DataFrame, fmt: str) -> None:
    with ChunkedWriter(path, fmt) as writer:
        writer.write(frame)


def write_toml(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tomli_w.dumps(document, multiline_strings=False))
    tmp.replace(path)


def arrow_schema(frame: pl.DataFrame) -> pa.Schema:
    return frame.to_arrow().schema
