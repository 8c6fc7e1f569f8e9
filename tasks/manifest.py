"""The manifest of a trained model, typed: what a training run writes and scoring reads back.

A horizontal run's manifest is its global ensemble with every model text replaced by its
sha256 (the texts are stored once each beside it, see :func:`storage.store.write_manifest`);
a vertical run's names every party's trees, the fusion rule and each party's feature schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, Field

from storage.store import FileRef
from tasks.horizontal.ensemble import GlobalEnsemble, MemberTuple, text_sha256
from tasks.prepare.design import FeatureSchema
from tasks.types import Aggregation, Objective
from tasks.vertical.fusion import Fusion


class EnsembleManifest(BaseModel):
    """A horizontal run's global ensemble, model texts by hash (``[party, weight, sha256]``
    per accepted update of each round)."""

    objective: Objective
    num_class: int = Field(ge=1)
    base_score: list[float]
    feature_names: list[str]
    categorical: list[str] = Field(default_factory=list)
    rounds: list[list[tuple[str, float, str]]] = Field(default_factory=list)
    metrics: list[dict[str, float]] = Field(default_factory=list)
    best_round: int | None = None
    aggregation: Aggregation = "samples"
    trees_per_round: int = Field(default=1, ge=1)
    model_texts: Literal["sha256"] = "sha256"

    @classmethod
    def of(cls, ensemble: GlobalEnsemble) -> tuple[EnsembleManifest, dict[str, str]]:
        """The manifest of ``ensemble`` and its model texts by sha256 (the storage layer
        writes each text once under its hash; :meth:`ensemble` reverses this)."""
        texts: dict[str, str] = {}
        rounds: list[list[tuple[str, float, str]]] = []
        for members in ensemble.rounds:
            row: list[tuple[str, float, str]] = []
            for party, weight, text in members:
                digest = text_sha256(text)
                texts[digest] = text
                row.append((party, weight, digest))
            rounds.append(row)
        body = ensemble.model_dump(exclude={"rounds"})
        return cls.model_validate({**body, "rounds": rounds}), texts

    def ensemble(self, texts: Mapping[str, str]) -> GlobalEnsemble:
        """The global ensemble, every model text checked against its hash."""
        rounds: list[list[MemberTuple]] = []
        for members in self.rounds:
            row: list[MemberTuple] = []
            for party, weight, digest in members:
                text = texts.get(digest)
                if text is None or text_sha256(text) != digest:
                    raise ValueError(
                        f"model text of party {party!r} is missing or does not match its hash"
                    )
                row.append((party, float(weight), text))
            rounds.append(row)
        body = self.model_dump(exclude={"rounds", "model_texts"})
        return GlobalEnsemble.model_validate({**body, "rounds": rounds})


class VerticalManifest(BaseModel):
    """A vertical run: every party's trees (none for a party without a model), the label
    party's fusion rule, and each party's feature schema (for scoring new data)."""

    layout: Literal["vertical"] = "vertical"
    mode: str = Field(description="rounds | one_shot")
    run_key: str
    label_party: str
    parties: list[str]
    fusion: Fusion
    upto_round: int
    models: dict[str, FileRef | None]
    feature_schema: dict[str, FeatureSchema]
    text_models: dict[str, FileRef] = Field(
        default_factory=dict,
        description="Each text party's text block ([text] model; its own store), whose "
        "score columns follow its feature schema",
    )
