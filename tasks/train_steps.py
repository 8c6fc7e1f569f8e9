"""Federated training steps: party-side (train, evaluate) and coordinator-side (aggregate).

Party steps read the party's fused table and keep the party's running raw scores in the
party's own store; only model texts (LightGBM text format), sample counts and aggregate
metrics are written to the coordinator store.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import polars as pl
from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from storage.files import read_text
from storage.store import FileRef, Store, TableRef, read_table
from tasks.caching import content_cache_key
from tasks.design import FeatureSchema, design_matrix, labels
from tasks.ensemble import MemberTuple, aggregation_weights, check_update, round_increment
from tasks.spec import TrainingSpec
from tasks.training import (
    RoundError,
    evaluate,
    label_stats,
    lgb_params,
    party_seed,
    split_assignments,
    train_update,
)
from tasks.types import ENTITY_HASH, Aggregation, Objective

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


class PartyStats(BaseModel):
    party: str
    n_train: int
    n_valid: int
    n_test: int
    label_sum: float
    label_sq_sum: float
    class_counts: list[int] = Field(default_factory=list)


class PartyUpdate(BaseModel):
    party: str
    round: int
    model: FileRef
    n_train: int


class Member(BaseModel):
    party: str
    weight: float
    model: FileRef


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
    scores: TableRef
    next: PartyUpdate | None = Field(
        default=None,
        description="The party's update for the next round, trained on these scores when the "
        "evaluation asked for it (a dispatched party: one run per round instead of two)",
    )


class QuorumError(RoundError):
    """Fewer valid party updates than the spec's ``min_parties``."""


def _party_data(setup: TrainSetup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fused = read_table(setup.fused)
    split = split_assignments(
        fused[ENTITY_HASH],
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


def initial_scores(setup: TrainSetup, base: list[float]) -> TableRef:
    """The party's running raw scores before round 1: the base score on every row."""
    fused = read_table(setup.fused, columns=[ENTITY_HASH])
    raw = np.tile(np.asarray(base, dtype=np.float64), (fused.height, 1))
    store = Store(setup.store)
    return store.write_table(_scores_frame(raw), "models", f"{setup.run_key}-scores-r0000")


def train_round(
    setup: TrainSetup, round_: int, scores: TableRef, learning_rate: float
) -> PartyUpdate:
    """Fit ``trees_per_round`` trees on the party's train split from the running scores."""
    x, y, split = _party_data(setup)
    running = _scores_array(scores)
    mask = split == "train"
    params = lgb_params(
        setup.training,
        setup.objective,
        setup.num_class,
        seed=party_seed(setup.training.seed, setup.party, round_),
        learning_rate=learning_rate,
    )
    text = train_update(
        x[mask],
        y[mask],
        running[mask],
        params,
        setup.training.trees_per_round,
        setup.schema_.categorical_index,
        feature_names=setup.schema_.names,
    )
    ref = Store(setup.coordinator).write_text(
        "models", f"{setup.run_key}-r{round_:04d}-{setup.party}.txt", text
    )
    return PartyUpdate(party=setup.party, round=round_, model=ref, n_train=int(mask.sum()))


def aggregate(
    updates: list[PartyUpdate],
    *,
    round_: int,
    schema: FeatureSchema,
    objective: Objective,
    num_class: int,
    trees_per_round: int,
    mode: Aggregation,
    min_parties: int,
    failed: dict[str, str] | None = None,
) -> RoundAggregate:
    """Check every update, drop the bad ones (with a reason) and weight the rest."""
    dropped = dict(failed or {})
    good: list[PartyUpdate] = []
    for update in updates:
        text = read_text(update.model.uri)
        problems = check_update(
            text,
            feature_names=schema.names,
            objective=objective,
            num_class=num_class,
            trees_per_round=trees_per_round,
            categorical=schema.categorical,
        )
        if problems:
            dropped[update.party] = "; ".join(problems)
            logger.warning(
                "round %d: update of party %s left out: %s",
                round_,
                update.party,
                dropped[update.party],
            )
        else:
            good.append(update)
    if len(good) < min_parties:
        raise QuorumError(
            f"round {round_}: {len(good)} valid update(s), quorum is {min_parties}; "
            f"left out: {dropped or 'none'}"
        )
    weights = aggregation_weights({u.party: u.n_train for u in good}, mode)
    members = [Member(party=u.party, weight=weights[u.party], model=u.model) for u in good]
    return RoundAggregate(round=round_, members=members, dropped=dropped)


def members(aggregate_: RoundAggregate) -> list[MemberTuple]:
    """The round's accepted updates as (party, weight, model text): the broadcast."""
    return [(m.party, m.weight, read_text(m.model.uri)) for m in aggregate_.members]


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
    ref = store.write_table(_scores_frame(running), "models", f"{setup.run_key}-scores-r{last:04d}")
    out: dict[str, Any] = {}
    for part in ("valid", "test"):
        mask = split == part
        out[part] = (
            evaluate(y[mask], running[mask], setup.objective, setup.num_class) if mask.any() else {}
        )
    return PartyEval(
        party=setup.party,
        round=last,
        n_valid=int((split == "valid").sum()),
        n_test=int((split == "test").sum()),
        valid=out["valid"],
        test=out["test"],
        scores=ref,
    )


party_stats = task(name="compute-party-stats", cache_key_fn=content_cache_key, persist_result=True)(
    compute_stats
)
start_scores = task(name="start-scores", cache_key_fn=content_cache_key, persist_result=True)(
    initial_scores
)
train_party = task(name="train-party", cache_key_fn=content_cache_key, persist_result=True)(
    train_round
)
evaluate_party = task(name="evaluate-party", cache_key_fn=content_cache_key, persist_result=True)(
    evaluate_round
)
