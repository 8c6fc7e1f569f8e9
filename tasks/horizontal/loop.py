"""The in-memory loop of horizontal federated training: every party's rows in one process.

Output averaging with residual rounds (see :mod:`tasks.horizontal.ensemble`): each party
splits its rows (:func:`tasks.horizontal.training.party_data`) and reports label aggregates;
the coordinator computes the base score and the strategy's plan; per round, each planned
party fits ``trees_per_round`` trees from its *running* raw scores F_{t-1}(x)
(:func:`train_party`), the coordinator checks and weights the updates on the round rules of
:mod:`tasks.horizontal.rounds` (:func:`aggregate_updates`), each party adds Σ_k w_k f_k(x) to
its running scores and evaluates on its validation rows (:func:`apply_round`,
:func:`evaluate_party`), and the coordinator aggregates the metrics and applies federated
early stopping.

:func:`run_round` is one round wired in memory, :func:`train_federated` the whole loop; both
are references for the Prefect flow (:mod:`flows.horizontal`), which runs the same rules and
the same local steps as tasks, and the baselines (:mod:`tasks.horizontal.baselines`) reuse
the loop. Nothing here reads files or the clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tasks.horizontal.ensemble import (
    GlobalEnsemble,
    MemberTuple,
    ensemble_size,
    predict_raw,
    round_increment,
    text_sha256,
)
from tasks.horizontal.leaf_refit import LeafSums, leaf_sums
from tasks.horizontal.model_text import check_task
from tasks.horizontal.rounds import (
    Candidate,
    ModelRules,
    Review,
    RoundError,
    StopReason,
    cannot_train,
    refit_review,
    require_quorum,
    require_trainers,
    review_updates,
    round_trees,
    stop_before,
    strategy_for,
    structure_rules,
    weigh,
)
from tasks.horizontal.rounds import (
    label_span as rounds_label_span,
)
from tasks.horizontal.score_histograms import ScoreHistogram, score_histogram
from tasks.horizontal.strategies import Strategy
from tasks.horizontal.training import (
    LOSS_METRIC,
    EarlyStopping,
    PartyData,
    aggregate_metrics,
    base_score,
    evaluate,
    fit_round,
    label_stats,
    party_data,
)
from tasks.spec.models import TrainingSpec
from tasks.types import Objective

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class RoundUpdate(BaseModel):
    """What a party sends to the coordinator after local training in one round."""

    model_config = ConfigDict(frozen=True)

    party: str
    round: int = Field(ge=1)
    model_text: str
    n_train: int = Field(ge=0)
    learning_rate: float = Field(gt=0)
    seed: int = 0

    @property
    def sha256(self) -> str:
        return text_sha256(self.model_text)


def _map(executor: Executor | None, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``fn`` over ``items``, in ``executor`` side by side when given; results in order."""
    return list(map(fn, items) if executor is None else executor.map(fn, items))


# --------------------------------------------------------------------------------------
# Party-side state and steps
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartyState:
    """A party's data and its running raw scores F_t on its train and valid rows."""

    data: PartyData
    raw_train: np.ndarray
    raw_valid: np.ndarray
    round: int = 0


def start_state(data: PartyData, base: Sequence[float], num_class: int) -> PartyState:
    def tile(n: int) -> np.ndarray:
        out = np.tile(np.asarray(base, dtype=np.float64), (n, 1))
        return out.reshape(n) if num_class == 1 else out

    return PartyState(
        data=data, raw_train=tile(len(data.y_train)), raw_valid=tile(len(data.y_valid))
    )


def train_party(
    state: PartyState,
    *,
    round_: int,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
    learning_rate: float,
) -> RoundUpdate:
    """Party step: fit this round's trees from the running scores."""
    text, seed = fit_round(
        state.data.X_train,
        state.data.y_train,
        state.raw_train,
        training=spec,
        objective=objective,
        num_class=num_class,
        party=state.data.party,
        round_=round_,
        learning_rate=learning_rate,
        categorical=categorical,
        feature_names=feature_names,
    )
    return RoundUpdate(
        party=state.data.party,
        round=round_,
        model_text=text,
        n_train=len(state.data.y_train),
        learning_rate=learning_rate,
        seed=seed,
    )


def apply_round(state: PartyState, members: Sequence[MemberTuple], num_class: int) -> PartyState:
    """Party step: add Σ_k w_k f_k(x) of an accepted round to the running scores."""
    d = state.data
    return replace(
        state,
        raw_train=state.raw_train + round_increment(members, d.X_train, num_class),
        raw_valid=state.raw_valid + round_increment(members, d.X_valid, num_class),
        round=state.round + 1,
    )


def party_leaf_sums(
    state: PartyState,
    updates: Sequence[Candidate],
    rules: ModelRules,
    min_rows: int,
) -> dict[str, LeafSums]:
    """Party step (``leaf_values = "consortium"``): its per-leaf gradient sums of every
    accepted update at its running scores (:func:`tasks.horizontal.leaf_refit.leaf_sums`)."""
    d = state.data
    return {
        u.party: leaf_sums(
            u.text or "",
            d.X_train,
            d.y_train,
            state.raw_train,
            objective=rules.objective,
            num_class=rules.num_class,
            min_rows=min_rows,
            max_abs_leaf=rules.max_abs_leaf,
        )
        for u in updates
    }


def evaluate_party(
    state: PartyState, objective: Objective, num_class: int
) -> tuple[int, dict[str, float], ScoreHistogram | None]:
    """Party step: (validation size, metrics of the running scores on it, their per-label
    histogram for the pooled AUC)."""
    d = state.data
    return (
        len(d.y_valid),
        evaluate(d.y_valid, state.raw_valid, objective, num_class),
        score_histogram(d.y_valid, state.raw_valid, objective, num_class),
    )


# --------------------------------------------------------------------------------------
# Coordinator-side steps
# --------------------------------------------------------------------------------------


def aggregate_updates(
    ensemble: GlobalEnsemble,
    updates: Sequence[RoundUpdate],
    *,
    round_: int,
    rules: ModelRules,
    strategy: Strategy,
    min_parties: int,
    planned: Sequence[str] | None = None,
    refit: Callable[[Review], Review] | None = None,
) -> tuple[GlobalEnsemble, dict[str, str]]:
    """Coordinator step in memory: the round rules of :mod:`tasks.horizontal.rounds` (the
    flow's own), then the accepted updates, weighted by ``strategy``, appended as the
    ensemble's next round.

    Returns the new ensemble and the rejected parties with their reasons. Raises
    :class:`RoundError` below ``min_parties`` accepted updates.
    """
    if round_ != len(ensemble.rounds) + 1:
        raise RoundError(f"round {round_} does not follow the ensemble's {len(ensemble.rounds)}")
    candidates = [
        Candidate(party=u.party, round=u.round, n_train=u.n_train, text=u.model_text)
        for u in updates
    ]
    checks = rules if refit is None else structure_rules(rules)
    review = review_updates(candidates, round_=round_, rules=checks, planned=planned)
    for party, reason in review.rejected.items():
        logger.warning("round %d: update of %s rejected: %s", round_, party, reason)
    require_quorum(review, round_=round_, min_parties=min_parties)
    if refit is not None:
        review = refit(review)
    weights = weigh(review, strategy)
    members = [(c.party, weights[c.party], c.text or "") for c in review.accepted]
    return ensemble.with_round(members), review.rejected


class RoundRecord(BaseModel):
    round: int
    weights: dict[str, float]
    rejected: dict[str, str] = Field(default_factory=dict)
    valid: dict[str, float]
    party_valid: dict[str, dict[str, float]]
    trees: int
    model_bytes: int


class TrainingHistory(BaseModel):
    rounds: list[RoundRecord] = Field(default_factory=list)
    best_round: int = 0
    best_loss: float | None = None
    stop_reason: StopReason = "rounds"
    left_out: dict[str, str] = Field(default_factory=dict, description="Parties that cannot train")
    n_train: dict[str, int] = Field(default_factory=dict)
    learning_rates: dict[str, float] = Field(default_factory=dict)
    test: dict[str, float] = Field(default_factory=dict)


def run_round(
    ensemble: GlobalEnsemble,
    states: Mapping[str, PartyState],
    *,
    round_: int,
    spec: TrainingSpec,
    learning_rates: Mapping[str, float],
    executor: Executor | None = None,
    label_span: float = 0.0,
) -> tuple[GlobalEnsemble, dict[str, PartyState], RoundRecord]:
    """One round in memory: train at the parties ``learning_rates`` names (the strategy's
    plan), aggregate, apply and evaluate everywhere, aggregate the metrics.

    With an ``executor`` the parties' fits and score updates run in it side by side (as the
    parties' own machines would; LightGBM releases the GIL); the results are the same.
    """
    k = ensemble.num_class

    def fit(item: tuple[str, PartyState]) -> RoundUpdate:
        party, state = item
        return train_party(
            state,
            round_=round_,
            spec=spec,
            objective=ensemble.objective,
            num_class=k,
            categorical=ensemble.categorical,
            feature_names=ensemble.feature_names,
            learning_rate=learning_rates[party],
        )

    active = [(p, s) for p, s in states.items() if p in learning_rates and len(s.data.y_train)]
    updates = _map(executor, fit, active)
    rules = ModelRules.for_spec(
        spec,
        feature_names=ensemble.feature_names,
        categorical=ensemble.categorical,
        objective=ensemble.objective,
        num_class=k,
        label_span=label_span,
    )

    def refit(review: Review) -> Review:
        reporters = [s for s in states.values() if len(s.data.y_train)]
        sums = _map(
            executor,
            lambda s: party_leaf_sums(s, review.accepted, rules, spec.min_data_in_leaf),
            reporters,
        )
        refitted, bad = refit_review(
            review,
            {s.data.party: got for s, got in zip(reporters, sums, strict=True)},
            rules=rules,
            learning_rates=learning_rates,
            min_rows=spec.min_data_in_leaf,
        )
        for party, reason in bad.items():
            logger.warning("round %d: %s left out of the leaf values: %s", round_, party, reason)
        return refitted

    ensemble, rejected = aggregate_updates(
        ensemble,
        updates,
        round_=round_,
        rules=rules,
        strategy=strategy_for(spec),
        min_parties=spec.min_parties,
        planned=list(learning_rates),
        refit=refit if spec.leaf_values == "consortium" else None,
    )
    members = ensemble.rounds[-1]
    new_states = dict(
        zip(
            states,
            _map(executor, lambda s: apply_round(s, members, k), states.values()),
            strict=True,
        )
    )
    per_party = {p: evaluate_party(s, ensemble.objective, k) for p, s in new_states.items()}
    valid = aggregate_metrics(
        {p: (n, m) for p, (n, m, _) in per_party.items()},
        {p: h for p, (_, _, h) in per_party.items()},
    )
    ensemble = ensemble.with_metrics(round_, valid)
    size = ensemble_size(ensemble)
    record = RoundRecord(
        round=round_,
        weights={p: w for p, w, _ in members},
        rejected=rejected,
        valid=valid,
        party_valid={p: m for p, (_, m, _) in per_party.items()},
        trees=size.trees,
        model_bytes=size.bytes,
    )
    return ensemble, new_states, record


def train_federated(
    party_frames: Mapping[str, pl.DataFrame],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
    executor: Executor | None = None,
    idle_ok: bool = False,
) -> tuple[GlobalEnsemble, TrainingHistory]:
    """The in-memory loop of horizontal federated training, on the round rules of
    :mod:`tasks.horizontal.rounds` and the strategies of :mod:`tasks.horizontal.strategies` (as the flow).

    Parties that cannot train (:func:`~tasks.horizontal.rounds.cannot_train`) are left out
    (``history.left_out``) and still evaluated; ``idle_ok`` lets a run where nobody can
    train end with the prior alone (a one-class party's local-only model).

    Stops after ``spec.rounds``, on early stopping (``spec.patience`` rounds without a better
    aggregated validation loss, :data:`LOSS_METRIC`), or before a round that could take the
    ensemble past ``spec.max_trees`` LightGBM trees (all classes; a round adds at most
    parties × trees_per_round × num_class). The returned ensemble keeps every round run and
    sets ``best_round``; ``history.test`` holds the size-weighted test metrics at that round.
    ``executor`` runs the parties' steps of each round side by side (see :func:`run_round`).
    """
    check_task(objective, num_class)
    data = {
        p: party_data(
            frame,
            party=p,
            feature_names=feature_names,
            validation_fraction=spec.validation_fraction,
            test_fraction=spec.test_fraction,
        )
        for p, frame in party_frames.items()
    }
    stats = {p: label_stats(d.y_train, objective, num_class) for p, d in data.items()}
    n_train = {p: s.n_train for p, s in stats.items()}
    left_out = {p: why for p, st in stats.items() if (why := cannot_train(st, objective))}
    trainers = {p: (0 if p in left_out else n) for p, n in n_train.items()}
    able = sum(1 for n in trainers.values() if n)
    if not (idle_ok and able == 0):
        require_trainers(trainers, left_out, min_parties=spec.min_parties)
    base = base_score(stats, objective, num_class)
    strategy = strategy_for(spec)
    rates = strategy.learning_rates(n_train)
    ensemble = GlobalEnsemble(
        objective=objective,
        num_class=num_class,
        base_score=base,
        feature_names=list(feature_names),
        categorical=list(categorical),
        aggregation=spec.aggregation,
        trees_per_round=spec.trees_per_round,
    )
    states = {p: start_state(d, base, num_class) for p, d in data.items()}
    stopper = EarlyStopping(patience=spec.patience)
    history = TrainingHistory(n_train=n_train, learning_rates=rates, left_out=left_out)
    loss_name = LOSS_METRIC[objective]
    per_round = round_trees(strategy, trainers, spec.trees_per_round, num_class)
    span = rounds_label_span(list(stats.values())) if objective == "regression" else 0.0
    t = 0
    while able:
        t += 1
        reason = stop_before(
            t,
            rounds=spec.rounds,
            trees=ensemble_size(ensemble).trees,
            next_trees=per_round,
            max_trees=spec.max_trees,
        )
        if reason is not None:
            history.stop_reason = reason
            break
        plan = strategy.plan(t, trainers)
        ensemble, states, record = run_round(
            ensemble,
            states,
            round_=t,
            spec=spec,
            learning_rates=plan.learning_rates,
            executor=executor,
            label_span=span,
        )
        history.rounds.append(record)
        loss = record.valid.get(loss_name, math.nan)
        logger.info("round %d: valid %s, %d trees", t, record.valid, record.trees)
        if stopper.update(t, loss):
            history.stop_reason = "early_stopping"
            break
    if stopper.best_round == 0 and not any(len(d.y_valid) for d in data.values()):
        stopper.best_round = len(ensemble.rounds)  # nothing to validate on: keep every round
    ensemble = ensemble.model_copy(update={"best_round": stopper.best_round})
    history.best_round = stopper.best_round
    history.best_loss = stopper.best_loss
    raw_test = {p: predict_raw(ensemble, d.X_test) for p, d in data.items() if len(d.y_test)}
    history.test = aggregate_metrics(
        {
            p: (len(data[p].y_test), evaluate(data[p].y_test, raw, objective, num_class))
            for p, raw in raw_test.items()
        },
        {
            p: score_histogram(data[p].y_test, raw, objective, num_class)
            for p, raw in raw_test.items()
        },
    )
    return ensemble, history
