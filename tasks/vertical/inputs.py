"""What a party's vertical steps read from its stores: its hashed entity keys and per-run
PSI secret, a PSI message it received, its rows in the overlap (sorted by alignment id,
with their split) as a feature block or as labels, and its model so far.

Row order. Every party sorts its aligned rows by the alignment id, and the split of an
entity (train / valid / test) is a function of its hashed key, which every party holds for
its own rows, so the arrays exchanged in a round are position-aligned at every party without
sending any id along, and an entity stays in its split across runs.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import polars as pl

from storage.files import read_text
from storage.psi import party_master_secret, read_message
from storage.runs import TEXT_MODEL_MAX_BYTES
from storage.secrets import resolve_secret
from storage.store import FileRef, Store, TableRef, read_table, read_verified_text
from tasks.horizontal.training import split_assignments
from tasks.prepare.align import hash_keys
from tasks.prepare.design import design_matrix, labels
from tasks.prepare.modalities.text import entity_tfidf, text_tokens, text_window
from tasks.prepare.text_model import TextVocabulary
from tasks.types import ENTITY_HASH
from tasks.vertical.data import LabelData, PartyBlock
from tasks.vertical.party_model import PartyModel
from tasks.vertical.psi_curve import PSIError
from tasks.vertical.psi_protocol import (
    ALIGN_ID,
    ROW,
    BlindedSet,
    PartySecret,
    derive_secret,
    message_from_arrow,
)
from tasks.vertical.refs import VerticalSetup, VerticalTextSetup
from tasks.vertical.text_block import (
    VerticalTextModel,
    block_scores,
    entity_documents,
    entity_rows,
    party_vocabulary,
)

#: Key of position-aligned score tables (row position in alignment-id order).
POS = "pos"


def psi_run_id(setup: VerticalSetup) -> str:
    """The run id the party's PSI secret and message names derive from."""
    return f"v{setup.run_key}"


def psi_secret(setup: VerticalSetup) -> PartySecret:
    """The party's PSI secret of this run, from the master secret in its own store."""
    master = party_master_secret(Store(setup.store))
    return derive_secret(master, run_id=psi_run_id(setup), party=setup.party)


def entity_hashes(setup: VerticalSetup) -> pl.Series:
    """The hashed entity keys of the party's fused table, in row order."""
    return read_table(setup.fused, columns=[ENTITY_HASH])[ENTITY_HASH]


def read_blinded(ref: FileRef) -> BlindedSet:
    """A blinded set received through the coordinator store."""
    message = message_from_arrow(read_message(ref.uri))
    if not isinstance(message, BlindedSet):
        raise PSIError(f"{ref.uri}: expected a blinded set")
    return message


def aligned_frame(setup: VerticalSetup, alignment: TableRef) -> pl.DataFrame:
    """The party's fused rows in the overlap, sorted by alignment id, with their split.

    Read once per process for the same tables (keyed by their content hashes): the label
    party needs it for every gradient, round and combination step."""
    t = setup.training
    return _aligned_frame(
        setup.fused.model_dump_json(),
        alignment.model_dump_json(),
        t.validation_fraction,
        t.test_fraction,
        setup.party,
    )


@functools.lru_cache(maxsize=8)
def _aligned_frame(
    fused_json: str, alignment_json: str, validation: float, test: float, party: str
) -> pl.DataFrame:
    fused_ref = TableRef.model_validate_json(fused_json)
    alignment = TableRef.model_validate_json(alignment_json)
    fused = read_table(fused_ref).with_row_index(ROW)
    table = read_table(alignment).select(pl.col(ROW).cast(pl.UInt32), ALIGN_ID)
    frame = table.join(fused.with_columns(pl.col(ROW).cast(pl.UInt32)), on=ROW, how="inner")
    if frame.height != table.height:
        raise PSIError(
            f"party {party}: alignment {alignment.uri} names rows missing from {fused_ref.uri}"
        )
    frame = frame.sort(ALIGN_ID)
    # the split follows the entity's hashed key, which every party holds for its own rows:
    # the same entity lands in the same split at every party and in every run (alignment
    # ids change with each run's PSI secrets)
    split = split_assignments(
        frame[ENTITY_HASH], validation_fraction=validation, test_fraction=test
    )
    return frame.with_columns(split.alias("split"))


def party_block(setup: VerticalSetup, alignment: TableRef) -> PartyBlock:
    """The party's feature block of the overlap, split into train / valid / test (with
    its text block's score columns when it has one: out of fold on the training rows)."""
    frame = aligned_frame(setup, alignment)
    split = frame["split"].to_numpy()
    names, x = party_matrix(setup, frame, in_fold=split == "train")
    return PartyBlock(
        party=setup.party,
        feature_names=names,
        X_train=x[split == "train"],
        X_valid=x[split == "valid"],
        X_test=x[split == "test"],
        categorical=tuple(setup.schema_.categorical),
    )


def label_data(setup: VerticalSetup, alignment: TableRef) -> LabelData:
    """The label party's labels of the overlap, split into train / valid / test."""
    frame = aligned_frame(setup, alignment)
    y = labels(frame)
    split = frame["split"].to_numpy()
    return LabelData(y[split == "train"], y[split == "valid"], y[split == "test"])


def read_party_model(ref: FileRef | None, setup: VerticalSetup) -> PartyModel:
    """The party's model so far (an empty one before its first round)."""
    if ref is None:
        return PartyModel(party=setup.party, num_class=setup.num_class)
    return PartyModel.model_validate_json(read_text(ref.uri))


def party_matrix(
    setup: VerticalSetup, frame: pl.DataFrame, *, in_fold: np.ndarray | None = None
) -> tuple[tuple[str, ...], np.ndarray]:
    """Feature names and matrix of the party's rows ``frame`` (fused rows, any order): its
    feature block, then, with a text block (``setup.text_model``), its score columns; the
    rows ``in_fold`` (training rows) scored by their fold's model, the others (default:
    every row, as when scoring) by the full model."""
    x = design_matrix(frame, setup.schema_)
    names = tuple(setup.schema_.names)
    if setup.text_model is None:
        return names, x
    if setup.text is None:
        raise ValueError(f"party {setup.party}: a text block without its text sources")
    model = read_text_block(setup.text_model)
    hashes, rows, has_text = text_rows(setup.text, model.vocabulary)
    fold_rows = np.zeros(frame.height, dtype=bool) if in_fold is None else in_fold
    scores = block_scores(hashes, rows, has_text, frame[ENTITY_HASH], fold_rows, model)
    return (*names, *model.columns), np.hstack([x, scores])


def read_text_block(ref: FileRef) -> VerticalTextModel:
    """A party's text block, its content hash checked."""
    text = read_verified_text(ref, max_bytes=TEXT_MODEL_MAX_BYTES)
    return VerticalTextModel.model_validate_json(text)


def _windows(text: VerticalTextSetup) -> list[tuple[Any, pl.Series, list[list[str]]]]:
    """Each text source's window (:func:`text_window`), distinct scored texts and tokens."""
    out = []
    for source in text.sources:
        clean = read_table(source.clean)
        window = text_window(
            clean, entity=text.entity, as_of=text.as_of, max_chars=source.options.text_max_chars
        )
        distinct = window.rows.get_column("_scored").drop_nulls().unique().sort()
        out.append((window, distinct, [text_tokens(t) for t in distinct.to_list()]))
    return out


def own_vocabulary(text: VerticalTextSetup) -> TextVocabulary:
    """The party's vocabulary from its own texts (every scored text a document)."""
    return _own_vocabulary(text.model_dump_json())


@functools.lru_cache(maxsize=4)
def _own_vocabulary(text_json: str) -> TextVocabulary:
    text = VerticalTextSetup.model_validate_json(text_json)
    documents: list[list[str]] = []
    for window, distinct, tokens in _windows(text):
        terms = entity_documents(tokens, text.ngram_max)
        index = {t: i for i, t in enumerate(distinct.to_list())}
        scored = window.rows.get_column("_scored").drop_nulls().to_list()
        documents += [terms[index[t]] for t in scored]
    return party_vocabulary(
        documents,
        min_documents=text.min_documents,
        max_terms=text.max_terms,
        ngram_max=text.ngram_max,
    )


def text_rows(
    text: VerticalTextSetup, vocabulary: TextVocabulary
) -> tuple[pl.Series, Any, np.ndarray]:
    """The party's TF-IDF row per hashed entity key (sorted) over ``vocabulary``, and
    whether each has a scored text; read once per process for the same inputs."""
    return _text_rows(text.model_dump_json(), vocabulary.model_dump_json())


@functools.lru_cache(maxsize=4)
def _text_rows(text_json: str, vocabulary_json: str) -> tuple[pl.Series, Any, np.ndarray]:
    text = VerticalTextSetup.model_validate_json(text_json)
    vocabulary = TextVocabulary.model_validate_json(vocabulary_json)
    secret = resolve_secret(env=text.secret.env, block=text.secret.block)
    parts = []
    for window, distinct, tokens in _windows(text):
        entities = window.keyed.get_column(text.entity).unique().sort()
        X, has_text = entity_tfidf(
            window.rows, distinct, tokens, entities, entity=text.entity, vocabulary=vocabulary
        )
        parts.append((hash_keys(entities, secret), X, has_text))
    return entity_rows(parts)
