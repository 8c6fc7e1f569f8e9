"""What vertical steps pass each other: a party's setup and each step's typed result
(references into stores, counts, metrics, the model as a fusion). Small and JSON-friendly,
so they serve as task parameters, cache-key inputs and ``party-call`` arguments alike.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, Field

from storage.store import FileRef, TableRef
from tasks.prepare.design import FeatureSchema
from tasks.prepare.modalities.text import TextOptions
from tasks.spec.models import SecretRef, TrainingSpec
from tasks.types import Objective
from tasks.vertical.fusion import Fusion


class TextSourceRef(BaseModel):
    """One of the party's text sources: its clean table (own store) and options."""

    source: str
    clean: TableRef
    options: TextOptions


class VerticalTextSetup(BaseModel):
    """What a text party needs for its linear block (``[text] model``; no secret)."""

    sources: list[TextSourceRef] = Field(min_length=1)
    entity: str = Field(description="Canonical entity column of the clean tables")
    as_of: dt.date = Field(description="End of the text window")
    secret: SecretRef = Field(description="Where the party reads the key-hashing secret")
    min_documents: int = Field(ge=1)
    max_terms: int = Field(ge=1)
    ngram_max: int = Field(ge=1)
    folds: int = Field(ge=2)
    alpha: float = Field(gt=0)


class VerticalSetup(BaseModel):
    """What one party's vertical steps need (references and settings; no secret)."""

    party: str
    label_party: str
    store: str
    coordinator: str
    run_key: str
    fused: TableRef
    schema_: FeatureSchema = Field(description="The party's own feature block")
    objective: Objective
    num_class: int = Field(ge=1)
    training: TrainingSpec
    text: VerticalTextSetup | None = Field(
        default=None, description="The party's text sources, when it fits a text block"
    )
    text_model: FileRef | None = Field(
        default=None, description="Its fitted text block (own store): adds the score columns"
    )

    @property
    def is_label(self) -> bool:
        return self.party == self.label_party


class PsiOverlap(BaseModel):
    """The label party's result of the intersection (counts only leave it)."""

    alignment: TableRef
    answers: dict[str, FileRef]
    overlap: int
    sizes: dict[str, int]


class StateRef(BaseModel):
    """The label party's checkpoint: JSON progress + its score arrays, in its own store."""

    document: FileRef
    arrays: TableRef
    round: int
    best_round: int
    stopped: bool
    next: str | None = Field(
        default=None, description="Why no further round may run (None: one may)"
    )
    valid: dict[str, float] = Field(default_factory=dict)
    trees: int = 0
    history: list[dict[str, float]] = Field(
        default_factory=list, description="Validation metrics per round"
    )
    fusion: Fusion = Field(description="The model as a score fusion (coefficients, base)")


class PartyRoundOut(BaseModel):
    model: FileRef = Field(description="The party's model so far (its own store)")
    delta: TableRef = Field(description="Per-entity deltas for the label party (coordinator)")


class OneShotOut(BaseModel):
    model: FileRef = Field(description="The party's full model on its block (own store)")
    scores: TableRef = Field(description="Its raw scores on valid and test (coordinator)")
    trees: int


class OneShotFusion(BaseModel):
    fusion: Fusion
    valid: dict[str, float]
    test: dict[str, float]
