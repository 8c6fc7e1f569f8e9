"""Alignment to the consortium schema and fusion of a party's aligned tables.

* :func:`hash_keys` replaces entity keys by HMAC-SHA256 with the consortium secret, so the same
  customer gets the same opaque key at every party and the raw id never leaves the store.
* :func:`align_features` gives features their canonical names (``<prefix>__<feature>``),
  float dtypes, and categories their consortium-wide integer codes; it returns the
  feature-schema artefact beside the table.
* :func:`fuse_tables` joins a party's aligned tables on the hashed key (validated 1:1).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

import polars as pl
from pydantic import BaseModel

from tasks.types import ENTITY_HASH, LABEL, SPLIT, JoinKind, Objective, SourceKind

SEPARATOR = "__"


class FeatureColumn(BaseModel):
    name: str
    dtype: str  # "float" or "category"
    party: str
    source: str
    modality: SourceKind
    vocabulary: list[str] | None = None


class AlignError(ValueError):
    """Aligned tables cannot be fused (duplicate keys, clashing names)."""


def hash_keys(keys: pl.Series, secret: bytes) -> pl.Series:
    """HMAC-SHA256 of each (already normalised) key, as 64 hex characters."""
    if not secret:
        raise ValueError("the consortium secret is empty")
    base = hmac.new(secret, digestmod=hashlib.sha256)

    def one(key: str) -> str:
        h = base.copy()
        h.update(key.encode())
        return h.hexdigest()

    values = [None if k is None else one(k) for k in keys.cast(pl.String).to_list()]
    return pl.Series(ENTITY_HASH, values, dtype=pl.String)


def encode_label(
    values: pl.Series, *, task: Objective, vocabulary: Sequence[str] | None
) -> pl.Series:
    """Labels as model targets: binary 0/1, multiclass class index, regression float."""
    if task == "multiclass" and values.dtype == pl.String:
        if vocabulary is None:
            raise AlignError(f"multiclass label '{values.name}' is text but has no vocabulary")
        return values.replace_strict(
            list(vocabulary), list(range(len(vocabulary))), default=None, return_dtype=pl.Float64
        ).alias(LABEL)
    return values.cast(pl.Float64).alias(LABEL)


def align_features(
    features: pl.DataFrame,
    *,
    entity: str,
    party: str,
    source: str,
    modality: SourceKind,
    prefix: str,
    secret: bytes,
    vocabularies: Mapping[str, list[str]],
    label_column: str | None = None,
    task: Objective = "binary",
) -> tuple[pl.DataFrame, list[FeatureColumn]]:
    """Canonical names/dtypes, vocabulary codes and hashed keys for one features table."""
    if features[entity].null_count():
        raise AlignError(f"{party}/{source}: features hold rows without an entity key")
    exprs: list[pl.Expr] = []
    schema: list[FeatureColumn] = []
    for name, dtype in features.schema.items():
        if name in (entity, label_column, SPLIT):
            continue
        canonical = f"{prefix}{SEPARATOR}{name}"
        if dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum):
            vocab = vocabularies.get(name)
            if vocab is None:
                raise AlignError(f"{party}/{source}: text column '{name}' has no vocabulary")
            exprs.append(
                pl.col(name)
                .cast(pl.String)
                .replace_strict(vocab, list(range(len(vocab))), default=None, return_dtype=pl.Int32)
                .alias(canonical)
            )
            schema.append(
                FeatureColumn(
                    name=canonical,
                    dtype="category",
                    party=party,
                    source=source,
                    modality=modality,
                    vocabulary=list(vocab),
                )
            )
        elif dtype.is_numeric() or dtype == pl.Boolean:
            exprs.append(pl.col(name).cast(pl.Float64).alias(canonical))
            schema.append(
                FeatureColumn(
                    name=canonical, dtype="float", party=party, source=source, modality=modality
                )
            )
        else:
            raise AlignError(f"{party}/{source}: feature '{name}' has unsupported dtype {dtype}")
    columns: list[pl.Series | pl.Expr] = [hash_keys(features[entity], secret)]
    if label_column is not None:
        label = encode_label(
            features[label_column], task=task, vocabulary=vocabularies.get(label_column)
        )
        unusable = label.is_null() | ~label.is_finite()
        if unusable.any():
            raise AlignError(
                f"{party}/{source}: label '{label_column}' is missing, NaN or infinite in "
                f"{unusable.sum()} row(s) (prepare quarantines such rows: rerun it)"
            )
        columns.append(label)
    # features and keys are computed side by side on the input rows: a source with no
    # feature column (a table of the key and the label only) keeps every row
    # the label source's split (train / valid / test) travels with its rows, as text
    split = [SPLIT] if label_column is not None and SPLIT in features.columns else []
    aligned = features.with_columns(*exprs, *columns).select(
        ENTITY_HASH, *([LABEL] if label_column else []), *split, *(c.name for c in schema)
    )
    return aligned.sort(ENTITY_HASH), schema


def _check_finite(name: str, table: pl.DataFrame) -> None:
    """Refuse inf, -inf and NaN in any float column: a missing feature is null in every
    features table (and a join's missing rows are null), so NaN is never "missing" here.
    The error names the columns and their row counts, never a value."""
    floats = [c for c, dtype in table.schema.items() if dtype.is_float()]
    if not floats:
        return
    counts = table.select((~pl.col(c).is_finite()).sum().alias(c) for c in floats).row(0)
    bad = [(c, n) for c, n in zip(floats, counts, strict=True) if n]
    if bad:
        shown = ", ".join(f"'{c}' ({n} row(s))" for c, n in bad)
        raise AlignError(
            f"aligned table '{name}': non-finite values (inf, -inf or NaN) in column(s) "
            f"{shown}; features must be finite, null where missing"
        )


def fuse_tables(tables: Mapping[str, pl.DataFrame], *, join: JoinKind) -> pl.DataFrame:
    """Join a party's aligned tables on the hashed key.

    The base is the table holding the label (if any) for ``left`` joins, so every labelled
    entity stays; without a label the base is the union of all keys. ``inner`` keeps the
    entities every table knows. Keys must be unique per table (1:1 join, validated).
    """
    if not tables:
        raise AlignError("nothing to fuse: the party has no aligned tables")
    seen: dict[str, str] = {}
    for name, table in tables.items():
        dupes = table.filter(pl.col(ENTITY_HASH).is_duplicated())
        if dupes.height:
            raise AlignError(
                f"aligned table '{name}' holds {dupes.height} rows with a duplicate entity key "
                f"({dupes[ENTITY_HASH].n_unique()} key(s)); one row per entity is required"
            )
        _check_finite(name, table)
        for column in table.columns:
            if column == ENTITY_HASH:
                continue
            if column in seen:
                raise AlignError(f"column '{column}' is in both '{seen[column]}' and '{name}'")
            seen[column] = name
    ordered = sorted(tables.items(), key=lambda kv: (LABEL not in kv[1].columns, kv[0]))
    labelled = LABEL in ordered[0][1].columns
    if join == "left" and not labelled:
        keys = pl.concat([t.select(ENTITY_HASH) for _, t in ordered]).unique()
        fused = keys
        rest = ordered
    else:
        fused = ordered[0][1]
        rest = ordered[1:]
    for _, table in rest:
        fused = fused.join(table, on=ENTITY_HASH, how=join, validate="1:1", maintain_order="left")
    return fused.sort(ENTITY_HASH)
