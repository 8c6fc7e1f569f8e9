"""Consortium-wide bin boundaries for a training run (``training.bins = "consortium"``):
every party sketches its numerical features (the ``sketch`` party step, run at the party like
any training step), the coordinator merges the sketches into one set of boundaries and
stores them in its store; the parties' LightGBM bins with them
(:mod:`tasks.horizontal.bins`). Both training modes call :func:`consortium_bins`.

The sketches are content-cached party steps and the merge a content-cached task, so a
retried run (or a resumed one) takes the same boundaries without sketching again.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from flows.common import task_options
from flows.transport import PartyJob, PartyRunner
from storage.runs import write_bins
from storage.store import FileRef, Store
from tasks.caching import content_cache_key
from tasks.horizontal.bins import ConsortiumBins, PartySketches, max_bin_of
from tasks.horizontal.bins import consortium_bins as merge_bins
from tasks.horizontal.steps import TrainSetup


def merge_and_store(
    sketches: list[PartySketches],
    feature_names: list[str],
    categorical: list[str],
    max_bin: int,
    coordinator: str,
    run_key: str,
) -> tuple[ConsortiumBins, FileRef]:
    """Merge the parties' sketches into the consortium's boundaries and store them."""
    bins = merge_bins(sketches, feature_names, categorical, max_bin=max_bin)
    return bins, write_bins(Store(coordinator), run_key, bins)


merge_sketches_task = task(
    name="merge-sketches", cache_key_fn=content_cache_key, persist_result=True
)(merge_and_store)


def consortium_bins(
    runner: PartyRunner, setups: list[TrainSetup], job: dict[str, Any]
) -> tuple[ConsortiumBins, FileRef] | None:
    """The run's consortium bins and their stored reference, or ``None`` when the spec
    asks for per-party bins or no party could send sketches (each party then bins its own
    rows, as said in the log)."""
    logger = get_run_logger()
    if not setups or setups[0].training.bins != "consortium":
        return None
    first = setups[0]
    futures = {s.party: runner.submit_job(PartyJob(setup=s, op="sketch", **job)) for s in setups}
    sketches: list[PartySketches] = [futures[s.party].result() for s in setups]
    for part in sketches:
        if part.refused is not None:
            logger.warning("party %s sends no feature sketches: %s", part.party, part.refused)
    if all(p.refused is not None for p in sketches):
        logger.warning(
            "no party sent feature sketches: every party bins its features from its own rows"
        )
        return None
    merge = merge_sketches_task.with_options(**task_options(runner.results, runner.refresh))
    bins, ref = merge(
        sketches,
        first.schema_.names,
        first.schema_.categorical,
        max_bin_of(first.training.params),
        first.coordinator,
        first.run_key,
    )
    logger.info(
        "consortium bins: %d numerical features, up to %d boundaries each, from the sketches "
        "of %d parties (%d rows; rank error %.4f)",
        len(bins.bounds),
        max((len(b) for b in bins.bounds.values()), default=0),
        len(bins.parties),
        bins.rows,
        bins.rank_error,
    )
    return bins, ref
