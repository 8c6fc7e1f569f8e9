"""IO of private set intersection: messages as Arrow IPC files, alignments as Parquet.

Messages (blinded sets, alignment answers) travel through the coordinator store as
uncompressed Arrow IPC streams: what lies in the file is exactly the blinded values and
opaque ids of the message, nothing else. A party's alignment (its rows -> alignment ids)
stays in its own store.
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import polars as pl
import pyarrow as pa
from pyarrow import ipc

from storage.files import read_bytes
from storage.store import FileRef, Layer, Store, TableRef

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def _safe(value: str, what: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '_' and '-'")
    return value


def message_name(run_id: str, table: pa.Table) -> str:
    """``psi-<run>-<kind>-<sender>-to-<recipient>[-<role>]-<hash12>.arrow``."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    parts = [
        "psi",
        _safe(run_id, "run id"),
        meta.get("kind", "message"),
        _safe(meta.get("sender", "?"), "sender"),
        "to",
        _safe(meta.get("recipient", "?"), "recipient"),
    ]
    if "role" in meta:
        parts.append(meta["role"])
    return "-".join(parts)


def write_message(
    store: Store, table: pa.Table, *, run_id: str, layer: Layer = "aligned"
) -> FileRef:
    """Write one message table atomically as ``<layer>/<name>-<hash12>.arrow``."""
    sink = io.BytesIO()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    data = sink.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    return store.write_bytes(layer, f"{message_name(run_id, table)}-{digest[:12]}.arrow", data)


def read_message(location: str) -> pa.Table:
    """A message table written by :func:`write_message`."""
    with ipc.open_stream(pa.py_buffer(read_bytes(location))) as reader:
        return reader.read_all()


def write_alignment(store: Store, table: pl.DataFrame, *, run_id: str) -> TableRef:
    """A party's alignment (``row``, ``align_id``) into its own ``aligned/`` layer."""
    return store.write_table(table, "aligned", f"psi-alignment-{_safe(run_id, 'run id')}")


MASTER_NAME = "psi-master.key"


def party_master_secret(store: Store) -> bytes:
    """The party's own PSI master secret (32 random bytes in its ``aligned/`` layer, made on
    first use). It never leaves the party's store; per-run secrets derive from it."""
    if not store.exists("aligned", MASTER_NAME):
        store.write_bytes("aligned", MASTER_NAME, os.urandom(32))
    return read_bytes(store.location("aligned", MASTER_NAME))
