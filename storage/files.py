"""Location helpers: local paths and file-system URIs (``s3://``, ``gs://``, ``memory://``).

Credentials of object stores are fsspec ``storage_options`` (for ``s3://``: ``key``,
``secret``, ``client_kwargs = {endpoint_url = ...}``, ...). The spec only *references* them
(``storage_options = { env = "FEDFUSE_S3_SITE_A" }`` or ``{ block = "..." }``, a JSON object
in an environment variable or a Prefect Secret block); :func:`resolve_storage_options` reads
them and :func:`register_options` keeps them, in this process's memory only, for a location
prefix (a store root). :func:`filesystem` uses the options of the longest registered prefix
of a location, so code that reads a reference by its uri (``read_table``, ``read_text``,
``read_verified_text``, ...) or builds ``Store(root)`` gets the right credentials without
passing them along.

Trade-off of that process-wide registry: it is global mutable state (the last
registration of a prefix wins; two specs in one process naming the same root with different
credentials clash), it must be filled before the first access (``tasks.spec.load.load_spec``
does it for every store root of the spec it loads; a process that gets references without
loading the spec, e.g. a bare worker, falls back to the file system's default credentials),
and fsspec caches one file-system instance per option set. In exchange no option value
ever travels in a task parameter, a reference, a persisted result or a log line: references
stay plain uris, and the values are never written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import threading
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


class StorageOptionsError(RuntimeError):
    """Storage options the spec references are malformed or cannot be read (the message
    names where they were looked up, never their value)."""


_OPTIONS: dict[str, dict[str, Any]] = {}
_OPTIONS_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


def _prefix_key(prefix: str) -> str:
    return real_location(prefix).rstrip("/") if is_uri(prefix) else prefix.rstrip("/")


def register_options(prefix: str, options: dict[str, Any]) -> None:
    """Use ``options`` (fsspec storage options) for every location under ``prefix`` (kept in
    this process's memory only; see the module docstring). Empty options unregister it."""
    key = _prefix_key(prefix)
    with _OPTIONS_LOCK:
        if options:
            _OPTIONS[key] = dict(options)
        else:
            _OPTIONS.pop(key, None)


def clear_options() -> None:
    """Forget every registered option set (tests)."""
    with _OPTIONS_LOCK:
        _OPTIONS.clear()


def registered_options(location: str) -> dict[str, Any]:
    """The options of the longest registered prefix of ``location`` ({} when none)."""
    key = _prefix_key(location)
    with _OPTIONS_LOCK:
        best = max((p for p in _OPTIONS if lies_within(key, p)), key=len, default=None)
        return dict(_OPTIONS[best]) if best is not None else {}


def resolve_storage_options(*, env: str | None = None, block: str | None = None) -> dict[str, Any]:
    """fsspec storage options from an environment variable or a Prefect Secret block holding
    a JSON object. An unset (or empty) variable gives ``{}``, the caller's to report;
    malformed content raises :class:`StorageOptionsError` (never showing the value)."""
    if env is not None:
        raw: object = os.environ.get(env)
        where = f"environment variable {env}"
        if not raw:
            return {}
    elif block is not None:
        from prefect.blocks.system import Secret

        where = f"Prefect Secret block {block!r}"
        try:
            raw = Secret.load(block).get()  # type: ignore[union-attr]
        except ValueError as exc:
            raise StorageOptionsError(f"no Prefect Secret block named {block!r}") from exc
    else:
        raise StorageOptionsError("no storage options reference given")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise StorageOptionsError(f"the storage options in {where} are not JSON") from None
    if not isinstance(raw, dict):
        raise StorageOptionsError(f"the storage options in {where} are not a JSON object")
    return {str(k): v for k, v in raw.items()}


def filesystem(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec file system for a location and the path inside it, built with
    ``storage_options`` (default: those registered for the location, see
    :func:`register_options`)."""
    options = registered_options(location) if storage_options is None else storage_options
    fs, path = fsspec.core.url_to_fs(location, **options)
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
