"""Lossless mode of ``federated-training``: one data-parallel LightGBM model over the
parties' fused tables (one process per party, synchronous, no checkpoints), published like
any other training.

Without per-party pools every party's process runs beside the flow. With them, every party
runs the ``lossless`` step (dispatched like any other step, :mod:`flows.transport`) in the
subflow :func:`lossless_parties`, which also runs the coordinator's side of the protocol
through the session's mailbox (:mod:`tasks.horizontal.lossless_remote`)."""

from __future__ import annotations

from collections.abc import Mapping
from uuid import uuid4

from prefect import flow, get_run_logger, tags, task
from prefect.futures import PrefectFuture
from prefect.futures import wait as wait_futures

from flows import progress
from flows.bins import consortium_bins
from flows.common import threads
from flows.publish import FinishedTraining, TrainingResult, publish_training
from flows.transport import PartyJob, PartyRunner
from storage.results import DEFAULT_RESULTS
from storage.store import TableRef
from tasks.horizontal.bins import ConsortiumBins
from tasks.horizontal.lossless import FusedSource, LosslessResult, train_lossless
from tasks.horizontal.lossless_remote import RemoteParties
from tasks.horizontal.session import loss_name, training_setups
from tasks.horizontal.steps import TrainSetup
from tasks.prepare.design import FeatureSchema
from tasks.run_identity import num_classes
from tasks.spec.models import FedSpec, TrainingSpec
from tasks.types import Objective


@task(name="lossless-training")
def lossless_task(
    sources: list[FusedSource],
    training: TrainingSpec,
    objective: Objective,
    num_class: int,
    schema: FeatureSchema,
    bins: ConsortiumBins | None = None,
    run_key: str = "lossless",
) -> LosslessResult:
    """Every party's LightGBM machine in its own process, each reading its own fused table
    (and binning with the consortium's boundaries when given)."""
    return train_lossless(
        sources,
        spec=training,
        objective=objective,
        num_class=num_class,
        categorical=schema.categorical,
        feature_names=schema.names,
        bins=bins,
        run_key=run_key,
    )


#: Seconds a failed session waits for the parties' steps to end after telling them to stop.
STOP_GRACE_SECONDS = 120.0


def session_tag(session: str) -> str:
    """The tag of every party run of one lossless session."""
    return f"lossless-session:{session}"


def cancel_unstarted(session: str) -> list[str]:
    """Cancel the session's party runs that no worker has started (scheduled or pending),
    so their dispatching tasks end; names them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[session_tag(session)]),
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING])
                ),
            )
        )
        for run in runs:
            client.set_flow_run_state(
                run.id, Cancelled(message="the lossless run failed before it started"), force=True
            )
    return [run.name for run in runs]


def _ended(futures: Mapping[str, PrefectFuture[object]]) -> dict[str, str]:
    """Party -> why its step ended, filled in as each step ends."""
    ended: dict[str, str] = {}
    for party, future in futures.items():

        def record(f: PrefectFuture[object], party: str = party) -> None:
            state = f.state
            name = state.name or str(state.type.value)
            ended[party] = f"{name}: {state.message}" if state.message else name

        future.add_done_callback(record)
    return ended


@flow(name="lossless-parties", persist_result=True)
def lossless_parties(
    setups: list[TrainSetup],
    remote: dict[str, str],
    addresses: dict[str, str],
    bins: ConsortiumBins | None = None,
    results: str = DEFAULT_RESULTS,
    refresh: bool = False,
    party_timeout: float = 3600.0,
    join_timeout: float = 600.0,
) -> LosslessResult:
    """Every party's LightGBM machine on its own worker (a party without a pool: beside this
    flow), joined through the coordinator store; the coordinator's side of the protocol
    runs here. A party that does not join within ``join_timeout`` seconds fails the run with
    its name; the other parties are told to stop, and runs no worker started are cancelled.

    Args:
        setups: Every party's training setup (references only), in rank order.
        remote: Party -> deployment prefix, for the parties with a work pool.
        addresses: Party -> host:port its LightGBM listens on (port 0: picked at start).
        bins: The consortium's bin boundaries, when the run has them.
        results: Folder for persisted task results.
        refresh: Recompute cached steps.
        party_timeout: Seconds a dispatched party run may take.
        join_timeout: Seconds every party has to join.
    """
    logger = get_run_logger()
    first = setups[0]
    session = uuid4().hex[:12]
    runner = PartyRunner(
        remote,
        coordinator=first.coordinator,
        results=results,
        refresh=refresh,
        timeout=party_timeout,
    )
    with tags(session_tag(session)):
        futures: dict[str, PrefectFuture[object]] = {
            s.party: runner.submit_job(
                PartyJob(
                    op="lossless",
                    setup=s,
                    session=session,
                    address=addresses[s.party],
                    join_timeout=join_timeout,
                    results=results,
                    refresh=refresh,
                )
            )
            for s in setups
        }
    ended = _ended(futures)
    parties = RemoteParties(first.coordinator, session, list(futures), ended=ended.get)
    sources = [
        FusedSource(
            party=s.party,
            fused=s.fused,
            schema=s.schema_,
            validation_fraction=s.training.validation_fraction,
            test_fraction=s.training.test_fraction,
            store=s.store,
        )
        for s in setups
    ]
    logger.info("lossless session %s: %d parties joining", session, len(setups))
    try:
        result = train_lossless(
            sources,
            spec=first.training,
            objective=first.objective,
            num_class=first.num_class,
            categorical=first.schema_.categorical,
            feature_names=first.schema_.names,
            bins=bins,
            run_key=first.run_key,
            connect=lambda _: parties,
            join_timeout=join_timeout,
        )
    except Exception:
        cancelled = cancel_unstarted(session)
        if cancelled:
            logger.warning("cancelled party runs no worker had started: %s", cancelled)
        wait_futures(list(futures.values()), timeout=STOP_GRACE_SECONDS)
        raise
    for future in futures.values():
        future.result()  # a party's step that failed after its model fails the run
    return result


def lossless_run(
    spec: FedSpec,
    training: TrainingSpec,
    *,
    schema: FeatureSchema,
    fused: dict[str, TableRef],
    key: str,
    baselines: bool,
    refresh: bool,
    remote: Mapping[str, str] | None = None,
) -> TrainingResult:
    """Train one data-parallel model over the parties' fused tables and publish it as a
    one-round ensemble (manifest) and exported model. With ``remote`` (party -> deployment
    prefix) every party trains on its own pool (:func:`lossless_parties`)."""
    logger = get_run_logger()
    objective = spec.consortium.task
    num_class = max(num_classes(spec), 1)
    results = spec.run.results or DEFAULT_RESULTS
    runner = PartyRunner(
        dict(remote or {}),
        coordinator=spec.coordinator.store,
        results=results,
        refresh=refresh,
        timeout=spec.run.party_timeout,
    )
    setups = training_setups(
        spec, training, key=key, schema=schema, fused=fused, num_class=num_class
    )
    bins = consortium_bins(runner, setups, {"results": results, "refresh": refresh})
    sources = [
        FusedSource(
            party=p,
            fused=ref,
            schema=schema,
            validation_fraction=training.validation_fraction,
            test_fraction=training.test_fraction,
            store=spec.party(p).store,
        )
        for p, ref in fused.items()
    ]
    if remote:
        if bins is not None:
            setups = [s.model_copy(update={"bins": bins[1]}) for s in setups]
        addresses = {p.id: p.lossless_address or "" for p in spec.parties}
        result = lossless_parties.with_options(task_runner=threads(len(setups)))(
            setups,
            dict(remote),
            {s.party: addresses[s.party] for s in setups},
            bins[0] if bins is not None else None,
            results,
            refresh,
            spec.run.party_timeout,
            spec.run.join_timeout,
        )
    else:
        result = lossless_task(
            sources,
            training,
            objective,
            num_class,
            schema,
            bins[0] if bins is not None else None,
            key,
        )
    logger.info(
        "lossless training: %d parties, best round %d of %d (%s); valid %s",
        len(sources),
        result.best_round,
        result.rounds_run,
        result.stop_reason,
        result.valid[result.best_round - 1] if result.best_round else {},
    )
    metric = loss_name(objective)
    for t, valid in enumerate(result.valid, start=1):
        if metric in valid:
            progress.emit("training", f"round {t}", f"valid {metric} {valid[metric]:.5f}")
    ensemble = result.ensemble(
        objective=objective,
        num_class=num_class,
        feature_names=schema.names,
        categorical=schema.categorical,
    )
    finished = FinishedTraining(
        run_key=key,
        ensemble=ensemble,
        upto_round=None,
        valid=result.valid,
        test=result.test,
        best_round=result.best_round,
        rounds_run=result.rounds_run,
        best_test=result.best_test,
        parties=[s.party for s in sources],
        description="Aggregated validation metrics per round (lossless mode)",
        baselines=baselines,
        fused=fused,
        schema_=schema,
        training=training,
        results=spec.run.results or DEFAULT_RESULTS,
        refresh=refresh,
        split_sizes=result.split_sizes,
        stop_reason=result.stop_reason,
    )
    return publish_training(spec, finished)
