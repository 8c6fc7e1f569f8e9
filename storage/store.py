"""Party and coordinator stores: layered folders, typed references, atomic writes.

A store is rooted at a local path or any fsspec URI (``s3://``, ``gs://``, ``memory://``).
Tables are Parquet (zstd) named by their content hash, so a reference (uri + hash)
always points at the bytes it describes and cached results never go stale.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from storage.files import confined, filesystem, is_uri, lies_within, real_location

logger = logging.getLogger(__name__)

Layer = Literal[
    "raw",
    "clean",
    "features",
    "aligned",
    "fused",
    "rejected",
    "reports",
    "models",
    "checkpoints",
    "exchange",
    "split",
]
LAYERS: tuple[Layer, ...] = get_args(Layer)
_CHUNK = 8 * 1024 * 1024


class FileRef(BaseModel):
    """A file by location and content hash."""

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    size: int


class TableRef(BaseModel):
    """A Parquet table by location, content hash, row count and schema summary."""

    model_config = ConfigDict(frozen=True)

    uri: str
    sha256: str
    rows: int
    columns: dict[str, str]

    @property
    def short(self) -> str:
        return f"{posixpath.basename(self.uri)} ({self.rows} rows, {len(self.columns)} cols)"


#: A temporary file this old is a killed write's leftover, removed at the next write of its name.
STALE_TMP_SECONDS = 600.0


class IntegrityError(RuntimeError):
    """A referenced file does not hold the bytes its reference names."""


class UnverifiedError(ValueError):
    """A referenced text could not be verified; the message is one line, without content."""


def _hash_stream(handle: Any) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def fingerprint(location: str, *, roots: Sequence[str] | None = None) -> FileRef:
    """Hash a file or a folder of files where it lies (used for raw sources, which we never
    copy). With ``roots`` (a party's store and import areas), a location leading outside them
    (``..``, symlinks) is refused with :class:`storage.files.ConfinementError` before
    anything is read. A folder's hash covers its files' relative paths and bytes
    (:func:`folder_digest`); its size is the files' total."""
    if roots is not None:
        fs, path = filesystem(confined(location, roots))
    else:
        fs, path = filesystem(location)
    if not fs.exists(path):
        raise FileNotFoundError(f"{location}: no such file")
    if fs.isdir(path):
        sha, size = folder_digest(location)
        return FileRef(uri=location, sha256=sha, size=size)
    with fs.open(path, "rb") as handle:
        sha, size = _hash_stream(handle)
    return FileRef(uri=location, sha256=sha, size=size)


class FolderError(ValueError):
    """A folder source holds an entry that cannot be part of its content hash."""


def folder_files(location: str) -> list[tuple[str, str]]:
    """The files under a folder, as (relative POSIX path, path in its file system), sorted
    by relative path. A symlink anywhere in the folder, or an entry leading outside it, is
    refused with :class:`FolderError` naming the entry (relative to the folder)."""
    fs, path = filesystem(location)
    root = path.rstrip("/")
    if is_uri(location) and not location.lower().startswith(("file://", "local://")):
        return sorted(_remote_files(location, fs, root))
    real_root = real_location(location)
    files: list[tuple[str, str]] = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in [*dirs, *names]:
            entry = Path(folder) / name
            if entry.is_symlink() or not lies_within(str(entry.resolve()), real_root):
                raise FolderError(
                    f"{location}: holds a symbolic link or an entry leading outside the "
                    "folder (list them with: find FOLDER -type l); a folder source holds "
                    "plain files and folders only"
                )
        files += [((Path(folder) / n).relative_to(root).as_posix(), f"{folder}/{n}") for n in names]
    return sorted(files)


def _remote_files(location: str, fs: Any, root: str) -> list[tuple[str, str]]:
    """Files under an object-store prefix (no symlinks there; entries stay under it)."""
    files: list[tuple[str, str]] = []
    for found in fs.find(root, detail=False):
        entry = str(found)
        if not entry.startswith(root + "/"):
            raise FolderError(f"{location}: holds an entry that lies outside the folder")
        files.append((entry[len(root) + 1 :], entry))
    return files


def folder_digest(location: str) -> tuple[str, int]:
    """SHA-256 over a folder's files in relative-path order (each: path, byte count, bytes)
    and their total size: the same files under the same names give the same hash anywhere."""
    fs, _ = filesystem(location)
    digest = hashlib.sha256()
    total = 0
    for rel, entry in folder_files(location):
        with fs.open(entry, "rb") as handle:
            data_digest, size = _hash_stream(handle)
        digest.update(rel.encode())
        digest.update(b"\0")
        digest.update(str(size).encode())
        digest.update(b"\0")
        digest.update(bytes.fromhex(data_digest))
        total += size
    return digest.hexdigest(), total


def _schema_summary(schema: pl.Schema | dict[str, Any]) -> dict[str, str]:
    return {name: str(dtype) for name, dtype in schema.items()}


class Store:
    """A store root with one folder per layer.

    ``storage_options`` (fsspec options, e.g. object-store credentials) are used for every
    read and write through the store; without them, those registered for the root
    (:func:`storage.files.register_options`) are.
    """

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/") if is_uri(root) else root
        self.storage_options = storage_options
        self.fs, self._base = filesystem(root, storage_options)

    def _filesystem(self, uri: str) -> tuple[Any, str]:
        """The file system and path of ``uri``: this store's options inside the store,
        the registered ones elsewhere."""
        if lies_within(real_location(uri), real_location(self.root)):
            return filesystem(uri, self.storage_options)
        return filesystem(uri)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def _join(self, *parts: str) -> str:
        return posixpath.join(self._base, *parts)

    def _uri(self, path: str) -> str:
        """The location users see: the store root with the relative part appended."""
        rel = posixpath.relpath(path, self._base)
        return posixpath.join(self.root, rel) if is_uri(self.root) else path

    def _path(self, uri: str) -> str:
        fs, path = self._filesystem(uri)
        if type(fs) is not type(self.fs):
            raise ValueError(f"{uri} is not in store {self.root}")
        return str(path)

    def location(self, layer: Layer, name: str) -> str:
        return self._uri(self._join(layer, name))

    def exists(self, layer: Layer, name: str) -> bool:
        return bool(self.fs.exists(self._join(layer, name)))

    def list(self, layer: Layer) -> list[str]:
        folder = self._join(layer)
        if not self.fs.exists(folder):
            return []
        return sorted(posixpath.basename(p) for p in self.fs.ls(folder, detail=False))

    # -- atomic writing ---------------------------------------------------------------------
    def _commit(self, tmp: str, final: str) -> None:
        if self.fs.exists(final):
            self.fs.rm(final)
        self.fs.mv(tmp, final)

    def _tmp(self, folder: str, name: str) -> str:
        self.fs.makedirs(folder, exist_ok=True)
        # a layer folder that is a symlink out of the store (say rejected/ -> another store)
        # would put this party's rows elsewhere: refused before anything is written
        confined(self._uri(folder), [self.root], area=f"the store {self.root}")
        self._sweep(posixpath.join(folder, f".{glob.escape(name)}.*.tmp"))
        return posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")

    def sweep(self, layer: Layer, prefix: str) -> None:
        """Remove the files of ``layer`` named ``<prefix>*`` that a killed step left behind:
        those older than :data:`STALE_TMP_SECONDS` (a step in flight elsewhere is younger)."""
        self._sweep(self._join(layer, f"{glob.escape(prefix)}*"))

    def _sweep(self, pattern: str) -> None:
        """Remove the files matching ``pattern`` older than :data:`STALE_TMP_SECONDS`."""
        now = time.time()
        for path in self.fs.glob(pattern):
            try:
                info = self.fs.info(path)
            except FileNotFoundError:
                continue
            stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
            seconds = stamp.timestamp() if hasattr(stamp, "timestamp") else stamp
            if isinstance(seconds, int | float) and now - float(seconds) > STALE_TMP_SECONDS:
                self._discard(path)

    def write_bytes(self, layer: Layer, name: str, data: bytes) -> FileRef:
        folder = self._join(layer)
        tmp = self._tmp(folder, name)
        try:
            with self.fs.open(tmp, "wb") as handle:
                handle.write(data)
            final = posixpath.join(folder, name)
            self._commit(tmp, final)
        except BaseException:
            self._discard(tmp)
            raise
        return FileRef(
            uri=self._uri(final), sha256=hashlib.sha256(data).hexdigest(), size=len(data)
        )

    def write_json(self, layer: Layer, name: str, obj: Any) -> FileRef:
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        return self.write_bytes(layer, name, text.encode())

    def write_text(self, layer: Layer, name: str, text: str) -> FileRef:
        return self.write_bytes(layer, name, text.encode())

    def remove(self, ref: TableRef | FileRef) -> None:
        """Delete a file this store wrote (refused for one outside it)."""
        path = self._path(ref.uri)
        if not lies_within(path, self._base):
            raise ValueError(f"{ref.uri} is not in store {self.root}")
        if self.fs.exists(path):
            self.fs.rm(path)

    def _discard(self, tmp: str) -> None:
        try:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
        except OSError:  # pragma: no cover - best effort clean-up
            logger.warning("could not remove temporary file %s", tmp)

    def write_table(self, df: pl.DataFrame, layer: Layer, name: str) -> TableRef:
        """Write ``df`` as ``<layer>/<name>-<hash12>.parquet`` atomically."""
        return self.write_arrow(df.to_arrow(), layer, name, schema=_schema_summary(df.schema))

    def write_arrow(
        self, table: pa.Table, layer: Layer, name: str, *, schema: dict[str, str] | None = None
    ) -> TableRef:
        folder = self._join(layer)
        tmp = self._tmp(folder, name)
        try:
            with self.fs.open(tmp, "wb") as handle:
                pq.write_table(table, handle, compression="zstd", write_statistics=True)
            with self.fs.open(tmp, "rb") as handle:
                sha, _ = _hash_stream(handle)
            final = posixpath.join(folder, f"{name}-{sha[:12]}.parquet")
            self._commit(tmp, final)
        except BaseException:
            self._discard(tmp)
            raise
        summary = schema or _schema_summary(pl.from_arrow(table.slice(0, 0)).schema)  # type: ignore[union-attr]
        return TableRef(uri=self._uri(final), sha256=sha, rows=table.num_rows, columns=summary)

    def concat_tables(self, refs: Sequence[TableRef], layer: Layer, name: str) -> TableRef:
        """Write the rows of ``refs`` one after the other, in their order, as one table
        ``<layer>/<name>-<hash12>.parquet`` (atomically), a record batch at a time: never
        more than one batch is held. Columns come in the first table's order; a column some
        tables lack is null there, and types are promoted as polars' relaxed concatenation
        does (a column of nulls takes the others' type)."""
        if not refs:
            raise ValueError(f"{name}: no table to concatenate")
        handles = []
        for ref in refs:
            fs, path = self._filesystem(ref.uri)
            handles.append(fs.open(path, "rb"))
        try:
            files = [pq.ParquetFile(handle) for handle in handles]
            schema = pa.unify_schemas([f.schema_arrow for f in files], promote_options="permissive")
            folder = self._join(layer)
            tmp = self._tmp(folder, name)
            rows = 0
            try:
                with (
                    self.fs.open(tmp, "wb") as handle,
                    pq.ParquetWriter(
                        handle, schema, compression="zstd", write_statistics=True
                    ) as writer,
                ):
                    for file in files:
                        for batch in file.iter_batches(batch_size=1 << 20):
                            columns = [
                                batch.column(f.name).cast(f.type)
                                if f.name in batch.schema.names
                                else pa.nulls(batch.num_rows, f.type)
                                for f in schema
                            ]
                            writer.write_batch(pa.record_batch(columns, schema=schema))
                            rows += batch.num_rows
                with self.fs.open(tmp, "rb") as handle:
                    sha, _ = _hash_stream(handle)
                final = posixpath.join(folder, f"{name}-{sha[:12]}.parquet")
                self._commit(tmp, final)
            except BaseException:
                self._discard(tmp)
                raise
        finally:
            for handle in handles:
                handle.close()
        summary = _schema_summary(pl.from_arrow(schema.empty_table()).schema)  # type: ignore[union-attr]
        return TableRef(uri=self._uri(final), sha256=sha, rows=rows, columns=summary)

    # -- reading ------------------------------------------------------------------------------
    def verify(self, ref: TableRef | FileRef) -> None:
        fs, path = self._filesystem(ref.uri)
        if not fs.exists(path):
            raise IntegrityError(f"{ref.uri}: referenced file is missing")
        with fs.open(path, "rb") as handle:
            sha, _ = _hash_stream(handle)
        if sha != ref.sha256:
            raise IntegrityError(
                f"{ref.uri}: content hash {sha[:12]} != referenced {ref.sha256[:12]}"
            )

    def read_table(self, ref: TableRef, *, verify: bool = False) -> pl.DataFrame:
        return read_table(ref, verify=verify, located=self._filesystem(ref.uri))

    def read_json(self, layer: Layer, name: str) -> Any:
        with self.fs.open(self._join(layer, name), "rb") as handle:
            return json.loads(handle.read().decode())


def read_table(
    ref: TableRef,
    *,
    verify: bool = False,
    columns: list[str] | None = None,
    located: tuple[Any, str] | None = None,
) -> pl.DataFrame:
    """Read a referenced table (optionally checking its content hash first), through
    ``located`` (a file system and path) when given, else the one
    :func:`storage.files.filesystem` gives for its uri."""
    fs, path = located or filesystem(ref.uri)
    if not fs.exists(path):
        raise IntegrityError(f"{ref.uri}: referenced file is missing")
    if verify:
        with fs.open(path, "rb") as handle:
            sha, _ = _hash_stream(handle)
        if sha != ref.sha256:
            raise IntegrityError(
                f"{ref.uri}: content hash {sha[:12]} != referenced {ref.sha256[:12]}"
            )
    if not is_uri(ref.uri):
        return pl.read_parquet(path, columns=columns)
    with fs.open(path, "rb") as handle:
        return pl.read_parquet(io.BytesIO(handle.read()), columns=columns)


def scan_table(ref: TableRef) -> pl.LazyFrame:
    """Lazily scan a referenced table (local files are scanned without loading)."""
    if not is_uri(ref.uri):
        return pl.scan_parquet(ref.uri)
    return read_table(ref).lazy()


def iter_batches(ref: TableRef, batch_rows: int = 1_000_000) -> Iterator[pa.RecordBatch]:
    fs, path = filesystem(ref.uri)
    with fs.open(path, "rb") as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows)


def write_manifest(store: Store, name: str, body: dict[str, Any], texts: dict[str, str]) -> FileRef:
    """A JSON manifest plus its model texts, each written once under its content hash."""
    files: dict[str, str] = {}
    for digest, text in sorted(texts.items()):
        file_name = f"text-{digest[:16]}.txt"
        if not store.exists("models", file_name):
            store.write_text("models", file_name, text)
        files[digest] = file_name
    return store.write_json("models", name, body | {"text_files": files})


def read_manifest(uri: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest body and its model texts by hash (files next to the manifest)."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        body: dict[str, Any] = json.loads(handle.read().decode())
    folder = posixpath.dirname(path)
    texts: dict[str, str] = {}
    for digest, file_name in body.pop("text_files", {}).items():
        with fs.open(posixpath.join(folder, file_name), "rb") as handle:
            texts[digest] = handle.read().decode()
    return body, texts


def _read_at_most(handle: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes from a binary handle (never more, however large the file)."""
    parts: list[bytes] = []
    got = 0
    while got < limit:
        chunk: bytes = handle.read(min(_CHUNK, limit - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_verified_text(ref: FileRef, *, max_bytes: int) -> str:
    """The UTF-8 text a reference names, verified against its sha256, read with a size cap.

    Reads at most ``max_bytes + 1`` bytes (a larger file is refused by its size first when
    the file system reports one). Every verification failure raises :class:`UnverifiedError`
    with a one-line message that never includes file content: ``update file not found``
    (also for a folder), ``update file is not readable``, ``update is N bytes, limit M``
    (``update is more than M bytes, limit M`` when the file system reports no size),
    ``content does not match its sha256``, ``not UTF-8 text``. Other I/O errors (network,
    unknown protocol) propagate unchanged.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    fs, path = filesystem(ref.uri)
    try:
        info = fs.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        size = info.get("size")
        if isinstance(size, int) and size > max_bytes:
            raise UnverifiedError(f"update is {size} bytes, limit {max_bytes}")
        with fs.open(path, "rb") as handle:
            data = _read_at_most(handle, max_bytes + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UnverifiedError("update file not found") from None
    except PermissionError:
        raise UnverifiedError("update file is not readable") from None
    if len(data) > max_bytes:
        raise UnverifiedError(f"update is more than {max_bytes} bytes, limit {max_bytes}")
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise UnverifiedError("content does not match its sha256")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnverifiedError("not UTF-8 text") from None
