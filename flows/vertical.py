"""The ``vertical-training`` flow: private set intersection, then gradient rounds in which
every party fits trees on its own feature block and the label party fuses their outputs."""

from __future__ import annotations

import datetime as dt
import hashlib
import posixpath

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from pydantic import BaseModel, Field, JsonValue

from flows import progress
from flows.common import task_options, threads
from flows.names import FLOW_RUN_NAMES, tagged
from flows.prepare import party_pipeline, prepare, require_secret
from flows.publish import VerticalReport, code_version, publish_model_card, publish_vertical
from flows.score import ScoringInputError, party_labels, resolve_run
from flows.transport import (
    PIPELINE_FLOW,
    PartyRunner,
    dispatch_pipeline,
    party_deployments,
    pooled_parties,
)
from storage.files import read_text, write_text_atomic
from storage.results import DEFAULT_RESULTS
from storage.runs import vertical_manifest_name
from storage.store import FileRef, IntegrityError, TableRef
from tasks.manifest import VerticalManifest
from tasks.model_card import vertical_card
from tasks.prepare.design import FeatureSchema, consortium_schema
from tasks.prepare.steps import FusedOutput
from tasks.run_identity import (
    num_classes,
    run_key,
    scoring_run_key,
    spec_identity,
    vertical_run_key,
)
from tasks.spec.load import load_spec
from tasks.spec.models import FedSpec, FusionSpec, TrainingSpec
from tasks.vertical.export import vertical_export
from tasks.vertical.fusion import Fusion
from tasks.vertical.inputs import read_text_block
from tasks.vertical.party_model import PartyModel
from tasks.vertical.refs import (
    PsiOverlap,
    StateRef,
    TextSourceRef,
    VerticalSetup,
    VerticalTextSetup,
)
from tasks.vertical.steps import (
    baselines_task,
    combine_task,
    finish_task,
    fuse_predictions_task,
    gradients_task,
    latest_state_task,
    model_at_task,
    one_shot_fusion_task,
    one_shot_task,
    party_round_task,
    party_scores_task,
    psi_answer_task,
    psi_blind_task,
    psi_intersect_task,
    psi_receive_task,
    send_labels_task,
    start_state_task,
    test_metrics_task,
    test_scores_task,
    text_block_at_task,
    text_block_task,
)
from tasks.vertical.text_block import TextTarget


class VerticalResult(BaseModel):
    run_key: str
    parties: list[str]
    label_party: str
    overlap: int
    set_sizes: dict[str, int]
    rounds_run: int
    best_round: int
    stop_reason: str | None
    valid: list[dict[str, float]]
    test: dict[str, float]
    trees: int
    models: dict[str, str]
    comparison: dict[str, dict[str, float]]
    manifest: str
    model_card: str = Field(default="", description="URI of the model card (JSON)")


def align_parties(
    setups: dict[str, VerticalSetup], label: str, min_overlap: int, call: PartyRunner
) -> tuple[PsiOverlap, dict[str, TableRef]]:
    """Private set intersection, a star around the label party; each party's alignment
    (its rows -> alignment ids) lands in its own store."""
    logger = get_run_logger()
    others = [p for p in setups if p != label]
    sent = call(label, psi_blind_task, setups[label], others)
    answer_f = {p: call.submit(p, psi_answer_task, setups[p], sent[p]) for p in others}
    answers = {p: f.result() for p, f in answer_f.items()}
    overlap: PsiOverlap = call(label, psi_intersect_task, setups[label], answers, min_overlap)
    receive_f = {p: call.submit(p, psi_receive_task, setups[p], overlap.answers[p]) for p in others}
    aligns: dict[str, TableRef] = {label: overlap.alignment}
    aligns.update({p: f.result() for p, f in receive_f.items()})
    progress.emit("psi", "overlap", f"{overlap.overlap} entities at every party")
    logger.info("PSI: %d entities in common; set sizes %s", overlap.overlap, overlap.sizes)
    return overlap, aligns


def check_vertical(spec: FedSpec, spec_path: str) -> str:
    """The label party. A loaded vertical spec has one, and has opted in to what its mode
    shares (:func:`tasks.spec.checks.semantic_problems`); refused here: a horizontal spec, or a
    vertical one that has not chosen a mode (it can be prepared, not trained)."""
    label = spec.consortium.label.party
    if spec.consortium.layout != "vertical" or label is None:
        raise ValueError(f"{spec_path}: vertical-training needs consortium.layout = 'vertical'")
    if spec.fusion.mode is None:
        raise ValueError(
            f"{spec_path}: fusion.mode: vertical training needs one: 'rounds' (opt in with "
            "fusion.share_gradients = true: per-entity gradients, which reveal label "
            "information, go to every party) or 'one_shot' (opt in with fusion.share_labels "
            "= true: the overlap's labels go to every party)"
        )
    return label


def _text_setup(
    spec: FedSpec, party: str, prepared: FusedOutput, as_of: dt.date | None, *, wanted: bool
) -> VerticalTextSetup | None:
    """What the party's text block reads (``wanted``: ``[text] model`` or a trained block
    to score with; a party with a text source): its clean text tables as its pipeline wrote
    them, and the ``[text]`` settings."""
    text = spec.text
    sources = [s for s in spec.party(party).sources if s.kind == "text"]
    if not wanted or not sources:
        return None
    missing = [s.id for s in sources if s.id not in prepared.clean_tables]
    if missing:
        raise ValueError(f"party {party}: no clean table of text source(s) {missing}")
    return VerticalTextSetup(
        sources=[
            TextSourceRef(
                source=s.id,
                clean=prepared.clean_tables[s.id],
                options=s.features,
            )
            for s in sources
        ],
        entity=spec.consortium.entity,
        as_of=as_of or spec.consortium.as_of,
        secret=spec.consortium.secret,
        min_documents=text.min_documents,
        max_terms=text.max_terms,
        ngram_max=text.ngram_max,
        folds=text.folds,
        alpha=text.alpha,
    )


def _vertical_setups(
    spec: FedSpec,
    label: str,
    *,
    key: str,
    prepared: dict[str, FusedOutput],
    schemas: dict[str, FeatureSchema],
    training: TrainingSpec,
    scoring: bool = False,
    as_of: dt.date | None = None,
    text_models: dict[str, FileRef] | None = None,
) -> dict[str, VerticalSetup]:
    """Every party's setup (stores under ``scoring/`` when scoring new data; a scoring
    text party gets its trained ``text_models`` block)."""
    fused = {p: out.table for p, out in prepared.items()}
    text_models = text_models or {}
    return {
        p: VerticalSetup(
            party=p,
            label_party=label,
            store=(
                posixpath.join(spec.party(p).store, "scoring") if scoring else spec.party(p).store
            ),
            coordinator=spec.coordinator.store,
            run_key=key,
            fused=fused[p],
            schema_=schemas[p],
            objective=spec.consortium.task,
            num_class=max(num_classes(spec), 1),
            training=training,
            text=_text_setup(
                spec, p, prepared[p], as_of, wanted=spec.text.model or p in text_models
            ),
            text_model=text_models.get(p),
        )
        for p in fused
    }


def _runner(spec: FedSpec, dispatch: str | None, refresh: bool) -> PartyRunner:
    return PartyRunner(
        pooled_parties(spec, dispatch),
        coordinator=spec.coordinator.store,
        results=spec.run.results or DEFAULT_RESULTS,
        refresh=refresh,
        timeout=spec.run.party_timeout,
    )


@flow(
    name="vertical-training",
    flow_run_name=FLOW_RUN_NAMES["vertical-training"],
    persist_result=True,
    task_runner=threads(4),
)
def vertical_training(
    spec_path: str,
    refresh: bool = False,
    rounds: int | None = None,
    stop_after: int | None = None,
    baselines: bool = False,
    dispatch: str | None = None,
) -> VerticalResult:
    """Prepare every party, align them by private set intersection, then run gradient
    rounds until the round limit or early stopping.

    Args:
        spec_path: Consortium spec (TOML) as seen by the machine running the flow.
        refresh: Recompute every step and start training afresh (ignore checkpoints).
        rounds: Override the spec's round limit.
        stop_after: Stop after this many rounds of this run (resume later).
        baselines: Also train each block alone and, for comparison only, a centralised
            model on the joined blocks (pools data).
        dispatch: Deployment prefix of the per-party deployments (``fedfuse deploy`` sets
            it): parties with a work pool run their steps there. Empty: all in process.
    """
    spec = load_spec(spec_path)
    require_secret(spec, dispatch)
    label = check_vertical(spec, spec_path)
    call = _runner(spec, dispatch, refresh)
    if baselines and call.remote:
        raise ValueError(
            "baselines pool the parties' blocks in one process; they cannot run while "
            f"parties {sorted(call.remote)} work on their own pools"
        )
    training: TrainingSpec = spec.training
    if rounds is not None:
        training = training.model_copy(update={"rounds": rounds})
    prepared = prepare(spec_path, refresh=refresh, dispatch=dispatch)
    parties = [p.id for p in spec.parties]
    schema = consortium_schema({p: out.features for p, out in prepared.items()})
    fused = {p: out.table for p, out in prepared.items()}
    base_key = run_key(spec.model_copy(update={"training": training}), schema, fused)
    key = vertical_run_key(base_key, spec.fusion, spec.text if spec.text.model else None)
    schemas = {p: consortium_schema({p: prepared[p].features}) for p in parties}
    setups = _vertical_setups(
        spec, label, key=key, prepared=prepared, schemas=schemas, training=training
    )
    overlap, aligns = align_parties(setups, label, spec.fusion.min_overlap, call)
    if spec.fusion.mode == "one_shot":
        fit = _one_shot(setups, label, aligns, spec.fusion.weights, spec.fusion.learned, call)
    else:
        fit = _rounds(setups, label, aligns, spec.fusion, refresh, stop_after, call)
    setups = _with_text_blocks(setups, fit.text_models)
    comparison: dict[str, dict[str, float]] = {"vertical (fused)": fit.test}
    if baselines:
        opts = task_options(call.results, refresh)
        comparison |= baselines_task.with_options(**opts)(setups, aligns, label)
    manifest = VerticalManifest(
        mode=fit.mode,
        run_key=key,
        label_party=label,
        parties=parties,
        fusion=fit.fusion,
        upto_round=fit.upto_round,
        models=fit.models,
        feature_schema={p: s.schema_ for p, s in setups.items()},
        text_models=fit.text_models,
    )
    report = VerticalReport(
        overlap=overlap.overlap,
        set_sizes=overlap.sizes,
        mode=fit.mode,
        rounds_run=fit.rounds_run,
        best_round=fit.best_round,
        trees=fit.trees,
        valid=fit.valid,
        comparison=comparison,
    )
    written = publish_vertical(spec, manifest, report)
    card = vertical_card(
        spec=spec,
        identity=spec_identity(spec),
        code=code_version(),
        run_key=key,
        label_party=label,
        mode=fit.mode,
        fused=fused,
        overlap=overlap.overlap,
        accepted=fit.accepted,
        rejected=fit.left_out,
        valid=fit.valid,
        best_round=fit.best_round,
        rounds_run=fit.rounds_run,
        stop_reason=fit.stop_reason,
        test=fit.test,
    )
    card_ref, _ = publish_model_card(
        spec, card, {"manifest": f"models/{vertical_manifest_name(key)}"}
    )
    return VerticalResult(
        run_key=key,
        parties=parties,
        label_party=label,
        overlap=overlap.overlap,
        set_sizes=overlap.sizes,
        rounds_run=fit.rounds_run,
        best_round=fit.best_round,
        stop_reason=fit.stop_reason,
        valid=fit.valid,
        test=fit.test,
        trees=fit.trees,
        models={p: (m.uri if m else "") for p, m in fit.models.items()},
        comparison=comparison,
        manifest=written.uri,
        model_card=card_ref.uri,
    )


class _Fit(BaseModel):
    """What a training mode hands to the report and the manifest."""

    mode: str
    test: dict[str, float]
    valid: list[dict[str, float]]
    rounds_run: int
    best_round: int
    upto_round: int
    stop_reason: str | None
    trees: int
    models: dict[str, FileRef | None]
    fusion: Fusion
    accepted: dict[int, list[str]] = Field(
        default_factory=dict, description="Parties whose deltas each round of this call combined"
    )
    left_out: dict[int, dict[str, str]] = Field(
        default_factory=dict, description="Parties each round of this call left out, and why"
    )
    text_models: dict[str, FileRef] = Field(
        default_factory=dict, description="The text parties' text blocks (their own stores)"
    )


def _with_text_blocks(
    setups: dict[str, VerticalSetup], blocks: dict[str, FileRef]
) -> dict[str, VerticalSetup]:
    """The setups with each text party's fitted block (its score columns join its block)."""
    return {
        p: s.model_copy(update={"text_model": blocks[p]}) if p in blocks else s
        for p, s in setups.items()
    }


def _fit_text_blocks(
    setups: dict[str, VerticalSetup],
    aligns: dict[str, TableRef],
    target: TableRef,
    kind: TextTarget,
    call: PartyRunner,
) -> dict[str, FileRef]:
    """Every text party fits its text block on ``target`` (round-1 gradients or labels)."""
    futures = {
        p: call.submit(p, text_block_task, s, aligns[p], target, kind)
        for p, s in setups.items()
        if s.text is not None
    }
    blocks = {p: f.result() for p, f in futures.items()}
    if blocks:
        progress.emit("training", "text block", ", ".join(sorted(blocks)))
    return blocks


def _rounds(
    setups: dict[str, VerticalSetup],
    label: str,
    aligns: dict[str, TableRef],
    fusion: FusionSpec,
    refresh: bool,
    stop_after: int | None,
    call: PartyRunner,
) -> _Fit:
    logger = get_run_logger()
    parties = list(setups)
    key = setups[label].run_key
    state: StateRef | None = None if refresh else call(label, latest_state_task, setups[label])
    if state is None:
        state = call(
            label,
            start_state_task,
            setups[label],
            aligns[label],
            parties,
            fusion.weights,
            fusion.combine,
        )
        models: dict[str, FileRef | None] = dict.fromkeys(parties)
        blocks: dict[str, FileRef] = {}
    else:
        logger.info("resuming vertical run %s after round %d", key, state.round)
        models = {p: call(p, model_at_task, setups[p], state.round) for p in parties}
        blocks = _stored_text_blocks(setups, state.round, call)
        setups = _with_text_blocks(setups, blocks)
    done_here = 0
    members: dict[int, list[str]] = {}
    left_out: dict[int, dict[str, str]] = {}
    while state.next is None:
        if stop_after is not None and done_here >= stop_after:
            break
        t = state.round + 1
        with tagged(round_=t):
            grads = call(label, gradients_task, setups[label], aligns[label], state)
            if t == 1:
                blocks = _fit_text_blocks(setups, aligns, grads, "gradients", call)
                setups = _with_text_blocks(setups, blocks)
            futures = {
                p: call.submit(p, party_round_task, setups[p], aligns[p], models[p], grads, t)
                for p in parties
            }
            wait(list(futures.values()))
            deltas: dict[str, TableRef] = {}
            for party, future in futures.items():
                if future.state.is_completed():
                    out = future.result()
                    models[party], deltas[party] = out.model, out.delta
                else:
                    message = str(future.state.message)
                    left_out.setdefault(t, {})[party] = message
                    logger.warning("round %d: party %s left out: %s", t, party, message)
            members[t] = sorted(deltas)
            state = call(label, combine_task, setups[label], aligns[label], state, deltas, t)
        done_here += 1
        progress.emit("training", f"round {t}", f"valid {state.valid}")
    if state.next is not None:
        state = call(label, finish_task, setups[label], aligns[label], state)
    best = state.best_round
    score_f = {
        p: call.submit(p, test_scores_task, setups[p], aligns[p], models[p], best) for p in parties
    }
    scores = {p: f.result() for p, f in score_f.items()}
    test = call(label, test_metrics_task, setups[label], aligns[label], state, scores)
    return _Fit(
        mode="rounds",
        test=test,
        valid=state.history,
        rounds_run=state.round,
        best_round=best,
        upto_round=best,
        stop_reason=state.next,
        trees=state.trees,
        models=models,
        fusion=state.fusion,
        accepted=members,
        left_out=left_out,
        text_models=blocks,
    )


def _stored_text_blocks(
    setups: dict[str, VerticalSetup], done: int, call: PartyRunner
) -> dict[str, FileRef]:
    """The text parties' blocks of a resumed run (fitted in its round 1)."""
    blocks: dict[str, FileRef] = {}
    for p, s in setups.items():
        if s.text is None or done == 0:
            continue
        ref = call(p, text_block_at_task, s)
        if ref is None:
            raise ValueError(
                f"party {p}: the text block of run {s.run_key} is missing from its store; "
                "train again with refresh"
            )
        blocks[p] = ref
    return blocks


def _one_shot(
    setups: dict[str, VerticalSetup],
    label: str,
    aligns: dict[str, TableRef],
    weights: dict[str, float] | None,
    learned: bool,
    call: PartyRunner,
) -> _Fit:
    labels_ref = call(label, send_labels_task, setups[label], aligns[label])
    blocks = _fit_text_blocks(setups, aligns, labels_ref, "labels", call)
    setups = _with_text_blocks(setups, blocks)
    futures = {
        p: call.submit(p, one_shot_task, s, aligns[p], labels_ref) for p, s in setups.items()
    }
    shots = {p: f.result() for p, f in futures.items()}
    fused = call(
        label,
        one_shot_fusion_task,
        setups[label],
        aligns[label],
        {p: o.scores for p, o in shots.items()},
        weights,
        learned,
    )
    progress.emit("training", "one-shot", f"valid {fused.valid}")
    return _Fit(
        mode="one_shot",
        test=fused.test,
        valid=[fused.valid],
        rounds_run=1,
        best_round=1,
        upto_round=1,
        stop_reason=None,
        trees=sum(o.trees for o in shots.values()),
        models={p: o.model for p, o in shots.items()},
        fusion=fused.fusion,
        text_models=blocks,
    )


@flow(
    name="vertical-score",
    flow_run_name=FLOW_RUN_NAMES["vertical-score"],
    persist_result=True,
    task_runner=threads(4),
)
def vertical_score(
    spec_path: str,
    party: str | None = None,
    data: str | dict[str, str] | None = None,
    manifest: str | None = None,
    as_of: dt.date | None = None,
    dispatch: str | None = None,
) -> TableRef:
    """Federated inference for a vertical consortium: every party runs its pipeline on its
    (new) raw data, the parties align by private set intersection, each scores its block
    with its own trees, and the label party fuses the scores into predictions.

    Args:
        spec_path: Consortium spec (TOML).
        party: Whose raw data ``data`` is when it is one folder.
        data: New raw exports per party (party -> folder, same file names as its sources),
            or one folder for ``party``; a party without one scores on its spec's sources.
        manifest: Vertical manifest (default: the latest training run).
        as_of: End of every feature window (default: the spec's).
        dispatch: Deployment prefix of the per-party deployments: parties with a work pool
            run their pipeline and scoring steps there.
    """
    logger = get_run_logger()
    spec = load_spec(spec_path)
    label = check_vertical(spec, spec_path)
    body = _vertical_manifest(spec, spec_path, manifest)
    call = _runner(spec, dispatch, False)
    new_data = _new_data(spec, spec_path, party, data)
    stale = [p.id for p in spec.parties if p.id not in new_data]
    if new_data and stale:
        logger.warning(
            "new data for %s only: %s score on their training exports",
            ", ".join(sorted(new_data)),
            ", ".join(stale),
        )
    prepared = _score_pipelines(spec, spec_path, new_data, as_of, dispatch)
    fused = {p: out.table for p, out in prepared.items()}
    key = scoring_run_key(body.run_key, fused)
    setups = _vertical_setups(
        spec,
        label,
        key=key,
        prepared=prepared,
        schemas=body.feature_schema,
        training=spec.training,
        scoring=True,
        as_of=as_of,
        text_models=body.text_models,
    )
    overlap, aligns = align_parties(setups, label, 0, call)
    if overlap.overlap == 0:
        sizes = ", ".join(f"{p} {n}" for p, n in overlap.sizes.items())
        source = {p: "new data" if p in new_data else "training exports" for p in setups}
        given = ", ".join(f"{p} {source[p]}" for p in setups)
        raise ScoringInputError(
            f"{spec_path}: no entity of the data scored is known to every party (rows: "
            f"{sizes}; {given}), so nothing can be scored; give every party's new data "
            "with --data PARTY=DIR"
        )
    models = body.models
    upto = body.upto_round
    score_f = {
        p: call.submit(p, party_scores_task, setups[p], aligns[p], models[p], upto)
        for p in setups
        if p != label
    }
    scores = {p: f.result() for p, f in score_f.items()}
    out: TableRef = call(
        label,
        fuse_predictions_task,
        setups[label],
        aligns[label],
        body.fusion,
        models[label],
        upto,
        scores,
        list(prepared[label].key_tables.values()),
        spec.consortium.entity,
        spec.consortium.secret,
        party_labels(spec, label),
    )
    logger.info(
        "%d entities scored (%d known to every party) -> %s", out.rows, overlap.overlap, out.uri
    )
    return out


def _vertical_manifest(spec: FedSpec, spec_path: str, manifest: str | None) -> VerticalManifest:
    """The given vertical manifest, or the latest training run's (which must be vertical)."""
    if manifest is None:
        latest = resolve_run(spec)
        if not latest.is_vertical:
            raise ValueError(f"{spec_path}: the latest training run is not a vertical one")
        manifest = latest.manifest
    return VerticalManifest.model_validate_json(read_text(manifest))


def _read_party_model(party: str, ref: FileRef) -> PartyModel:
    """A party's trained model as the manifest names it (its bytes checked against it)."""
    text = read_text(ref.uri)
    if hashlib.sha256(text.encode()).hexdigest() != ref.sha256:
        raise IntegrityError(f"{ref.uri}: party {party}'s model does not match the manifest")
    return PartyModel.model_validate_json(text)


def export_vertical(spec_path: str, out: str, manifest: str | None = None) -> list[str]:
    """Write a vertical run (``manifest``, default the latest) into the folder ``out``: one
    LightGBM model file per party with trees and ``fusion.json``
    (:mod:`tasks.vertical.export`). Returns the locations written."""
    spec = load_spec(spec_path)
    body = _vertical_manifest(spec, spec_path, manifest)
    models = {
        p: None if ref is None else _read_party_model(p, ref) for p, ref in body.models.items()
    }
    blocks = {p: read_text_block(ref) for p, ref in body.text_models.items()}
    written: list[str] = []
    for name, text in vertical_export(body, models, blocks).items():
        location = posixpath.join(out, name)
        write_text_atomic(location, text)
        written.append(location)
    return written


def _new_data(
    spec: FedSpec, spec_path: str, party: str | None, data: str | dict[str, str] | None
) -> dict[str, str]:
    """Party -> folder of its new raw exports (one folder means ``party``'s)."""
    if data is None:
        return {}
    if isinstance(data, str):
        if party is None:
            raise ScoringInputError(f"{spec_path}: new data given as one folder needs its party")
        data = {party: data}
    known = {p.id for p in spec.parties}
    for p in data:
        if p not in known:
            raise ScoringInputError(
                f"{spec_path}: new data for party {p!r}, which the spec does not name "
                f"(parties: {', '.join(sorted(known))})"
            )
    return dict(data)


def _score_pipelines(
    spec: FedSpec,
    spec_path: str,
    data: dict[str, str],
    as_of: dt.date | None,
    dispatch: str | None,
) -> dict[str, FusedOutput]:
    """Every party's pipeline on its (new) data: on its own pool when it has one."""
    remote = party_deployments(spec, dispatch, PIPELINE_FLOW)
    pipelines: dict[str, PrefectFuture[FusedOutput] | FusedOutput] = {}
    for p in spec.parties:
        params: dict[str, JsonValue] = {
            "spec_path": spec_path,
            "party": p.id,
            "as_of": as_of.isoformat() if as_of else None,
            "scoring": True,
            "data": (new := data.get(p.id)),
        }
        if p.id in remote:
            pipelines[p.id] = dispatch_pipeline.submit(
                remote[p.id], params, spec.coordinator.store, spec.run.party_timeout
            )
        else:
            pipelines[p.id] = party_pipeline(spec_path, p.id, as_of=as_of, scoring=True, data=new)
    return {p: (v.result() if isinstance(v, PrefectFuture) else v) for p, v in pipelines.items()}
