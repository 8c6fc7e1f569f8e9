"""Federated training steps: party-side (train, evaluate) and coordinator-side (aggregate).

Party steps read the party's fused table and keep the party's running raw scores in the
party's own store; only model texts (LightGBM text format), sample counts and aggregate
metrics are written to the coordinator store.
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from storage.files import ConfinementError, confined
from storage.runs import (
    read_bins,
    refit_name,
    running_scores_name,
    update_name,
    write_forced_bins,
)
from storage.store import (
    FileRef,
    IntegrityError,
    Store,
    TableRef,
    UnverifiedError,
    read_table,
    read_verified_text,
)
from tasks.caching import content_cache_key
from tasks.horizontal.bins import (
    ConsortiumBins,
    PartySketches,
    forced_bin_params,
    forced_bins,
    sketch_features,
)
from tasks.horizontal.ensemble import MemberTuple, round_increment
from tasks.horizontal.leaf_refit import LeafSums, leaf_sums
from tasks.horizontal.model_text import count_trees
from tasks.horizontal.rounds import (
    MAX_UPDATE_BYTES,
    Candidate,
    ModelRules,
    refit_review,
    require_quorum,
    review_updates,
    structure_rules,
    weigh,
)
from tasks.horizontal.score_histograms import ScoreHistogram, score_histogram
from tasks.horizontal.strategies import Strategy
from tasks.horizontal.training import (
    LgbParams,
    fit_round,
    frame_splits,
    label_stats,
    split_metrics,
)
from tasks.prepare.design import FeatureSchema, design_matrix, labels
from tasks.spec.models import TrainingSpec
from tasks.types import ENTITY_HASH, Objective

logger = logging.getLogger(__name__)


class TrainSetup(BaseModel):
    """What one party needs for a training run (no data, only references)."""

    model_config = ConfigDict(frozen=True)

    party: str
    store: str
    coordinator: str
    run_key: str
    fused: TableRef
    schema_: FeatureSchema
    objective: Objective
    num_class: int
    training: TrainingSpec
    bins: FileRef | None = Field(
        default=None,
        description="The consortium's bin boundaries in the coordinator store (none: each "
        "party bins from its own rows)",
    )


class PartyStats(BaseModel):
    party: str
    n_train: int
    n_valid: int
    n_test: int
    label_sum: float
    label_sq_sum: float
    class_counts: list[int] = Field(default_factory=list)


def model_rules(setup: TrainSetup, span: float = 0.0) -> ModelRules:
    """What every accepted update of this training run must look like."""
    return ModelRules.for_spec(
        setup.training,
        feature_names=setup.schema_.names,
        categorical=setup.schema_.categorical,
        objective=setup.objective,
        num_class=setup.num_class,
        label_span=span,
    )


class PartyUpdate(BaseModel):
    party: str
    round: int
    model: FileRef
    n_train: int


class Member(BaseModel):
    party: str
    weight: float
    model: FileRef
    trees: int = Field(default=0, ge=0, description="LightGBM trees in the update")


class RoundAggregate(BaseModel):
    round: int
    members: list[Member]
    dropped: dict[str, str] = Field(default_factory=dict)


class PartyEval(BaseModel):
    party: str
    round: int
    n_valid: int
    n_test: int
    valid: dict[str, float]
    test: dict[str, float]
    valid_histogram: ScoreHistogram | None = Field(
        default=None,
        description="Per-label counts of the validation split's scores (the pooled AUC)",
    )
    test_histogram: ScoreHistogram | None = Field(
        default=None, description="Per-label counts of the test split's scores (the pooled AUC)"
    )
    scores: TableRef
    next: PartyUpdate | None = Field(
        default=None,
        description="The party's update for the next round, trained on these scores when the "
        "evaluation asked for it (a dispatched party: one run per round instead of two)",
    )


def _party_data(setup: TrainSetup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fused = read_table(setup.fused)
    split = frame_splits(
        fused,
        validation_fraction=setup.training.validation_fraction,
        test_fraction=setup.training.test_fraction,
    ).to_numpy()
    return design_matrix(fused, setup.schema_), labels(fused), split


def _scores_frame(raw: np.ndarray) -> pl.DataFrame:
    matrix = raw.reshape(len(raw), -1)
    return pl.DataFrame({f"raw_{k}": matrix[:, k] for k in range(matrix.shape[1])})


def _scores_array(ref: TableRef) -> np.ndarray:
    frame = read_table(ref)
    values = frame.to_numpy().astype(np.float64)
    return values[:, 0] if values.shape[1] == 1 else values


def compute_stats(setup: TrainSetup) -> PartyStats:
    _, y, split = _party_data(setup)
    stats = label_stats(y[split == "train"], setup.objective, setup.num_class)
    return PartyStats(
        party=setup.party,
        n_valid=int((split == "valid").sum()),
        n_test=int((split == "test").sum()),
        **stats.model_dump(),
    )


def compute_sketches(setup: TrainSetup) -> PartySketches:
    """The party's KLL sketches of its numerical features over its training rows: all that
    leaves the party for the consortium's bin boundaries."""
    x, _, split = _party_data(setup)
    return sketch_features(
        setup.party,
        x[split == "train"],
        setup.schema_.names,
        setup.schema_.categorical,
        min_rows=setup.training.min_sketch_rows,
    )


def consortium_bin_params(
    bins: ConsortiumBins,
    x_train: np.ndarray,
    feature_names: list[str],
    *,
    store: str | None,
    run_key: str,
    categorical: list[str] | None = None,
    rank: int = 0,
    machines: int = 1,
) -> LgbParams:
    """The LightGBM params that bin a party's rows with the consortium's boundaries (the
    forced-bins file written where the party's LightGBM reads it; ``rank`` of ``machines``
    in lossless mode)."""
    text, per_feature = forced_bins(
        bins, x_train, feature_names, categorical=categorical or [], rank=rank, machines=machines
    )
    return forced_bin_params(write_forced_bins(store, run_key, text), per_feature)


def _bin_params(setup: TrainSetup, x_train: np.ndarray) -> LgbParams:
    if setup.bins is None:
        return {}
    try:
        bins = read_bins(setup.bins, ConsortiumBins)
    except UnverifiedError as exc:
        raise IntegrityError(f"party {setup.party}: consortium bins: {exc}") from None
    return consortium_bin_params(
        bins, x_train, setup.schema_.names, store=setup.store, run_key=setup.run_key
    )


def initial_scores(setup: TrainSetup, base: list[float]) -> TableRef:
    """The party's running raw scores before round 1: the base score on every row."""
    fused = read_table(setup.fused, columns=[ENTITY_HASH])
    raw = np.tile(np.asarray(base, dtype=np.float64), (fused.height, 1))
    store = Store(setup.store)
    return store.write_table(_scores_frame(raw), "models", running_scores_name(setup.run_key, 0))


def train_round(
    setup: TrainSetup, round_: int, scores: TableRef, learning_rate: float
) -> PartyUpdate:
    """Fit ``trees_per_round`` trees on the party's train split from the running scores."""
    x, y, split = _party_data(setup)
    running = _scores_array(scores)
    mask = split == "train"
    text, _ = fit_round(
        x[mask],
        y[mask],
        running[mask],
        training=setup.training,
        objective=setup.objective,
        num_class=setup.num_class,
        party=setup.party,
        round_=round_,
        learning_rate=learning_rate,
        categorical=setup.schema_.categorical_index,
        feature_names=setup.schema_.names,
        bin_params=_bin_params(setup, x[mask]),
    )
    ref = Store(setup.coordinator).write_text(
        "models", update_name(setup.run_key, round_, setup.party), text
    )
    return PartyUpdate(party=setup.party, round=round_, model=ref, n_train=int(mask.sum()))


def read_update(update: PartyUpdate, folder: str | None = None) -> Candidate:
    """A party's update as the coordinator receives it: its text verified against the sha256
    the party reported, or why it cannot be read (outside ``folder``, missing, oversized,
    altered, binary)."""
    try:  # '..' and symlinks resolved: the reference must lead into the folder
        if folder is not None:
            confined(update.model.uri, [folder])
    except ConfinementError:
        return Candidate(
            party=update.party,
            round=update.round,
            n_train=update.n_train,
            problem="update is not in the coordinator store's models folder",
        )
    try:
        text = read_verified_text(update.model, max_bytes=MAX_UPDATE_BYTES)
    except UnverifiedError as exc:
        return Candidate(
            party=update.party, round=update.round, n_train=update.n_train, problem=str(exc)
        )
    return Candidate(party=update.party, round=update.round, n_train=update.n_train, text=text)


def aggregate(
    updates: list[PartyUpdate],
    *,
    round_: int,
    rules: ModelRules,
    strategy: Strategy,
    min_parties: int,
    planned: list[str] | None = None,
    failed: dict[str, str] | None = None,
    folder: str | None = None,
    refit: Refit | None = None,
) -> RoundAggregate:
    """Check every update (read only from ``folder`` when given), leave out the bad ones
    with a reason and weight the rest (the round rules of :mod:`tasks.horizontal.rounds`).
    With ``refit`` the accepted updates get the consortium's leaf values from the parties'
    sums, written beside the updates as new model files."""
    review = review_updates(
        [read_update(u, folder) for u in updates],
        round_=round_,
        rules=rules if refit is None else structure_rules(rules),
        planned=planned,
        failed=failed,
    )
    for party, reason in review.rejected.items():
        if party not in (failed or {}):
            logger.warning("round %d: update of party %s left out: %s", round_, party, reason)
    require_quorum(review, round_=round_, min_parties=min_parties)
    models = {u.party: u.model for u in updates}
    if refit is not None:
        review, bad = refit_review(
            review,
            refit.sums,
            rules=rules,
            learning_rates=refit.learning_rates,
            min_rows=refit.min_rows,
        )
        for party, reason in bad.items():
            logger.warning("round %d: %s left out of the leaf values: %s", round_, party, reason)
        store = Store(refit.coordinator)
        models = {
            c.party: store.write_text(
                "models", refit_name(refit.run_key, round_, c.party), c.text or ""
            )
            for c in review.accepted
        }
    weights = weigh(review, strategy)
    members = [
        Member(
            party=c.party,
            weight=weights[c.party],
            model=models[c.party],
            trees=count_trees(c.text or ""),
        )
        for c in review.accepted
    ]
    return RoundAggregate(round=round_, members=members, dropped=review.rejected)


class Refit(BaseModel):
    """What the coordinator needs to give a round's updates the consortium's leaf values."""

    sums: dict[str, dict[str, LeafSums]] = Field(
        description="Reporting party -> its leaf sums per accepted update"
    )
    learning_rates: dict[str, float]
    min_rows: int = Field(ge=1)
    coordinator: str
    run_key: str


def round_leaf_sums(
    setup: TrainSetup,
    round_: int,
    scores: TableRef,
    updates: list[PartyUpdate],
    planned: list[str],
    span: float,
) -> dict[str, LeafSums]:
    """The party's per-leaf gradient sums of every update the round's rules accept (the
    party checks each update as the coordinator does before loading it), at its running
    scores on its training rows; nothing for a party without training rows."""
    rules = model_rules(setup, span)
    review = review_updates(
        [read_update(u, Store(setup.coordinator).location("models", "")) for u in updates],
        round_=round_,
        rules=structure_rules(rules),
        planned=planned,
    )
    x, y, split = _party_data(setup)
    mask = split == "train"
    if not mask.any():
        return {}
    running = _scores_array(scores)[mask]
    return {
        c.party: leaf_sums(
            c.text or "",
            x[mask],
            y[mask],
            running,
            objective=setup.objective,
            num_class=setup.num_class,
            min_rows=setup.training.min_data_in_leaf,
            max_abs_leaf=rules.max_abs_leaf,
        )
        for c in review.accepted
    }


def members(aggregate_: RoundAggregate) -> list[MemberTuple]:
    """The round's accepted updates as (party, weight, model text): the broadcast. Every
    text is verified against the sha256 the round recorded (a file swapped after the round,
    e.g. before a resume, is refused, never loaded)."""
    out: list[MemberTuple] = []
    for m in aggregate_.members:
        try:
            text = read_verified_text(m.model, max_bytes=MAX_UPDATE_BYTES)
        except UnverifiedError as exc:
            raise IntegrityError(
                f"round {aggregate_.round}: accepted update of party {m.party}: {exc}"
            ) from None
        out.append((m.party, m.weight, text))
    return out


def evaluate_round(
    setup: TrainSetup, aggregates: list[RoundAggregate], scores: TableRef
) -> PartyEval:
    """Apply the rounds (one, or several for a party catching up) to the party's running
    scores; metrics of the resulting ensemble on the valid and test splits."""
    if not aggregates:
        raise ValueError("no round to apply")
    x, y, split = _party_data(setup)
    running = _scores_array(scores)
    for aggregate_ in aggregates:
        running = running + round_increment(members(aggregate_), x, setup.num_class)
    last = aggregates[-1].round
    store = Store(setup.store)
    ref = store.write_table(
        _scores_frame(running), "models", running_scores_name(setup.run_key, last)
    )
    out = split_metrics(y, running, split, ("valid", "test"), setup.objective, setup.num_class)
    hist = {
        part: score_histogram(
            y[split == part], running[split == part], setup.objective, setup.num_class
        )
        for part in ("valid", "test")
    }
    return PartyEval(
        party=setup.party,
        round=last,
        n_valid=int((split == "valid").sum()),
        n_test=int((split == "test").sum()),
        valid=out["valid"],
        test=out["test"],
        valid_histogram=hist["valid"],
        test_histogram=hist["test"],
        scores=ref,
    )


party_stats = task(name="compute-party-stats", cache_key_fn=content_cache_key, persist_result=True)(
    compute_stats
)
sketch_party = task(name="sketch-features", cache_key_fn=content_cache_key, persist_result=True)(
    compute_sketches
)
start_scores = task(name="start-scores", cache_key_fn=content_cache_key, persist_result=True)(
    initial_scores
)
train_party = task(name="train-party", cache_key_fn=content_cache_key, persist_result=True)(
    train_round
)
leaf_sums_party = task(name="leaf-sums", cache_key_fn=content_cache_key, persist_result=True)(
    round_leaf_sums
)
evaluate_party = task(name="evaluate-party", cache_key_fn=content_cache_key, persist_result=True)(
    evaluate_round
)
