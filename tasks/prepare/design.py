"""From fused tables to model inputs: the consortium feature schema and design matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
from pydantic import BaseModel

from tasks.prepare.align import FeatureColumn
from tasks.prepare.modalities import display_order
from tasks.types import ENTITY_HASH, LABEL


class SchemaError(ValueError):
    """Parties disagree on a feature's meaning."""


class FeatureSchema(BaseModel):
    """The features every party's model sees, in one fixed order."""

    names: list[str]
    categorical: list[str]
    modality: dict[str, str]
    parties: dict[str, list[str]]

    @property
    def categorical_index(self) -> list[int]:
        wanted = set(self.categorical)
        return [i for i, name in enumerate(self.names) if name in wanted]


def consortium_schema(schemas: Mapping[str, Sequence[FeatureColumn]]) -> FeatureSchema:
    """Union of the parties' aligned features; a name must mean the same thing everywhere."""
    seen: dict[str, FeatureColumn] = {}
    holders: dict[str, list[str]] = {}
    for party, columns in sorted(schemas.items()):
        for column in columns:
            prior = seen.get(column.name)
            if prior is not None and (
                prior.dtype != column.dtype or prior.vocabulary != column.vocabulary
            ):
                raise SchemaError(
                    f"feature '{column.name}' is {column.dtype} at party {party} but "
                    f"{prior.dtype} at party {prior.party} (vocabularies must match too)"
                )
            seen.setdefault(column.name, column)
            holders.setdefault(column.name, []).append(party)
    names = sorted(seen, key=lambda n: (display_order(seen[n].modality), n))
    return FeatureSchema(
        names=names,
        categorical=[n for n in names if seen[n].dtype == "category"],
        modality={n: seen[n].modality for n in names},
        parties=holders,
    )


def design_matrix(fused: pl.DataFrame, schema: FeatureSchema) -> np.ndarray:
    """Features in schema order as float64 (absent features are missing values)."""
    present = set(fused.columns)
    exprs = [
        pl.col(n).cast(pl.Float64) if n in present else pl.lit(None, pl.Float64).alias(n)
        for n in schema.names
    ]
    return fused.select(exprs).to_numpy(allow_copy=True).astype(np.float64, copy=False)


def labels(fused: pl.DataFrame) -> np.ndarray:
    if LABEL not in fused.columns:
        raise SchemaError("the fused table has no label column")
    return fused[LABEL].cast(pl.Float64).to_numpy()


def keys(fused: pl.DataFrame) -> pl.Series:
    return fused[ENTITY_HASH]
