"""The ``score`` flow: run a party's pipeline on new raw data and score it with the ensemble."""

from __future__ import annotations

import datetime as dt
import posixpath

from prefect import flow, get_run_logger

from flows.common import threads
from flows.names import FLOW_RUN_NAMES
from flows.prepare import (
    consortium_text_model,
    consortium_vocabularies,
    rebased_sources,
    run_party_steps,
)
from storage.files import resolve_location
from storage.runs import LatestRun, choose_run
from storage.store import Store, TableRef
from tasks.prepare.steps import PartyContext
from tasks.run_identity import num_classes, spec_identity
from tasks.scoring import label_values, score_party
from tasks.spec.load import load_spec
from tasks.spec.models import FedSpec, label_source


class NoModelError(FileNotFoundError):
    """No trained ensemble to score with."""


class ScoringInputError(ValueError):
    """New data that cannot be scored as given (unknown party, no overlap)."""


def resolve_run(spec: FedSpec, run_key: str | None = None) -> LatestRun:
    """The run this spec predicts with: ``run_key``, else its latest
    (:func:`storage.runs.choose_run`)."""
    run = choose_run(Store(spec.coordinator.store), spec_identity(spec), run_key)
    if run is None:
        raise NoModelError(
            f"{spec.coordinator.store}: no trained model yet (run `fedfuse train` first)"
        )
    return run


def latest_manifest(spec: FedSpec) -> str:
    """The manifest of this spec's latest training run."""
    return resolve_run(spec).manifest


def party_labels(spec: FedSpec, party: str) -> list[str]:
    """The party's own label value of each class (from its label source's mapping)."""
    source = label_source(spec, spec.party(party))
    name = spec.consortium.label.column
    column = source.columns.get(name) if source is not None else None
    return label_values(
        column,
        task=spec.consortium.task,
        classes=num_classes(spec),
        vocabulary=consortium_vocabularies(spec).get(name),
        positive=spec.consortium.label.positive,
        values=spec.consortium.label.values,
    )


@flow(
    name="score",
    flow_run_name=FLOW_RUN_NAMES["score"],
    persist_result=True,
    task_runner=threads(4),
)
def score(
    spec_path: str,
    party: str,
    data: str | None = None,
    manifest: str | None = None,
    as_of: dt.date | None = None,
) -> TableRef:
    """Preprocess, featurise, align and fuse a party's new raw data with the consortium's
    mappings and vocabularies, then score it with the trained global ensemble."""
    logger = get_run_logger()
    spec = load_spec(spec_path)
    manifest = manifest or latest_manifest(spec)
    store = posixpath.join(spec.party(party).store, "scoring")
    ctx = PartyContext.from_spec(
        spec,
        party,
        as_of=as_of,
        vocabularies=consortium_vocabularies(spec),
        text_model=consortium_text_model(spec),
    )
    ctx = ctx.model_copy(
        update={
            "store": store,
            "label_source": None,
            "scoring": True,
            "roots": [*ctx.roots, *([resolve_location(data, ".")] if data else [])],
        }
    )
    sources = rebased_sources(
        spec.party(party).sources,
        data,
        spec.consortium.label.column,
        split=spec.training.split_column,
    )
    fused, _ = run_party_steps(ctx, sources, results=spec.run.results, refresh=False, keys=True)
    out = score_party(
        store,
        fused.table,
        list(fused.key_tables.values()),
        manifest,
        ctx.entity,
        ctx.secret,
        party_labels(spec, party),
    )
    logger.info("%s: %d entities scored -> %s", party, out.rows, out.uri)
    return out
