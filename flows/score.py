"""The ``score`` flow: run a party's pipeline on new raw data and score it with the ensemble."""

from __future__ import annotations

import datetime as dt
import posixpath

from prefect import flow, get_run_logger

from flows.common import threads
from flows.prepare import rebased_sources, run_party_steps
from storage.files import resolve_location
from storage.runs import read_latest
from storage.store import Store, TableRef
from tasks.prepare.steps import PartyContext
from tasks.scoring import score_party
from tasks.spec.load import load_spec
from tasks.spec.models import FedSpec


class NoModelError(FileNotFoundError):
    """No trained ensemble to score with."""


def latest_manifest(spec: FedSpec) -> str:
    """The manifest of the latest training run."""
    latest = read_latest(Store(spec.coordinator.store))
    if latest is None:
        raise NoModelError(
            f"{spec.coordinator.store}: no trained model yet (run `fedfuse train` first)"
        )
    return latest.manifest


@flow(name="score", persist_result=True, task_runner=threads(4))
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
    ctx = PartyContext.from_spec(spec, party, as_of=as_of)
    ctx = ctx.model_copy(
        update={
            "store": store,
            "label_source": None,
            "roots": [*ctx.roots, *([resolve_location(data, ".")] if data else [])],
        }
    )
    sources = rebased_sources(spec.party(party).sources, data, spec.consortium.label.column)
    fused, features = run_party_steps(ctx, sources, results=spec.run.results, refresh=False)
    out = score_party(store, fused.table, list(features.values()), manifest, ctx.entity, ctx.secret)
    logger.info("%s: %d entities scored -> %s", party, out.rows, out.uri)
    return out
