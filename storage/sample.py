"""Reading sample export files for ``fedfuse init``: the CSV dialect sniffed from the bytes
(delimiter, header or not, missing-value markers, comment and preamble lines, quoting), and
every file read into a frame of its own columns for the draft to look at.

Parquet, Arrow and JSONL files are read by :func:`storage.sources.read_source`; a CSV file
is parsed here with the dialect it was sniffed with. Errors are :class:`SourceError` naming
the file, never a cell.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, replace

import polars as pl

from storage.sources import INVALID_UTF8, ROW, CsvLayout, SourceError, read_head, read_source

#: Bytes of a sample file read at most (a larger file is sampled from its start).
MAX_SAMPLE_BYTES = 64 * 1024 * 1024
#: Bytes of the start of a CSV file its dialect is sniffed from.
MAX_SNIFF_BYTES = 1024 * 1024
#: Table lines (after the preamble) the header is judged on.
PROBE_LINES = 2000
#: Data rows of a sample file looked at most.
MAX_SAMPLE_ROWS = 200_000
#: Field separators a CSV file is tried with, in order of preference on a tie.
DELIMITERS = (",", ";", "\t", "|")
#: Cells read as missing when a column is otherwise numeric, a date or a boolean.
NULL_MARKERS = ("?", "NA", "N/A", "n/a", "na", "NULL", "null", "None", "none", "-", "--", "nan")
#: Lines starting with one of these (after the preamble) are comments.
COMMENT_PREFIXES = ("#", "//")
_BOM = b"\xef\xbb\xbf"
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_DATEISH = re.compile(r"^\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}([ T].*)?$")
_BOOLISH = frozenset({"true", "false", "yes", "no", "y", "n", "t", "f"})


@dataclass(frozen=True)
class CsvDialect:
    """How a CSV export is written (the keys of ``[parties.sources.csv]``)."""

    delimiter: str = ","
    header: bool = True
    skip_rows: int = 0
    comment_prefix: str | None = None
    quote_char: str = '"'
    null_values: tuple[str, ...] = ()
    #: Rows with another number of fields than the header (skipped here; quarantined by the
    #: pipeline).
    bad_rows: int = 0


@dataclass(frozen=True)
class SampleFile:
    """One sample export: where it lies, its format, its CSV dialect (CSV only) and its
    rows (the file's own columns; CSV and JSONL cells as text, missing cells null)."""

    location: str
    format: str
    frame: pl.DataFrame
    dialect: CsvDialect | None = None
    #: Whether only the start of the file was looked at (:data:`MAX_SAMPLE_ROWS`, bytes).
    truncated: bool = False
    #: Rows or lines that could not be parsed (quarantined by the pipeline).
    bad_lines: int = 0


def read_sample(location: str, fmt: str) -> SampleFile:
    """Read one sample export file (``fmt``: csv, parquet, jsonl or arrow)."""
    if fmt == "csv":
        return _read_csv_sample(location)
    if fmt == "jsonl":
        _refuse_binary(location, read_head(location, 1 << 16)[0])
    raw = read_source(location, fmt)
    frame = raw.frame.drop([c for c in (ROW, INVALID_UTF8) if c in raw.frame.columns])
    truncated = frame.height > MAX_SAMPLE_ROWS
    return SampleFile(
        location,
        fmt,
        frame.head(MAX_SAMPLE_ROWS),
        truncated=truncated,
        bad_lines=len(raw.bad_lines),
    )


def _refuse_binary(location: str, data: bytes) -> None:
    if b"\x00" in data:
        raise SourceError(f"{location}: holds NUL bytes; not a text export")


def _decode(location: str, data: bytes, *, truncated: bool) -> str:
    data = data.removeprefix(_BOM)
    _refuse_binary(location, data)
    if truncated:  # the sample ends at the last complete line
        data = data[: data.rfind(b"\n") + 1]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{location}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _field_counts(lines: list[str], delimiter: str) -> list[int]:
    counts = []
    for line in lines:
        try:
            counts.append(len(next(csv.reader([line], delimiter=delimiter))))
        except (csv.Error, StopIteration):
            counts.append(0)
    return counts


def _sniff_delimiter(lines: list[str]) -> tuple[str, int]:
    """The delimiter whose field count is the most consistent over the lines (and above 1),
    and that count."""
    best: tuple[float, int, str] = (0.0, 1, ",")
    for delimiter in DELIMITERS:
        counts = _field_counts(lines, delimiter)
        modal, times = Counter(counts).most_common(1)[0]
        if modal < 2:
            continue
        share = times / len(counts)
        if (share, modal) > best[:2]:
            best = (share, modal, delimiter)
    return best[2], best[1]


def _kind_of_cell(cell: str) -> str:
    text = cell.strip()
    if not text:
        return "empty"
    if _NUMBER.match(text):
        return "number"
    if _DATEISH.match(text):
        return "date"
    if text.lower() in _BOOLISH:
        return "bool"
    return "text"


def _has_header(rows: list[list[str]]) -> bool:
    """Whether the first row names the columns: per column of mostly numbers, dates or
    booleans, a first cell of that kind votes against a header and any other for it; in a
    column of text, a first cell repeated below votes against it. A tie is a header."""
    first, rest = rows[0], rows[1:]
    if not rest:
        return True
    votes = 0
    for index, cell in enumerate(first):
        below = [row[index] for row in rest if index < len(row)]
        kinds = Counter(_kind_of_cell(c) for c in below if c.strip())
        head = _kind_of_cell(cell)
        common, times = kinds.most_common(1)[0] if kinds else ("text", 0)
        if common != "text" and times >= kinds.total() / 2:
            votes += -1 if head == common else 1
        elif cell.strip() and cell.strip() in {c.strip() for c in below}:
            votes -= 1
    return votes >= 0


def _null_markers(frame: pl.DataFrame) -> tuple[str, ...]:
    """The markers of :data:`NULL_MARKERS` standing in for a value in some column whose
    other cells (if any) are all numbers, dates or booleans (cells as the reader gives
    them: a marker is matched exactly, as the reader's ``null_values`` are)."""
    found: set[str] = set()
    markers = list(NULL_MARKERS)
    for name in frame.columns:
        cells = frame[name].drop_nulls()
        held = cells.filter(cells.is_in(markers))
        if held.len() == 0:
            continue
        others = cells.filter(~cells.is_in(markers)).str.strip_chars()
        others = others.filter(others != "")
        lowered = others.str.to_lowercase()
        typed = (
            others.str.contains(_NUMBER.pattern)
            | others.str.contains(_DATEISH.pattern)
            | lowered.is_in(list(_BOOLISH))
        )
        if typed.all():
            found |= set(held.unique().to_list())
    return tuple(sorted(found))


def _table(
    location: str, lines: list[str], prefix: str | None
) -> tuple[list[tuple[int, str]], str, int]:
    """The non-empty lines that are not comments (with their line index), the delimiter,
    and the position among them of the header: the first line of the modal field count."""
    content = [
        (n, line)
        for n, line in enumerate(lines)
        if line.strip() and not (prefix and line.startswith(prefix))
    ]
    if not content:
        raise SourceError(f"{location}: holds comment lines only, no data rows")
    probe = [line for _, line in content[:500]]
    delimiter, modal = _sniff_delimiter(probe)
    counts = _field_counts(probe, delimiter)
    return content, delimiter, next((i for i, n in enumerate(counts) if n == modal), 0)


def sniff_csv(location: str, text: str) -> CsvDialect:
    """The dialect of a CSV export from the start of its text (delimiter, header or not,
    preamble and comment lines, quoting); missing-value markers are found on the rows
    read (:func:`read_sample`)."""
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise SourceError(f"{location}: file is empty")
    prefix = next((p for p in COMMENT_PREFIXES if any(line.startswith(p) for line in lines)), None)
    content, delimiter, start = _table(location, lines, prefix)
    header_line = content[start][0]
    if prefix is not None:
        # lines of the table starting with the prefix but shaped like rows are data
        modal = _field_counts([content[start][1]], delimiter)[0]
        after = [line for line in lines[header_line:] if line.startswith(prefix)]
        if not after:  # comments before the header only: skipped with the preamble
            prefix = None
        elif any(n == modal for n in _field_counts(after, delimiter)):
            prefix = None
            content, delimiter, start = _table(location, lines, None)
            header_line = content[start][0]
    # a preamble (title lines before the table) is skipped by line count, comments included
    skip_rows = header_line
    probe = "\n".join(line for _, line in content[start : start + PROBE_LINES])
    quote = '"' if '"' in probe else ""
    reader = csv.reader(
        io.StringIO(probe),
        delimiter=delimiter,
        quotechar=quote or None,
        quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE,
    )
    try:
        rows = [row for row in reader if row]
    except csv.Error as exc:
        raise SourceError(f"{location}: malformed CSV ({exc})") from None
    return CsvDialect(
        delimiter=delimiter,
        header=_has_header(rows),
        skip_rows=skip_rows,
        comment_prefix=prefix,
        quote_char=quote or '"',
    )


def _read_csv_sample(location: str) -> SampleFile:
    """Sniff the dialect, then read the rows through the pipeline's reader
    (:func:`storage.sources.read_source`) with it: what the draft sees is what the pipeline
    reads."""
    data, truncated = read_head(location, MAX_SAMPLE_BYTES)
    if not data.removeprefix(_BOM).strip():
        raise SourceError(f"{location}: file is empty")
    start = _decode(location, data[:MAX_SNIFF_BYTES], truncated=len(data) > MAX_SNIFF_BYTES)
    dialect = sniff_csv(location, start)
    names = None
    if not dialect.header:
        width = _first_width(start, dialect)
        names = tuple(f"column_{i}" for i in range(1, width + 1))
    layout = CsvLayout(
        header=dialect.header,
        names=names,
        delimiter=dialect.delimiter,
        skip_rows=dialect.skip_rows,
        comment_prefix=dialect.comment_prefix,
        quote_char=dialect.quote_char,
    )
    raw = read_source(location, "csv", csv=layout, max_bytes=MAX_SAMPLE_BYTES)
    if INVALID_UTF8 in raw.frame.columns:
        raise SourceError(f"{location}: not UTF-8 text")
    frame = raw.frame.drop(ROW)
    if frame.height > MAX_SAMPLE_ROWS:
        frame, truncated = frame.head(MAX_SAMPLE_ROWS), True
    markers = _null_markers(frame)
    if markers:
        if any(frame[name].null_count() for name in frame.columns):
            markers = ("", *markers)  # empty cells stay missing beside the markers
        frame = frame.with_columns(
            pl.when(pl.col(name).is_in(list(markers)))
            .then(None)
            .otherwise(pl.col(name))
            .alias(name)
            for name in frame.columns
        )
    dialect = replace(dialect, null_values=markers, bad_rows=len(raw.bad_lines))
    return SampleFile(
        location, "csv", frame, dialect=dialect, truncated=truncated, bad_lines=dialect.bad_rows
    )


def _first_width(text: str, dialect: CsvDialect) -> int:
    """The field count of the first row of the table (a file without a header)."""
    lines = [
        line
        for line in text.splitlines()[dialect.skip_rows :]
        if line.strip() and not (dialect.comment_prefix and line.startswith(dialect.comment_prefix))
    ]
    return _field_counts(lines[:1], dialect.delimiter)[0] if lines else 0
