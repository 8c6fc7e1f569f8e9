"""Location helpers: local paths and file-system URIs (``s3://``, ``gs://``, ``memory://``)."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import fsspec

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


def resolve_location(location: str, base: str) -> str:
    """Resolve a relative location against ``base`` (a folder path or URI)."""
    if is_uri(location):
        return location
    if is_uri(base):
        return posixpath.join(base, location) if not location.startswith("/") else location
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = Path(base) / path
    return str(path.resolve())


def filesystem(location: str) -> tuple[Any, str]:
    """The fsspec file system for a location and the path inside it."""
    fs, path = fsspec.core.url_to_fs(location)
    return fs, path


def read_text(location: str, encoding: str = "utf-8") -> str:
    fs, path = filesystem(location)
    if not fs.exists(path):
        raise FileNotFoundError(f"{location}: no such file")
    with fs.open(path, "rb") as handle:
        data: bytes = handle.read()
    return data.decode(encoding)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    if not fs.exists(path):
        raise FileNotFoundError(f"{location}: no such file")
    with fs.open(path, "rb") as handle:
        data: bytes = handle.read()
    return data


def write_text_atomic(location: str, text: str) -> None:
    """Write a whole text file under a temporary name, then rename it into place."""
    fs, path = filesystem(location)
    folder = posixpath.dirname(path)
    if folder:
        fs.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{posixpath.basename(path)}.tmp")
    with fs.open(tmp, "wb") as handle:
        handle.write(text.encode())
    fs.mv(tmp, path)
