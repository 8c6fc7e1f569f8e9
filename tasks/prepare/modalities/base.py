"""The interface of a modality (a kind of source) and the table of registered ones.

A modality says everything fedfuse needs to know about one ``kind`` of source: the canonical
columns it requires, the column that keys its raw rows, its feature options (the
``[parties.sources.features]`` table of the spec), its default feature prefix and display
order, its extra spec checks, its preprocessing hooks and the extraction of its feature
frame. Each one is an instance of a :class:`Modality` subclass passed to :func:`register`.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import polars as pl

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


class Modality(ABC):
    """One kind of source. Subclasses set the class attributes and implement :meth:`extract`;
    the other methods have the defaults of a source keyed by the entity itself."""

    #: The ``kind`` a spec's source gives.
    kind: ClassVar[str]
    #: Where its features come in the consortium schema (lower first).
    order: ClassVar[int]
    #: Model of its ``features`` options (a subclass of :class:`FeatureOptions`).
    options: ClassVar[type[FeatureOptions]] = FeatureOptions

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
