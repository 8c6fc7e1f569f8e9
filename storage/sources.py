"""Reading raw party sources (CSV, Parquet, JSONL, Arrow IPC) with errors that name the file.

Every frame returned carries a ``__row`` column: the 1-based data row (CSV: record after the
header, not counting the skipped preamble lines, comment lines and blank lines; JSONL: line
number; Parquet/Arrow: row index + 1), so rejections can name the row. A UTF-8 byte-order
mark at the start of a CSV or JSONL file is dropped. A CSV file's layout (header or given
names, delimiter, missing-value texts, preamble, comments, quoting) is a :class:`CsvLayout`.

Invalid UTF-8 never raises mid-file. CSV, Parquet and Arrow: the invalid bytes themselves are
found (a text that merely holds U+FFFD, the replacement character, is valid and kept), the
cells holding them are decoded lossily, and the frame gets a column ``__invalid_utf8`` listing
per row the columns with invalid bytes (only when there are any); preprocessing quarantines
those rows naming the column. Undecodable JSONL lines come back in ``bad_lines``, as do JSONL
lines that are not one JSON object or repeat a key inside one object.

JSONL is parsed by polars in blocks of lines, every value kept as text (a nested value as its
JSON text); a block that fails is halved until the failing lines stand alone, and only those
(plus lines that are not an object or may repeat a key) go through Python's JSON parser, which
names the reason.

A source that is a folder of files is listed by :func:`read_folder`: its files' relative
paths and sizes, each read on demand (:meth:`FolderFile.read`), within limits on the number
of files and the size of each.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from storage.files import filesystem, is_uri, lies_within, real_location
from storage.store import FolderError, folder_files

ROW = "__row"
#: Per row, the columns whose cells held invalid UTF-8 (present only when some did).
INVALID_UTF8 = "__invalid_utf8"

_BOM = b"\xef\xbb\xbf"
_FFFD = "\ufffd"
#: Noncharacters: valid UTF-8 that stands in for genuine U+FFFD while invalid bytes are found.
_SENTINELS = ("\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3", "\U0010fffe", "\U0010ffff")


#: Bytes of a CSV or JSONL file read at a time (a batch ends at a line's end).
READ_BATCH = 1 << 24


#: Rows per batch of a Parquet file read in batches.
READ_BATCH_ROWS = 1 << 20


class NotBatchable(Exception):
    """A file the batch reader cannot take as it is (invalid UTF-8 in a Parquet or Arrow
    string column): the caller reads it whole instead."""


class SourceError(ValueError):
    """A raw source cannot be read at all (missing, empty, unknown format, broken file)."""


@dataclass
class RawSource:
    frame: pl.DataFrame
    #: (row number, raw text, reason) for lines that could not be parsed at all
    bad_lines: list[tuple[int, str, str]] = field(default_factory=list)
    #: Whether ``frame`` holds only the rows the read's ``keep`` expression selected (a
    #: reader that cannot select while it reads returns every row, and the caller filters).
    selected: bool = False


def read_head(location: str, limit: int | None = None) -> tuple[bytes, bool]:
    """The file's bytes, or its first ``limit`` bytes, and whether the file is longer."""
    fs, path = filesystem(location)
    if not fs.exists(path):
        raise SourceError(f"{location}: source file not found")
    if fs.isdir(path):
        raise SourceError(f"{location}: is a folder, expected a file")
    with fs.open(path, "rb") as handle:
        data: bytes = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        return data[:limit], True
    return data, False


def _open_bytes(location: str, max_bytes: int | None = None) -> bytes:
    """The file's bytes; with ``max_bytes``, at most that many, ending at the last whole
    line when the file is longer."""
    data, truncated = read_head(location, max_bytes)
    return data[: data.rfind(b"\n") + 1] if truncated else data


@dataclass(frozen=True)
class CsvLayout:
    """How a CSV file is laid out (the spec's ``csv`` options, checked there)."""

    header: bool = True
    #: Column names in file order: the file has no header, or they replace it.
    names: tuple[str, ...] | None = None
    delimiter: str = ","
    #: Cell texts read as missing, besides the empty cell.
    null_values: tuple[str, ...] = ()
    #: Lines dropped before the header.
    skip_rows: int = 0
    #: Lines starting with it are dropped.
    comment_prefix: str | None = None
    #: "" for none.
    quote_char: str = '"'


def read_source(
    location: str,
    fmt: str,
    *,
    encoding: str = "utf8",
    csv: CsvLayout | None = None,
    max_bytes: int | None = None,
    keep: pl.Expr | None = None,
    batch_bytes: int = READ_BATCH,
) -> RawSource:
    """Read a raw source file into a frame of its own columns plus ``__row``; a CSV file
    with ``max_bytes`` only up to the last whole line within them (a sample of it).

    ``keep``: an expression over the file's columns (and ``__row``) selecting the rows
    wanted (a shard of the file). Local Parquet and Arrow files are scanned by polars'
    streaming engine; CSV and JSONL files are read in batches of about ``batch_bytes``
    (each ending at a line's end), each batch filtered as it is read: either way only the
    selected rows are ever held (``selected``). Other files are read whole and every row
    returned, for the caller to filter. A column ``keep`` needs that a CSV or JSONL file
    lacks is missing for it (its rows have no key). Row numbers are the file's either way,
    and a file holding no rows at all is refused as without ``keep``."""
    if keep is not None and fmt in ("parquet", "arrow") and not is_uri(location):
        selected = _scan_selected(location, fmt, keep)
        if selected is not None:
            return RawSource(selected, selected=True)
    if fmt == "parquet":
        return RawSource(_read_parquet(location))
    if fmt == "arrow":
        return RawSource(_read_arrow(location))
    if fmt == "csv":
        return _read_csv(location, encoding, csv or CsvLayout(), max_bytes, keep, batch_bytes)
    if fmt == "jsonl":
        return _read_jsonl(location, encoding, keep, batch_bytes)
    raise SourceError(f"{location}: unknown format {fmt!r} (csv, parquet, jsonl, arrow)")


#: Default limits of a folder source: files matched, bytes per file.
MAX_FOLDER_FILES = 100_000
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class FolderFile:
    """One file of a folder source: its path relative to the folder (POSIX), its size, where
    it lies and its position in the sorted listing; its bytes are read by :meth:`read`.

    Errors name the file by position, never by name: a file name may be an entity id."""

    path: str
    size: int
    uri: str
    folder: str
    max_bytes: int
    position: int = 0

    @property
    def shown(self) -> str:
        """How errors name the file: its position in the folder's sorted listing."""
        return f"file {self.position} (in path order)"

    @property
    def oversized(self) -> bool:
        """Whether the file is larger than the listing's limit (:meth:`read` refuses it)."""
        return self.size > self.max_bytes

    def read(self) -> bytes:
        """The file's bytes. Refused with :class:`SourceError` naming the file by position
        when it is over the size limit, or has become a symbolic link, or leads
        outside the folder since it was listed."""
        if self.oversized:
            raise SourceError(
                f"{self.folder}: {self.shown} holds {self.size} bytes, over the limit of "
                f"{self.max_bytes} bytes per file"
            )
        fs, path = filesystem(self.uri)
        if is_uri(self.uri) and not self.uri.lower().startswith(("file://", "local://")):
            with fs.open(path, "rb") as handle:
                data: bytes = handle.read(self.max_bytes + 1)
        else:
            if not lies_within(real_location(path), real_location(self.folder)):
                raise SourceError(f"{self.folder}: {self.shown} leads outside the folder")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError as exc:
                if Path(path).is_symlink():
                    raise SourceError(
                        f"{self.folder}: {self.shown} is a symbolic link; a folder source "
                        "holds plain files and folders only"
                    ) from None
                raise SourceError(
                    f"{self.folder}: {self.shown} cannot be read ({type(exc).__name__})"
                ) from None
            with os.fdopen(fd, "rb") as handle:
                data = handle.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise SourceError(
                f"{self.folder}: {self.shown} grew over the limit of {self.max_bytes} bytes "
                "per file since it was listed"
            )
        return data


@dataclass(frozen=True)
class FolderListing:
    """The files of a folder source matching a pattern, sorted by relative path."""

    location: str
    pattern: str
    files: list[FolderFile]


def read_folder(
    location: str,
    pattern: str = "*",
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_files: int = MAX_FOLDER_FILES,
) -> FolderListing:
    """List the files of a folder source whose relative paths match ``pattern`` (``fnmatch``
    on the POSIX path relative to the folder; ``*`` crosses subfolders). Nothing is read
    yet: each :class:`FolderFile` reads its bytes on demand, refusing more than
    ``max_bytes``. Refused with :class:`SourceError` naming the folder (and the entry): a
    missing folder or a file in its place, a pattern or an entry leading outside it (``..``,
    absolute), a symbolic link inside it, no matching file, more than ``max_files``."""
    parts = pattern.replace("\\", "/").split("/")
    if pattern.startswith("/") or ".." in parts:
        raise SourceError(f"{location}: file pattern {pattern!r} leads outside the folder")
    fs, path = filesystem(location)
    if not fs.exists(path):
        raise SourceError(f"{location}: source folder not found")
    if not fs.isdir(path):
        raise SourceError(f"{location}: is a file, expected a folder of files")
    try:
        entries = folder_files(location)
    except FolderError as exc:
        raise SourceError(str(exc)) from None
    matched = [(rel, entry) for rel, entry in entries if fnmatch.fnmatchcase(rel, pattern)]
    for rel, _ in matched:
        if ".." in rel.split("/"):
            raise SourceError(f"{location}: holds an entry leading outside the folder")
    if not matched:
        raise SourceError(
            f"{location}: folder holds no file matching {pattern!r} ({len(entries)} file(s) in all)"
        )
    if len(matched) > max_files:
        raise SourceError(
            f"{location}: folder holds {len(matched)} files matching {pattern!r}, more than "
            f"the limit of {max_files}"
        )
    files = [
        FolderFile(
            path=rel,
            size=int(fs.size(entry)),
            uri=entry if not is_uri(location) else _entry_uri(location, path, entry),
            folder=location,
            max_bytes=max_bytes,
            position=position,
        )
        for position, (rel, entry) in enumerate(matched, start=1)
    ]
    return FolderListing(location=location, pattern=pattern, files=files)


def _entry_uri(location: str, root: str, entry: str) -> str:
    """An entry's URI under the folder's (``entry``: its path in the file system)."""
    return location.rstrip("/") + entry[len(root.rstrip("/")) :]


def _empty_check(location: str, frame: pl.DataFrame) -> pl.DataFrame:
    if frame.height == 0:
        raise SourceError(f"{location}: file holds no data rows")
    return frame.with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))


def _is_utf8_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "utf8" in text or "utf-8" in text


def _invalid_positions(chunk: pa.Array, start: int, stop: int, out: list[int]) -> None:
    """Indices in ``[start, stop)`` of the string cells of ``chunk`` that are not valid UTF-8:
    Arrow's own full validation over halves, so the cost follows the invalid cells."""
    try:
        chunk.slice(start, stop - start).validate(full=True)
    except pa.ArrowInvalid:
        if stop - start == 1:
            out.append(start)
            return
        middle = (start + stop) // 2
        _invalid_positions(chunk, start, middle, out)
        _invalid_positions(chunk, middle, stop, out)


def _utf8_checked(table: pa.Table) -> pl.DataFrame:
    """The table as polars: string cells holding invalid UTF-8 are decoded lossily and their
    columns listed per row in :data:`INVALID_UTF8` (polars must never see invalid strings)."""
    import numpy as np
    import pyarrow.compute as pc

    flags: dict[str, Any] = {}
    for index, name in enumerate(table.column_names):
        column = table.column(index)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        bad: list[int] = []
        offset = 0
        for chunk in column.chunks:
            found: list[int] = []
            if len(chunk):
                _invalid_positions(chunk, 0, len(chunk), found)
            bad += [offset + i for i in found]
            offset += len(chunk)
        if not bad:
            continue
        whole = column.combine_chunks()
        large = pa.types.is_large_string(whole.type)
        binary = whole.view(pa.large_binary() if large else pa.binary())
        mask = np.zeros(len(whole), dtype=bool)
        mask[bad] = True
        lossy = [binary[i].as_py().decode("utf-8", "replace").encode() for i in bad]
        repaired = pc.replace_with_mask(binary, pa.array(mask), pa.array(lossy, binary.type))
        table = table.set_column(index, name, repaired.cast(whole.type))
        flags[name] = mask
    frame = pl.DataFrame(pl.from_arrow(table))
    if not flags:
        return frame
    listed = [pl.when(pl.lit(pl.Series(mask))).then(pl.lit(name)) for name, mask in flags.items()]
    return frame.with_columns(pl.concat_list(listed).list.drop_nulls().alias(INVALID_UTF8))


def _read_parquet(location: str) -> pl.DataFrame:
    if not is_uri(location):
        fs, path = filesystem(location)
        if not fs.exists(path):
            raise SourceError(f"{location}: source file not found")
        try:
            return _empty_check(location, pl.read_parquet(path))
        except (pl.exceptions.PolarsError, OSError) as exc:
            # the reader's own message is not shown (nor chained): it may quote the file
            if not _is_utf8_error(exc):
                raise SourceError(
                    f"{location}: not a readable Parquet file ({type(exc).__name__})"
                ) from None
            # invalid UTF-8 in a string column: read by Arrow, the cells found below
    data = _open_bytes(location)
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(
            f"{location}: not a readable Parquet file ({type(exc).__name__})"
        ) from None
    return _empty_check(location, _utf8_checked(table))


def _scan_selected(location: str, fmt: str, keep: pl.Expr) -> pl.DataFrame | None:
    """The rows of a local Parquet or Arrow file that ``keep`` selects, scanned in streaming
    mode; ``None`` when the scan cannot do it (a missing or unreadable file, invalid UTF-8,
    a column ``keep`` needs missing): the whole-file reader then names the problem, or
    returns the rows for the caller to filter, and the pipeline's checks name the column."""
    _, path = filesystem(location)
    if not Path(path).is_file():
        return None
    try:
        scan = pl.scan_parquet(path) if fmt == "parquet" else pl.scan_ipc(path)
        names = set(scan.collect_schema().names())
        if not set(keep.meta.root_names()) <= names | {ROW}:
            return None
        if scan.select(pl.len()).collect().item() == 0:
            raise SourceError(f"{location}: file holds no data rows")
        return (
            scan.with_row_index(ROW, offset=1)
            .with_columns(pl.col(ROW).cast(pl.Int64))
            .filter(keep)
            .collect(engine="streaming")
        )
    except (pl.exceptions.PolarsError, OSError, pa.ArrowException):
        return None


def _read_arrow(location: str) -> pl.DataFrame:
    data = _open_bytes(location)
    try:
        frame = pl.read_ipc(io.BytesIO(data))
    except (pl.exceptions.PolarsError, OSError) as exc:
        if not _is_utf8_error(exc):
            raise SourceError(
                f"{location}: not a readable Arrow IPC file ({type(exc).__name__})"
            ) from None
        frame = _read_arrow_checked(location, data)  # invalid UTF-8: found per cell
    return _empty_check(location, frame)


def _read_arrow_checked(location: str, data: bytes) -> pl.DataFrame:
    from pyarrow import ipc

    try:
        table = ipc.open_file(io.BytesIO(data)).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(
            f"{location}: not a readable Arrow IPC file ({type(exc).__name__})"
        ) from None
    return _utf8_checked(table)


def _first_fields(data: bytes, layout: CsvLayout) -> list[str]:
    """The fields of the first line (the header, or the first data row)."""
    import csv

    line = data.split(b"\n", 1)[0].decode().rstrip("\r")
    if layout.quote_char:
        reader = csv.reader([line], delimiter=layout.delimiter, quotechar=layout.quote_char)
    else:
        reader = csv.reader([line], delimiter=layout.delimiter, quoting=csv.QUOTE_NONE)
    return next(reader, [])


def _chunks(location: str, size: int, max_bytes: int | None = None) -> Iterator[bytes]:
    """The file's bytes in pieces of about ``size`` bytes, each ending at a line's end (the
    last where the file ends; a line longer than ``size`` is one piece); with ``max_bytes``,
    only up to the last whole line within them when the file is longer."""
    fs, path = filesystem(location)
    if not fs.exists(path):
        raise SourceError(f"{location}: source file not found")
    if fs.isdir(path):
        raise SourceError(f"{location}: is a folder, expected a file")
    size = max(size, 1)
    with fs.open(path, "rb") as handle:
        carry = b""
        total = 0
        while True:
            want = size if max_bytes is None else min(size, max_bytes + 1 - total)
            piece: bytes = handle.read(want)
            total += len(piece)
            if max_bytes is not None and total > max_bytes:
                data = carry + piece[: len(piece) - (total - max_bytes)]
                if cut := data.rfind(b"\n") + 1:
                    yield data[:cut]
                return
            if not piece:
                if carry:
                    yield carry
                return
            data = carry + piece
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield data[:cut]


def _is_utf8(encoding: str, *, lossy: bool = True) -> bool:
    names = ("utf8", "utf8lossy", "utf8sig") if lossy else ("utf8", "utf8sig")
    return encoding.lower().replace("-", "").replace("_", "") in names


def _without_bom(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The chunks, a UTF-8 byte-order mark at the start of the first dropped."""
    first = True
    for chunk in chunks:
        yield chunk[len(_BOM) :] if first and chunk.startswith(_BOM) else chunk
        first = False


@dataclass
class _CsvText:
    """What a first pass over a CSV file found: how its bytes become UTF-8 text."""

    utf8: bool
    #: Invalid UTF-8 somewhere: every cell holding it is decoded lossily and flagged.
    replaced: bool = False
    #: The noncharacter standing in for genuine U+FFFD while that is done.
    sentinel: str | None = None
    #: Bytes of the file's longest line (its end of line included).
    longest: int = 0


def _csv_text(location: str, encoding: str, batch_bytes: int, max_bytes: int | None) -> _CsvText:
    """One pass over the file, batch by batch: refused when it is blank or cannot be
    decoded (naming the byte), else how its batches are to be decoded."""
    import codecs

    utf8 = _is_utf8(encoding)
    text = _CsvText(utf8=utf8)
    blank = True
    has_fffd = False
    present: set[str] = set()
    decoder: codecs.IncrementalDecoder | None = None
    unknown = False
    if not utf8:
        try:
            decoder = codecs.getincrementaldecoder(encoding)()
        except LookupError:
            unknown = True
    offset = 0
    chunks = _chunks(location, batch_bytes, max_bytes)
    for chunk in _without_bom(chunks) if utf8 else chunks:
        blank = blank and not chunk.strip()
        text.longest = max(text.longest, _longest_line(chunk))
        if utf8:
            if not text.replaced:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    text.replaced = True
            if _FFFD.encode() in chunk:
                has_fffd = True
                present |= {s for s in _SENTINELS if s.encode() in chunk}
        elif decoder is not None:
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                raise SourceError(
                    f"{location}: cannot decode as {encoding} (byte {at}: {exc.reason})"
                ) from None
        offset += len(chunk)
    if blank:
        raise SourceError(f"{location}: file is empty")
    if unknown:
        raise SourceError(f"{location}: cannot decode as {encoding} (unknown encoding)")
    if decoder is not None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            pending = len(decoder.getstate()[0])
            at = offset - pending + exc.start
            raise SourceError(
                f"{location}: cannot decode as {encoding} (byte {at}: {exc.reason})"
            ) from None
    if text.replaced and has_fffd:
        # a genuine U+FFFD is swapped for a noncharacter the file does not hold first, and
        # restored after parsing: only the invalid bytes become U+FFFD
        text.sentinel = next((s for s in _SENTINELS if s not in present), None)
        if text.sentinel is None:  # pragma: no cover - a file holding all six
            raise SourceError(f"{location}: cannot locate its invalid UTF-8")
    return text


def _longest_line(chunk: bytes) -> int:
    """Bytes of the longest line of ``chunk`` (its end of line included)."""
    import numpy as np

    ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n"))
    bounds = np.concatenate(([-1], ends, [len(chunk) - 1] if not chunk.endswith(b"\n") else []))
    return int(np.diff(bounds).max()) if len(bounds) > 1 else 0


def _csv_lines(
    location: str,
    encoding: str,
    layout: CsvLayout,
    text: _CsvText,
    batch_bytes: int,
    max_bytes: int | None,
) -> Iterator[bytes]:
    """The file's lines as UTF-8, batch by batch (each batch ending at a line's end),
    without the preamble (``skip_rows`` lines) and comment lines."""
    import codecs

    chunks = _chunks(location, batch_bytes, max_bytes)
    decoder = None if text.utf8 else codecs.getincrementaldecoder(encoding)()
    carry = ""
    skip = layout.skip_rows
    comment = (
        re.compile(rb"(?m)^" + re.escape(layout.comment_prefix.encode()) + rb"[^\n]*(?:\n|\Z)")
        if layout.comment_prefix is not None
        else None
    )
    ended = False
    pieces = _without_bom(chunks) if text.utf8 else chunks
    while not ended:
        chunk = next(pieces, None)
        if chunk is None:
            ended = True
            if decoder is None:
                break
            chunk = b""
        if decoder is not None:
            decoded = carry + decoder.decode(chunk, final=ended)
            cut = len(decoded) if ended else decoded.rfind("\n") + 1
            carry = decoded[cut:]
            data = decoded[:cut].encode()
        elif text.replaced:
            if text.sentinel is not None:
                chunk = chunk.replace(_FFFD.encode(), text.sentinel.encode())
            data = chunk.decode("utf-8", errors="replace").encode()
        else:
            data = chunk
        while skip and data:
            at = data.find(b"\n") + 1
            data = data[at:] if at else b""
            skip -= 1
        if comment is not None:
            data = comment.sub(b"", data)
        if data:
            yield data


class _Stream(io.RawIOBase):
    """A readable binary stream over an iterator of byte strings (for pyarrow's reader)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._left = piece
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size


def _header(
    location: str, lines: Iterator[bytes], layout: CsvLayout
) -> tuple[list[str], Iterator[bytes]]:
    """The column names (the header's, or the layout's), checked, and the data lines after
    the header (refused when there are none)."""
    import itertools

    head = b""
    for data in lines:
        head += data
        if b"\n" in head:
            break
    if not head.strip():
        raise SourceError(f"{location}: file holds no data rows")
    first = _first_fields(head, layout)
    if layout.header:
        head = head.split(b"\n", 1)[1] if b"\n" in head else b""
    if layout.names is not None:
        names = list(layout.names)
        if len(first) != len(names):
            what = "header" if layout.header else "first data row"
            raise SourceError(  # counts, not cells: a header may be a line of data
                f"{location}: csv.names gives {len(names)} column(s) but the {what} has "
                f"{len(first)} field(s)"
            )
    else:
        names = first
    if len(set(names)) != len(names):
        repeated = [i for i, name in enumerate(names, start=1) if names.index(name) < i - 1]
        raise SourceError(  # positions, not names: a header may be a line of data
            f"{location}: duplicate column names in the header ({len(repeated)} of "
            f"{len(names)} repeat an earlier one, at column(s) {repeated})"
        )
    blank = [head]
    while not blank[-1].strip():
        more = next(lines, None)
        if more is None:
            raise SourceError(f"{location}: file holds no data rows")
        blank.append(more)
    return names, itertools.chain(blank, lines)


def _row_numbers(start: int, count: int, skipped: Any) -> Any:
    """The numbers of the next ``count`` parsed records from ``start`` on: the data rows
    left once the skipped ones (sorted) are taken out."""
    import numpy as np

    ahead = skipped[np.searchsorted(skipped, start) :]
    candidates = np.arange(start, start + count + len(ahead), dtype=np.int64)
    return candidates[~np.isin(candidates, ahead)][:count]


def _with_keep_columns(frame: pl.DataFrame, keep: pl.Expr) -> tuple[pl.DataFrame, list[str]]:
    """The frame with the columns ``keep`` needs that it lacks added as missing text (those
    rows have no key), and their names (to drop after filtering)."""
    missing = [c for c in keep.meta.root_names() if c not in frame.columns]
    if missing:
        frame = frame.with_columns(pl.lit(None, pl.String).alias(c) for c in missing)
    return frame, missing


def _selected(frame: pl.DataFrame, keep: pl.Expr | None) -> pl.DataFrame:
    if keep is None:
        return frame
    frame, added = _with_keep_columns(frame, keep)
    return frame.filter(keep).drop(added)


@dataclass
class SourceBatches:
    """A CSV or JSONL file read batch by batch (:func:`read_batches`). ``frames`` yields
    each batch's rows (``__row`` and the columns seen so far, in the file's order);
    ``bad_lines`` and ``columns`` (the file's columns in the order a whole read gives) are
    complete once ``frames`` is exhausted. A file holding no rows at all is refused while
    iterating."""

    frames: Iterator[pl.DataFrame]
    bad_lines: list[tuple[int, str, str]] = field(default_factory=list)
    columns: dict[str, pl.DataType] = field(default_factory=dict)

    def collect(self, keep: pl.Expr | None) -> RawSource:
        """Every batch (filtered by ``keep``) in one frame of the whole file's columns."""
        kept = [_selected(frame, keep) for frame in self.frames]
        schema = {ROW: pl.Int64(), **self.columns}
        frame = pl.concat(kept, how="diagonal_relaxed") if kept else pl.DataFrame(schema=schema)
        frame = frame.with_columns(
            pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in frame.columns
        )
        return RawSource(frame.select(*schema), self.bad_lines, selected=keep is not None)


def read_batches(
    location: str,
    fmt: str,
    *,
    encoding: str = "utf8",
    csv: CsvLayout | None = None,
    batch_bytes: int = READ_BATCH,
) -> SourceBatches:
    """A file's rows batch by batch, with the file's row numbers, for callers that route
    rows as they come (entity-hash shards): a CSV or JSONL file in about ``batch_bytes``
    each (ending at a line's end, read as :func:`read_source` reads them), a local Parquet
    file in row groups' batches of :data:`READ_BATCH_ROWS` rows, an Arrow file in its own
    record batches. A Parquet or Arrow file holding invalid UTF-8 in a string column raises
    :class:`NotBatchable` while iterating (read it whole: its cells are found there)."""
    batches = SourceBatches(iter(()))
    if fmt in ("parquet", "arrow"):
        batches.frames = _table_frames(location, fmt, READ_BATCH_ROWS, batches)
    elif fmt == "csv":
        batches.frames = _csv_frames(
            location, encoding, csv or CsvLayout(), None, batch_bytes, batches
        )
    elif fmt == "jsonl":
        batches.frames = _jsonl_frames(location, encoding, batch_bytes, batches)
    else:
        raise SourceError(f"{location}: {fmt} is not read in batches (csv, jsonl, parquet, arrow)")
    return batches


def _table_frames(
    location: str, fmt: str, batch_rows: int, out: SourceBatches
) -> Iterator[pl.DataFrame]:
    from pyarrow import ipc

    _, path = filesystem(location)
    if not Path(path).is_file():
        raise SourceError(f"{location}: source file not found")
    start = 1
    what = "Parquet" if fmt == "parquet" else "Arrow IPC"
    try:
        if fmt == "parquet":
            batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(
                batch_size=batch_rows
            )
        else:
            reader = ipc.open_file(path)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            if batch.num_rows == 0:
                continue
            try:  # polars takes Arrow strings as they are: their UTF-8 is checked first
                batch.validate(full=True)
            except pa.ArrowInvalid:
                raise NotBatchable(location) from None
            frame = pl.DataFrame(pl.from_arrow(pa.Table.from_batches([batch])))
            out.columns = dict(frame.schema)
            yield frame.with_row_index(ROW, offset=start).with_columns(pl.col(ROW).cast(pl.Int64))
            start += batch.num_rows
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        # the reader's own message is not shown (nor chained): it may quote the file
        raise SourceError(
            f"{location}: not a readable {what} file ({type(exc).__name__})"
        ) from None
    if start == 1:
        raise SourceError(f"{location}: file holds no data rows")


def _read_csv(
    location: str,
    encoding: str,
    layout: CsvLayout,
    max_bytes: int | None = None,
    keep: pl.Expr | None = None,
    batch_bytes: int = READ_BATCH,
) -> RawSource:
    """All cells as text; rows with the wrong number of fields come back in ``bad_lines``.
    Read in batches (a first pass finds the encoding problems), each batch filtered by
    ``keep``; the header line is not given to the parser, so its line numbers are data rows."""
    batches = SourceBatches(iter(()))
    batches.frames = _csv_frames(location, encoding, layout, max_bytes, batch_bytes, batches)
    return batches.collect(keep)


def _csv_frames(
    location: str,
    encoding: str,
    layout: CsvLayout,
    max_bytes: int | None,
    batch_bytes: int,
    out: SourceBatches,
) -> Iterator[pl.DataFrame]:
    import numpy as np
    import pyarrow.csv as pacsv

    text = _csv_text(location, encoding, batch_bytes, max_bytes)
    lines = _csv_lines(location, encoding, layout, text, batch_bytes, max_bytes)
    names, data = _header(location, lines, layout)
    bad: list[tuple[int, str, str]] = []

    def invalid(row: Any) -> str:
        number = int(row.number) if row.number is not None else -1
        bad.append(
            (
                number,
                str(row.text),
                f"expected {row.expected_columns} fields, found {row.actual_columns}",
            )
        )
        return "skip"

    parsed = 0
    start = 1
    try:
        reader = pacsv.open_csv(
            _Stream(data),
            # a block holds whole lines: at least the longest (decoded to UTF-8, a
            # character of another encoding takes up to 4 bytes)
            read_options=pacsv.ReadOptions(
                use_threads=False,
                block_size=max(batch_bytes, 4 * text.longest + 16),
                column_names=names,
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=layout.delimiter,
                quote_char=layout.quote_char or False,
                invalid_row_handler=invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                strings_can_be_null=True,
                null_values=["", *layout.null_values],
            ),
        )
        for batch in reader:
            if batch.num_rows == 0:
                continue
            skipped = np.sort(np.array([n for n, _, _ in bad], dtype=np.int64))
            rows = _row_numbers(start, batch.num_rows, skipped)
            start = int(rows[-1]) + 1
            parsed += batch.num_rows
            frame = pl.DataFrame(pl.from_arrow(pa.Table.from_batches([batch])))
            frame = frame.with_columns(pl.Series(ROW, rows, dtype=pl.Int64)).select(ROW, *names)
            if text.replaced:
                frame = _flag_replaced(frame, names, text.sentinel)
            yield frame
    except (pa.ArrowException, OSError) as exc:
        # the parser's detail ("Expected 4 columns, got 5: <the row>") is not shown
        raise SourceError(f"{location}: malformed CSV ({str(exc).split(':', 1)[0]})") from None
    if parsed == 0 and not bad:
        raise SourceError(f"{location}: file holds no data rows")
    if text.sentinel is not None:
        bad = [(n, line.replace(text.sentinel, _FFFD), why) for n, line, why in bad]
    columns = [n.replace(text.sentinel, _FFFD) if text.sentinel else n for n in names]
    out.columns = dict.fromkeys(columns, pl.String())
    if text.replaced:
        out.columns[INVALID_UTF8] = pl.List(pl.String)
    out.bad_lines = bad


def _flag_replaced(frame: pl.DataFrame, names: list[str], sentinel: str | None) -> pl.DataFrame:
    """List per row the columns whose cells held invalid bytes (U+FFFD after the lossy
    decoding); give genuine U+FFFD back where the sentinel stood in for it."""

    def flag(name: str) -> pl.Expr:
        return pl.when(pl.col(name).str.contains(_FFFD, literal=True)).then(pl.lit(name))

    listed = [flag(name) for name in names]
    frame = frame.with_columns(pl.concat_list(listed).list.drop_nulls().alias(INVALID_UTF8))
    if sentinel is None:
        return frame
    genuine = pl.col(names).str.replace_all(sentinel, _FFFD, literal=True)
    return frame.with_columns(genuine).rename({n: n.replace(sentinel, _FFFD) for n in names})


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a key repeated inside one object (json keeps the last)."""
    record = dict(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


#: JSONL lines parsed by the vectorised reader per block (a failing block is halved).
JSONL_BLOCK = 1 << 16
#: A ``"key":`` token of a JSON line (also matches inside strings: a superset of the keys).
_JSON_KEY = r'"(?:[^"\\]|\\.)*"\s*:'
_ASCII_SPACE = " \t\n\r\x0b\x0c"


def _lines(data: bytes) -> tuple[pa.LargeBinaryArray, Any]:
    """The lines of ``data`` (without their ``\\n``) as one binary array, and their 1-based
    numbers, found without a Python loop."""
    import numpy as np

    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw == 0x0A)
    starts = np.concatenate([[0], ends + 1]).astype(np.int64)
    stops = np.concatenate([ends, [len(data)]]).astype(np.int64)
    # each line is copied out once, without its newline, into one contiguous buffer
    keep = np.ones(len(data), dtype=bool)
    keep[ends] = False
    body = raw[keep]
    lengths = stops - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    array = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(lengths), [None, pa.py_buffer(offsets), pa.py_buffer(body)]
    )
    return array, np.arange(1, len(lengths) + 1, dtype=np.int64)


def _parse_line(number: int, text: str, bad: list[tuple[int, str, str]]) -> dict[str, Any] | None:
    """One line through Python's JSON parser (only lines the vectorised reader refused or
    that may repeat a key): its record, or ``None`` with the reason appended to ``bad``."""
    try:
        record = json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as exc:
        bad.append((number, text, f"invalid JSON ({exc.msg})"))
        return None
    except _DuplicateKey as exc:  # the key is a column name; its values are not shown
        bad.append((number, text, f"duplicate JSON key {exc.key[:80]!r}"))
        return None
    if not isinstance(record, dict):
        bad.append((number, text, "JSON line is not an object"))
        return None
    return {
        key: value
        if value is None or isinstance(value, str)
        else json.dumps(value, ensure_ascii=False)
        for key, value in record.items()
    }


def _parse_block(texts: pl.Series, rows: pl.Series) -> pl.DataFrame | None:
    """Lines of JSON objects parsed by polars, every value as text (nested ones as JSON);
    ``None`` when some line fails (or the lines do not give one record each)."""
    data = texts.str.join("\n").item().encode() + b"\n"
    try:
        names = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None).columns
        if not names:
            return None
        frame = pl.read_ndjson(io.BytesIO(data), schema=dict.fromkeys(names, pl.String))
    except (pl.exceptions.PolarsError, OSError, ValueError):
        return None
    if frame.height != len(texts):
        return None
    return frame.with_columns(rows.alias(ROW))


def _parse_lines(
    texts: pl.Series,
    rows: pl.Series,
    bad: list[tuple[int, str, str]],
    records: list[tuple[int, dict[str, Any]]],
) -> list[pl.DataFrame]:
    """Frames of the lines' records; a block that fails is halved down to single lines,
    which go through :func:`_parse_line` (their records appended to ``records``)."""
    if len(texts) == 0:
        return []
    if len(texts) > 1:
        frame = _parse_block(texts, rows)
        if frame is not None:
            return [frame]
        middle = len(texts) // 2
        return _parse_lines(texts[:middle], rows[:middle], bad, records) + _parse_lines(
            texts[middle:], rows[middle:], bad, records
        )
    frame = _parse_block(texts, rows)
    if frame is not None:
        return [frame]
    _python_lines(texts, rows, bad, records)
    return []


def _python_lines(
    texts: pl.Series,
    rows: pl.Series,
    bad: list[tuple[int, str, str]],
    records: list[tuple[int, dict[str, Any]]],
) -> None:
    for number, text in zip(rows.to_list(), texts.to_list(), strict=True):
        record = _parse_line(number, text, bad)
        if record is not None:
            records.append((number, record))


def _decoded_lines(
    location: str, data: bytes, encoding: str, bad: list[tuple[int, str, str]], first: int = 0
) -> pl.DataFrame:
    """The non-blank lines of ``data`` (the file's lines after its first ``first``) as text
    (``__row``, ``text``); undecodable lines go to ``bad``. UTF-8: the invalid lines are found by Arrow's validation over halves; another
    encoding: the whole file is decoded at once, line by line only when that fails."""
    utf8 = encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig")
    if not utf8:
        try:
            data = data.decode(encoding).encode()
        except UnicodeDecodeError:
            good: list[bytes] = []
            for number, line in enumerate(data.split(b"\n"), start=first + 1):
                try:
                    good.append(line.decode(encoding).encode())
                except UnicodeDecodeError as exc:
                    text = line.decode("utf-8", "replace")
                    if text.strip(_ASCII_SPACE):
                        bad.append((number, text, f"invalid {encoding} ({exc.reason})"))
                    good.append(b"")
            data = b"\n".join(good)
    array, numbers = _lines(data)
    numbers += first
    invalid: list[int] = []
    if len(array):
        _invalid_positions(array.view(pa.large_string()), 0, len(array), invalid)
    if invalid:
        import numpy as np
        import pyarrow.compute as pc

        for i in invalid:
            line = array[i].as_py()
            try:
                line.decode(encoding)
            except UnicodeDecodeError as exc:
                text = line.decode("utf-8", "replace")
                if text.strip(_ASCII_SPACE):
                    bad.append((int(numbers[i]), text, f"invalid {encoding} ({exc.reason})"))
        mask = np.ones(len(array), dtype=bool)
        mask[invalid] = False
        array = pc.filter(array, pa.array(mask))
        numbers = numbers[mask]
    lines = pl.DataFrame(
        {
            ROW: pl.Series(ROW, numbers, dtype=pl.Int64),
            "text": pl.Series("text", array.view(pa.large_string()), dtype=pl.String),
        }
    )
    lines = lines.with_columns(pl.col("text").str.strip_chars(_ASCII_SPACE))
    return lines.filter(pl.col("text") != "")


def _read_jsonl(
    location: str, encoding: str, keep: pl.Expr | None = None, batch_bytes: int = READ_BATCH
) -> RawSource:
    """JSONL read in batches of lines (their numbers the file's), each by polars in blocks
    and filtered by ``keep``; only lines that fail (and lines that may repeat a key inside
    an object) are parsed one by one, to name the line and the reason. The columns come in
    the order of their first appearance (those of the lines parsed one by one last), as
    over the whole file at once."""
    batches = SourceBatches(iter(()))
    batches.frames = _jsonl_frames(location, encoding, batch_bytes, batches)
    return batches.collect(keep)


def _jsonl_frames(
    location: str, encoding: str, batch_bytes: int, out: SourceBatches
) -> Iterator[pl.DataFrame]:
    bad: list[tuple[int, str, str]] = []
    columns: dict[str, None] = {}
    one_by_one: dict[str, None] = {}
    failed: dict[str, None] = {}
    parsed = False
    offset = 0
    chunks = _chunks(location, batch_bytes)
    for chunk in _without_bom(chunks) if _is_utf8(encoding, lossy=False) else chunks:
        lines = _decoded_lines(location, chunk, encoding, bad, offset)
        offset += chunk.count(b"\n")
        # lines that are not an object, or may repeat a key, go through Python's parser
        keys = pl.col("text").str.extract_all(_JSON_KEY)
        lines = lines.with_columns(
            (~pl.col("text").str.starts_with("{") | (keys.list.n_unique() < keys.list.len())).alias(
                "one_by_one"
            )
        )
        single = lines.filter(pl.col("one_by_one"))
        singles: list[tuple[int, dict[str, Any]]] = []
        _python_lines(single["text"], single[ROW], bad, singles)
        frames: list[pl.DataFrame] = []
        fails: list[tuple[int, dict[str, Any]]] = []
        blocks = lines.filter(~pl.col("one_by_one"))
        for start in range(0, blocks.height, JSONL_BLOCK):
            block = blocks.slice(start, JSONL_BLOCK)
            frames += _parse_lines(block["text"], block[ROW], bad, fails)
        for frame in frames:
            columns.update(dict.fromkeys(c for c in frame.columns if c != ROW))
        one_by_one.update(dict.fromkeys(key for _, record in singles for key in record))
        failed.update(dict.fromkeys(key for _, record in fails for key in record))
        if records := singles + fails:
            names = list(dict.fromkeys(key for _, record in records for key in record))
            frames.append(
                pl.DataFrame(
                    {
                        key: pl.Series(key, [r.get(key) for _, r in records], dtype=pl.String)
                        for key in names
                    }
                    | {ROW: pl.Series(ROW, [n for n, _ in records], dtype=pl.Int64)}
                )
            )
        if frames:
            parsed = True
            yield pl.concat(frames, how="diagonal_relaxed").sort(ROW)
    bad.sort(key=lambda item: item[0])
    if not parsed and not bad:
        raise SourceError(f"{location}: file holds no data rows")
    if not parsed:
        shown = "; ".join(f"line {n}: {why}" for n, _, why in bad[:5])
        more = f"; ... ({len(bad) - 5} more)" if len(bad) > 5 else ""
        raise SourceError(
            f"{location}: no line holds a valid JSON object ({len(bad)} non-empty line(s), "
            f"all invalid: {shown}{more})"
        )
    out.columns = dict.fromkeys([*columns, *one_by_one, *failed], pl.String())
    out.bad_lines = bad
