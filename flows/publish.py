"""What every finished training leaves behind (horizontal, lossless, vertical): manifest,
exported model, baselines, plots, report, the latest-run pointer and the UI's artifacts.

The model and its manifest are the product; the baselines, plots and importance are
optional: a failure there becomes a warning in the report and the result, never a failed
training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from flows.common import artifact_key, task_options
from storage.code_version import git_commit, package_version
from storage.runs import (
    LatestRun,
    PlotName,
    manifest_name,
    model_card_name,
    model_name,
    plot_name,
    report_name,
    write_latest,
    write_model_card,
    write_vertical_manifest,
)
from storage.store import FileRef, Store, TableRef, write_manifest
from tasks.horizontal.baselines import compare_baselines
from tasks.horizontal.ensemble import GlobalEnsemble, ensemble_size, export_model
from tasks.horizontal.rounds import STOP_TEXT, StopReason
from tasks.horizontal.steps import RoundAggregate
from tasks.manifest import EnsembleManifest, VerticalManifest
from tasks.model_card import CodeVersion, ModelCard, card_markdown, horizontal_card
from tasks.prepare.design import FeatureSchema
from tasks.report import (
    VERTICAL_AUC_NOTE,
    Comparison,
    importance_by_party_modality,
    markdown_report,
    markdown_table,
    metric_rows,
    plot_importance,
    plot_rounds,
    png_data_uri,
    round_metric_rows,
)
from tasks.run_identity import spec_identity
from tasks.spec.models import FedSpec, TrainingSpec

T = TypeVar("T")


class FinishedTraining(BaseModel):
    """A finished horizontal (or lossless) training run, as publishing needs it."""

    run_key: str
    ensemble: GlobalEnsemble
    upto_round: int | None = Field(description="Export up to this round (None: all)")
    valid: list[dict[str, float]]
    party_valid: list[dict[str, dict[str, float]]] = Field(
        default_factory=list,
        description="Validation metrics per round at every party that evaluated it",
    )
    test: list[dict[str, float]]
    best_round: int
    rounds_run: int
    best_test: dict[str, float]
    dropped: dict[int, dict[str, str]] = Field(default_factory=dict)
    parties: list[str]
    stop_reason: StopReason | None = None
    left_out: dict[str, str] = Field(default_factory=dict)
    description: str = Field(description="Caption of the round-metrics artifact")
    baselines: bool = False
    fused: dict[str, TableRef] = Field(description="The parties' fused tables (baselines)")
    schema_: FeatureSchema
    training: TrainingSpec
    results: str
    refresh: bool = False
    split_sizes: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Rows per split (train, valid, test) of every party: counts only",
    )
    rounds: list[RoundAggregate] = Field(
        default_factory=list,
        description="The round records (accepted updates, left-out parties) for the model card",
    )
    tables: dict[str, TableRef] = Field(
        default_factory=dict,
        description="Every party's fused table, left-out ones too (the model card; default: fused)",
    )


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
    split_sizes: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Rows per split (train, valid, test) of every party: counts only",
    )
    model_card: str = Field(default="", description="URI of the model card (JSON)")


def code_version() -> CodeVersion:
    return CodeVersion(version=package_version(), commit=git_commit())


def publish_model_card(
    spec: FedSpec, card: ModelCard, files: dict[str, str]
) -> tuple[FileRef, FileRef]:
    """The model card next to the model (JSON and Markdown) and as the UI's artifact;
    ``files`` names the run's files relative to the coordinator store."""
    coordinator = Store(spec.coordinator.store)
    markdown = card_markdown(
        card,
        files={
            **files,
            "model card": f"models/{model_card_name(card.run_key, 'json')}",
        },
    )
    written = write_model_card(coordinator, card.run_key, card, markdown)
    create_markdown_artifact(
        markdown,
        key=f"{artifact_key(spec.consortium.name)}-model-card",
        description="Model card: run key, spec hash, code version, data hashes, rounds",
    )
    return written


def publish_training_artifacts(
    consortium: str, rounds: list[dict[str, str]], report: str, *, description: str
) -> None:
    """A training run's artifacts in the UI: validation metrics per round (and party, from
    :func:`tasks.report.round_metric_rows`) and the report (plots inline)."""
    key = artifact_key(consortium)
    create_table_artifact(
        table=rounds,
        key=f"{key}-round-metrics",
        description=f"{description}, best round marked (4 significant digits)",
    )
    create_markdown_artifact(report, key=f"{key}-training-report", description="Training report")


class _Optional:
    """Runs the optional parts of publishing; a failure becomes a warning."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def __call__(self, what: str, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except Exception as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            self.warnings.append(f"{what} failed: {type(exc).__name__}: {first}")
            get_run_logger().warning("%s failed (%s); the trained model is unaffected", what, first)
            return default


def publish_training(spec: FedSpec, run: FinishedTraining) -> TrainingResult:
    """Manifest, exported model, baselines, plots, report, ``latest.json`` and artifacts of
    a finished horizontal training run (both modes)."""
    optional = _Optional()
    key, ensemble, upto = run.run_key, run.ensemble, run.upto_round
    objective = ensemble.objective
    coordinator = Store(spec.coordinator.store)
    body, texts = EnsembleManifest.of(ensemble)
    manifest = write_manifest(coordinator, manifest_name(key), body.model_dump(mode="json"), texts)
    exported = coordinator.write_text(
        "models", model_name(key), export_model(ensemble, upto_round=upto)
    )
    size = ensemble_size(ensemble, upto_round=upto)
    comparison = Comparison(federated=run.best_test)
    if run.baselines:
        comparison = optional(
            "baselines",
            lambda: compare_baselines.with_options(**task_options(run.results, run.refresh))(
                run.fused,
                schema=run.schema_,
                training=run.training,
                objective=objective,
                num_class=ensemble.num_class,
                federated=run.best_test,
                ensemble=ensemble,
                upto_round=upto,
            ),
            comparison,
        )
    no_importance: dict[str, dict[str, float]] = {}
    importance = optional(
        "feature importance",
        lambda: importance_by_party_modality(ensemble, run.schema_, upto_round=upto),
        no_importance,
    )
    artefacts = {
        "manifest": f"models/{manifest_name(key)}",
        "model (LightGBM text)": f"models/{model_name(key)}",
    }

    def plot(name: PlotName, render: Callable[[], bytes]) -> bytes:
        png = render()
        coordinator.write_bytes("reports", plot_name(key, name), png)
        return png

    pngs: dict[PlotName, bytes] = {
        "rounds": optional(
            "validation plot",
            lambda: plot(
                "rounds",
                lambda: plot_rounds(run.valid, objective=objective, best_round=run.best_round),
            ),
            b"",
        ),
        "importance": optional(
            "importance plot", lambda: plot("importance", lambda: plot_importance(importance)), b""
        ),
    }
    pngs = {name: png for name, png in pngs.items() if png}
    titles: dict[PlotName, str] = {"rounds": "validation plot", "importance": "importance plot"}
    for name in pngs:
        artefacts[titles[name]] = f"reports/{plot_name(key, name)}"
    artefacts["report"] = f"reports/{report_name(key)}"

    def render(plots: Mapping[str, str]) -> str:
        return markdown_report(
            consortium=spec.consortium.name,
            objective=objective,
            comparison=comparison,
            valid=run.valid,
            best_round=run.best_round,
            trees=size.trees,
            model_bytes=size.bytes,
            importance=importance,
            artefacts=artefacts,
            dropped=run.dropped,
            stopped=STOP_TEXT[run.stop_reason] if run.stop_reason else None,
            left_out=run.left_out or None,
            warnings=optional.warnings,
            split_sizes=run.split_sizes,
            plots=plots,
        )

    # the stored report links the plots beside it; the UI's copy carries them inline
    text = render({name: plot_name(key, name) for name in pngs})
    report = coordinator.write_text("reports", report_name(key), text)
    write_latest(
        coordinator,
        LatestRun(run_key=key, manifest=manifest.uri, model=exported.uri, spec=spec_identity(spec)),
    )
    publish_training_artifacts(
        spec.consortium.name,
        round_metric_rows(run.valid, run.party_valid, best_round=run.best_round),
        render({name: png_data_uri(png) for name, png in pngs.items()}),
        description=run.description,
    )
    card = horizontal_card(
        spec=spec,
        identity=spec_identity(spec),
        code=code_version(),
        run_key=key,
        lossless=run.training.mode == "lossless",
        fused=run.tables or run.fused,
        split_rows=run.split_sizes,
        left_out=run.left_out,
        rounds=run.rounds,
        valid=run.valid,
        best_round=run.best_round,
        rounds_run=run.rounds_run,
        stop_reason=run.stop_reason,
        test=run.best_test,
    )
    card_ref, _ = publish_model_card(
        spec,
        card,
        {
            "model (LightGBM text)": f"models/{model_name(key)}",
            "manifest": f"models/{manifest_name(key)}",
            "report": f"reports/{report_name(key)}",
        },
    )
    return TrainingResult(
        run_key=key,
        rounds_run=run.rounds_run,
        best_round=run.best_round,
        valid=run.valid,
        test=run.test,
        manifest=manifest.uri,
        model=exported.uri,
        trees=size.trees,
        model_bytes=size.bytes,
        parties=run.parties,
        dropped=run.dropped,
        comparison=comparison,
        report=report.uri,
        stop_reason=run.stop_reason,
        left_out=run.left_out,
        warnings=optional.warnings,
        split_sizes=run.split_sizes,
        model_card=card_ref.uri,
    )


class VerticalReport(BaseModel):
    """The facts of a finished vertical run the report shows."""

    overlap: int
    set_sizes: dict[str, int]
    mode: str
    rounds_run: int
    best_round: int
    trees: int
    valid: list[dict[str, float]]
    comparison: dict[str, dict[str, float]]


def publish_vertical(spec: FedSpec, manifest: VerticalManifest, report: VerticalReport) -> FileRef:
    """A finished vertical run's manifest, ``latest.json`` and artifacts; the manifest's
    reference."""
    coordinator = Store(spec.coordinator.store)
    written = write_vertical_manifest(coordinator, manifest.run_key, manifest)
    write_latest(
        coordinator,
        LatestRun(
            run_key=manifest.run_key,
            layout="vertical",
            manifest=written.uri,
            spec=spec_identity(spec),
        ),
    )
    lines = [
        f"# Vertical training `{spec.consortium.name}`",
        "",
        f"- entities at every party (PSI): {report.overlap} (set sizes {report.set_sizes})",
        f"- mode {report.mode}: rounds {report.rounds_run}, best {report.best_round}; "
        f"trees: {report.trees}",
        "",
        *markdown_table(metric_rows(list(report.comparison.items()))),
        *(["", VERTICAL_AUC_NOTE] if any("auc" in m for m in report.comparison.values()) else []),
    ]
    publish_training_artifacts(
        spec.consortium.name,
        round_metric_rows(report.valid, [], best_round=report.best_round),
        "\n".join(lines),
        description="Validation metrics per vertical round (label party)",
    )
    return written
