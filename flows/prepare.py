"""The per-party pipeline flow and the ``prepare`` flow over all parties."""

from __future__ import annotations

import datetime as dt
import posixpath
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, wait

from flows import progress
from flows.common import artifact_key, task_options, threads
from flows.engines import Submit, shard_engine, submit_here
from flows.names import FLOW_RUN_NAMES, party_step_name, source_step_name, tagged
from flows.transport import (
    PIPELINE_FLOW,
    PartyRunner,
    dispatch_pipeline,
    party_deployments,
    pooled_parties,
    publish,
)
from storage.files import resolve_location
from storage.results import DEFAULT_RESULTS
from storage.runs import (
    read_learned_vocabularies,
    text_model_ref,
    write_learned_vocabularies,
    write_text_model,
)
from storage.store import FileRef, Store, TableRef
from tasks.prepare.shards import all_shards
from tasks.prepare.steps import (
    AlignedOutput,
    CleanOutput,
    FusedOutput,
    PartyContext,
    align_source,
    count_text_terms,
    count_vocabulary_values,
    extract_features,
    fingerprint_source,
    fit_text_model,
    fuse_party,
    merge_clean,
    merge_features,
    prepare_shard,
    preprocess_source,
    read_raw_keys,
    secret_tag,
    split_source,
)
from tasks.prepare.text_model import (
    CrossFitModels,
    DocumentCounts,
    LinearWeights,
    TextModelError,
    TextModelSettings,
    TextVocabulary,
    learn_text_model,
)
from tasks.prepare.vocabulary import (
    LearnedVocabularies,
    learned_from_counts,
    resolve_vocabularies,
)
from tasks.report import quality_rows as report_quality_rows
from tasks.spec.load import load_spec
from tasks.spec.models import FedSpec, RunSpec, SourceSpec, default_parallelism


@flow(
    name="party-pipeline",
    flow_run_name="party-pipeline {party}",
    persist_result=True,
    task_runner=threads(default_parallelism()),
)
def party_pipeline(
    spec_path: str,
    party: str,
    as_of: dt.date | None = None,
    refresh: bool = False,
    scoring: bool = False,
    data: str | None = None,
) -> FusedOutput:
    """Preprocess -> features -> align every source of one party, then fuse them.

    Args:
        spec_path: Consortium spec (TOML).
        party: The party whose sources are processed.
        as_of: End of every feature window (default: the spec's).
        refresh: Recompute every step, ignoring cached results.
        scoring: New data to score: results go to the store's ``scoring/`` folder and the
            label mapping is dropped.
        data: With ``scoring``, a folder with new raw exports (same file names as the
            party's sources); default: the spec's sources.
    """
    spec = load_spec(spec_path)
    ctx = PartyContext.from_spec(
        spec,
        party,
        as_of=as_of,
        vocabularies=consortium_vocabularies(spec),
        text_model=consortium_text_model(spec),
    )
    sources = spec.party(party).sources
    if scoring:
        ctx = ctx.model_copy(
            update={
                "store": posixpath.join(ctx.store, "scoring"),
                "label_source": None,
                "scoring": True,
                "roots": [*ctx.roots, *([resolve_location(data, ".")] if data else [])],
            }
        )
        sources = rebased_sources(
            sources, data, spec.consortium.label.column, split=spec.training.split_column
        )
    fused, features = run_party_steps(
        ctx, sources, results=spec.run.results, refresh=refresh, keys=scoring, run=spec.run
    )
    fused = fused.model_copy(update={"feature_tables": features})
    publish(spec.coordinator.store, fused)
    return fused


def rebased_sources(
    sources: list[SourceSpec], data: str | None, label: str, *, split: str | None = None
) -> list[SourceSpec]:
    """The party's sources read from ``data`` (same file names), label and split column
    mappings and the external test file dropped (new rows have neither label nor split)."""
    out = []
    for source in sources:
        columns = {k: v for k, v in source.columns.items() if k not in (label, split)}
        update: dict[str, object] = {"columns": columns, "test_path": None}
        if data is not None:
            update["path"] = posixpath.join(data, posixpath.basename(source.path))
            if source.entity_map is not None:
                update["entity_map"] = source.entity_map.model_copy(
                    update={
                        "path": posixpath.join(data, posixpath.basename(source.entity_map.path))
                    }
                )
        out.append(source.model_copy(update=update))
    return out


def raise_first_failure(futures: list[PrefectFuture[Any]]) -> None:
    """Re-raise the first failed step's own error (not "upstream not finished")."""
    for future in futures:
        if future.state.is_failed() or future.state.is_crashed():
            future.result()


def run_party_steps(
    ctx: PartyContext,
    sources: list[SourceSpec],
    *,
    results: str | None,
    refresh: bool,
    keys: bool = False,
    run: RunSpec | None = None,
) -> tuple[FusedOutput, dict[str, TableRef]]:
    """Submit every source's steps, then fuse; returns the fused output and the features
    tables (keyed by source), which still carry the party's own entity keys. With ``keys``
    (scoring), the fused output also names each source's raw-key table. ``run``: the spec's
    ``[run]``, whose ``shards`` and ``engine`` say how many entity-hash shards each source
    is prepared in and where those run (default: whole sources, here)."""
    with shard_engine(run) as submit:
        return _run_party_steps(
            ctx,
            sources,
            results=results,
            refresh=refresh,
            keys=keys,
            shards=run.shards if run is not None else 1,
            submit=submit if run is not None and run.engine != "local" else None,
        )


def _run_party_steps(
    ctx: PartyContext,
    sources: list[SourceSpec],
    *,
    results: str | None,
    refresh: bool,
    keys: bool,
    shards: int,
    submit: Submit[Any] | None,
) -> tuple[FusedOutput, dict[str, TableRef]]:
    logger = get_run_logger()
    party = ctx.party
    opts = task_options(results, refresh)
    tag = secret_tag(ctx.secret)
    futures: dict[
        str,
        tuple[PrefectFuture[CleanOutput], PrefectFuture[TableRef], PrefectFuture[AlignedOutput]],
    ] = {}
    fingerprints: list[PrefectFuture[Any]] = []
    key_f: dict[str, PrefectFuture[TableRef]] = {}
    shard_f: list[PrefectFuture[Any]] = []
    for source in sources:

        def named(step: str, source_id: str = source.id) -> dict[str, Any]:
            return {**opts, "task_run_name": source_step_name(party, source_id, step)}

        fingerprint = fingerprint_source.with_options(**named("fingerprint"))
        raw = fingerprint.submit(source.path, ctx.roots)
        emap = (
            fingerprint_source.with_options(**named("fingerprint entity map")).submit(
                source.entity_map.path, ctx.roots
            )
            if source.entity_map is not None
            else None
        )
        test = (
            fingerprint_source.with_options(**named("fingerprint test rows")).submit(
                source.test_path, ctx.roots
            )
            if source.test_path is not None and source.id == ctx.label_source
            else None
        )
        fingerprints += [raw] + [f for f in (emap, test) if f is not None]
        if shards > 1 or submit is not None:
            # each shard a task of its own (on the party's cluster with engine = dask, which
            # takes plain values: the fingerprints are resolved first), merged per source
            refs: dict[str, Any] = {
                "raw": raw.result(),
                "entity_map": emap.result() if emap is not None else None,
                "test": test.result() if test is not None else None,
            }
            # a CSV or JSONL file is split once, here, so that no shard parses it whole
            split = split_source.with_options(**named("split into shards"))
            refs["split"] = split.submit(ctx, source, **refs, count=shards).result()
            parts = [
                (submit or submit_here)(
                    prepare_shard.with_options(**named(f"shard {s.index + 1} of {shards}")),
                    {"ctx": ctx, "source": source, **refs, "shard": s},
                )
                for s in all_shards(shards)
            ]
            shard_f += parts
            clean = merge_clean.with_options(**named("merge shards")).submit(ctx, source, parts)  # type: ignore[arg-type]
            merge = merge_features.with_options(**named("merge shard features"))
            feats = merge.submit(ctx, source, parts)  # type: ignore[arg-type]
        else:
            # futures as arguments: Prefect resolves them (its stubs only type plain values)
            clean = preprocess_source.with_options(**named("preprocess")).submit(  # type: ignore[call-overload]
                ctx, source, raw, emap, test
            )
            feats = extract_features.with_options(**named("features")).submit(ctx, source, clean)
        aligned = align_source.with_options(**named("align")).submit(ctx, source, feats, tag)  # type: ignore[call-overload]
        futures[source.id] = (clean, feats, aligned)
        if keys:
            key_f[source.id] = read_raw_keys.with_options(**named("read keys")).submit(  # type: ignore[call-overload]
                ctx, source, raw, emap
            )
    pending: list[PrefectFuture[Any]] = [f for group in futures.values() for f in group]
    pending += list(key_f.values())
    wait(shard_f + pending)
    raise_first_failure(fingerprints + shard_f + pending)
    cleaned = [futures[s.id][0].result() for s in sources]
    aligned_outputs = [futures[s.id][2].result() for s in sources]
    for out in cleaned:
        q = out.quality
        progress.emit(party, "preprocess", f"{q.source}: {q.rows_out}/{q.rows_in} rows kept")
        if q.rows_rejected:
            logger.warning(
                "%s/%s: %d row(s) quarantined to %s: %s",
                party,
                q.source,
                q.rows_rejected,
                out.rejected.uri if out.rejected else "-",
                q.rejected_by_reason,
            )
    fuse = fuse_party.with_options(**opts, task_run_name=party_step_name(party, "fuse"))
    fused = fuse(ctx, aligned_outputs, [c.quality for c in cleaned])
    fused = fused.model_copy(update={"clean_tables": {c.source: c.clean for c in cleaned}})
    if key_f:
        fused = fused.model_copy(update={"key_tables": {s: f.result() for s, f in key_f.items()}})
    logger.info("%s: fused table %s", party, fused.table.short)
    progress.emit(party, "fused", fused.table.short)
    return fused, {s.id: futures[s.id][1].result() for s in sources}


class PrepareError(RuntimeError):
    """One or more parties' pipelines failed."""


def require_secret(spec: FedSpec, dispatch: str | None = None) -> None:
    """Fail at once, in one line saying how to set it (:class:`storage.secrets.SecretError`),
    when a party whose pipeline runs in this process (every party without ``dispatch``)
    cannot read the consortium secret where the spec says: before any pipeline starts,
    rather than once per party and step."""
    pooled = pooled_parties(spec, dispatch)
    if any(p.id not in pooled for p in spec.parties):
        secret_tag(spec.consortium.secret)


def consortium_vocabularies(spec: FedSpec) -> dict[str, list[str]]:
    """The spec's resolved vocabularies: listed ones as written, learned ones as stored in
    the coordinator store for this spec (never learned again here)."""
    learned: dict[str, list[str]] = {}
    if spec.learned_vocabularies():
        stored = read_learned_vocabularies(
            Store(spec.coordinator.store), spec.vocabulary_fingerprint(), LearnedVocabularies
        )
        learned = stored.columns if stored is not None else {}
    return resolve_vocabularies(spec.vocabularies, learned)


def learn_vocabularies(spec: FedSpec, *, dispatch: str | None, refresh: bool) -> None:
    """Learn the spec's ``learn = true`` vocabularies unless they are stored for this spec:
    every party counts the distinct entities per value of its own data (only values held by
    at least ``min_entities`` of them), the coordinator adds the counts, keeps the
    ``max_size`` most frequent values and stores them. A stored vocabulary is never learned
    again (not even with ``refresh``, which recomputes the steps): a model trained on it
    keeps being scored with it; removing the file or changing the spec learns anew."""
    logger = get_run_logger()
    wanted = spec.learned_vocabularies()
    if not wanted:
        return
    coordinator = Store(spec.coordinator.store)
    fingerprint = spec.vocabulary_fingerprint()
    if read_learned_vocabularies(coordinator, fingerprint, LearnedVocabularies) is not None:
        logger.info("learned vocabularies of this spec already stored: %s", ", ".join(wanted))
        return
    runner = PartyRunner(
        pooled_parties(spec, dispatch),
        coordinator=spec.coordinator.store,
        results=spec.run.results or DEFAULT_RESULTS,
        refresh=refresh,
        timeout=spec.run.party_timeout,
    )
    listed = {k: v for k, v in spec.vocabularies.items() if not v.learn}
    thresholds = {name: v.min_entities for name, v in wanted.items()}
    futures = {
        party.id: runner.submit(
            party.id,
            count_vocabulary_values,
            PartyContext.from_spec(spec, party.id, vocabularies=resolve_vocabularies(listed, {})),
            party.sources,
            thresholds,
        )
        for party in spec.parties
    }
    wait(list(futures.values()))
    raise_first_failure(list(futures.values()))
    counts = [futures[p.id].result() for p in spec.parties]
    learned = learned_from_counts(spec.vocabularies, counts, spec=fingerprint)
    ref = write_learned_vocabularies(coordinator, fingerprint, learned)
    logger.info(
        "learned vocabularies %s -> %s",
        ", ".join(f"{k} ({len(v)} values)" for k, v in learned.columns.items()),
        ref.uri,
    )


def consortium_text_model(spec: FedSpec) -> FileRef | None:
    """The stored text model of this spec (``[text] model`` in the horizontal layout),
    ``None`` without one; an error when the spec wants one that was not trained yet. (In
    the vertical layout each text party fits its own text block at training.)"""
    if not spec.consortium_text_model():
        return None
    ref = text_model_ref(Store(spec.coordinator.store), spec.text_fingerprint())
    if ref is None:
        raise TextModelError(
            "text.model: no text model was trained for this spec yet; run `fedfuse prepare` "
            "(or train) first"
        )
    return ref


def text_model_settings(spec: FedSpec) -> TextModelSettings:
    text = spec.text
    return TextModelSettings(
        task=spec.consortium.task,
        num_classes=spec.consortium.label.num_classes,
        alpha=text.alpha,
        learning_rate=text.learning_rate,
        epochs=text.epochs,
        seed=spec.training.seed,
    )


def learn_consortium_text_model(spec: FedSpec, *, dispatch: str | None, refresh: bool) -> None:
    """Learn the consortium text vocabulary and train the text model (``[text] model``)
    unless they are stored for this spec: every party with a text source counts its terms'
    document frequencies (only terms in at least ``min_documents`` of its texts), the
    coordinator keeps the terms at least ``min_parties`` parties report and their IDF, then
    runs ``rounds`` FedAvg rounds of the fold and full models (each a ``fit-text-model``
    step at every party) and stores vocabulary and models in one file. Like learned
    vocabularies, a stored model is never trained again for the same spec."""
    logger = get_run_logger()
    text = spec.text
    if not spec.consortium_text_model():
        return
    coordinator = Store(spec.coordinator.store)
    fingerprint = spec.text_fingerprint()
    if text_model_ref(coordinator, fingerprint) is not None:
        logger.info("text model of this spec already stored")
        return
    runner = PartyRunner(
        pooled_parties(spec, dispatch),
        coordinator=spec.coordinator.store,
        results=spec.run.results or DEFAULT_RESULTS,
        refresh=refresh,
        timeout=spec.run.party_timeout,
    )
    holders = [spec.party(p) for p in spec.text_parties()]
    contexts = {
        p.id: PartyContext.from_spec(spec, p.id, vocabularies=consortium_vocabularies(spec))
        for p in holders
    }

    def count() -> dict[str, DocumentCounts]:
        futures = {
            p.id: runner.submit(p.id, count_text_terms, contexts[p.id], p.sources, text)
            for p in holders
        }
        wait(list(futures.values()))
        raise_first_failure(list(futures.values()))
        return {p.id: futures[p.id].result() for p in holders}

    settings = text_model_settings(spec)

    def fit_round(
        vocabulary: TextVocabulary, models: CrossFitModels, round_: int
    ) -> dict[str, list[tuple[LinearWeights, int]]]:
        futures = {
            p.id: runner.submit(
                p.id,
                fit_text_model,
                contexts[p.id],
                p.sources,
                vocabulary,
                models,
                settings,
                round_,
            )
            for p in holders
        }
        wait(list(futures.values()))
        raise_first_failure(list(futures.values()))
        progress.emit("coordinator", "text model", f"round {round_}/{text.rounds}")
        return {p.id: futures[p.id].result().pairs() for p in holders}

    stored = learn_text_model(
        count,
        fit_round,
        min_documents=text.min_documents,
        min_parties=text.min_parties,
        max_terms=text.max_terms,
        ngram_max=text.ngram_max,
        folds=text.folds,
        rounds=text.rounds,
        settings=settings,
        spec=fingerprint,
    )
    ref = write_text_model(coordinator, fingerprint, stored)
    logger.info(
        "text model (%d terms, %d rounds) -> %s", len(stored.vocabulary.terms), text.rounds, ref.uri
    )


def quality_rows(outputs: list[FusedOutput]) -> list[dict[str, str]]:
    """The data quality table of every party's sources (:func:`tasks.report.quality_rows`)."""
    return report_quality_rows([q for out in outputs for q in out.quality])


def run_pipelines(
    spec: FedSpec,
    spec_path: str,
    *,
    as_of: dt.date | None,
    refresh: bool,
    dispatch: str | None,
) -> dict[str, PrefectFuture[FusedOutput]]:
    """Run every party's pipeline, ``[run] max_parallel_parties`` at once (in spec order),
    and wait for all of them: a party with a work pool on its pool, the others here as
    subflows whose source steps run ``max_parallel_sources`` at once. A failed party does
    not stop the others. Each pipeline is one task keyed by the party within the top-level
    run, so a retry of this run takes back every finished party's output, whichever order
    they ran or finished in, and runs only the others again (their finished steps come back
    from their content-keyed caches)."""
    remote = party_deployments(spec, dispatch, PIPELINE_FLOW)
    # the cache must hold across a retry even with refresh: the key is the top-level run
    pipeline = dispatch_pipeline.with_options(**task_options(spec.run.results, refresh=False))
    with threads(spec.run.parallel_parties()) as runner:
        futures = {}
        for party in spec.parties:
            named = pipeline.with_options(task_run_name=party_step_name(party.id, "pipeline"))
            with tagged(party=party.id):
                futures[party.id] = runner.submit(
                    named,
                    {
                        "deployment": remote.get(party.id),
                        "parameters": {
                            "spec_path": spec_path,
                            "party": party.id,
                            "as_of": as_of.isoformat() if as_of else None,
                            "refresh": refresh,
                        },
                        "coordinator": spec.coordinator.store,
                        "timeout": spec.run.party_timeout,
                        "sources": spec.run.parallel_sources(),
                    },
                )
        wait(list(futures.values()))
    return futures


@flow(
    name="prepare",
    flow_run_name=FLOW_RUN_NAMES["prepare"],
    persist_result=True,
    task_runner=threads(2),
)
def prepare(
    spec_path: str,
    as_of: dt.date | None = None,
    refresh: bool = False,
    dispatch: str | None = None,
) -> dict[str, FusedOutput]:
    """Run every party's pipeline and report data quality.

    Args:
        spec_path: Consortium spec (TOML) as seen by the machine running the flow.
        as_of: End of every feature window (default: the spec's).
        refresh: Recompute every step, ignoring cached results.
        dispatch: Deployment prefix of the per-party deployments (``fedfuse deploy`` sets
            it): parties with a work pool run their pipeline there. Empty: all in process.
    """
    logger = get_run_logger()
    spec = load_spec(spec_path)
    require_secret(spec, dispatch)
    learn_vocabularies(spec, dispatch=dispatch, refresh=refresh)
    learn_consortium_text_model(spec, dispatch=dispatch, refresh=refresh)
    futures = run_pipelines(spec, spec_path, as_of=as_of, refresh=refresh, dispatch=dispatch)
    outputs: dict[str, FusedOutput] = {}
    failures: dict[str, BaseException] = {}
    for party_id, future in futures.items():
        try:
            outputs[party_id] = future.result()
        except Exception as exc:
            failures[party_id] = exc
            logger.error("party %s failed: %s", party_id, exc)
    outputs = {p.id: outputs[p.id] for p in spec.parties if p.id in outputs}
    if failures:
        first = next(iter(failures.values()))
        raise PrepareError(
            f"{len(failures)} of {len(spec.parties)} parties failed: "
            + "; ".join(f"{p}: {e}" for p, e in failures.items())
        ) from first
    rows = quality_rows(list(outputs.values()))
    key = artifact_key(spec.consortium.name)
    create_table_artifact(table=rows, key=f"{key}-quality", description="Data quality per source")
    lines = [f"# Prepared consortium `{spec.consortium.name}`", ""]
    for party_id, out in outputs.items():
        lines.append(
            f"- **{party_id}**: `{out.table.uri}` ({out.table.rows} rows, {len(out.features)} features)"
        )
    create_markdown_artifact("\n".join(lines), key=f"{key}-prepared", description="Fused tables")
    logger.info("prepared %d parties", len(outputs))
    return outputs
