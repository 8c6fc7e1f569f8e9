"""The interface of a modality (a kind of source) and the table of registered ones.

A modality says everything fedfuse needs to know about one ``kind`` of source: the canonical
columns it requires, the column that keys its raw rows, its feature options (the
``[parties.sources.features]`` table of the spec), its default feature prefix and display
order, its extra spec checks, how its raw source is read, its preprocessing hooks and the
extraction of its feature frame. Each one is an instance of a :class:`Modality` subclass
passed to :func:`register`.

A source is one file (CSV, Parquet, JSONL, Arrow), read by :meth:`Modality.read`; a
modality whose source is a folder of files (images, documents, per-device logs) subclasses
:class:`FolderModality`, which lists the folder through :func:`storage.sources.read_folder`
and turns each file into one raw row (:meth:`FolderModality.parse_file`).
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import ClassVar

import polars as pl

from storage.files import is_uri
from storage.sources import (
    MAX_FILE_BYTES,
    MAX_FOLDER_FILES,
    ROW,
    CsvLayout,
    FolderFile,
    RawSource,
    SourceBatches,
    read_batches,
    read_folder,
    read_source,
)
from tasks.prepare.text_model import TextModel
from tasks.spec.models import FeatureOptions, SourceSpec, SpecProblem
from tasks.types import KeyNormalisation

#: Registered modalities by kind.
MODALITIES: dict[str, Modality] = {}


@dataclass(frozen=True)
class FeatureInputs:
    """What a modality's extraction needs of the party beside its clean rows."""

    entity: str
    as_of: dt.date
    vocabularies: Mapping[str, list[str]]
    #: The consortium's label column when this source holds it: passed through unchanged
    #: (alignment encodes it as the model's target).
    label: str | None = None
    #: The consortium text model (``[text] model``): text sources add its score.
    text_model: TextModel | None = None
    #: New rows to score: the text model's full model scores every row.
    scoring: bool = False


class Modality(ABC):
    """One kind of source. Subclasses set the class attributes and implement :meth:`extract`;
    the other methods have the defaults of a source keyed by the entity itself."""

    #: The ``kind`` a spec's source gives.
    kind: ClassVar[str]
    #: Where its features come in the consortium schema (lower first).
    order: ClassVar[int]
    #: Model of its ``features`` options (a subclass of :class:`FeatureOptions`).
    options: ClassVar[type[FeatureOptions]] = FeatureOptions
    #: Whether a source's ``path`` names a folder of files (else one file).
    reads_folders: ClassVar[bool] = False

    def read(self, location: str, source: SourceSpec, *, keep: pl.Expr | None = None) -> RawSource:
        """The source's raw rows (its own columns plus ``__row``) and the lines that could
        not be parsed. ``location`` is where the source lies (confined to the party's
        folders already); default: the file read by :func:`storage.sources.read_source`
        in the source's format, encoding and CSV layout. ``keep``: the rows wanted (a
        shard), selected while reading where the reader can (``RawSource.selected``)."""
        return read_source(
            location,
            source.file_format,
            encoding=source.encoding,
            csv=csv_layout(source),
            keep=keep,
        )

    def batches(self, location: str, source: SourceSpec) -> SourceBatches | None:
        """The source's rows batch by batch (:func:`storage.sources.read_batches`), as
        :meth:`read` reads them, for a source split once into shards; ``None`` where it is
        not read in batches (folders; a Parquet or Arrow file in an object store, read whole
        and filtered per shard instead)."""
        fmt = source.file_format
        if self.reads_folders or (fmt in ("parquet", "arrow") and is_uri(location)):
            return None
        if fmt not in ("csv", "jsonl", "parquet", "arrow"):
            return None
        return read_batches(
            location, source.file_format, encoding=source.encoding, csv=csv_layout(source)
        )

    def required_columns(self, source: SourceSpec) -> tuple[str, ...]:
        """Canonical columns the source must map (besides the key)."""
        return ()

    def default_prefix(self, source: SourceSpec) -> str:
        """Feature name prefix when the spec gives none."""
        return self.kind

    def prefix(self, source: SourceSpec) -> str:
        """The source's feature name prefix: the spec's, else :meth:`default_prefix`."""
        return source.features.prefix or self.default_prefix(source)

    def describe(self, source: SourceSpec) -> str:
        """How the spec summary names the source's kind."""
        return self.kind

    def holds_label(self, source: SourceSpec) -> bool:
        """Whether the source may map the label (one row per entity)."""
        return False

    def key_column(self, source: SourceSpec, *, entity: str) -> str:
        """The canonical column keying the raw rows (normalised like the entity key)."""
        return entity

    def key_problems(self, source: SourceSpec, *, at: str, entity: str) -> list[SpecProblem]:
        """Spec problems of how the source reaches the entity key (``at``: the source's key
        path, e.g. ``parties[0].sources[1]``)."""
        if entity in source.columns:
            return []
        return [
            SpecProblem(
                path=f"{at}.columns", message=f"needs a mapping for the entity key '{entity}'"
            )
        ]

    def bounds(self, source: SourceSpec) -> dict[str, tuple[float, str]]:
        """Canonical column -> (largest magnitude after unit conversion, how a rejection
        states it): values the feature arithmetic cannot take are quarantined."""
        return {}

    def one_row_per_entity(self, source: SourceSpec) -> bool:
        """Whether rows sharing an entity key are quarantined as conflicting."""
        return False

    def attach_entity(
        self,
        frame: pl.DataFrame,
        source: SourceSpec,
        entity_map: pl.DataFrame | None,
        *,
        entity: str,
        normalisation: KeyNormalisation,
    ) -> tuple[pl.DataFrame, list[str]]:
        """The coerced rows (``__row``, canonical columns, ``reject_reason``) with the entity
        key attached, and the canonical columns of the clean table in order."""
        return frame, list(source.columns)

    @abstractmethod
    def extract(
        self, clean: pl.LazyFrame, source: SourceSpec, inputs: FeatureInputs
    ) -> pl.DataFrame:
        """The feature frame: one row per entity, the entity key and unprefixed features."""


def csv_layout(source: SourceSpec) -> CsvLayout | None:
    """The reader's layout of a CSV source from its ``csv`` options (none: the defaults)."""
    options = source.csv
    if options is None:
        return None
    return CsvLayout(
        header=options.header,
        names=tuple(options.names) if options.names is not None else None,
        delimiter=options.delimiter,
        null_values=tuple(options.null_values),
        skip_rows=options.skip_rows,
        comment_prefix=options.comment_prefix,
        quote_char=options.quote_char,
    )


class FileRejected(ValueError):
    """One file of a folder source cannot be a raw row: it is quarantined with this reason
    (a reason names what is wrong, never the file's name or content)."""


#: Columns every row of a folder source has: the file's path relative to the folder, its
#: name without the last suffix, its size in bytes.
FOLDER_COLUMNS: dict[str, pl.DataType] = {
    "path": pl.String(),
    "stem": pl.String(),
    "size": pl.Int64(),
}


class FolderModality(Modality):
    """A modality whose source is a folder of files, one raw row per file matching
    :attr:`pattern` (sorted by relative path; ``__row`` is the position in that order).

    Every row has :data:`FOLDER_COLUMNS`; :meth:`parse_file` adds :attr:`file_columns` from
    the file's bytes. The spec maps these like any raw columns (e.g. the entity key from
    ``stem`` for files named ``<entity>.txt``). A file over :attr:`max_file_bytes`, or one
    :meth:`parse_file` rejects (:class:`FileRejected`), is quarantined to ``rejected/`` with
    its reason and its relative path; an empty folder, one with more than :attr:`max_files`
    matching files, or one holding a symbolic link is refused naming the folder."""

    reads_folders = True
    #: Which files are rows: ``fnmatch`` on the path relative to the folder (``*`` crosses
    #: subfolders).
    pattern: ClassVar[str] = "*"
    max_files: ClassVar[int] = MAX_FOLDER_FILES
    max_file_bytes: ClassVar[int] = MAX_FILE_BYTES
    #: Columns :meth:`parse_file` returns, with their dtypes.
    file_columns: ClassVar[Mapping[str, pl.DataType]] = {}

    def parse_file(self, file: FolderFile, data: bytes, source: SourceSpec) -> dict[str, object]:
        """The :attr:`file_columns` of one file from its bytes; raise :class:`FileRejected`
        to quarantine it."""
        return {}

    def read(self, location: str, source: SourceSpec, *, keep: pl.Expr | None = None) -> RawSource:
        listing = read_folder(
            location, self.pattern, max_bytes=self.max_file_bytes, max_files=self.max_files
        )
        schema = {ROW: pl.Int64(), **FOLDER_COLUMNS, **self.file_columns}
        rows: dict[str, list[object]] = {name: [] for name in schema}
        bad: list[tuple[int, str, str]] = []
        for number, file in enumerate(listing.files, start=1):
            if file.oversized:
                bad.append((number, file.path, f"file over {self.max_file_bytes} bytes"))
                continue
            try:
                parsed = self.parse_file(file, file.read(), source)
            except FileRejected as exc:
                bad.append((number, file.path, str(exc)))
                continue
            stem = PurePosixPath(file.path).stem
            record = {ROW: number, "path": file.path, "stem": stem, "size": file.size}
            for name in self.file_columns:
                record[name] = parsed.get(name)
            for name, value in record.items():
                rows[name].append(value)
        return RawSource(pl.DataFrame(rows, schema=schema), bad)


def register(modality: Modality) -> Modality:
    """Add ``modality`` to the registry under its kind (a second registration of the same
    kind by another class is refused); returns it."""
    prior = MODALITIES.get(modality.kind)
    if prior is not None and _name(prior) != _name(modality):
        raise ValueError(f"modality kind {modality.kind!r} is registered already ({_name(prior)})")
    MODALITIES[modality.kind] = modality
    return modality


def _name(modality: Modality) -> str:
    return f"{type(modality).__module__}.{type(modality).__qualname__}"
