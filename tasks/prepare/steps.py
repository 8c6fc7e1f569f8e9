"""Per-party pipeline steps: thin Prefect tasks around the pure transforms.

Each step reads its inputs by reference, calls one pure function, writes its outputs through
the party's :class:`~storage.store.Store` and returns small typed references. Cache keys come
from those references (content hashes), so unchanged work is skipped on retries and reruns.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import polars as pl
from prefect import task
from prefect.client.schemas.objects import State
from pydantic import BaseModel, ConfigDict, Field

from storage.files import ConfinementError, confined
from storage.runs import read_text_model
from storage.secrets import SecretError, resolve_secret, secret_fingerprint
from storage.sources import ROW, NotBatchable, RawSource, SourceError, read_source
from storage.splits import SplitSource, read_split, split_batches
from storage.store import FileRef, Store, TableRef, fingerprint, read_table, scan_table
from tasks.caching import content_cache_key
from tasks.prepare.align import (
    AlignError,
    FeatureColumn,
    align_features,
    encode_label,
    fuse_tables,
    hash_keys,
)
from tasks.prepare.modalities import FeatureInputs, modality_of
from tasks.prepare.modalities.events import device_map
from tasks.prepare.modalities.text import (
    TextOptions,
    party_text_matrix,
    text_tokens,
    text_window,
)
from tasks.prepare.preprocess import (
    KEY_CONTROL,
    KEY_SEPARATOR,
    TEST_FILE_REASON,
    LabelRule,
    Preprocessed,
    PreprocessError,
    QualityReport,
    SplitRule,
    TestFile,
    composite_key,
    key_parts,
    normalise_key,
    preprocess,
    raw_name,
)
from tasks.prepare.shards import Shard, all_shards, shard_filter, shard_index
from tasks.prepare.text_model import (
    CrossFitModels,
    DocumentCounts,
    LinearWeights,
    TextModel,
    TextModelError,
    TextModelSettings,
    TextVocabulary,
    document_frequencies,
    fold_of,
    learn_text_model,
    ngram_terms,
    party_updates,
)
from tasks.prepare.vocabulary import (
    VocabularyError,
    entity_value_counts,
    other_columns,
    resolve_vocabularies,
)
from tasks.spec.models import (
    FedSpec,
    KeySpec,
    SecretRef,
    SourceSpec,
    SpecError,
    TextSpec,
    infer_format,
    label_source,
    vocabulary_value_problem,
)
from tasks.types import REASON, SPLIT, JoinKind, KeyNormalisation, Objective

logger = logging.getLogger(__name__)

IO_RETRIES = 2
IO_RETRY_DELAYS: list[float] = [1.0, 5.0]
#: Failures a second try cannot fix: a missing, unreadable or malformed file fails at once.
DETERMINISTIC_IO: tuple[type[OSError], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether a step that failed with ``exc`` may succeed on a second try: time-outs, lost
    connections and other I/O errors of network file systems and object stores. Validation
    errors (``ValueError``: a bad file, a missing column) and missing or unreadable files
    are deterministic and never retried."""
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, DETERMINISTIC_IO)


class StepError(RuntimeError):
    """A party pipeline step failed in an unforeseen way; the message names the party, the
    source and the step (the error itself, which may quote values, stays in the party's
    logs as the cause)."""


#: Errors whose messages already name the file, source or column they are about (and
#: I/O errors, which keep their type so that :func:`retry_transient` can judge them).
NAMED_ERRORS: tuple[type[BaseException], ...] = (
    SourceError,
    PreprocessError,
    AlignError,
    SecretError,
    ConfinementError,
    SpecError,
    VocabularyError,
    TextModelError,
    OSError,
)


@contextmanager
def naming_source(party: str, source: str, step: str) -> Iterator[None]:
    """Re-raise any other failure of ``step`` as a :class:`StepError` naming the source."""
    try:
        yield
    except NAMED_ERRORS:
        raise
    except Exception as exc:
        raise StepError(
            f"{party}/{source}: {step} failed ({type(exc).__name__}); the party's logs hold "
            "the details"
        ) from exc


def retry_transient(task: object, task_run: object, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry only :func:`is_transient` failures."""
    exc = state.data
    return isinstance(exc, BaseException) and is_transient(exc)


class PartyContext(BaseModel):
    """What a party's steps need to know of the consortium (no secret value)."""

    model_config = ConfigDict(frozen=True)

    party: str
    store: str
    entity: str
    normalisation: KeyNormalisation
    vocabularies: dict[str, list[str]] = Field(
        description="Resolved vocabularies (listed or learned; 'other' last for a bucket)"
    )
    other: list[str] = Field(
        default_factory=list,
        description="Category columns whose values outside the vocabulary map to 'other'",
    )
    as_of: dt.date
    task: Objective
    label: str
    label_source: str | None
    secret: SecretRef
    join: JoinKind
    num_classes: int | None = None
    label_positive: str | None = Field(
        default=None, description="Binary: the raw label value that is class 1"
    )
    label_values: dict[str, float] | None = Field(
        default=None, description="Raw label value -> label value"
    )
    roots: list[str] = Field(
        default_factory=list,
        description="Folders the party's sources may be read from (its store and imports)",
    )
    split_column: str | None = Field(
        default=None, description="Canonical column of the label source deciding the split"
    )
    split_values: dict[str, str] = Field(
        default_factory=dict,
        description="Raw value of the split column -> train, valid or test",
    )
    validation_fraction: float = Field(
        default=0.0, description="Share of entities the hashed key sends to validation"
    )
    test_fraction: float = Field(
        default=0.0, description="Share of entities the hashed key sends to test"
    )
    text_model: FileRef | None = Field(
        default=None,
        description="The consortium text model in the coordinator store ([text] model)",
    )
    scoring: bool = Field(default=False, description="New rows to score (no label)")

    @classmethod
    def from_spec(
        cls,
        spec: FedSpec,
        party_id: str,
        *,
        as_of: dt.date | None = None,
        vocabularies: Mapping[str, list[str]] | None = None,
        text_model: FileRef | None = None,
    ) -> PartyContext:
        """``vocabularies``: the resolved ones (:func:`resolve_vocabularies`; default: the
        spec's listed ones, an error when the spec learns one)."""
        party = spec.party(party_id)
        holder = label_source(spec, party)
        if vocabularies is None:
            vocabularies = resolve_vocabularies(spec.vocabularies, {})
        return cls(
            party=party.id,
            store=party.store,
            entity=spec.consortium.entity,
            normalisation=spec.consortium.key_normalisation,
            vocabularies=dict(vocabularies),
            other=other_columns(spec.vocabularies),
            as_of=as_of or spec.consortium.as_of,
            task=spec.consortium.task,
            label=spec.consortium.label.column,
            label_source=holder.id if holder else None,
            secret=spec.consortium.secret,
            join=spec.fusion.join,
            num_classes=spec.consortium.label.num_classes,
            label_positive=spec.consortium.label.positive,
            label_values=spec.consortium.label.values,
            roots=party.roots,
            split_column=spec.training.split_column,
            split_values=spec.training.split_values.mapping(),
            validation_fraction=spec.training.validation_fraction,
            test_fraction=spec.training.test_fraction,
            text_model=text_model,
        )


class CleanOutput(BaseModel):
    source: str
    clean: TableRef
    rejected: TableRef | None
    quality: QualityReport


class AlignedOutput(BaseModel):
    source: str
    table: TableRef
    schema_: list[FeatureColumn]


class FusedOutput(BaseModel):
    party: str
    table: TableRef
    schema_file: FileRef
    features: list[FeatureColumn]
    quality: list[QualityReport]
    feature_tables: dict[str, TableRef] = Field(
        default_factory=dict,
        description="Per-source features tables (in the party's store; they hold its own keys)",
    )
    key_tables: dict[str, TableRef] = Field(
        default_factory=dict,
        description="Scoring: per-source normalised key -> the party's raw key (its store only)",
    )
    clean_tables: dict[str, TableRef] = Field(
        default_factory=dict,
        description="Per-source clean tables (in the party's store; they hold its own keys)",
    )


def secret_tag(ref: SecretRef) -> str:
    """Fingerprint of the current secret: part of alignment cache keys, reveals nothing."""
    return secret_fingerprint(resolve_secret(env=ref.env, block=ref.block))


@task(
    name="fingerprint-source",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
)
def fingerprint_source(location: str, roots: list[str] | None = None) -> FileRef:
    """Hash a raw source where it lies (its content hash keys every later step); with
    ``roots``, only when it lies (symlinks resolved) inside one of them."""
    return fingerprint(location, roots=roots or None)


def read_entity_map(source: SourceSpec, entity_map: FileRef | None) -> pl.DataFrame | None:
    """The raw rows of an events source's entity map (none for other sources)."""
    if source.entity_map is None or entity_map is None:
        return None
    fmt = source.entity_map.format or infer_format(source.entity_map.path)
    return read_source(entity_map.uri, fmt).frame


def shard_rows(data: RawSource, keep: pl.Expr | None, shard: Shard | None) -> RawSource:
    """The rows of ``shard`` in what a reader returned (filtered here when the reader could
    not select while reading); the unparsable lines only in the first shard. A file lacking
    a column the shard's key needs goes whole to the first shard (preprocessing names the
    missing column there, and the other shards have no rows to refuse)."""
    if shard is None or keep is None:
        return data
    frame = data.frame
    if not data.selected:
        if set(keep.meta.root_names()) <= set(frame.columns):
            frame = frame.filter(keep)
        elif not shard.first:
            frame = frame.head(0)
    return RawSource(frame, data.bad_lines if shard.first else [], selected=True)


def shard_devices(
    ctx: PartyContext, source: SourceSpec, mapping: pl.DataFrame | None
) -> pl.DataFrame | None:
    """An events source's device map as the shard key needs it (none for other sources)."""
    if mapping is None or source.entity_map is None:
        return None
    return device_map(
        mapping, source.entity_map, entity=ctx.entity, normalisation=ctx.normalisation
    )


class SplitOutput(BaseModel):
    """A source's file, and its external test file, split once into entity-hash shards."""

    count: int = Field(ge=2)
    main: SplitSource
    test: SplitSource | None = None


def run_split(
    ctx: PartyContext,
    source: SourceSpec,
    raw: FileRef,
    entity_map: FileRef | None,
    test: FileRef | None,
    count: int,
) -> SplitOutput | None:
    """Split a source file (and its external test file) once into ``count`` entity-hash
    shards in the party's store (:mod:`storage.splits`), so that no shard reads the whole
    file or computes every row's shard again; ``None`` for a source each shard reads
    itself (folders, Parquet or Arrow in an object store, or holding invalid UTF-8)."""
    modality = modality_of(source)
    if modality.batches(raw.uri, source) is None:
        return None
    if ctx.roots:
        for ref in (raw, entity_map, test):
            if ref is not None:
                confined(ref.uri, ctx.roots)
    with naming_source(ctx.party, source.id, "split into shards"):
        devices = shard_devices(ctx, source, read_entity_map(source, entity_map))
        route = shard_index(
            source, count, entity=ctx.entity, normalisation=ctx.normalisation, devices=devices
        )
        store = Store(ctx.store)

        def split(ref: FileRef, name: str) -> SplitSource:
            batches = modality.batches(ref.uri, source)
            assert batches is not None  # the same source's format
            return split_batches(batches, route, count, store, name)

        try:
            return SplitOutput(
                count=count,
                main=split(raw, source.id),
                test=split(test, f"{source.id}.test") if test is not None else None,
            )
        except NotBatchable:
            return None  # invalid UTF-8 in a Parquet or Arrow file: each shard reads it whole


def read_preprocessed(
    ctx: PartyContext,
    source: SourceSpec,
    raw: FileRef,
    entity_map: FileRef | None,
    test: FileRef | None = None,
    shard: Shard | None = None,
    split: SplitOutput | None = None,
) -> Preprocessed:
    """Read one source (its entity map, its external test file) and preprocess it; nothing
    is written. ``shard``: only the rows of the entities of that entity-hash shard
    (:mod:`tasks.prepare.shards`), with the file's row numbers: read from ``split`` (the
    source split once) when given, else selected from the file while reading."""
    keep = None
    mapping = read_entity_map(source, entity_map)
    held_out = None
    if shard is not None and split is not None:
        if split.count != shard.count or (test is None) != (split.test is None):
            raise StepError(f"{ctx.party}/{source.id}: the split does not match shard {shard.name}")
        data = read_split(split.main, shard.index)
        if split.test is not None:
            test_data = read_split(split.test, shard.index)
            held_out = TestFile(raw=test_data.frame, bad_lines=test_data.bad_lines)
    else:
        if shard is not None:
            keep = shard_filter(
                source,
                shard,
                entity=ctx.entity,
                normalisation=ctx.normalisation,
                devices=shard_devices(ctx, source, mapping),
            )
        data = shard_rows(modality_of(source).read(raw.uri, source, keep=keep), keep, shard)
        if test is not None:
            test_data = shard_rows(
                modality_of(source).read(test.uri, source, keep=keep), keep, shard
            )
            held_out = TestFile(raw=test_data.frame, bad_lines=test_data.bad_lines)
    return preprocess(
        data.frame,
        source,
        party=ctx.party,
        entity=ctx.entity,
        normalisation=ctx.normalisation,
        vocabularies=ctx.vocabularies,
        entity_map=mapping,
        bad_lines=data.bad_lines,
        label=label_rule(ctx, source),
        other=ctx.other,
        split=split_rule(ctx, source),
        test=held_out,
    )


def run_preprocess(
    ctx: PartyContext,
    source: SourceSpec,
    raw: FileRef,
    entity_map: FileRef | None,
    test: FileRef | None = None,
    shard: Shard | None = None,
    split: SplitOutput | None = None,
) -> CleanOutput:
    """Preprocess one source; ``test``: its external test file (the label source's
    ``test_path``), read the same way and merged as the test split. ``shard``: one
    entity-hash shard of it (read from ``split`` when the source was split once), written
    as ``<source>.shard-<i>-of-<n>`` (its quality report is the merged source's part:
    :func:`run_merge_clean` writes the source's)."""
    if ctx.roots:  # again at the read: a link swapped since the fingerprint is refused too
        confined(raw.uri, ctx.roots)
        if entity_map is not None:
            confined(entity_map.uri, ctx.roots)
        if test is not None:
            confined(test.uri, ctx.roots)
    with naming_source(ctx.party, source.id, "preprocess"):
        result = read_preprocessed(ctx, source, raw, entity_map, test, shard, split)
        store = Store(ctx.store)
        name = table_name(source, shard)
        clean = store.write_table(result.clean, "clean", name)
        rejected = (
            store.write_table(result.rejected, "rejected", name) if result.rejected.height else None
        )
    if shard is None:
        store.write_json(
            "reports", f"quality-{source.id}.json", result.quality.model_dump(mode="json")
        )
    return CleanOutput(source=source.id, clean=clean, rejected=rejected, quality=result.quality)


#: The party's own entity key, exactly as exported (key tables, predictions); a composite
#: key's parts are ``__raw_key:<raw column>`` each.
RAW_KEY = "__raw_key"
RAW_KEY_PART = f"{RAW_KEY}:"


def spec_key_table(
    frame: pl.DataFrame, key: KeySpec, *, entity: str, normalisation: KeyNormalisation
) -> pl.DataFrame:
    """The raw keys of a source with a ``key``: the row number as text beside itself, or
    the composite key beside its part columns as exported (rows with a part missing, or
    holding the separator or a control character, are left out: preprocessing refuses
    them). A part column the file lacks gives no rows (preprocessing names it)."""
    if key.row_number:
        number = pl.col(ROW).cast(pl.String)
        return frame.select(number.alias(entity), number.alias(RAW_KEY))
    if any(c not in frame.columns for c in key.columns):
        schema = {entity: pl.String, **{RAW_KEY_PART + c: pl.String for c in key.columns}}
        return pl.DataFrame(schema=schema)
    parts = key_parts(key, normalisation)
    usable = pl.all_horizontal(
        [
            p.is_not_null()
            & ~p.str.contains(KEY_CONTROL)
            & ~p.str.contains(KEY_SEPARATOR, literal=True)
            for p in parts
        ]
    )
    return (
        frame.filter(usable)
        .select(
            composite_key(parts).alias(entity),
            *[pl.col(c).cast(pl.String).alias(RAW_KEY_PART + c) for c in key.columns],
        )
        .unique(entity, keep="first", maintain_order=True)
    )


def run_raw_keys(
    ctx: PartyContext, source: SourceSpec, raw: FileRef, entity_map: FileRef | None
) -> TableRef:
    """The source's entity keys as the party exported them beside their normalised form
    (first spelling of each normalised key), in the party's ``clean/keys-<source>``:
    predictions show the party's own ids. Events sources with an entity map take them from it;
    a source with a ``key`` gives its row numbers or its composite key's part columns."""
    if source.entity_map is not None and entity_map is not None:
        if ctx.roots:
            confined(entity_map.uri, ctx.roots)
        fmt = source.entity_map.format or infer_format(source.entity_map.path)
        frame = read_source(entity_map.uri, fmt).frame
        column = source.entity_map.columns.get(ctx.entity)
    else:
        if ctx.roots:
            confined(raw.uri, ctx.roots)
        frame = modality_of(source).read(raw.uri, source).frame
        column = source.columns.get(ctx.entity)
        if source.key is not None:
            keys = spec_key_table(
                frame, source.key, entity=ctx.entity, normalisation=ctx.normalisation
            )
            return Store(ctx.store).write_table(keys, "clean", f"keys-{source.id}")
    name = raw_name(ctx.entity, column) if column is not None else ctx.entity
    if name not in frame.columns:
        keys = pl.DataFrame(schema={ctx.entity: pl.String, RAW_KEY: pl.String})
    else:
        keys = (
            frame.select(pl.col(name).cast(pl.String).alias(RAW_KEY))
            .with_columns(normalise_key(pl.col(RAW_KEY), ctx.normalisation).alias(ctx.entity))
            .drop_nulls()
            .unique(ctx.entity, keep="first", maintain_order=True)
            .select(ctx.entity, RAW_KEY)
        )
    return Store(ctx.store).write_table(keys, "clean", f"keys-{source.id}")


def label_rule(ctx: PartyContext, source: SourceSpec) -> LabelRule | None:
    """The label check for the party's label source (none elsewhere, nor when scoring)."""
    if source.id != ctx.label_source or ctx.label not in source.columns:
        return None
    return LabelRule(
        column=ctx.label,
        task=ctx.task,
        num_classes=ctx.num_classes,
        positive=ctx.label_positive,
        values=ctx.label_values,
    )


def split_rule(ctx: PartyContext, source: SourceSpec) -> SplitRule | None:
    """How the party's label source decides each entity's split: its split column (when it
    maps the consortium's); none elsewhere, nor when scoring (the hashed key decides)."""
    if source.id != ctx.label_source or ctx.split_column not in source.columns:
        return None
    return SplitRule(column=ctx.split_column, values=ctx.split_values)


def table_name(source: SourceSpec, shard: Shard | None) -> str:
    """The name of a source's tables in each layer (a shard's: ``<source>.shard-2-of-4``)."""
    return source.id if shard is None else f"{source.id}.{shard.name}"


def run_features(
    ctx: PartyContext, source: SourceSpec, cleaned: CleanOutput, shard: Shard | None = None
) -> TableRef:
    """The source's features (of one shard's entities with ``shard``), extracted by its
    modality."""
    with naming_source(ctx.party, source.id, "feature extraction"):
        model = (
            read_text_model(ctx.text_model, TextModel)
            if ctx.text_model is not None and source.kind == "text"
            else None
        )
        inputs = FeatureInputs(
            entity=ctx.entity,
            as_of=ctx.as_of,
            vocabularies=ctx.vocabularies,
            label=ctx.label if source.id == ctx.label_source else None,
            text_model=model,
            scoring=ctx.scoring,
        )
        frame = modality_of(source).extract(scan_table(cleaned.clean), source, inputs)
        return Store(ctx.store).write_table(frame, "features", table_name(source, shard))


class ShardOutput(BaseModel):
    """One entity-hash shard of a source, preprocessed and featurised."""

    shard: Shard
    clean: CleanOutput
    features: TableRef


def run_shard(
    ctx: PartyContext,
    source: SourceSpec,
    raw: FileRef,
    entity_map: FileRef | None,
    test: FileRef | None,
    shard: Shard,
    split: SplitOutput | None = None,
) -> ShardOutput:
    """Preprocess one shard of a source (its rows from ``split`` when the source was split
    once) and extract its entities' features: what a shard task does wherever it runs (it
    needs the party's store and sources, nothing else)."""
    clean = run_preprocess(ctx, source, raw, entity_map, test, shard, split)
    features = run_features(ctx, source, clean, shard)
    return ShardOutput(shard=shard, clean=clean, features=features)


def _in_order(source: SourceSpec, shards: list[ShardOutput]) -> list[ShardOutput]:
    ordered = sorted(shards, key=lambda s: s.shard.index)
    count = ordered[0].shard.count if ordered else 0
    if [s.shard.index for s in ordered] != list(range(count)) or any(
        s.shard.count != count for s in ordered
    ):
        raise StepError(f"{source.id}: the shards to merge are not one complete set")
    return ordered


def merged_quality(
    parts: list[QualityReport], clean: TableRef, columns: list[str]
) -> QualityReport:
    """The quality report of a whole source from its shards' (``columns``: the source's
    canonical columns, the order unknown categories are listed in): counts added, null
    rates of the merged clean table."""
    first = parts[0]
    by_reason: dict[str, int] = {}
    unknown: dict[str, int] = {}
    for part in parts:
        for kind, n in part.rejected_by_reason.items():
            by_reason[kind] = by_reason.get(kind, 0) + n
        for column, n in part.unknown_categories.items():
            unknown[column] = unknown.get(column, 0) + n
    order = {c: i for i, c in enumerate(columns)}
    rows = sum(p.rows_out for p in parts)
    nulls = scan_table(clean).select(pl.all().null_count()).collect().row(0, named=True)
    return first.model_copy(
        update={
            "rows_in": sum(p.rows_in for p in parts),
            "rows_out": rows,
            "rows_rejected": sum(p.rows_rejected for p in parts),
            "rejected_by_reason": dict(sorted(by_reason.items())),
            "duplicates_removed": sum(p.duplicates_removed for p in parts),
            "null_rates": {c: round(float(n) / rows, 6) if rows else 0.0 for c, n in nulls.items()},
            "unknown_categories": dict(
                sorted(unknown.items(), key=lambda kv: order.get(kv[0], len(order)))
            ),
        }
    )


def run_merge_clean(
    ctx: PartyContext, source: SourceSpec, shards: list[ShardOutput]
) -> CleanOutput:
    """A source's clean table, quarantine and quality report from its shards: clean rows in
    shard order, quarantined rows in the file's order (the main file's, then the external
    test file's), counts as if the file had been processed whole."""
    ordered = _in_order(source, shards)
    store = Store(ctx.store)
    with naming_source(ctx.party, source.id, "merging shards"):
        clean = store.concat_tables([s.clean.clean for s in ordered], "clean", source.id)
        parts = [read_table(s.clean.rejected) for s in ordered if s.clean.rejected is not None]
        rejected = None
        if parts:
            frame = pl.concat(parts, how="diagonal_relaxed")
            from_test = pl.col(REASON).str.starts_with(TEST_FILE_REASON)
            frame = frame.sort(from_test, ROW, maintain_order=True)
            rejected = store.write_table(frame, "rejected", source.id)
        quality = merged_quality([s.clean.quality for s in ordered], clean, list(source.columns))
    store.write_json("reports", f"quality-{source.id}.json", quality.model_dump(mode="json"))
    return CleanOutput(source=source.id, clean=clean, rejected=rejected, quality=quality)


def run_merge_features(
    ctx: PartyContext, source: SourceSpec, shards: list[ShardOutput]
) -> TableRef:
    """A source's features table: its shards' (each entity in exactly one) in shard order."""
    ordered = _in_order(source, shards)
    with naming_source(ctx.party, source.id, "merging shards"):
        return Store(ctx.store).concat_tables([s.features for s in ordered], "features", source.id)


def run_align(ctx: PartyContext, source: SourceSpec, features: TableRef, tag: str) -> AlignedOutput:
    secret = resolve_secret(env=ctx.secret.env, block=ctx.secret.block)
    if secret_fingerprint(secret) != tag:
        raise RuntimeError("the consortium secret changed while the run was in progress")
    label = ctx.label if source.id == ctx.label_source else None
    with naming_source(ctx.party, source.id, "alignment"):
        aligned, schema = align_features(
            read_table(features),
            entity=ctx.entity,
            party=ctx.party,
            source=source.id,
            modality=source.kind,
            prefix=modality_of(source).prefix(source),
            secret=secret,
            vocabularies=ctx.vocabularies,
            label_column=label,
            task=ctx.task,
        )
        ref = Store(ctx.store).write_table(aligned, "aligned", source.id)
    return AlignedOutput(source=source.id, table=ref, schema_=schema)


def run_fuse(
    ctx: PartyContext, aligned: list[AlignedOutput], quality: list[QualityReport]
) -> FusedOutput:
    tables = {a.source: read_table(a.table) for a in aligned}
    with naming_source(ctx.party, "+".join(tables), "fusion"):
        fused = fuse_tables(tables, join=ctx.join)
    store = Store(ctx.store)
    ref = store.write_table(fused, "fused", "fused")
    features = [c for a in aligned for c in a.schema_]
    schema_file = store.write_json(
        "fused", "feature-schema.json", [c.model_dump(mode="json") for c in features]
    )
    store.write_json("reports", "quality.json", [q.model_dump(mode="json") for q in quality])
    return FusedOutput(
        party=ctx.party, table=ref, schema_file=schema_file, features=features, quality=quality
    )


def run_count_values(
    ctx: PartyContext, sources: list[SourceSpec], min_entities: dict[str, int]
) -> dict[str, dict[str, int]]:
    """The party's side of learned vocabularies: for each column of ``min_entities`` (its
    threshold k), the distinct entities per value over the sources mapping it as a category,
    read and preprocessed as the pipeline does (value maps applied, bad rows left out).
    Only values held by at least k entities are counted; no key or row leaves. ``ctx``'s
    vocabularies leave those columns out, so their mapped values are seen."""
    frames: dict[str, list[pl.DataFrame]] = {name: [] for name in min_entities}
    for source in sources:
        held = [
            name
            for name in min_entities
            if name in source.columns and source.columns[name].dtype == "category"
        ]
        if not held:
            continue
        roots = ctx.roots or None
        raw = fingerprint(source.path, roots=roots)
        emap = (
            fingerprint(source.entity_map.path, roots=roots)
            if source.entity_map is not None
            else None
        )
        with naming_source(ctx.party, source.id, "vocabulary count"):
            clean = read_preprocessed(ctx, source, raw, emap).clean
            for name in held:
                frames[name].append(clean.select(ctx.entity, pl.col(name).cast(pl.String)))
    out: dict[str, dict[str, int]] = {}
    for name, parts in frames.items():
        counts = (
            entity_value_counts(
                pl.concat(parts), key=ctx.entity, column=name, min_entities=min_entities[name]
            )
            if parts
            else {}
        )
        out[name] = {v: n for v, n in counts.items() if vocabulary_value_problem(v) is None}
        if len(out[name]) < len(counts):
            logger.warning(  # the party's own log; the values are not named
                "%s: %d value(s) of '%s' cannot name features and are not counted (like any "
                "value outside the vocabulary, they map to the other bucket or to missing)",
                ctx.party,
                len(counts) - len(out[name]),
                name,
            )
    return out


def _clean_tables(
    ctx: PartyContext, sources: list[SourceSpec], step: str
) -> list[tuple[SourceSpec, pl.DataFrame]]:
    """Every source's clean rows, read and preprocessed as the pipeline does."""
    out: list[tuple[SourceSpec, pl.DataFrame]] = []
    roots = ctx.roots or None
    for source in sources:
        raw = fingerprint(source.path, roots=roots)
        emap = (
            fingerprint(source.entity_map.path, roots=roots)
            if source.entity_map is not None
            else None
        )
        with naming_source(ctx.party, source.id, step):
            out.append((source, read_preprocessed(ctx, source, raw, emap).clean))
    return out


def _text_options(source: SourceSpec) -> TextOptions:
    options = source.features
    if not isinstance(options, TextOptions):
        raise TypeError(f"source {source.id!r}: text options expected")
    return options


def run_count_text_terms(
    ctx: PartyContext, sources: list[SourceSpec], settings: TextSpec
) -> DocumentCounts:
    """The party's side of the text vocabulary: documents (non-empty texts in the window)
    per term over its text sources; only terms held by at least ``min_documents`` of them
    are counted. No key, text or row leaves."""
    texts = [s for s in sources if s.kind == "text"]
    documents: list[list[str]] = []
    for source, clean in _clean_tables(ctx, texts, "text term count"):
        options = _text_options(source)
        window = text_window(
            clean, entity=ctx.entity, as_of=ctx.as_of, max_chars=options.text_max_chars
        )
        with naming_source(ctx.party, source.id, "text term count"):
            for text in window.rows.get_column("_scored").drop_nulls().to_list():
                documents.append(ngram_terms(text_tokens(text), settings.ngram_max))
    return document_frequencies(documents, min_documents=settings.min_documents)


class TextUpdates(BaseModel):
    """One party's round of the text model: every fold model and the full model, with the
    training rows each was fitted on."""

    weights: list[LinearWeights] = Field(description="Fold models, then the full model")
    counts: list[int] = Field(description="Training rows of each")

    def pairs(self) -> list[tuple[LinearWeights, int]]:
        """The (weights, count) pairs; none when the lists differ in length, which the
        coordinator's review then rejects (:func:`~tasks.prepare.text_model.update_problems`)."""
        if len(self.weights) != len(self.counts):
            return []
        return list(zip(self.weights, self.counts, strict=True))


TextRows = tuple[Any, np.ndarray, np.ndarray, np.ndarray]
#: The last parties' text-model rows in this process, by content key: the rounds of one run
#: read and preprocess a party's sources once (a dispatched party reads them each round).
_TEXT_ROWS: OrderedDict[str, TextRows] = OrderedDict()
TEXT_ROWS_KEPT = 4


def cached_text_training_data(
    ctx: PartyContext, sources: list[SourceSpec], vocabulary: TextVocabulary, folds: int
) -> TextRows:
    """:func:`text_training_data`, kept per content (the context, the sources, their files'
    content hashes, the vocabulary and the folds) for the next round in this process."""
    roots = ctx.roots or None
    # only the sources the rows are read from (the label's and the texts): another source's
    # problem is its pipeline's to report
    sources = [s for s in sources if s.kind == "text" or s.id == ctx.label_source]
    files = [
        fingerprint(path, roots=roots).sha256
        for s in sources
        for path in (s.path, *([s.entity_map.path] if s.entity_map is not None else []))
    ]
    blob = json.dumps(
        [
            ctx.model_dump(mode="json"),
            [s.model_dump(mode="json", by_alias=True) for s in sources],
            files,
            vocabulary.model_dump(mode="json"),
            folds,
        ],
        sort_keys=True,
    )
    key = hashlib.sha256(blob.encode()).hexdigest()
    if key in _TEXT_ROWS:
        _TEXT_ROWS.move_to_end(key)
        return _TEXT_ROWS[key]
    rows = text_training_data(ctx, sources, vocabulary, folds)
    _TEXT_ROWS[key] = rows
    while len(_TEXT_ROWS) > TEXT_ROWS_KEPT:
        _TEXT_ROWS.popitem(last=False)
    return rows


def text_training_data(
    ctx: PartyContext, sources: list[SourceSpec], vocabulary: TextVocabulary, folds: int
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """The party's text-model rows: TF-IDF per entity of its text sources (one source: its
    matrix; several: their entities' rows stacked), the encoded label, the fold, and which
    rows train (a label, a scored text and the training split)."""
    from scipy import sparse

    from tasks.horizontal.training import frame_splits  # imports LightGBM: only here

    holder = next((s for s in sources if s.id == ctx.label_source), None)
    texts = [s for s in sources if s.kind == "text"]
    empty = (sparse.csr_matrix((0, len(vocabulary.terms))), np.zeros(0), np.zeros(0, np.int64))
    if holder is None or not texts:
        return (*empty, np.zeros(0, dtype=bool))
    ((_, labelled),) = _clean_tables(ctx, [holder], "text model labels")
    secret = resolve_secret(env=ctx.secret.env, block=ctx.secret.block)
    keys = labelled.filter(pl.col(ctx.entity).is_not_null())
    hashed = keys.select(
        pl.col(ctx.entity),
        hash_keys(keys.get_column(ctx.entity), secret),
        encode_label(
            keys.get_column(ctx.label), task=ctx.task, vocabulary=ctx.vocabularies.get(ctx.label)
        ).alias("_label"),
        *([pl.col(SPLIT)] if SPLIT in keys.columns else []),
    ).unique(ctx.entity, keep="first")
    split = frame_splits(
        hashed, validation_fraction=ctx.validation_fraction, test_fraction=ctx.test_fraction
    )
    labels = hashed.select(pl.col(ctx.entity), pl.col("_label"), split.alias("_split"))
    matrices, ys, fold_parts, trains = [], [], [], []
    for source, clean in _clean_tables(ctx, texts, "text model rows"):
        with naming_source(ctx.party, source.id, "text model rows"):
            entities, X, has_text = party_text_matrix(
                clean,
                entity=ctx.entity,
                as_of=ctx.as_of,
                options=_text_options(source),
                vocabulary=vocabulary,
            )
            joined = pl.DataFrame({ctx.entity: entities}).join(
                labels, on=ctx.entity, how="left", validate="1:1", maintain_order="left"
            )
            y = joined.get_column("_label").fill_null(float("nan")).to_numpy()
            in_train = (joined.get_column("_split") == "train").fill_null(False).to_numpy()
            usable = np.isfinite(y) & has_text & in_train
            matrices.append(X)
            ys.append(np.nan_to_num(y))
            fold_parts.append(fold_of(entities, folds))
            trains.append(usable)
    return (
        sparse.vstack(matrices).tocsr(),
        np.concatenate(ys),
        np.concatenate(fold_parts),
        np.concatenate(trains),
    )


def run_fit_text_model(
    ctx: PartyContext,
    sources: list[SourceSpec],
    vocabulary: TextVocabulary,
    models: CrossFitModels,
    settings: TextModelSettings,
    round_: int,
) -> TextUpdates:
    """The party's side of one FedAvg round of the text model (``round_`` names it): the
    global models fitted a few epochs on its own rows. Only weights and counts leave."""
    X, y, fold, train = cached_text_training_data(ctx, sources, vocabulary, len(models.folds))
    updates = party_updates(X, y, fold, train, models, settings)
    logger.debug("%s: text model round %d on %d rows", ctx.party, round_, int(train.sum()))
    return TextUpdates(weights=[w for w, _ in updates], counts=[n for _, n in updates])


def run_text_model(
    parties: Mapping[str, tuple[PartyContext, list[SourceSpec]]],
    text: TextSpec,
    settings: TextModelSettings,
    *,
    spec: str,
) -> TextModel:
    """The consortium text model learned in this process, no orchestration (benchmarks,
    notebooks, tests): the party steps ``prepare`` dispatches, called in turn."""

    def count() -> dict[str, DocumentCounts]:
        return {p: run_count_text_terms(ctx, srcs, text) for p, (ctx, srcs) in parties.items()}

    def fit_round(
        vocabulary: TextVocabulary, models: CrossFitModels, round_: int
    ) -> dict[str, list[tuple[LinearWeights, int]]]:
        return {
            p: run_fit_text_model(ctx, srcs, vocabulary, models, settings, round_).pairs()
            for p, (ctx, srcs) in parties.items()
        }

    return learn_text_model(
        count,
        fit_round,
        min_documents=text.min_documents,
        min_parties=text.min_parties,
        max_terms=text.max_terms,
        ngram_max=text.ngram_max,
        folds=text.folds,
        rounds=text.rounds,
        settings=settings,
        spec=spec,
    )


def run_party(ctx: PartyContext, sources: list[SourceSpec], shards: int = 1) -> FusedOutput:
    """A party's whole pipeline in this process, no orchestration (benchmarks, notebooks):
    the steps the ``party-pipeline`` flow runs as cached tasks, in the same order (with
    ``shards`` > 1, each source's shards one after the other)."""
    tag = secret_tag(ctx.secret)
    cleaned: list[CleanOutput] = []
    aligned: list[AlignedOutput] = []
    for source in sources:
        roots = ctx.roots or None
        raw = fingerprint(source.path, roots=roots)
        emap = (
            fingerprint(source.entity_map.path, roots=roots)
            if source.entity_map is not None
            else None
        )
        test = (
            fingerprint(source.test_path, roots=roots)
            if source.test_path is not None and source.id == ctx.label_source
            else None
        )
        if shards > 1:
            split = run_split(ctx, source, raw, emap, test, shards)
            parts = [run_shard(ctx, source, raw, emap, test, s, split) for s in all_shards(shards)]
            clean = run_merge_clean(ctx, source, parts)
            features = run_merge_features(ctx, source, parts)
        else:
            clean = run_preprocess(ctx, source, raw, emap, test)
            features = run_features(ctx, source, clean)
        aligned.append(run_align(ctx, source, features, tag))
        cleaned.append(clean)
    return run_fuse(ctx, aligned, [c.quality for c in cleaned])


#: Options of a cached step that reads a party's files: retried on transient IO errors.
READS_FILES: dict[str, Any] = {
    "cache_key_fn": content_cache_key,
    "persist_result": True,
    "retries": IO_RETRIES,
    "retry_delay_seconds": IO_RETRY_DELAYS,
    "retry_condition_fn": retry_transient,
}
preprocess_source = task(
    name="preprocess-source",
    **READS_FILES,
)(run_preprocess)
extract_features = task(
    name="extract-features", cache_key_fn=content_cache_key, persist_result=True
)(run_features)
align_source = task(name="align-source", cache_key_fn=content_cache_key, persist_result=True)(
    run_align
)
read_raw_keys = task(
    name="read-raw-keys",
    **READS_FILES,
)(run_raw_keys)
#: A CSV or JSONL source split once into its entity-hash shards (cached by the source's
#: fingerprint and the shard count).
split_source = task(
    name="split-source",
    **READS_FILES,
)(run_split)
#: One entity-hash shard of a source (preprocess + features); cached by its content key
#: (the source's fingerprint and the shard), so a retry keeps every finished shard.
prepare_shard = task(
    name="prepare-shard",
    **READS_FILES,
)(run_shard)
merge_clean = task(name="merge-shards-clean", cache_key_fn=content_cache_key, persist_result=True)(
    run_merge_clean
)
merge_features = task(
    name="merge-shards-features", cache_key_fn=content_cache_key, persist_result=True
)(run_merge_features)
fuse_party = task(name="fuse-party", cache_key_fn=content_cache_key, persist_result=True)(run_fuse)
#: Read the party's current raw data: never cached (a rerun counts again).
count_text_terms = task(
    name="count-text-terms",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
)(run_count_text_terms)
fit_text_model = task(
    name="fit-text-model",
    task_run_name="fit text model round {round_}",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
)(run_fit_text_model)
count_vocabulary_values = task(
    name="count-vocabulary-values",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=retry_transient,
)(run_count_values)
