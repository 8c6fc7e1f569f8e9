"""The label party's vertical steps on stores: it blinds its keys and computes the
all-party overlap (PSI), keeps the global scores of the gradient rounds (start, gradients,
combination, finish, test metrics), shares labels and fuses scores in one-shot mode, and
fuses the parties' scores into predictions at inference.

Each step runs *at* the label party and does its IO through :mod:`storage`; what goes to
another party passes the coordinator store (``exchange/``): blinded sets and alignment
answers, the gradients (opt-in, ``fusion.share_gradients``) or the overlap's labels (opt-in,
``fusion.share_labels``). Labels, checkpoints and its alignment stay in its own store.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from storage.files import read_text
from storage.psi import write_alignment, write_message
from storage.runs import (
    vertical_checkpoint_name,
    vertical_gradients_name,
    vertical_labels_name,
    vertical_predictions_name,
    vertical_round_document_name,
    vertical_round_name,
)
from storage.secrets import resolve_secret
from storage.store import FileRef, Store, TableRef, read_table
from tasks.horizontal.training import base_score, evaluate, label_stats
from tasks.links import probabilities
from tasks.scoring import entity_keys, score_columns, with_raw_keys
from tasks.spec.models import SecretRef
from tasks.types import ENTITY_HASH
from tasks.vertical.arrays import arrays_frame, frame_arrays, split_frame, unsplit_frame
from tasks.vertical.fusion import (
    Fusion,
    apply_fusion,
    fixed_fusion,
    join_scores,
    learn_fusion,
    score_table,
)
from tasks.vertical.inputs import (
    POS,
    aligned_frame,
    entity_hashes,
    label_data,
    party_matrix,
    psi_run_id,
    psi_secret,
    read_blinded,
    read_party_model,
)
from tasks.vertical.party_model import party_model_text, score_block
from tasks.vertical.psi_curve import pool_for
from tasks.vertical.psi_protocol import ROW, blind_own, intersect
from tasks.vertical.refs import OneShotFusion, PsiOverlap, StateRef, VerticalSetup
from tasks.vertical.rounds import (
    Combine,
    LabelState,
    PartyDelta,
    combine_round,
    finish,
    gradient_message,
    next_round_allowed,
    rounds_fusion,
    start_label_state,
)

logger = logging.getLogger(__name__)


# -- PSI -------------------------------------------------------------------------------------


def psi_label_blind(setup: VerticalSetup, others: Sequence[str]) -> dict[str, FileRef]:
    """Label party: its own keys blinded once, one (identical) message per feature party."""
    keys = entity_hashes(setup)
    with pool_for(keys.len()) as ex:
        sent = blind_own(keys, psi_secret(setup), party=setup.party, to=others[0], executor=ex)
    coordinator = Store(setup.coordinator)
    return {
        other: write_message(
            coordinator, sent.forward(other).to_arrow(), run_id=psi_run_id(setup), layer="exchange"
        )
        for other in others
    }


def psi_label_intersect(
    setup: VerticalSetup,
    answers: Mapping[str, tuple[FileRef, FileRef]],
    min_overlap: int,
) -> PsiOverlap:
    """Label party: the all-party overlap, its own alignment, one answer per party."""
    keys = entity_hashes(setup)
    blinded = {p: read_blinded(own) for p, (own, _) in answers.items()}
    with pool_for(sum(len(b) for b in blinded.values())) as ex:
        alignment, messages = intersect(
            keys.len(),
            psi_secret(setup),
            party=setup.party,
            reblinded={p: read_blinded(back) for p, (_, back) in answers.items()},
            blinded=blinded,
            min_overlap=min_overlap,
            executor=ex,
        )
    coordinator = Store(setup.coordinator)
    run = psi_run_id(setup)
    out = {
        p: write_message(coordinator, m.to_arrow(), run_id=run, layer="exchange")
        for p, m in messages.items()
    }
    ref = write_alignment(Store(setup.store), alignment.table, run_id=run)
    sizes = {setup.party: keys.len()} | {p: len(b) for p, b in blinded.items()}
    logger.info("PSI: %d entities at every party (set sizes %s)", alignment.table.height, sizes)
    return PsiOverlap(alignment=ref, answers=out, overlap=alignment.table.height, sizes=sizes)


# -- gradient rounds -------------------------------------------------------------------------


def _save_state(setup: VerticalSetup, state: LabelState) -> StateRef:
    """Checkpoint ``state`` in the label party's store and point its latest-state file at it."""
    store = Store(setup.store)
    document, arrays = state.checkpoint()
    table = store.write_table(
        split_frame(arrays),
        "checkpoints",
        vertical_round_name(setup.run_key, state.progress.round),
    )
    doc = store.write_json(
        "checkpoints", vertical_round_document_name(setup.run_key, state.progress.round), document
    )
    p = state.progress
    valid = p.history[-1].valid if p.history else {}
    ref = StateRef(
        document=doc,
        arrays=table,
        round=p.round,
        best_round=p.best_round,
        stopped=p.stop_reason is not None,
        next=next_round_allowed(state, setup.training),
        valid=valid,
        trees=p.total_trees,
        history=[dict(r.valid) for r in p.history],
        fusion=rounds_fusion(p),
    )
    store.write_json(
        "checkpoints", vertical_checkpoint_name(setup.run_key), ref.model_dump(mode="json")
    )
    return ref


def load_state(ref: StateRef, num_class: int) -> LabelState:
    """The label state a checkpoint reference points at (arrays verified)."""
    document = json.loads(read_text(ref.document.uri))
    return LabelState.from_checkpoint(document, unsplit_frame(read_table(ref.arrays), num_class))


def latest_state(setup: VerticalSetup) -> StateRef | None:
    """Label party: its latest checkpoint of this run, if any (resuming)."""
    store = Store(setup.store)
    name = vertical_checkpoint_name(setup.run_key)
    if not store.exists("checkpoints", name):
        return None
    return StateRef.model_validate(store.read_json("checkpoints", name))


def start_state(
    setup: VerticalSetup,
    alignment: TableRef,
    parties: Sequence[str],
    weights: Mapping[str, float] | None,
    combine: Combine,
) -> StateRef:
    """Label party: round 0 (the prior and the coefficients), checkpointed."""
    data = label_data(setup, alignment)
    state = start_label_state(
        data,
        parties=parties,
        objective=setup.objective,
        num_class=setup.num_class,
        patience=setup.training.patience,
        weights=weights,
        combine=combine,
    )
    return _save_state(setup, state)


def send_gradients(setup: VerticalSetup, alignment: TableRef, state: StateRef) -> TableRef:
    """Label party: g and h of the next round on the train entities, to every party."""
    data = label_data(setup, alignment)
    message = gradient_message(load_state(state, setup.num_class), data)
    frame = arrays_frame({"grad": message.grad, "hess": message.hess})
    return Store(setup.coordinator).write_table(
        frame, "exchange", vertical_gradients_name(setup.run_key, message.round)
    )


def combine(
    setup: VerticalSetup,
    alignment: TableRef,
    state: StateRef,
    deltas: Mapping[str, TableRef],
    round_: int,
) -> StateRef:
    """Label party: add the round's weighted deltas, evaluate on valid, checkpoint."""
    data = label_data(setup, alignment)
    received = []
    for party, ref in deltas.items():
        frame = read_table(ref)
        parts = unsplit_frame(frame.drop("trees"), setup.num_class)
        trees = int(frame["trees"][0]) if frame.height else 0
        received.append(PartyDelta(party, round_, parts["train"], parts["valid"], trees))
    new = combine_round(
        load_state(state, setup.num_class), received, data, min_parties=setup.training.min_parties
    )
    return _save_state(setup, new)


def finish_state(setup: VerticalSetup, alignment: TableRef, state: StateRef) -> StateRef:
    """Label party: mark the run as stopped (when it is), so the checkpoint says why."""
    return _save_state(setup, finish(load_state(state, setup.num_class), setup.training))


def fused_test_metrics(
    setup: VerticalSetup, alignment: TableRef, state: StateRef, scores: Mapping[str, TableRef]
) -> dict[str, float]:
    """Label party: the fused model's metrics on the test entities."""
    data = label_data(setup, alignment)
    assert data.y_test is not None
    if not len(data.y_test):
        return {}
    k = setup.num_class
    parts = {p: frame_arrays(read_table(ref), ["raw"], k)["raw"] for p, ref in scores.items()}
    raw = _fuse_aligned(parts, state.fusion)
    return evaluate(data.y_test, raw, setup.objective, k)


def _fuse_aligned(parts: Mapping[str, np.ndarray], fusion: Fusion) -> np.ndarray:
    """Fused raw scores of position-aligned per-party outputs (same rows at every party)."""
    k = fusion.num_class
    tables = {
        p: score_table(pl.Series(POS, np.arange(len(v))), v, key=POS, num_class=k)
        for p, v in parts.items()
    }
    raw, _ = apply_fusion(join_scores(tables, key=POS, num_class=k), fusion)
    return raw


# -- one-shot mode ---------------------------------------------------------------------------


def send_labels(setup: VerticalSetup, alignment: TableRef) -> TableRef:
    """Label party (one-shot, opt-in ``fusion.share_labels``): the overlap's train and
    valid labels, position-aligned, to every party."""
    data = label_data(setup, alignment)
    frame = split_frame({"train": data.y_train, "valid": data.y_valid})
    return Store(setup.coordinator).write_table(
        frame, "exchange", vertical_labels_name(setup.run_key)
    )


def one_shot_fusion(
    setup: VerticalSetup,
    alignment: TableRef,
    scores: Mapping[str, TableRef],
    weights: Mapping[str, float] | None,
    learned: bool,
) -> OneShotFusion:
    """Label party (one-shot): fixed weights from the spec, or weights learned on the
    validation scores (logistic stacking; non-negative least squares for regression);
    metrics of the fused score on valid and test."""
    data = label_data(setup, alignment)
    k = setup.num_class
    base = base_score([label_stats(data.y_train, setup.objective, k)], setup.objective, k)
    parts = {p: unsplit_frame(read_table(ref), k) for p, ref in scores.items()}

    def tables(split: str) -> dict[str, pl.DataFrame]:
        return {
            p: score_table(pl.Series(POS, np.arange(len(v[split]))), v[split], key=POS, num_class=k)
            for p, v in parts.items()
        }

    if learned:
        label_frame = pl.DataFrame({POS: np.arange(len(data.y_valid)), "label": data.y_valid})
        fusion = learn_fusion(
            tables("valid"),
            label_frame,
            key=POS,
            objective=setup.objective,
            num_class=k,
            base=base,
            score_kind="raw",
        )
    else:
        fusion = fixed_fusion(
            list(scores), weights, objective=setup.objective, num_class=k, base=base
        )
    out: dict[str, dict[str, float]] = {}
    assert data.y_test is not None
    for split, y in (("valid", data.y_valid), ("test", data.y_test)):
        raw = _fuse_aligned({p: v[split] for p, v in parts.items()}, fusion)
        out[split] = evaluate(y, raw, setup.objective, k) if len(y) else {}
    return OneShotFusion(fusion=fusion, valid=out["valid"], test=out["test"])


# -- inference -------------------------------------------------------------------------------


def fuse_predictions(
    setup: VerticalSetup,
    alignment: TableRef,
    fusion: Fusion,
    model: FileRef | None,
    upto_round: int,
    scores: Mapping[str, TableRef],
    key_tables: Sequence[TableRef] = (),
    entity: str | None = None,
    secret: SecretRef | None = None,
    labels: list[str] | None = None,
) -> TableRef:
    """Label party (inference): fuse its own model's output on every row of its scoring
    table with the other parties' outputs on the overlap. Rule for an entity another party
    does not know (outside the all-party overlap): that party is absent, i.e. contributes
    0 (the prior); fixed weights are renormalised over the parties present."""
    fused = read_table(setup.fused)
    k = setup.num_class
    _, x = party_matrix(setup, fused)
    own = score_block(party_model_text(read_party_model(model, setup), upto_round), x, k).reshape(
        fused.height, k
    )
    pos = pl.Series(POS, np.arange(fused.height))
    tables = {setup.party: score_table(pos, own, key=POS, num_class=k)}
    rows = aligned_frame(setup, alignment)[ROW].to_numpy().astype(np.int64)
    for party, ref in scores.items():
        if party == setup.party:
            continue
        part = frame_arrays(read_table(ref), ["raw"], k)["raw"]
        if len(part) != len(rows):
            raise ValueError(f"scores of party {party}: {len(part)} rows, overlap {len(rows)}")
        tables[party] = score_table(pl.Series(POS, rows), part, key=POS, num_class=k)
    raw, count = apply_fusion(join_scores(tables, key=POS, num_class=k, ids=pos), fusion)
    present = count == len(fusion.parties)
    out = fused.select(ENTITY_HASH).with_columns(
        pl.Series("all_parties", present),
        *score_columns(
            raw, probabilities(raw, setup.objective, k), objective=setup.objective, labels=labels
        ),
    )
    if key_tables and entity is not None and secret is not None:
        keys = entity_keys(
            [read_table(t) for t in key_tables],
            entity=entity,
            secret=resolve_secret(env=secret.env, block=secret.block),
        )
        out = with_raw_keys(out, keys, entity=entity)
    return Store(setup.store).write_table(out, "reports", vertical_predictions_name(setup.run_key))
