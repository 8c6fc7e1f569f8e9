"""Entity-hash shards of a party's source (``[run] shards``).

A shard holds every raw row whose entity falls in it, and nothing else: the entity key is
computed from the raw columns exactly as preprocessing computes it (the key column
normalised, the composite of normalised parts, the row number, or the device mapped to its
entity through the source's entity map) and hashed. Everything preprocessing and feature
extraction decide per entity (exact duplicates, one row per entity, an entity in both the
main and the test file, windows, learned or listed vocabularies) therefore comes out of the
shards as it comes out of the whole file, and the row numbers stay those of the file. Rows
without a usable key (missing, or a device the map does not know), and the lines a reader
could not parse at all, go to the first shard, which quarantines them with their reasons.

The hash is polars' own (stable within one polars version, which is part of every shard's
identity and so of its cache key): every machine running a party's shards needs the same
installation.
"""

from __future__ import annotations

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tasks.prepare.modalities import modality_of
from tasks.prepare.preprocess import composite_key, key_parts, normalise_key, raw_name
from tasks.spec.models import SourceSpec
from tasks.types import DEVICE, KeyNormalisation

#: Seed of the entity hash (fixed: a shard's rows must not change between runs).
SHARD_SEED = 14


class Shard(BaseModel):
    """One of ``count`` entity-hash shards (``index`` 0-based)."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0, description="Position of the shard, 0-based")
    count: int = Field(ge=1, description="How many shards the source is split into")
    hasher: str = Field(
        default=f"polars {pl.__version__}",
        description="The hash's implementation: shards of different versions never mix",
    )

    @property
    def name(self) -> str:
        """How the shard's tables are named beside the source's (``<source>.shard-2-of-4``)."""
        return f"shard-{self.index + 1}-of-{self.count}"

    @property
    def first(self) -> bool:
        """The shard holding the rows without a key and the unparsable lines."""
        return self.index == 0


def all_shards(count: int) -> list[Shard]:
    return [Shard(index=i, count=count) for i in range(count)]


def shard_of(key: pl.Expr, count: int) -> pl.Expr:
    """The shard of each entity key (a missing key: shard 0)."""
    return (
        pl.when(key.is_null())
        .then(pl.lit(0, pl.UInt64))
        .otherwise(key.hash(seed=SHARD_SEED) % count)
    )


def raw_entity_key(
    source: SourceSpec,
    *,
    entity: str,
    normalisation: KeyNormalisation,
    devices: pl.DataFrame | None = None,
) -> pl.Expr:
    """The normalised entity key of each raw row, as preprocessing computes it.

    ``devices``: an events source's device map (``device_id``, entity; the normalised pairs
    :func:`~tasks.prepare.modalities.events.device_map` gives); a device outside it has no
    key."""
    if source.key is not None:
        if source.key.row_number:
            return pl.col("__row").cast(pl.String)
        return composite_key(key_parts(source.key, normalisation))
    column = modality_of(source).key_column(source, entity=entity)
    key = normalise_key(pl.col(raw_name(column, source.columns[column])), normalisation)
    if column == DEVICE and source.entity_map is not None:
        if devices is None:
            raise ValueError(f"{source.path}: an events source's shards need its device map")
        return key.replace_strict(
            devices[DEVICE], devices[entity], default=None, return_dtype=pl.String
        )
    return key


def shard_index(
    source: SourceSpec,
    count: int,
    *,
    entity: str,
    normalisation: KeyNormalisation,
    devices: pl.DataFrame | None = None,
) -> pl.Expr:
    """The shard (0-based, of ``count``) of each raw row (an expression over the raw
    columns)."""
    key = raw_entity_key(source, entity=entity, normalisation=normalisation, devices=devices)
    return shard_of(key, count)


def shard_filter(
    source: SourceSpec,
    shard: Shard,
    *,
    entity: str,
    normalisation: KeyNormalisation,
    devices: pl.DataFrame | None = None,
) -> pl.Expr:
    """Whether a raw row belongs to ``shard`` (an expression over the raw columns)."""
    index = shard_index(
        source, shard.count, entity=entity, normalisation=normalisation, devices=devices
    )
    return index == shard.index
