"""Lossless mode of ``federated-training``: one data-parallel LightGBM model over the
parties' fused tables (one process per party, synchronous, no checkpoints), published like
any other training."""

from __future__ import annotations

from prefect import get_run_logger, task

from flows import progress
from flows.bins import consortium_bins
from flows.publish import FinishedTraining, TrainingResult, publish_training
from flows.transport import PartyRunner
from storage.results import DEFAULT_RESULTS
from storage.store import TableRef
from tasks.horizontal.bins import ConsortiumBins
from tasks.horizontal.lossless import FusedSource, LosslessResult, train_lossless
from tasks.horizontal.session import loss_name, training_setups
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


def lossless_run(
    spec: FedSpec,
    training: TrainingSpec,
    *,
    schema: FeatureSchema,
    fused: dict[str, TableRef],
    key: str,
    baselines: bool,
    refresh: bool,
) -> TrainingResult:
    """Train one data-parallel model over the parties' fused tables and publish it as a
    one-round ensemble (manifest) and exported model."""
    logger = get_run_logger()
    objective = spec.consortium.task
    num_class = max(num_classes(spec), 1)
    results = spec.run.results or DEFAULT_RESULTS
    runner = PartyRunner(
        {},  # lossless mode runs every party beside the flow (per-party pools are refused)
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
