"""Federated training flows: ``federated-round`` and ``federated-training`` (wiring of the
party steps; the session's rules live in :mod:`tasks.horizontal.session`)."""

from __future__ import annotations

import math
import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, wait

from flows import progress
from flows.bins import consortium_bins
from flows.common import artifact_key, threads
from flows.lossless import lossless_run
from flows.names import FLOW_RUN_NAMES, tagged
from flows.prepare import prepare, require_secret
from flows.publish import FinishedTraining, TrainingResult, publish_training
from flows.transport import PartyJob, PartyRunner, pooled_parties
from storage.results import DEFAULT_RESULTS
from storage.runs import read_checkpoint, write_checkpoint
from storage.store import Store, TableRef
from tasks.horizontal.rounds import (
    STOP_TEXT,
    RoundError,
    StopReason,
    cannot_train,
    label_span,
    require_trainers,
    round_trees,
    stop_before,
    strategy_for,
)
from tasks.horizontal.session import (
    Checkpoint,
    RoundInput,
    RoundOutput,
    check_training_request,
    loss_name,
    prefetch_wanted,
    require_evaluations,
    training_setups,
    usable,
)
from tasks.horizontal.steps import (
    PartyEval,
    PartyStats,
    PartyUpdate,
    Refit,
    RoundAggregate,
    TrainSetup,
    aggregate,
    model_rules,
)
from tasks.horizontal.training import EarlyStopping, aggregate_metrics, base_score
from tasks.prepare.design import FeatureSchema, consortium_schema
from tasks.report import progress_text
from tasks.run_identity import num_classes, run_key
from tasks.spec.load import load_spec
from tasks.spec.models import FedSpec, TrainingSpec
from tasks.types import Objective


@task(name="aggregate-round", task_run_name="aggregate round {round_}")
def aggregate_round(
    updates: list[PartyUpdate],
    failed: dict[str, str],
    round_: int,
    setup: TrainSetup,
    planned: list[str],
    span: float,
    refit: Refit | None = None,
) -> RoundAggregate:
    t = setup.training
    return aggregate(
        updates,
        round_=round_,
        rules=model_rules(setup, span),
        strategy=strategy_for(t),
        min_parties=t.min_parties,
        planned=planned,
        failed=failed,
        folder=Store(setup.coordinator).location("models", ""),
        refit=refit,
    )


def _runner(state: RoundInput) -> PartyRunner:
    return PartyRunner(
        state.remote,
        coordinator=state.setups[0].coordinator,
        results=state.results,
        refresh=state.refresh,
        timeout=state.timeout,
    )


def _job(state: RoundInput, setup: TrainSetup, **fields: Any) -> PartyJob:
    return PartyJob(
        setup=setup, round=state.round, results=state.results, refresh=state.refresh, **fields
    )


def _settle(futures: dict[str, PrefectFuture[Any]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Wait for every party's step: results of the completed ones, messages of the others."""
    wait(list(futures.values()))
    done: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for party, future in futures.items():
        if future.state.is_completed():
            done[party] = future.result()
        else:
            failed[party] = str(future.state.message)
    return done, failed


def _catch_up(
    runner: PartyRunner, state: RoundInput, setups: dict[str, TrainSetup]
) -> tuple[dict[str, Any], dict[str, int], dict[str, str]]:
    """Bring parties that missed rounds up to date before they train again."""
    logger = get_run_logger()
    scores, at = dict(state.scores), dict(state.scores_round)
    behind = state.behind()
    history = state.history
    futures = {
        p: runner.submit_job(
            _job(
                state,
                setups[p],
                op="evaluate",
                aggregates=history[r : state.round - 1],
                scores=scores[p],
            )
        )
        for p, r in behind.items()
    }
    done, failed = _settle(futures)
    for party, out in done.items():
        scores[party], at[party] = out.scores, state.round - 1
        logger.info("party %s caught up from round %d", party, behind[party])
    why = {p: f"could not catch up from round {behind[p]}: {m}" for p, m in failed.items()}
    return scores, at, why


def _leaf_sums(
    runner: PartyRunner,
    state: RoundInput,
    setups: dict[str, TrainSetup],
    scores: dict[str, Any],
    updates: list[PartyUpdate],
    planned: list[str],
    failed: dict[str, str],
) -> Refit:
    """Every reachable party's per-leaf gradient sums of the round's updates (``leaf_values
    = "consortium"``); a party whose step fails adds none (the others' sums still count)."""
    logger = get_run_logger()
    sums, sums_failed = _settle(
        {
            party: runner.submit_job(
                _job(
                    state,
                    setup,
                    op="leaf_sums",
                    scores=scores[party],
                    updates=updates,
                    planned=planned,
                    label_span=state.label_span,
                )
            )
            for party, setup in setups.items()
            if party not in failed
        }
    )
    for party, message in sums_failed.items():
        logger.warning("round %d: leaf sums of party %s failed: %s", state.round, party, message)
    first = next(iter(setups.values()))
    return Refit(
        sums=sums,
        learning_rates=dict(state.learning_rates),
        min_rows=first.training.min_data_in_leaf,
        coordinator=first.coordinator,
        run_key=first.run_key,
    )


# persist_result=False: Prefect matches a retried parent's subflow calls by position, not by
# round, and would hand round k+1 of a retry the first attempt's persisted round 1. The round's
# own identity is its checkpoint (run key, round); without a persisted result a retry runs
# the round afresh, and its party steps come back from their content-keyed caches.
@flow(
    name="federated-round",
    flow_run_name="round {state.round}",
    persist_result=False,
    task_runner=threads(4),
)
def federated_round(state: RoundInput) -> RoundOutput:
    """Broadcast, train on every party, check and average the updates, evaluate everywhere.

    A party whose task fails is left out of the round (and catches up in a later one); the
    spec's ``min_parties`` decides whether the round proceeds.
    """
    logger = get_run_logger()
    runner = _runner(state)
    setups = {s.party: s for s in state.setups}
    scores, at, failed = _catch_up(runner, state, setups)
    ready = state.ready(failed)
    if ready:
        logger.info(
            "round %d: updates of %s came with the last evaluation", state.round, sorted(ready)
        )
    trained, train_failed = _settle(
        {
            party: runner.submit_job(
                _job(
                    state,
                    setup,
                    op="train",
                    scores=scores[party],
                    learning_rate=state.learning_rates[party],
                )
            )
            for party, setup in setups.items()
            if party in state.learning_rates and party not in failed and party not in ready
        }
    )
    updates: list[PartyUpdate] = [*ready.values(), *trained.values()]
    failed |= {p: f"training task failed: {m}" for p, m in train_failed.items()}
    for party, reason in failed.items():
        logger.warning("round %d: party %s left out: %s", state.round, party, reason)
    first = next(iter(setups.values()))
    planned = sorted(state.learning_rates)
    refit = None
    if first.training.leaf_values == "consortium" and updates:
        refit = _leaf_sums(runner, state, setups, scores, updates, planned, failed)
    agg = aggregate_round(updates, failed, state.round, first, planned, state.label_span, refit)
    asked = [party for party in setups if at[party] == state.round - 1]
    evals, eval_failed = _settle(
        {
            party: runner.submit_job(
                _job(
                    state,
                    setups[party],
                    op="evaluate",
                    aggregates=[agg],
                    scores=scores[party],
                    next_learning_rate=state.next_rate(party),
                )
            )
            for party in asked
        }
    )
    for party, message in eval_failed.items():
        logger.warning("round %d: evaluation at party %s failed: %s", state.round, party, message)
    for party, done in evals.items():
        scores[party], at[party] = done.scores, state.round
    require_evaluations(state.round, first.training.min_parties, asked, list(evals))
    typed: dict[str, PartyEval] = evals
    valid = aggregate_metrics(
        {p: (e.n_valid, e.valid) for p, e in typed.items()},
        {p: e.valid_histogram for p, e in typed.items()},
    )
    test = aggregate_metrics(
        {p: (e.n_test, e.test) for p, e in typed.items()},
        {p: e.test_histogram for p, e in typed.items()},
    )
    logger.info(
        "round %d: %d/%d updates averaged; valid %s",
        state.round,
        len(agg.members),
        len(setups),
        {k: round(v, 5) for k, v in valid.items()},
    )
    return RoundOutput(
        aggregate=agg, evals=typed, valid=valid, test=test, scores=scores, scores_round=at
    )


def _party_stats(
    runner: PartyRunner, setups: list[TrainSetup], job: dict[str, Any], objective: Objective
) -> tuple[dict[str, PartyStats], dict[str, str]]:
    """Every party's label statistics, and the parties that cannot take part (and why)."""
    logger = get_run_logger()
    stats, failed = _settle(
        {s.party: runner.submit_job(PartyJob(setup=s, op="stats", **job)) for s in setups}
    )
    left_out = {p: f"its label statistics failed: {m}" for p, m in failed.items()}
    for party, st in stats.items():
        if (why := cannot_train(st, objective)) is not None:
            left_out[party] = why
    for party, st in stats.items():
        logger.info(
            "party %s: %d train, %d validation, %d test rows",
            party,
            st.n_train,
            st.n_valid,
            st.n_test,
        )
    for party, why in left_out.items():
        logger.warning("party %s cannot take part in training: %s", party, why)
    return stats, left_out


class _Loop:
    """The round loop's fixed inputs."""

    def __init__(
        self,
        spec: FedSpec,
        training: TrainingSpec,
        setups: list[TrainSetup],
        trainers: dict[str, int],
        span: float,
        remote: dict[str, str],
        job: dict[str, Any],
        num_class: int,
    ) -> None:
        self.spec, self.training, self.setups = spec, training, setups
        self.trainers, self.span, self.remote, self.job = trainers, span, remote, job
        self.strategy = strategy_for(training)
        self.per_round = round_trees(self.strategy, trainers, training.trees_per_round, num_class)
        self.coordinator = Store(spec.coordinator.store)
        self.num_class = num_class

    def input(
        self, checkpoint: Checkpoint, prefetched: dict[str, PartyUpdate], prefetch: bool
    ) -> RoundInput:
        t = checkpoint.round + 1
        return RoundInput(
            round=t,
            setups=self.setups,
            scores=checkpoint.scores,
            scores_round=checkpoint.scores_round,
            history=checkpoint.rounds,
            learning_rates=dict(self.strategy.plan(t, self.trainers).learning_rates),
            label_span=self.span,
            remote=self.remote,
            timeout=self.spec.run.party_timeout,
            prefetched=prefetched,
            next_learning_rates=dict(self.strategy.plan(t + 1, self.trainers).learning_rates),
            prefetch=prefetch,
            **self.job,
        )


def _run_rounds(
    loop: _Loop, checkpoint: Checkpoint, stop_after: int | None
) -> tuple[Checkpoint, StopReason | None]:
    """Rounds until the round limit, a budget, early stopping or ``stop_after``; each
    round's checkpoint written as it ends."""
    logger = get_run_logger()
    training = loop.training
    metric = loss_name(loop.spec.consortium.task)
    stopper = EarlyStopping(
        patience=training.patience, best_round=checkpoint.best_round, best_loss=checkpoint.best_loss
    )
    progress_id: UUID = create_progress_artifact(  # type: ignore[assignment]
        progress=100.0 * checkpoint.round / training.rounds,
        key=f"{artifact_key(loop.spec.consortium.name)}-training-progress",
        description="Federated training: share of the round limit done",
    )
    started = time.monotonic()
    done_here = 0
    reason: StopReason | None = checkpoint.stop_reason if checkpoint.stopped else None
    prefetched: dict[str, PartyUpdate] = {}
    # the parties that evaluated the last round, and those out of it (the progress line)
    evaluated: list[str] = []
    out_of_round: dict[str, str] = dict(checkpoint.left_out)
    while not checkpoint.stopped:
        t = checkpoint.round + 1
        reason = stop_before(
            t,
            rounds=training.rounds,
            trees=checkpoint.trees(),
            next_trees=loop.per_round,
            max_trees=training.max_trees,
            elapsed=time.monotonic() - started,
            max_seconds=training.max_seconds,
        )
        if reason is not None or (stop_after is not None and done_here >= stop_after):
            break
        prefetch = prefetch_wanted(loop.remote, t, training.rounds, stop_after, done_here)
        update_progress_artifact(
            progress_id,
            progress=100.0 * checkpoint.round / training.rounds,
            description=progress_text(
                t,
                training.rounds,
                parties=[s.party for s in loop.setups],
                left_out=checkpoint.left_out,
                running=True,
            ),
        )
        with tagged(round_=t):
            out = federated_round(loop.input(checkpoint, prefetched, prefetch))
        if out.aggregate.round != t:  # a round's result must be that round's, never another's
            raise RoundError(f"round {t} came back as round {out.aggregate.round}")
        prefetched = out.next_updates()
        stop = stopper.update(t, out.valid.get(metric, math.nan))
        reason = "early_stopping" if stop else None
        checkpoint = checkpoint.after(out, stopper, stop)
        write_checkpoint(loop.coordinator, checkpoint.run_key, t, checkpoint)
        done_here += 1
        progress.emit(
            "training", f"round {t}", f"valid {metric} {out.valid.get(metric, math.nan):.5f}"
        )
        evaluated = sorted(out.evals)
        out_of_round = {**checkpoint.left_out, **out.aggregate.dropped}
        update_progress_artifact(
            progress_id,
            progress=100.0 * t / training.rounds,
            description=progress_text(t, training.rounds, parties=evaluated, left_out=out_of_round),
        )
        if stop:
            logger.info("early stopping after round %d; best round %d", t, stopper.best_round)
    if reason is not None:
        logger.info("training stopped after round %d: %s", checkpoint.round, STOP_TEXT[reason])
        update_progress_artifact(
            progress_id,
            progress=100.0,
            description=progress_text(
                checkpoint.round,
                training.rounds,
                parties=evaluated,
                left_out=out_of_round,
                stopped=STOP_TEXT[reason],
                best_round=checkpoint.best_round,
            ),
        )
    return checkpoint, reason


@flow(
    name="federated-training",
    flow_run_name=FLOW_RUN_NAMES["federated-training"],
    persist_result=True,
    task_runner=threads(4),
)
def federated_training(
    spec_path: str,
    refresh: bool = False,
    rounds: int | None = None,
    stop_after: int | None = None,
    baselines: bool = False,
    dispatch: str | None = None,
) -> TrainingResult:
    """Prepare every party, then run rounds until the round limit or early stopping.

    ``stop_after`` ends the run after that many rounds *of this call* (a checkpoint is kept),
    as an operator stopping a run would; the next call resumes from the checkpoint.
    ``baselines`` adds local-only models and, for comparison only, a centralised model on
    the pooled fused tables to the report.
    With ``training.mode = "lossless"`` the parties train one LightGBM model data-parallel
    instead (:func:`flows.lossless.lossless_run`: one process per party, synchronous, no
    checkpoints).

    Args:
        spec_path: Consortium spec (TOML) as seen by the machine running the flow.
        refresh: Recompute every step and start training afresh (ignore checkpoints).
        rounds: Override the spec's round limit.
        stop_after: Stop after this many rounds of this run (resume later).
        baselines: Also train local-only and centralised baselines (pools data).
        dispatch: Deployment prefix of the per-party deployments (``fedfuse deploy`` sets
            it): parties with a work pool run their steps there. Empty: all in process.
    """
    logger = get_run_logger()
    spec = load_spec(spec_path)
    require_secret(spec, dispatch)
    training = (
        spec.training if rounds is None else spec.training.model_copy(update={"rounds": rounds})
    )
    remote = pooled_parties(spec, dispatch)
    check_training_request(spec, spec_path, training, remote, baselines)
    prepared = prepare(spec_path, refresh=refresh, dispatch=dispatch)
    labelled = {p: out for p, out in prepared.items() if p in spec.label_party_ids()}
    schema = consortium_schema({p: out.features for p, out in labelled.items()})
    fused = {p: out.table for p, out in labelled.items()}
    key = run_key(spec.model_copy(update={"training": training}), schema, fused)
    objective, k = spec.consortium.task, max(num_classes(spec), 1)
    results = spec.run.results or DEFAULT_RESULTS
    if training.mode == "lossless":
        if stop_after is not None:
            logger.warning("lossless mode trains in one synchronous run: stop_after is ignored")
        return lossless_run(
            spec,
            training,
            schema=schema,
            fused=fused,
            key=key,
            baselines=baselines,
            refresh=refresh,
            remote=remote,
        )
    setups = training_setups(spec, training, key=key, schema=schema, fused=fused, num_class=k)
    job: dict[str, Any] = {"results": results, "refresh": refresh}
    runner = PartyRunner(
        remote, coordinator=spec.coordinator.store, timeout=spec.run.party_timeout, **job
    )
    stats, left_out = _party_stats(runner, setups, job, objective)
    setups = usable(setups, stats)
    bins = consortium_bins(runner, setups, job)
    if bins is not None:
        setups = [s.model_copy(update={"bins": bins[1]}) for s in setups]
    trainers = {p: (0 if p in left_out else st.n_train) for p, st in stats.items()}
    require_trainers(trainers, left_out, min_parties=training.min_parties)
    base = base_score([stats[s.party] for s in setups], objective, k)
    checkpoint = (
        None if refresh else read_checkpoint(Store(spec.coordinator.store), key, Checkpoint)
    )
    if checkpoint is None:
        start = {
            s.party: runner.submit_job(PartyJob(setup=s, op="start", base=base, **job))
            for s in setups
        }
        checkpoint = Checkpoint.fresh(
            key, base, {p: f.result() for p, f in start.items()}, left_out
        )
    else:
        logger.info("resuming training run %s after round %d", key, checkpoint.round)
    loop = _Loop(spec, training, setups, trainers, label_span(list(stats.values())), remote, job, k)
    checkpoint, reason = _run_rounds(loop, checkpoint, stop_after)
    sizes = {
        p: {"train": st.n_train, "valid": st.n_valid, "test": st.n_test} for p, st in stats.items()
    }
    return _publish(spec, checkpoint, reason, loop, schema, fused, baselines, sizes)


def _publish(
    spec: FedSpec,
    checkpoint: Checkpoint,
    reason: StopReason | None,
    loop: _Loop,
    schema: FeatureSchema,
    fused: dict[str, TableRef],
    baselines: bool,
    split_sizes: dict[str, dict[str, int]],
) -> TrainingResult:
    best = checkpoint.best()
    parties = [s.party for s in loop.setups]
    finished = FinishedTraining(
        run_key=checkpoint.run_key,
        ensemble=checkpoint.ensemble(
            schema, spec.consortium.task, loop.setups[0].num_class, loop.training
        ),
        upto_round=best,
        valid=checkpoint.valid,
        party_valid=checkpoint.party_valid,
        test=checkpoint.test,
        best_round=checkpoint.best_round,
        rounds_run=checkpoint.round,
        best_test=checkpoint.test[best - 1] if best else {},
        dropped=checkpoint.dropped(),
        parties=parties,
        stop_reason=reason,
        left_out=checkpoint.left_out,
        description="Aggregated validation metrics per round",
        baselines=baselines,
        fused={p: ref for p, ref in fused.items() if p in parties},
        schema_=schema,
        training=loop.training,
        split_sizes=split_sizes,
        rounds=checkpoint.rounds,
        tables=fused,
        **loop.job,
    )
    return publish_training(spec, finished)
