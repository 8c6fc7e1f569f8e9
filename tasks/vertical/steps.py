"""Vertical training steps on stores: private set intersection, aligned blocks, gradient
rounds, final scores. Each function runs *at* one party and does its IO through
:mod:`storage`; what crosses to another party goes through the coordinator store
(``exchange/``): blinded sets and alignment answers (PSI), the label party's gradients
(opt-in, ``fusion.share_gradients``), each party's per-entity score deltas. Features, trees,
labels and alignments stay in the party's own store.

Row order. Every party sorts its aligned rows by the alignment id, and the split of an
entity (train / valid / test) is a function of its hashed key, which every party holds for
its own rows, so the arrays exchanged in a round are position-aligned at every party without
sending any id along, and an entity stays in its split across runs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any

import numpy as np
import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from storage.files import read_text
from storage.psi import party_master_secret, read_message, write_alignment, write_message
from storage.secrets import resolve_secret
from storage.store import FileRef, Store, TableRef, fingerprint, read_table
from tasks.caching import content_cache_key
from tasks.horizontal.model_text import count_trees
from tasks.horizontal.training import base_score, evaluate, label_stats, split_assignments
from tasks.links import probabilities
from tasks.prepare.design import FeatureSchema, design_matrix, labels
from tasks.scoring import entity_keys
from tasks.spec.models import SecretRef, TrainingSpec
from tasks.types import ENTITY_HASH, Objective
from tasks.vertical.psi import (
    ALIGN_ID,
    ROW,
    AlignmentMessage,
    BlindedSet,
    PSIError,
    blind_own,
    derive_secret,
    intersect,
    message_from_arrow,
    receive_alignment,
)
from tasks.vertical.psi import (
    answer as psi_answer,
)
from tasks.vertical.psi import (
    pool as psi_pool,
)
from tasks.vertical.training import (
    Combine,
    Fusion,
    GradientMessage,
    LabelData,
    LabelState,
    PartyBlock,
    PartyDelta,
    PartyModel,
    apply_fusion,
    combine_round,
    finish,
    fixed_fusion,
    gradient_message,
    join_scores,
    learn_fusion,
    next_round_allowed,
    party_model_text,
    rounds_fusion,
    score_block,
    score_table,
    start_label_state,
    train_one_shot,
    train_party_round,
)

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
#: Key of position-aligned score tables (row position in alignment-id order).
POS = "pos"


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
    fusion: dict[str, Any] = Field(
        default_factory=dict, description="The model as a score fusion (coefficients, base)"
    )


class PartyRoundOut(BaseModel):
    model: FileRef = Field(description="The party's model so far (its own store)")
    delta: TableRef = Field(description="Per-entity deltas for the label party (coordinator)")


# -- PSI -------------------------------------------------------------------------------------


def _run_id(setup: VerticalSetup) -> str:
    return f"v{setup.run_key}"


def _secret(setup: VerticalSetup) -> Any:
    master = party_master_secret(Store(setup.store))
    return derive_secret(master, run_id=_run_id(setup), party=setup.party)


#: Below this many X25519 operations a process pool costs more than it saves.
POOL_MIN_OPS = 50_000


@contextmanager
def _executor(ops: int) -> Iterator[Executor | None]:
    """A process pool over the machine's cores for large PSI steps, else none."""
    if ops < POOL_MIN_OPS or (os.cpu_count() or 1) < 2:
        yield None
        return
    executor = psi_pool()
    try:
        yield executor
    finally:
        executor.shutdown()


def _keys(setup: VerticalSetup) -> pl.Series:
    return read_table(setup.fused, columns=[ENTITY_HASH])[ENTITY_HASH]


def psi_label_blind(setup: VerticalSetup, others: Sequence[str]) -> dict[str, FileRef]:
    """Label party: its own keys blinded once, one (identical) message per feature party."""
    keys = _keys(setup)
    with _executor(keys.len()) as ex:
        sent = blind_own(keys, _secret(setup), party=setup.party, to=others[0], executor=ex)
    coordinator = Store(setup.coordinator)
    return {
        other: write_message(
            coordinator, sent.forward(other).to_arrow(), run_id=_run_id(setup), layer="exchange"
        )
        for other in others
    }


def psi_party_answer(setup: VerticalSetup, received: FileRef) -> tuple[FileRef, FileRef]:
    """Feature party: its own keys blinded, and the label party's set blinded again."""
    message = _blinded(received)
    secret = _secret(setup)
    keys = _keys(setup)
    with _executor(keys.len() + len(message)) as ex:
        own, back = psi_answer(keys, message, secret, party=setup.party, executor=ex)
    coordinator = Store(setup.coordinator)
    run = _run_id(setup)
    return (
        write_message(coordinator, own.to_arrow(), run_id=run, layer="exchange"),
        write_message(coordinator, back.to_arrow(), run_id=run, layer="exchange"),
    )


def _blinded(ref: FileRef) -> BlindedSet:
    message = message_from_arrow(read_message(ref.uri))
    if not isinstance(message, BlindedSet):
        raise PSIError(f"{ref.uri}: expected a blinded set")
    return message


def psi_label_intersect(
    setup: VerticalSetup,
    answers: Mapping[str, tuple[FileRef, FileRef]],
    min_overlap: int,
) -> PsiOverlap:
    """Label party: the all-party overlap, its own alignment, one answer per party."""
    keys = _keys(setup)
    blinded = {p: _blinded(own) for p, (own, _) in answers.items()}
    with _executor(sum(len(b) for b in blinded.values())) as ex:
        alignment, messages = intersect(
            keys.len(),
            _secret(setup),
            party=setup.party,
            reblinded={p: _blinded(back) for p, (_, back) in answers.items()},
            blinded=blinded,
            min_overlap=min_overlap,
            executor=ex,
        )
    coordinator = Store(setup.coordinator)
    run = _run_id(setup)
    out = {
        p: write_message(coordinator, m.to_arrow(), run_id=run, layer="exchange")
        for p, m in messages.items()
    }
    ref = write_alignment(Store(setup.store), alignment.table, run_id=run)
    sizes = {setup.party: keys.len()} | {p: len(b) for p, b in blinded.items()}
    logger.info("PSI: %d entities at every party (set sizes %s)", alignment.table.height, sizes)
    return PsiOverlap(alignment=ref, answers=out, overlap=alignment.table.height, sizes=sizes)


def psi_party_receive(setup: VerticalSetup, answer: FileRef) -> TableRef:
    """Feature party: its rows in the overlap and their alignment ids (own store only)."""
    message = message_from_arrow(read_message(answer.uri))
    if not isinstance(message, AlignmentMessage):
        raise PSIError(f"{answer.uri}: expected an alignment answer")
    alignment = receive_alignment(
        message, _secret(setup), party=setup.party, own_count=_keys(setup).len()
    )
    return write_alignment(Store(setup.store), alignment.table, run_id=_run_id(setup))


# -- aligned blocks --------------------------------------------------------------------------


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
    frame = aligned_frame(setup, alignment)
    y = labels(frame)
    split = frame["split"].to_numpy()
    return LabelData(y[split == "train"], y[split == "valid"], y[split == "test"])


# -- arrays through stores -------------------------------------------------------------------


def _frame(arrays: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """Equal-length arrays (1-D or 2-D) as float64 columns ``name_k``."""
    cols: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        matrix = np.asarray(array, dtype=np.float64).reshape(len(array), -1)
        for k in range(matrix.shape[1]):
            cols[f"{name}_{k}"] = matrix[:, k]
    return pl.DataFrame(cols)


def _arrays(frame: pl.DataFrame, names: Sequence[str], num_class: int) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        matrix = frame.select([f"{name}_{k}" for k in range(num_class)]).to_numpy()
        out[name] = matrix[:, 0].copy() if num_class == 1 else matrix.copy()
    return out


def _split_frames(parts: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """Arrays of different lengths (train / valid / test) in one long table."""
    frames = [
        _frame({"v": a}).with_columns(pl.lit(name).alias("part")) for name, a in parts.items()
    ]
    return pl.concat(frames, how="vertical")


def _unsplit(frame: pl.DataFrame, num_class: int) -> dict[str, np.ndarray]:
    out = {}
    for name in frame["part"].unique(maintain_order=True).to_list():
        sub = frame.filter(pl.col("part") == name)
        out[str(name)] = _arrays(sub, ["v"], num_class)["v"]
    return out


# -- label party: state ----------------------------------------------------------------------


def _save_state(setup: VerticalSetup, state: LabelState, data: LabelData) -> StateRef:
    store = Store(setup.store)
    document, arrays = state.checkpoint()
    table = store.write_table(
        _split_frames(arrays),
        "checkpoints",
        f"{setup.run_key}-vertical-r{state.progress.round:04d}",
    )
    doc = store.write_json(
        "checkpoints", f"{setup.run_key}-vertical-r{state.progress.round:04d}.json", document
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
        fusion=rounds_fusion(p).model_dump(mode="json"),
    )
    store.write_json(
        "checkpoints", f"{setup.run_key}-vertical-latest.json", ref.model_dump(mode="json")
    )
    return ref


def load_state(ref: StateRef, num_class: int) -> LabelState:
    document = json.loads(read_text(ref.document.uri))
    return LabelState.from_checkpoint(document, _unsplit(read_table(ref.arrays), num_class))


def latest_state(setup: VerticalSetup) -> StateRef | None:
    store = Store(setup.store)
    name = f"{setup.run_key}-vertical-latest.json"
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
    return _save_state(setup, state, data)


def send_gradients(setup: VerticalSetup, alignment: TableRef, state: StateRef) -> TableRef:
    """Label party: g and h of the next round on the train entities, to every party."""
    data = label_data(setup, alignment)
    message = gradient_message(load_state(state, setup.num_class), data)
    frame = _frame({"grad": message.grad, "hess": message.hess})
    return Store(setup.coordinator).write_table(
        frame, "exchange", f"{setup.run_key}-gradients-r{message.round:04d}"
    )


def _party_model(ref: FileRef | None, setup: VerticalSetup) -> PartyModel:
    if ref is None:
        return PartyModel(party=setup.party, num_class=setup.num_class)
    return PartyModel.model_validate_json(read_text(ref.uri))


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
    arrays = _arrays(read_table(gradients), ["grad", "hess"], setup.num_class)
    message = GradientMessage(round=round_, grad=arrays["grad"], hess=arrays["hess"])
    current, delta = train_party_round(
        _party_model(model, setup),
        block,
        message,
        spec=setup.training,
        objective=setup.objective,
        num_class=setup.num_class,
    )
    store = Store(setup.store)
    model_ref = store.write_text(
        "models",
        f"{setup.run_key}-vertical-{setup.party}-r{round_:04d}.json",
        current.model_dump_json(),
    )
    table = _split_frames({"train": delta.train, "valid": delta.valid}).with_columns(
        pl.lit(delta.trees).alias("trees")
    )
    delta_ref = Store(setup.coordinator).write_table(
        table, "exchange", f"{setup.run_key}-delta-{setup.party}-r{round_:04d}"
    )
    return PartyRoundOut(model=model_ref, delta=delta_ref)


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
        parts = _unsplit(frame.drop("trees"), setup.num_class)
        trees = int(frame["trees"][0]) if frame.height else 0
        received.append(PartyDelta(party, round_, parts["train"], parts["valid"], trees))
    new = combine_round(
        load_state(state, setup.num_class), received, data, min_parties=setup.training.min_parties
    )
    return _save_state(setup, new, data)


def finish_state(setup: VerticalSetup, alignment: TableRef, state: StateRef) -> StateRef:
    data = label_data(setup, alignment)
    return _save_state(setup, finish(load_state(state, setup.num_class), setup.training), data)


def party_test_scores(
    setup: VerticalSetup, alignment: TableRef, model: FileRef | None, upto_round: int
) -> TableRef:
    """Any party: its model's raw output on its test block up to the best round."""
    block = party_block(setup, alignment)
    text = party_model_text(_party_model(model, setup), upto_round)
    assert block.X_test is not None
    raw = score_block(text, block.X_test, setup.num_class)
    return Store(setup.coordinator).write_table(
        _frame({"raw": raw}), "exchange", f"{setup.run_key}-test-{setup.party}-r{upto_round:04d}"
    )


def fused_test_metrics(
    setup: VerticalSetup, alignment: TableRef, state: StateRef, scores: Mapping[str, TableRef]
) -> dict[str, float]:
    """Label party: the fused model's metrics on the test entities."""
    data = label_data(setup, alignment)
    assert data.y_test is not None
    if not len(data.y_test):
        return {}
    k = setup.num_class
    parts = {p: _arrays(read_table(ref), ["raw"], k)["raw"] for p, ref in scores.items()}
    raw = _fused(parts, Fusion.model_validate(state.fusion))
    return evaluate(data.y_test, raw, setup.objective, k)


def _fused(parts: Mapping[str, np.ndarray], fusion: Fusion) -> np.ndarray:
    """Fused raw scores of position-aligned per-party outputs (same rows at every party)."""
    k = fusion.num_class
    tables = {
        p: score_table(pl.Series(POS, np.arange(len(v))), v, key=POS, num_class=k)
        for p, v in parts.items()
    }
    raw, _ = apply_fusion(join_scores(tables, key=POS, num_class=k), fusion)
    return raw


def model_at(setup: VerticalSetup, round_: int) -> FileRef | None:
    """Any party: its model after ``round_`` (resuming a stopped run), if it has one."""
    store = Store(setup.store)
    name = f"{setup.run_key}-vertical-{setup.party}-r{round_:04d}.json"
    if round_ == 0 or not store.exists("models", name):
        return None
    return fingerprint(store.location("models", name))


def pooled_baselines(
    setups: Mapping[str, VerticalSetup], alignments: Mapping[str, TableRef], label_party: str
) -> dict[str, dict[str, float]]:
    """FOR COMPARISON ONLY, pools every party's block and the labels in one process: each
    party's block alone (one model on its block with the overlap's labels) and a centralised
    model on the joined blocks, same parameters, budget rounds x trees_per_round x parties
    and early stopping on the validation split."""
    import lightgbm as lgb

    from tasks.horizontal.training import lgb_params

    data = label_data(setups[label_party], alignments[label_party])
    blocks = {p: party_block(s, alignments[p]) for p, s in setups.items()}
    first = setups[label_party]
    out: dict[str, dict[str, float]] = {}
    for party, block in blocks.items():
        shot = train_one_shot(
            block, data, spec=first.training, objective=first.objective, num_class=first.num_class
        )
        assert shot.test is not None and data.y_test is not None
        out[f"{party} alone"] = evaluate(data.y_test, shot.test, first.objective, first.num_class)
    t = first.training
    params = lgb_params(t, first.objective, first.num_class, seed=t.seed) | {
        "boost_from_average": True
    }
    names = [n for b in blocks.values() for n in b.feature_names]
    cats = [n for b in blocks.values() for n in b.categorical]
    x_train = np.hstack([b.X_train for b in blocks.values()])
    x_valid = np.hstack([b.X_valid for b in blocks.values()])
    x_test = np.hstack([b.X_test for b in blocks.values() if b.X_test is not None])
    train_set = lgb.Dataset(
        x_train, data.y_train, feature_name=names, categorical_feature=cats, free_raw_data=False
    )
    valid_set = lgb.Dataset(x_valid, data.y_valid, reference=train_set)
    budget = t.rounds * t.trees_per_round * len(blocks)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=budget,
        valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(t.patience * t.trees_per_round, verbose=False)],
    )
    assert data.y_test is not None
    raw = np.asarray(booster.predict(x_test, raw_score=True, num_iteration=booster.best_iteration))
    out["centralised (pooled data)"] = evaluate(data.y_test, raw, first.objective, first.num_class)
    return out


def party_scores(
    setup: VerticalSetup, alignment: TableRef, model: FileRef | None, upto_round: int
) -> TableRef:
    """Any party (inference): its model's raw output on every aligned row, in alignment-id
    order; only these numbers go to the coordinator."""
    frame = aligned_frame(setup, alignment)
    text = party_model_text(_party_model(model, setup), upto_round)
    raw = score_block(text, design_matrix(frame, setup.schema_), setup.num_class)
    return Store(setup.coordinator).write_table(
        _frame({"raw": raw}), "exchange", f"{setup.run_key}-scores-{setup.party}"
    )


def fuse_predictions(
    setup: VerticalSetup,
    alignment: TableRef,
    fusion_doc: dict[str, Any],
    model: FileRef | None,
    upto_round: int,
    scores: Mapping[str, TableRef],
    features: Sequence[TableRef] = (),
    entity: str | None = None,
    secret: SecretRef | None = None,
) -> TableRef:
    """Label party (inference): fuse its own model's output on every row of its scoring
    table with the other parties' outputs on the overlap. Rule for an entity another party
    does not know (outside the all-party overlap): that party is absent, i.e. contributes
    0 (the prior); fixed weights are renormalised over the parties present."""
    fusion = Fusion.model_validate(fusion_doc)
    fused = read_table(setup.fused)
    k = setup.num_class
    own = score_block(
        party_model_text(_party_model(model, setup), upto_round),
        design_matrix(fused, setup.schema_),
        k,
    ).reshape(fused.height, k)
    pos = pl.Series(POS, np.arange(fused.height))
    tables = {setup.party: score_table(pos, own, key=POS, num_class=k)}
    rows = aligned_frame(setup, alignment)[ROW].to_numpy().astype(np.int64)
    for party, ref in scores.items():
        if party == setup.party:
            continue
        part = _arrays(read_table(ref), ["raw"], k)["raw"]
        if len(part) != len(rows):
            raise ValueError(f"scores of party {party}: {len(part)} rows, overlap {len(rows)}")
        tables[party] = score_table(pl.Series(POS, rows), part, key=POS, num_class=k)
    raw, count = apply_fusion(join_scores(tables, key=POS, num_class=k, ids=pos), fusion)
    present = count == len(fusion.parties)
    out = fused.select(ENTITY_HASH).with_columns(
        pl.Series("all_parties", present),
        *(
            [
                pl.Series("raw_score", raw),
                pl.Series("prediction", probabilities(raw, setup.objective, k)),
            ]
            if k == 1
            else [pl.Series("prediction", np.asarray(raw).argmax(axis=1))]
        ),
    )
    if features and entity is not None and secret is not None:
        keys = entity_keys(
            [read_table(f, columns=[entity]) for f in features],
            entity=entity,
            secret=resolve_secret(env=secret.env, block=secret.block),
        )
        out = out.join(keys, on=ENTITY_HASH, how="left", validate="1:1").select(
            entity, pl.exclude(entity)
        )
    return Store(setup.store).write_table(out, "reports", f"{setup.run_key}-predictions")


# -- one-shot mode ---------------------------------------------------------------------------


class OneShotOut(BaseModel):
    model: FileRef = Field(description="The party's full model on its block (own store)")
    scores: TableRef = Field(description="Its raw scores on valid and test (coordinator)")
    trees: int


class OneShotFusion(BaseModel):
    fusion: dict[str, Any]
    valid: dict[str, float]
    test: dict[str, float]


def send_labels(setup: VerticalSetup, alignment: TableRef) -> TableRef:
    """Label party (one-shot, opt-in ``fusion.share_labels``): the overlap's train and
    valid labels, position-aligned, to every party."""
    data = label_data(setup, alignment)
    frame = _split_frames({"train": data.y_train, "valid": data.y_valid})
    return Store(setup.coordinator).write_table(frame, "exchange", f"{setup.run_key}-labels")


def party_one_shot(setup: VerticalSetup, alignment: TableRef, labels_ref: TableRef) -> OneShotOut:
    """Any party (one-shot): a full LightGBM model on its block with the shared labels;
    keeps the model, sends its raw scores on valid and test."""
    block = party_block(setup, alignment)
    parts = _unsplit(read_table(labels_ref), 1)
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
        "models", f"{setup.run_key}-oneshot-{setup.party}.json", model.model_dump_json()
    )
    assert shot.test is not None
    frame = _split_frames({"valid": shot.valid, "test": shot.test})
    scores = Store(setup.coordinator).write_table(
        frame, "exchange", f"{setup.run_key}-oneshot-scores-{setup.party}"
    )
    return OneShotOut(model=model_ref, scores=scores, trees=count_trees(shot.model_text))


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
    parts = {p: _unsplit(read_table(ref), k) for p, ref in scores.items()}

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
        raw = _fused({p: v[split] for p, v in parts.items()}, fusion)
        out[split] = evaluate(y, raw, setup.objective, k) if len(y) else {}
    return OneShotFusion(
        fusion=fusion.model_dump(mode="json"), valid=out["valid"], test=out["test"]
    )


def _task(fn: Any, name: str) -> Any:
    return task(name=name, cache_key_fn=content_cache_key, persist_result=True)(fn)


psi_blind_task = _task(psi_label_blind, "psi-label-blind")
psi_answer_task = _task(psi_party_answer, "psi-party-answer")
psi_intersect_task = _task(psi_label_intersect, "psi-label-intersect")
psi_receive_task = _task(psi_party_receive, "psi-party-receive")
start_state_task = _task(start_state, "vertical-start")
gradients_task = _task(send_gradients, "vertical-gradients")
party_round_task = _task(party_round, "vertical-party-round")
combine_task = _task(combine, "vertical-combine")
finish_task = _task(finish_state, "vertical-finish")
test_scores_task = _task(party_test_scores, "vertical-test-scores")
test_metrics_task = _task(fused_test_metrics, "vertical-test-metrics")
model_at_task = task(name="vertical-model-at", cache_policy=NO_CACHE)(model_at)
baselines_task = task(
    name="vertical-pooled-baselines", persist_result=True, cache_key_fn=content_cache_key
)(pooled_baselines)
party_scores_task = _task(party_scores, "vertical-party-scores")
fuse_predictions_task = _task(fuse_predictions, "vertical-fuse-predictions")
send_labels_task = _task(send_labels, "vertical-send-labels")
one_shot_task = _task(party_one_shot, "vertical-one-shot")
one_shot_fusion_task = _task(one_shot_fusion, "vertical-one-shot-fusion")
latest_state_task = task(name="vertical-latest-state", cache_policy=NO_CACHE)(latest_state)
