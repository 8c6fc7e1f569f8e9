"""Location helpers: local paths and file-system URIs (``s3://``, ``gs://``, ``memory://``)."""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
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


class ConfinementError(ValueError):
    """A path leads outside the folders it must stay in (after ``..`` and symlinks)."""


_LOCAL_SCHEMES = ("file://", "local://")


def join_location(location: str, base: str) -> str:
    """``location`` against ``base`` like :func:`resolve_location`, but neither ``..`` nor
    symlinks resolved: the path as written, made absolute."""
    if is_uri(location):
        return location
    if is_uri(base):
        return posixpath.join(base, location) if not location.startswith("/") else location
    return str(Path(base) / Path(location).expanduser())


def real_location(location: str) -> str:
    """Where a location leads: local paths (and ``file://`` URIs) with ``..`` and symlinks
    resolved (``os.path.realpath``; the file need not exist); other URIs with ``..``
    normalised (``s3://b/x/../y`` -> ``s3://b/y``), as their file systems have no symlinks."""
    for scheme in _LOCAL_SCHEMES:
        if location.lower().startswith(scheme):
            return os.path.realpath(location[len(scheme) :] or "/")
    if is_uri(location):
        scheme, rest = location.split("://", 1)
        path = posixpath.normpath(rest.lstrip("/")) if rest.strip("/") else ""
        return f"{scheme.lower()}://{'' if path == '.' else path}"
    return os.path.realpath(location)


def lies_within(real: str, root: str) -> bool:
    """``real`` is ``root`` or inside it (both as :func:`real_location` returns them)."""
    if real == root:
        return True
    return real.startswith(root if root.endswith("/") else root + "/")


def confined(
    path: str, roots: Sequence[str], *, name: str | None = None, area: str | None = None
) -> str:
    """Where ``path`` leads (:func:`real_location`), if it lies inside one of ``roots`` (each
    resolved the same way); else :class:`ConfinementError` naming the path (as ``name``,
    default ``path``), where it leads (when resolving changed it) and the allowed area
    (``area``, default: the roots). Never reads the file."""
    real = real_location(path)
    if any(lies_within(real, real_location(root)) for root in roots):
        return real
    shown = name or path
    lexical = path
    for scheme in _LOCAL_SCHEMES:
        if path.lower().startswith(scheme):
            lexical = path[len(scheme) :]
    if not is_uri(lexical) and not Path(lexical).is_absolute():
        lexical = str(Path.cwd() / lexical)
    where = area or ("the folders " + ", ".join(roots) if roots else "any allowed folder")
    leads = "is" if lexical == real else f"leads to {real},"
    raise ConfinementError(f"{shown} {leads} outside {where}")


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
