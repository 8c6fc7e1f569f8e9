"""Federated training flows: ``federated-round`` and ``federated-training``."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.futures import wait
from pydantic import BaseModel, Field

from flows import progress
from flows.common import artifact_key, publish_training_artifacts, task_options, threads
from flows.prepare import prepare
from flows.transport import PartyJob, PartyRunner, pooled_parties
from storage.results import DEFAULT_RESULTS
from storage.store import Store, TableRef, write_manifest
from tasks.horizontal.baselines import compare_baselines
from tasks.horizontal.ensemble import GlobalEnsemble, ensemble_manifest, ensemble_size, export_model
from tasks.horizontal.lossless import FusedSource, LosslessResult, train_lossless
from tasks.horizontal.rounds import (
    STOP_TEXT,
    QuorumError,
    RoundError,
    StopReason,
    cannot_train,
    label_span,
    require_trainers,
    round_trees,
    stop_before,
    strategy_for,
)
from tasks.horizontal.steps import (
    PartyEval,
    PartyStats,
    PartyUpdate,
    RoundAggregate,
    TrainSetup,
    aggregate,
    members,
    model_rules,
)
from tasks.horizontal.training import EarlyStopping, aggregate_metrics, base_score
from tasks.prepare.design import FeatureSchema, consortium_schema
from tasks.report import (
    Comparison,
    importance_by_party_modality,
    markdown_report,
    plot_importance,
    plot_rounds,
)
from tasks.spec.models import FedSpec, TrainingSpec, load_spec
from tasks.types import Objective

T = TypeVar("T")


class RoundInput(BaseModel):
    """Everything one round needs: party setups, running-score references, learning rates."""

    round: int = Field(ge=1)
    setups: list[TrainSetup]
    scores: dict[str, TableRef]
    scores_round: dict[str, int] = Field(description="Round each party's running scores are at")
    history: list[RoundAggregate] = Field(default_factory=list, description="Rounds so far")
    learning_rates: dict[str, float] = Field(
        description="The parties that train this round (the strategy's plan) and their rates"
    )
    label_span: float = Field(default=0.0, description="Pooled label spread (leaf bound)")
    results: str
    refresh: bool = False
    remote: dict[str, str] = Field(
        default_factory=dict,
        description="Party -> the prefix of its deployments (its steps run on its own pool)",
    )
    timeout: float = Field(default=3600.0, description="Seconds to wait for a dispatched step")
    prefetched: dict[str, PartyUpdate] = Field(
        default_factory=dict,
        description="Updates for this round that dispatched parties trained in the previous "
        "round's evaluation run",
    )
    next_learning_rates: dict[str, float] = Field(
        default_factory=dict, description="The next round's plan (with prefetch)"
    )
    prefetch: bool = Field(
        default=False,
        description="A next round follows: dispatched parties train it in this round's "
        "evaluation run (one flow run per party and round instead of two)",
    )


class RoundOutput(BaseModel):
    aggregate: RoundAggregate
    evals: dict[str, PartyEval]
    valid: dict[str, float]
    test: dict[str, float]
    scores: dict[str, TableRef]
    scores_round: dict[str, int]

    def next_updates(self) -> dict[str, PartyUpdate]:
        """Updates for the next round trained in this round's evaluation runs."""
        return {p: e.next for p, e in self.evals.items() if e.next is not None}


class Checkpoint(BaseModel):
    run_key: str
    round: int
    base_score: list[float]
    rounds: list[RoundAggregate]
    valid: list[dict[str, float]]
    test: list[dict[str, float]]
    scores: dict[str, TableRef]
    scores_round: dict[str, int] = Field(default_factory=dict)
    best_round: int
    best_loss: float | None
    stopped: bool = False
    stop_reason: StopReason | None = None
    left_out: dict[str, str] = Field(
        default_factory=dict, description="Parties that cannot take part, and why"
    )


def loss_name(objective: Objective) -> str:
    return {"binary": "logloss", "multiclass": "logloss", "regression": "rmse"}[objective]


@task(name="aggregate-round", task_run_name="aggregate round {round_}")
def aggregate_round(
    updates: list[PartyUpdate],
    failed: dict[str, str],
    round_: int,
    setup: TrainSetup,
    planned: list[str],
    span: float,
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
    )


def _job(state: RoundInput, setup: TrainSetup, **fields: Any) -> PartyJob:
    return PartyJob(
        setup=setup, round=state.round, results=state.results, refresh=state.refresh, **fields
    )


def _runner(state: RoundInput) -> PartyRunner:
    coordinator = state.setups[0].coordinator
    return PartyRunner(
        state.remote,
        coordinator=coordinator,
        results=state.results,
        refresh=state.refresh,
        timeout=state.timeout,
    )


def _catch_up(
    state: RoundInput, setups: dict[str, TrainSetup]
) -> tuple[dict[str, TableRef], dict[str, int], dict[str, str]]:
    """Bring parties that missed rounds up to date before they train again."""
    logger = get_run_logger()
    runner = _runner(state)
    scores, at = dict(state.scores), dict(state.scores_round)
    failed: dict[str, str] = {}
    behind = {p: at[p] for p in setups if at[p] < state.round - 1}
    futures = {
        p: runner.submit_job(
            _job(
                state,
                setups[p],
                op="evaluate",
                aggregates=state.history[r : state.round - 1],
                scores=scores[p],
            )
        )
        for p, r in behind.items()
    }
    wait(list(futures.values()))
    for party, future in futures.items():
        if future.state.is_completed():
            scores[party], at[party] = future.result().scores, state.round - 1
            logger.info("party %s caught up from round %d", party, behind[party])
        else:
            failed[party] = f"could not catch up from round {behind[party]}: {future.state.message}"
    return scores, at, failed


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
    scores, at, failed = _catch_up(state, setups)
    ready = {
        party: update
        for party, update in state.prefetched.items()
        if party in setups and party not in failed and update.round == state.round
    }
    if ready:
        logger.info(
            "round %d: updates of %s came with the last evaluation", state.round, sorted(ready)
        )
    futures = {
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
    wait(list(futures.values()))
    updates: list[PartyUpdate] = list(ready.values())
    for party, future in futures.items():
        if future.state.is_completed():
            updates.append(future.result())
        else:
            failed[party] = f"training task failed: {future.state.message}"
    for party, reason in failed.items():
        logger.warning("round %d: party %s left out: %s", state.round, party, reason)
    first = next(iter(setups.values()))
    agg = aggregate_round(
        updates, failed, state.round, first, sorted(state.learning_rates), state.label_span
    )
    evals_f = {
        party: runner.submit_job(
            _job(
                state,
                setup,
                op="evaluate",
                aggregates=[agg],
                scores=scores[party],
                next_learning_rate=(
                    state.next_learning_rates.get(party)
                    if state.prefetch and party in state.remote
                    else None
                ),
            )
        )
        for party, setup in setups.items()
        if at[party] == state.round - 1
    }
    wait(list(evals_f.values()))
    evals: dict[str, PartyEval] = {}
    for party, done in evals_f.items():
        if done.state.is_completed():
            evals[party] = done.result()
            scores[party], at[party] = evals[party].scores, state.round
        else:
            logger.warning(
                "round %d: evaluation at party %s failed: %s",
                state.round,
                party,
                done.state.message,
            )
    # the round's metrics (and so early stopping and the best round) come from its
    # evaluations: below the quorum they would be another model's, so the round is redone
    wanted = min(first.training.min_parties, len(evals_f)) or 1
    if len(evals) < wanted:
        missing = sorted(set(evals_f) - set(evals))
        raise QuorumError(
            f"round {state.round}: {len(evals)} evaluation(s), min_parties is "
            f"{first.training.min_parties}; not evaluated at {', '.join(missing)}"
        )
    valid = aggregate_metrics({p: (e.n_valid, e.valid) for p, e in evals.items()})
    test = aggregate_metrics({p: (e.n_test, e.test) for p, e in evals.items()})
    logger.info(
        "round %d: %d/%d updates averaged; valid %s",
        state.round,
        len(agg.members),
        len(setups),
        {k: round(v, 5) for k, v in valid.items()},
    )
    return RoundOutput(
        aggregate=agg, evals=evals, valid=valid, test=test, scores=scores, scores_round=at
    )


def run_key(spec: FedSpec, schema: FeatureSchema, fused: dict[str, TableRef]) -> str:
    """Identity of a training run: same spec training section, schema and data -> same run."""
    blob = json.dumps(
        {
            "training": spec.training.model_dump(mode="json"),
            "task": spec.consortium.task,
            "schema": schema.model_dump(mode="json"),
            "fused": {p: r.sha256 for p, r in sorted(fused.items())},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _checkpoint_name(key: str) -> str:
    return f"{key}-latest.json"


def load_checkpoint(coordinator: Store, key: str) -> Checkpoint | None:
    if not coordinator.exists("checkpoints", _checkpoint_name(key)):
        return None
    return Checkpoint.model_validate(coordinator.read_json("checkpoints", _checkpoint_name(key)))


def save_checkpoint(coordinator: Store, checkpoint: Checkpoint) -> None:
    body = checkpoint.model_dump(mode="json")
    coordinator.write_json(
        "checkpoints", f"{checkpoint.run_key}-r{checkpoint.round:04d}.json", body
    )
    coordinator.write_json("checkpoints", _checkpoint_name(checkpoint.run_key), body)


class TrainingResult(BaseModel):
    run_key: str
    rounds_run: int
    best_round: int
    valid: list[dict[str, float]]
    test: list[dict[str, float]]
    manifest: str
    model: str
    trees: int
    model_bytes: int
    parties: list[str]
    dropped: dict[int, dict[str, str]]
    comparison: Comparison
    report: str
    stop_reason: StopReason | None = None
    left_out: dict[str, str] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


def num_classes(spec: FedSpec) -> int:
    if spec.consortium.task == "multiclass":
        return int(spec.consortium.label.num_classes or 0)
    return 1


@flow(name="federated-training", persist_result=True, task_runner=threads(4))
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
    instead (:func:`lossless_run`: one process per party, synchronous, no checkpoints).

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
    if spec.consortium.layout != "horizontal":
        raise ValueError(
            f"{spec_path}: federated-training averages party models over shared features "
            "(horizontal layout); vertical consortia are prepared but not trained yet"
        )
    training: TrainingSpec = spec.training
    if rounds is not None:
        training = training.model_copy(update={"rounds": rounds})
    remote = pooled_parties(spec, dispatch)
    if baselines and remote:
        raise ValueError(
            "baselines pool the parties' fused tables in one process; they cannot run while "
            f"parties {sorted(remote)} work on their own pools"
        )
    if training.mode == "lossless" and remote:
        raise ValueError(
            "lossless mode runs every party's LightGBM machine as a process beside this flow; "
            f"it cannot run while parties {sorted(remote)} work on their own pools"
        )
    prepared = prepare(spec_path, refresh=refresh, dispatch=dispatch)
    labelled = {p: out for p, out in prepared.items() if p in spec.label_party_ids()}
    schema = consortium_schema({p: out.features for p, out in labelled.items()})
    fused = {p: out.table for p, out in labelled.items()}
    key = run_key(spec.model_copy(update={"training": training}), schema, fused)
    objective = spec.consortium.task
    k = num_classes(spec)
    results = spec.run.results or DEFAULT_RESULTS
    opts = task_options(results, refresh)
    setups = [
        TrainSetup(
            party=p,
            store=spec.party(p).store,
            coordinator=spec.coordinator.store,
            run_key=key,
            fused=ref,
            schema_=schema,
            objective=objective,
            num_class=max(k, 1),
            training=training,
        )
        for p, ref in fused.items()
    ]
    if training.mode == "lossless":
        if stop_after is not None:
            logger.warning("lossless mode trains in one synchronous run: stop_after is ignored")
        return lossless_run(
            spec,
            training,
            schema=schema,
            fused=fused,
            key=key,
            num_class=max(k, 1),
            baselines=baselines,
            opts=opts,
        )
    timeout = spec.run.party_timeout
    runner = PartyRunner(
        remote,
        coordinator=spec.coordinator.store,
        results=results,
        refresh=refresh,
        timeout=timeout,
    )

    def job(setup: TrainSetup, **fields: Any) -> PartyJob:
        return PartyJob(setup=setup, results=results, refresh=refresh, **fields)

    stat_futures = {s.party: runner.submit_job(job(s, op="stats")) for s in setups}
    wait(list(stat_futures.values()))
    stats: dict[str, PartyStats] = {}
    left_out: dict[str, str] = {}
    for party, future in stat_futures.items():
        if future.state.is_completed():
            stats[party] = future.result()
            if (why := cannot_train(stats[party], objective)) is not None:
                left_out[party] = why
        else:
            left_out[party] = f"its label statistics failed: {future.state.message}"
    for party, why in left_out.items():
        logger.warning("party %s cannot take part in training: %s", party, why)
    # a party without rows has nothing to evaluate either; a one-class party still evaluates
    setups = [s for s in setups if s.party in stats and stats[s.party].n_train > 0]
    trainers = {p: (0 if p in left_out else st.n_train) for p, st in stats.items()}
    require_trainers(trainers, left_out, min_parties=training.min_parties)
    base = base_score([stats[s.party] for s in setups], objective, max(k, 1))
    strategy = strategy_for(training)
    span = label_span(list(stats.values()))
    coordinator = Store(spec.coordinator.store)
    checkpoint = None if refresh else load_checkpoint(coordinator, key)
    if checkpoint is None:
        start = {s.party: runner.submit_job(job(s, op="start", base=base)) for s in setups}
        scores = {p: f.result() for p, f in start.items()}
        checkpoint = Checkpoint(
            run_key=key,
            round=0,
            base_score=base,
            rounds=[],
            valid=[],
            test=[],
            scores=scores,
            scores_round=dict.fromkeys(scores, 0),
            best_round=0,
            best_loss=None,
            left_out=left_out,
        )
    else:
        logger.info("resuming training run %s after round %d", key, checkpoint.round)
    stopper = EarlyStopping(
        patience=training.patience, best_round=checkpoint.best_round, best_loss=checkpoint.best_loss
    )
    metric = loss_name(objective)
    progress_id: UUID = create_progress_artifact(  # type: ignore[assignment]
        progress=100.0 * checkpoint.round / training.rounds,
        key=f"{artifact_key(spec.consortium.name)}-training-progress",
        description="Federated training: share of the round limit done",
    )
    started = time.monotonic()
    per_round = round_trees(strategy, trainers, training.trees_per_round, max(k, 1))

    def stop_reason(round_: int, rounds_: list[RoundAggregate]) -> StopReason | None:
        """The round rules' answer to "may round ``round_`` run?" (early stopping aside)."""
        return stop_before(
            round_,
            rounds=training.rounds,
            trees=sum(m.trees for r in rounds_ for m in r.members),
            next_trees=per_round,
            max_trees=training.max_trees,
            elapsed=time.monotonic() - started,
            max_seconds=training.max_seconds,
        )

    done_here = 0
    reason: StopReason | None = checkpoint.stop_reason if checkpoint.stopped else None
    prefetched: dict[str, PartyUpdate] = {}
    while not checkpoint.stopped:
        t = checkpoint.round + 1
        reason = stop_reason(t, checkpoint.rounds)
        if reason is not None or (stop_after is not None and done_here >= stop_after):
            break
        plan = strategy.plan(t, trainers)
        following = strategy.plan(t + 1, trainers)
        out = federated_round(
            RoundInput(
                round=t,
                setups=setups,
                scores=checkpoint.scores,
                scores_round=checkpoint.scores_round,
                history=checkpoint.rounds,
                learning_rates=dict(plan.learning_rates),
                label_span=span,
                results=results,
                refresh=refresh,
                remote=remote,
                timeout=timeout,
                prefetched=prefetched,
                next_learning_rates=dict(following.learning_rates),
                # a head start on round t+1 only when it may follow (budgets aside: at worst
                # an update trained for nothing)
                prefetch=bool(remote)
                and t < training.rounds
                and (stop_after is None or done_here + 1 < stop_after),
            )
        )
        if out.aggregate.round != t:  # a round's result must be that round's, never another's
            raise RoundError(f"round {t} came back as round {out.aggregate.round}")
        prefetched = out.next_updates()
        stop = stopper.update(t, out.valid.get(metric, math.nan))
        reason = "early_stopping" if stop else None
        checkpoint = checkpoint.model_copy(
            update={
                "round": t,
                "rounds": [*checkpoint.rounds, out.aggregate],
                "valid": [*checkpoint.valid, out.valid],
                "test": [*checkpoint.test, out.test],
                "scores": out.scores,
                "scores_round": out.scores_round,
                "best_round": stopper.best_round,
                "best_loss": stopper.best_loss,
                "stopped": stop,
                "stop_reason": reason,
            }
        )
        save_checkpoint(coordinator, checkpoint)
        done_here += 1
        shown = out.valid.get(metric, math.nan)
        progress.emit("training", f"round {t}", f"valid {metric} {shown:.5f}")
        update_progress_artifact(progress_id, progress=100.0 * t / training.rounds)
        if stop:
            logger.info("early stopping after round %d; best round %d", t, stopper.best_round)
    if reason is not None:
        logger.info("training stopped after round %d: %s", checkpoint.round, STOP_TEXT[reason])
        update_progress_artifact(progress_id, progress=100.0)
    ensemble = build_ensemble(checkpoint, schema, objective, max(k, 1), training)
    best = checkpoint.best_round if checkpoint.rounds else 0
    return finish_training(
        spec,
        key=key,
        ensemble=ensemble,
        upto_round=best,
        valid=checkpoint.valid,
        test=checkpoint.test,
        best_round=checkpoint.best_round,
        rounds_run=checkpoint.round,
        best_test=checkpoint.test[best - 1] if best else {},
        dropped={r.round: r.dropped for r in checkpoint.rounds if r.dropped},
        parties=[s.party for s in setups],
        baselines=baselines,
        fused={p: ref for p, ref in fused.items() if p in stats and stats[p].n_train > 0},
        schema=schema,
        training=training,
        opts=opts,
        description="Aggregated validation metrics per round",
        stop_reason=reason,
        left_out=checkpoint.left_out,
    )


def finish_training(
    spec: FedSpec,
    *,
    key: str,
    ensemble: GlobalEnsemble,
    upto_round: int | None,
    valid: list[dict[str, float]],
    test: list[dict[str, float]],
    best_round: int,
    rounds_run: int,
    best_test: dict[str, float],
    dropped: dict[int, dict[str, str]],
    parties: list[str],
    baselines: bool,
    fused: dict[str, TableRef],
    schema: FeatureSchema,
    training: TrainingSpec,
    opts: dict[str, Any],
    description: str,
    stop_reason: StopReason | None = None,
    left_out: dict[str, str] | None = None,
) -> TrainingResult:
    """Manifest, exported model, baselines, plots, report, ``latest.json`` and artifacts of
    a finished training run (both modes). The model and its manifest are the product; the
    baselines, plots and importance are optional: a failure there becomes a warning in the
    report and the result, never a failed training."""
    logger = get_run_logger()
    warnings: list[str] = []

    def optional(what: str, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            warnings.append(f"{what} failed: {type(exc).__name__}: {first}")
            logger.warning("%s failed (%s); the trained model is unaffected", what, first)
            return default

    objective = ensemble.objective
    coordinator = Store(spec.coordinator.store)
    body, texts = ensemble_manifest(ensemble)
    manifest = write_manifest(coordinator, f"{key}-manifest.json", body, texts)
    exported = coordinator.write_text(
        "models", f"{key}-model.txt", export_model(ensemble, upto_round=upto_round)
    )
    size = ensemble_size(ensemble, upto_round=upto_round)
    comparison = Comparison(federated=best_test)
    if baselines:
        comparison = optional(
            "baselines",
            lambda: compare_baselines.with_options(**opts)(
                fused,
                schema=schema,
                training=training,
                objective=objective,
                num_class=ensemble.num_class,
                federated=best_test,
                ensemble=ensemble,
                upto_round=upto_round,
            ),
            comparison,
        )
    no_importance: dict[str, dict[str, float]] = {}
    importance = optional(
        "feature importance",
        lambda: importance_by_party_modality(ensemble, schema, upto_round=upto_round),
        no_importance,
    )
    artefacts = {"manifest": manifest.uri, "model (LightGBM text)": exported.uri}
    rounds_png = optional(
        "validation plot",
        lambda: (
            coordinator.write_bytes(
                "reports",
                f"{key}-rounds.png",
                plot_rounds(valid, objective=objective, best_round=best_round),
            ).uri
        ),
        "",
    )
    importance_png = optional(
        "importance plot",
        lambda: (
            coordinator.write_bytes(
                "reports", f"{key}-importance.png", plot_importance(importance)
            ).uri
        ),
        "",
    )
    if rounds_png:
        artefacts["validation plot"] = rounds_png
    if importance_png:
        artefacts["importance plot"] = importance_png
    text = (
        markdown_report(
            consortium=spec.consortium.name,
            objective=objective,
            comparison=comparison,
            valid=valid,
            best_round=best_round,
            trees=size.trees,
            model_bytes=size.bytes,
            importance=importance,
            artefacts=artefacts,
            dropped=dropped,
            stopped=STOP_TEXT[stop_reason] if stop_reason else None,
            left_out=left_out,
            warnings=warnings,
        )
        .replace("(rounds.png)", f"({key}-rounds.png)")
        .replace("(importance.png)", f"({key}-importance.png)")
    )
    report = coordinator.write_text("reports", f"{key}-report.md", text)
    coordinator.write_json(
        "models", "latest.json", {"run_key": key, "manifest": manifest.uri, "model": exported.uri}
    )
    publish_training_artifacts(spec.consortium.name, valid, text, description=description)
    return TrainingResult(
        run_key=key,
        rounds_run=rounds_run,
        best_round=best_round,
        valid=valid,
        test=test,
        manifest=manifest.uri,
        model=exported.uri,
        trees=size.trees,
        model_bytes=size.bytes,
        parties=parties,
        dropped=dropped,
        comparison=comparison,
        report=report.uri,
        stop_reason=stop_reason,
        left_out=left_out or {},
        warnings=warnings,
    )


def build_ensemble(
    checkpoint: Checkpoint,
    schema: FeatureSchema,
    objective: Objective,
    num_class: int,
    training: TrainingSpec,
) -> GlobalEnsemble:
    return GlobalEnsemble(
        objective=objective,
        num_class=num_class,
        base_score=checkpoint.base_score,
        feature_names=schema.names,
        categorical=schema.categorical,
        rounds=[members(r) for r in checkpoint.rounds],
        metrics=checkpoint.valid,
        best_round=checkpoint.best_round,
        aggregation=training.aggregation,
        trees_per_round=training.trees_per_round,
    )


@task(name="lossless-training")
def lossless_task(
    sources: list[FusedSource],
    training: TrainingSpec,
    objective: Objective,
    num_class: int,
    schema: FeatureSchema,
) -> LosslessResult:
    """Every party's LightGBM machine in its own process, each reading its own fused table."""
    return train_lossless(
        sources,
        spec=training,
        objective=objective,
        num_class=num_class,
        categorical=schema.categorical,
        feature_names=schema.names,
    )


def lossless_run(
    spec: FedSpec,
    training: TrainingSpec,
    *,
    schema: FeatureSchema,
    fused: dict[str, TableRef],
    key: str,
    num_class: int,
    baselines: bool,
    opts: dict[str, Any],
) -> TrainingResult:
    """Lossless mode of ``federated-training``: one data-parallel LightGBM model over the
    parties' fused tables, written as a one-round ensemble (manifest) and exported model."""
    logger = get_run_logger()
    objective = spec.consortium.task
    sources = [
        FusedSource(
            party=p,
            fused=ref,
            schema=schema,
            validation_fraction=training.validation_fraction,
            test_fraction=training.test_fraction,
        )
        for p, ref in fused.items()
    ]
    result = lossless_task(sources, training, objective, num_class, schema)
    logger.info(
        "lossless training: %d parties, best round %d of %d (%s); valid %s",
        len(sources),
        result.best_round,
        result.rounds_run,
        result.stop_reason,
        result.valid[result.best_round - 1] if result.best_round else {},
    )
    for t, valid in enumerate(result.valid, start=1):
        metric = loss_name(objective)
        if metric in valid:
            progress.emit("training", f"round {t}", f"valid {metric} {valid[metric]:.5f}")
    ensemble = result.ensemble(
        objective=objective,
        num_class=num_class,
        feature_names=schema.names,
        categorical=schema.categorical,
    )
    return finish_training(
        spec,
        key=key,
        ensemble=ensemble,
        upto_round=None,
        valid=result.valid,
        test=result.test,
        best_round=result.best_round,
        rounds_run=result.rounds_run,
        best_test=result.best_test,
        dropped={},
        parties=[s.party for s in sources],
        baselines=baselines,
        fused=fused,
        schema=schema,
        training=training,
        opts=opts,
        description="Aggregated validation metrics per round (lossless mode)",
    )
