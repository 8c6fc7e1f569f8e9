"""The JSONL reader: polars parses the lines in blocks; only lines that fail (or may repeat a
key) go one by one through Python's parser, and the result is the same either way."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from storage import sources
from storage.sources import ROW, read_source


def _lines(n: int) -> list[bytes]:
    out: list[bytes] = []
    for i in range(1, n + 1):
        record: dict[str, object] = {"user": f"C{i}", "comment": f"text {i} 服务", "stars": i % 5}
        if i % 7 == 0:
            record["extra"] = {"nested": [i, True]}
        if i % 11 == 0:
            record["stars"] = None
        out.append(json.dumps(record, ensure_ascii=False).encode())
    return out


@pytest.mark.parametrize("block", [3, 64, 1 << 16])
def test_scattered_bad_lines_are_named_and_the_good_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    monkeypatch.setattr(sources, "JSONL_BLOCK", block)
    lines = _lines(200)
    broken = {
        5: b'{"user": "C5", "comment": "unterminated',
        17: b'{"user": "C17", "user": "C18", "stars": 1}',
        40: b"[1, 2]",
        41: b"",
        42: b"   \r",
        77: b'{"user": "caf\xe9"}',
        120: b'{"user": "C120"}{"user": "C121"}',
        199: b'"just text"',
    }
    for number, text in broken.items():
        lines[number - 1] = text
    lines[9] = b'{"user": "C10", "stars": NaN}'  # Python's parser accepts NaN
    path = tmp_path / "feedback.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\r\n")
    raw = read_source(str(path), "jsonl")
    assert [(n, why.split(" (")[0]) for n, _, why in raw.bad_lines] == [
        (5, "invalid JSON"),
        (17, "duplicate JSON key 'user'"),
        (40, "JSON line is not an object"),
        (77, "invalid utf8"),
        (120, "invalid JSON"),
        (199, "JSON line is not an object"),
    ]
    frame = raw.frame
    expected_rows = [n for n in range(1, 201) if n not in broken]
    assert frame[ROW].to_list() == expected_rows
    assert frame.columns == [ROW, "user", "comment", "stars", "extra"]
    assert frame.schema["stars"] == pl.String
    by_row = {r[ROW]: r for r in frame.to_dicts()}
    assert by_row[1] == {
        ROW: 1,
        "user": "C1",
        "comment": "text 1 服务",
        "stars": "1",
        "extra": None,
    }
    assert by_row[7]["extra"] == '{"nested": [7, true]}'  # nested values as JSON text
    assert by_row[11]["stars"] is None
    assert by_row[10]["stars"] == "NaN" and by_row[10]["comment"] is None


def test_a_line_merely_quoting_a_key_twice_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    path.write_text(
        '{"user": "C1", "comment": "he wrote \\"user\\": twice", "stars": 2}\n'
        '{"user": "C2", "meta": {"user": "inner"}}\n',
        encoding="utf-8",
    )
    raw = read_source(str(path), "jsonl")
    assert raw.bad_lines == []
    assert raw.frame["user"].to_list() == ["C1", "C2"]
    assert raw.frame["meta"].to_list() == [None, '{"user": "inner"}']


def test_types_changing_between_lines_are_all_read_as_text(tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    path.write_text('{"a": {"x": 1}}\n{"a": 5}\n{"a": "five"}\n{"a": [1]}\n{}\n')
    raw = read_source(str(path), "jsonl")
    assert raw.bad_lines == []
    assert raw.frame["a"].to_list() == ['{"x": 1}', "5", "five", "[1]", None]
    assert raw.frame[ROW].to_list() == [1, 2, 3, 4, 5]


def test_other_encodings_decode_per_file_and_name_undecodable_lines(tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    path.write_bytes('{"user": "Zoë"}\n{"user": "x"}\n'.encode("latin-1"))
    raw = read_source(str(path), "jsonl", encoding="latin-1")
    assert raw.frame["user"].to_list() == ["Zoë", "x"]
    path.write_bytes(b'{"user": "a"}\n{"user": "\x81"}\n{"user": "b"}\n')
    raw = read_source(str(path), "jsonl", encoding="cp1252")
    assert raw.frame["user"].to_list() == ["a", "b"]
    assert [(n, why.split(" (")[0]) for n, _, why in raw.bad_lines] == [(2, "invalid cp1252")]
