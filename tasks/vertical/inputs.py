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

import polars as pl

from storage.files import read_text
from storage.psi import party_master_secret, read_message
from storage.store import FileRef, Store, TableRef, read_table
from tasks.horizontal.training import split_assignments
from tasks.prepare.design import design_matrix, labels
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
from tasks.vertical.refs import VerticalSetup

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
    """The party's feature block of the overlap, split into train / valid / test."""
    frame = aligned_frame(setup, alignment)
    x = design_matrix(frame, setup.schema_)
    split = frame["split"].to_numpy()
    return PartyBlock(
        party=setup.party,
        feature_names=tuple(setup.schema_.names),
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
