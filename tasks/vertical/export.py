"""A vertical run as portable files: one native LightGBM model per party and the fusion rule.

Each party's model text is cut at the run's chosen round (the one its fusion was fitted
for) and named ``<party>.txt``; ``fusion.json`` (:class:`VerticalExport`) holds the rule
that combines the parties' raw scores (:mod:`tasks.vertical.fusion`), which file is whose,
and the feature names each party's model reads, in order. A party whose model has no tree
gets no file (``null`` in ``models``): it contributes the prior. A text party's text block
(``[text] model``) is copied as ``<party>-text.json``; its score columns end the party's
feature names (the block's full model gives them for new rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, Field

from tasks.manifest import VerticalManifest
from tasks.vertical.fusion import Fusion
from tasks.vertical.party_model import PartyModel, party_model_text
from tasks.vertical.text_block import VerticalTextModel

FUSION_FILE = "fusion.json"


def model_file_name(party: str) -> str:
    return f"{party}.txt"


def text_file_name(party: str) -> str:
    return f"{party}-text.json"


class VerticalExport(BaseModel):
    """``fusion.json``: how the per-party model files combine into one raw score."""

    layout: Literal["vertical"] = "vertical"
    mode: str = Field(description="rounds | one_shot")
    run_key: str
    label_party: str
    upto_round: int = Field(description="Round the model files are cut at")
    fusion: Fusion
    models: dict[str, str | None] = Field(
        description="Party -> its model file in this folder (null: no trees, the prior)"
    )
    feature_names: dict[str, list[str]] = Field(
        description="Party -> the features its model reads, in column order"
    )
    categorical: dict[str, list[str]]
    text_models: dict[str, str] = Field(
        default_factory=dict,
        description="Text party -> its text block in this folder (vocabulary and weights)",
    )


def vertical_export(
    manifest: VerticalManifest,
    models: Mapping[str, PartyModel | None],
    text_blocks: Mapping[str, VerticalTextModel] | None = None,
) -> dict[str, str]:
    """File name -> text of a vertical run's export: every party's model text cut at the
    manifest's round, and :data:`FUSION_FILE`. ``models`` holds each party's model (None
    for a party without one), ``text_blocks`` each text party's text block."""
    blocks = text_blocks or {}
    files: dict[str, str] = {}
    names: dict[str, str | None] = {}
    for party in manifest.parties:
        model = models.get(party)
        text = None if model is None else party_model_text(model, manifest.upto_round)
        names[party] = None if text is None else model_file_name(party)
        if text is not None:
            files[model_file_name(party)] = text
    for party, block in blocks.items():
        files[text_file_name(party)] = block.model_dump_json(indent=2) + "\n"
    schema = manifest.feature_schema
    doc = VerticalExport(
        mode=manifest.mode,
        run_key=manifest.run_key,
        label_party=manifest.label_party,
        upto_round=manifest.upto_round,
        fusion=manifest.fusion,
        models=names,
        feature_names={
            p: [*schema[p].names, *(blocks[p].columns if p in blocks else [])]
            for p in manifest.parties
            if p in schema
        },
        categorical={p: schema[p].categorical for p in manifest.parties if p in schema},
        text_models={p: text_file_name(p) for p in blocks},
    )
    files[FUSION_FILE] = doc.model_dump_json(indent=2) + "\n"
    return files
