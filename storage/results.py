"""Where Prefect persists task results: a local folder or an fsspec URI (``s3://...``).

Prefect's ``result_storage=`` takes a :class:`pathlib.Path` (a local folder) or a writable
file-system block; a URI must not go through ``Path`` (``s3://b/r`` would become ``s3:/b/r``).

Prefect 3 refuses a block that is not saved server-side, and a saved
:class:`prefect.filesystems.RemoteFileSystem` keeps its ``settings`` (fsspec options, i.e.
object-store credentials) in the server's database in plain text. So a URI gets a
:class:`FedfuseResultStorage`: a ``RemoteFileSystem`` saved with its base path only (named
``fedfuse-results-<hash of the location>``, overwritten in place), whose file system is built
with the options given in this process or else those registered for the location
(:func:`storage.files.register_options`). The credentials stay in memory; a process that
loads the block by id (say a worker reading a persisted result) needs the options registered
too (``tasks.spec.load.load_spec`` does it).
"""

from __future__ import annotations

import hashlib
import threading
import urllib.parse
from pathlib import Path
from typing import Any, ClassVar

import fsspec
from prefect.filesystems import RemoteFileSystem
from pydantic import PrivateAttr

from storage.files import is_uri, registered_options

#: The results folder when the spec's ``[run] results`` does not name one.
DEFAULT_RESULTS = ".fedfuse/results"


class FedfuseResultStorage(RemoteFileSystem):
    """A remote results location whose fsspec options are never saved with the block."""

    _block_type_name: ClassVar[str] = "Fedfuse Result Storage"
    _description: ClassVar[str] = (
        "fedfuse task results on an fsspec file system; the storage options (credentials) "
        "are resolved in the process that uses it, never saved."
    )
    _fedfuse_options: dict[str, Any] | None = PrivateAttr(default=None)

    @property
    def filesystem(self) -> fsspec.AbstractFileSystem:
        if not self._filesystem:
            scheme = urllib.parse.urlsplit(self.basepath).scheme
            options = self._fedfuse_options
            if options is None:
                options = registered_options(self.basepath)
            self._filesystem = fsspec.filesystem(scheme, **(self.settings or options))
        return self._filesystem


_SAVED: dict[tuple[str, str], FedfuseResultStorage] = {}
_SAVED_LOCK = threading.Lock()


def block_name(location: str) -> str:
    """The saved block's name for a results location (no credentials in it)."""
    return "fedfuse-results-" + hashlib.sha256(location.encode()).hexdigest()[:12]


def result_storage(
    location: str, storage_options: dict[str, Any] | None = None
) -> Path | FedfuseResultStorage:
    """What Prefect's ``result_storage=`` accepts for ``location``: a Path for a local
    folder, a saved :class:`FedfuseResultStorage` (a ``RemoteFileSystem``) for a URI, using
    ``storage_options`` (fsspec options; default: those registered for the location) in this
    process only: the saved block holds the base path alone."""
    if not is_uri(location):
        return Path(location)
    from prefect.settings import PREFECT_API_URL

    key = (location, str(PREFECT_API_URL.value()))
    with _SAVED_LOCK:
        saved = _SAVED.get(key)
        if saved is None:
            saved = FedfuseResultStorage(basepath=location, settings={})
            saved.save(block_name(location), overwrite=True, _sync=True)  # type: ignore[call-arg]
            _SAVED[key] = saved
    block = saved.model_copy()
    block._block_document_id = saved._block_document_id
    block._block_document_name = saved._block_document_name
    block._filesystem = None
    block._fedfuse_options = storage_options
    return block
