"""A party's own vertical steps on stores, the label party's included in its role as a
holder of a feature block: it answers the label party's PSI messages and learns its rows in
the overlap, fits its trees of each gradient round, trains its one-shot model, and scores
its block for test metrics and inference.

Each step runs *at* the party and does its IO through :mod:`storage`; what goes to the
label party passes the coordinator store (``exchange/``): blinded sets, per-entity score
deltas and scores. Features, trees and the alignment stay in the party's own store.
"""

from __future__ import annotations

import polars as pl

from storage.psi import read_message, write_alignment, write_message
from storage.runs import (
    one_shot_model_name,
    one_shot_scores_name,
    vertical_delta_name,
    vertical_party_model_name,
    vertical_scores_name,
    vertical_test_scores_name,
    vertical_text_model_name,
)
from storage.store import FileRef, Store, TableRef, fingerprint, read_table
from tasks.horizontal.model_text import count_trees
from tasks.types import ENTITY_HASH
from tasks.vertical.arrays import arrays_frame, frame_arrays, split_frame, unsplit_frame
from tasks.vertical.data import LabelData
from tasks.vertical.inputs import (
    aligned_frame,
    entity_hashes,
    own_vocabulary,
    party_block,
    party_matrix,
    psi_run_id,
    psi_secret,
    read_blinded,
    read_party_model,
    text_rows,
)
from tasks.vertical.one_shot import train_one_shot
from tasks.vertical.party_model import PartyModel, party_model_text, score_block, train_party_round
from tasks.vertical.psi_curve import PSIError, pool_for
from tasks.vertical.psi_protocol import AlignmentMessage, message_from_arrow, receive_alignment
from tasks.vertical.psi_protocol import answer as psi_answer
from tasks.vertical.refs import OneShotOut, PartyRoundOut, VerticalSetup
from tasks.vertical.rounds import GradientMessage
from tasks.vertical.text_block import TextTarget, train_text_block

# -- PSI -------------------------------------------------------------------------------------


def psi_party_answer(setup: VerticalSetup, received: FileRef) -> tuple[FileRef, FileRef]:
    """Feature party: its own keys blinded, and the label party's set blinded again."""
    message = read_blinded(received)
    secret = psi_secret(setup)
    keys = entity_hashes(setup)
    with pool_for(keys.len() + len(message)) as ex:
        own, back = psi_answer(keys, message, secret, party=setup.party, executor=ex)
    coordinator = Store(setup.coordinator)
    run = psi_run_id(setup)
    return (
        write_message(coordinator, own.to_arrow(), run_id=run, layer="exchange"),
        write_message(coordinator, back.to_arrow(), run_id=run, layer="exchange"),
    )


def psi_party_receive(setup: VerticalSetup, answer: FileRef) -> TableRef:
    """Feature party: its rows in the overlap and their alignment ids (own store only)."""
    message = message_from_arrow(read_message(answer.uri))
    if not isinstance(message, AlignmentMessage):
        raise PSIError(f"{answer.uri}: expected an alignment answer")
    alignment = receive_alignment(
        message, psi_secret(setup), party=setup.party, own_count=entity_hashes(setup).len()
    )
    return write_alignment(Store(setup.store), alignment.table, run_id=psi_run_id(setup))


# -- the text block ([text] model) ------------------------------------------------------------


def party_text_block(
    setup: VerticalSetup, alignment: TableRef, target: TableRef, kind: TextTarget
) -> FileRef:
    """Text party: its linear text block fitted on its own TF-IDF vectors of the training
    entities against ``target``, the round-1 gradients (``kind`` ``gradients``: ridge of
    −g) or the shared labels (``labels``), cross-fitted by fold; kept in its own store.
    Nothing leaves the party."""
    if setup.text is None:
        raise ValueError(f"party {setup.party}: no text source for a text block")
    frame = aligned_frame(setup, alignment)
    train = frame.filter(pl.col("split") == "train")[ENTITY_HASH]
    if kind == "gradients":
        y = -frame_arrays(read_table(target), ["grad"], setup.num_class)["grad"]
    else:
        y = unsplit_frame(read_table(target), 1)["train"]
    if len(y) != train.len():
        raise ValueError(
            f"party {setup.party}: {len(y)} {kind} for {train.len()} training entities"
        )
    vocabulary = own_vocabulary(setup.text)
    hashes, rows, has_text = text_rows(setup.text, vocabulary)
    model = train_text_block(
        hashes,
        rows,
        has_text,
        train,
        y,
        party=setup.party,
        vocabulary=vocabulary,
        folds=setup.text.folds,
        target=kind,
        objective=setup.objective,
        alpha=setup.text.alpha,
    )
    return Store(setup.store).write_json(
        "models",
        vertical_text_model_name(setup.run_key, setup.party),
        model.model_dump(mode="json"),
    )


def text_block_at(setup: VerticalSetup) -> FileRef | None:
    """Text party: its stored text block of this run (resuming), if it has one."""
    store = Store(setup.store)
    name = vertical_text_model_name(setup.run_key, setup.party)
    if setup.text is None or not store.exists("models", name):
        return None
    return fingerprint(store.location("models", name))


# -- gradient rounds -------------------------------------------------------------------------


def party_round(
    setup: VerticalSetup,
    alignment: TableRef,
    model: FileRef | None,
    gradients: TableRef,
    round_: int,
) -> PartyRoundOut:
    """Any party: fit this round's trees on its block against the gradients; keep the
    model, send only the per-entity deltas on train and valid."""
    block = party_block(setup, alignment)
    arrays = frame_arrays(read_table(gradients), ["grad", "hess"], setup.num_class)
    message = GradientMessage(round=round_, grad=arrays["grad"], hess=arrays["hess"])
    current, delta = train_party_round(
        read_party_model(model, setup),
        block,
        message,
        spec=setup.training,
        objective=setup.objective,
        num_class=setup.num_class,
    )
    store = Store(setup.store)
    model_ref = store.write_text(
        "models",
        vertical_party_model_name(setup.run_key, setup.party, round_),
        current.model_dump_json(),
    )
    table = split_frame({"train": delta.train, "valid": delta.valid}).with_columns(
        pl.lit(delta.trees).alias("trees")
    )
    delta_ref = Store(setup.coordinator).write_table(
        table, "exchange", vertical_delta_name(setup.run_key, setup.party, round_)
    )
    return PartyRoundOut(model=model_ref, delta=delta_ref)


def party_test_scores(
    setup: VerticalSetup, alignment: TableRef, model: FileRef | None, upto_round: int
) -> TableRef:
    """Any party: its model's raw output on its test block up to the best round."""
    block = party_block(setup, alignment)
    text = party_model_text(read_party_model(model, setup), upto_round)
    assert block.X_test is not None
    raw = score_block(text, block.X_test, setup.num_class)
    return Store(setup.coordinator).write_table(
        arrays_frame({"raw": raw}),
        "exchange",
        vertical_test_scores_name(setup.run_key, setup.party, upto_round),
    )


def model_at(setup: VerticalSetup, round_: int) -> FileRef | None:
    """Any party: its model after ``round_`` (resuming a stopped run), if it has one."""
    store = Store(setup.store)
    name = vertical_party_model_name(setup.run_key, setup.party, round_)
    if round_ == 0 or not store.exists("models", name):
        return None
    return fingerprint(store.location("models", name))


# -- one-shot mode ---------------------------------------------------------------------------


def party_one_shot(setup: VerticalSetup, alignment: TableRef, labels_ref: TableRef) -> OneShotOut:
    """Any party (one-shot): a full LightGBM model on its block with the shared labels;
    keeps the model, sends its raw scores on valid and test."""
    block = party_block(setup, alignment)
    parts = unsplit_frame(read_table(labels_ref), 1)
    data = LabelData(parts["train"], parts["valid"], None)
    shot = train_one_shot(
        block, data, spec=setup.training, objective=setup.objective, num_class=setup.num_class
    )
    model = PartyModel(
        party=setup.party,
        num_class=setup.num_class,
        model_text=shot.model_text,
        iterations=[shot.iterations],
    )
    model_ref = Store(setup.store).write_text(
        "models", one_shot_model_name(setup.run_key, setup.party), model.model_dump_json()
    )
    assert shot.test is not None
    frame = split_frame({"valid": shot.valid, "test": shot.test})
    scores = Store(setup.coordinator).write_table(
        frame, "exchange", one_shot_scores_name(setup.run_key, setup.party)
    )
    return OneShotOut(model=model_ref, scores=scores, trees=count_trees(shot.model_text))


# -- inference -------------------------------------------------------------------------------


def party_scores(
    setup: VerticalSetup, alignment: TableRef, model: FileRef | None, upto_round: int
) -> TableRef:
    """Any party (inference): its model's raw output on every aligned row, in alignment-id
    order; only these numbers go to the coordinator."""
    frame = aligned_frame(setup, alignment)
    text = party_model_text(read_party_model(model, setup), upto_round)
    _, x = party_matrix(setup, frame)
    raw = score_block(text, x, setup.num_class)
    return Store(setup.coordinator).write_table(
        arrays_frame({"raw": raw}), "exchange", vertical_scores_name(setup.run_key, setup.party)
    )
