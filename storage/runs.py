"""Names of run artefacts, in one place: checkpoints, manifests, exported models, reports,
the ``models/latest.json`` pointer to the latest training run, the
``exchange/<flow-run-id>.json`` results of dispatched party runs, and the per-round files of
a run (running scores, model updates, the vertical exchange tables and party models).

A name here is the file name (``.json``/``.txt``) or, for a table, the stem the store adds
its content hash and ``.parquet`` to; the folder (``models``, ``exchange``, ...) is the
caller's.

Everything else reads and writes these through the functions here, with typed models; a
caller passes the model class of what it reads (storage knows no task-level type).
"""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, Field, JsonValue

from storage.store import FileRef, Store

M = TypeVar("M", bound=BaseModel)

LATEST = "latest.json"

Layout = Literal["horizontal", "vertical"]


class LatestRun(BaseModel):
    """``models/latest.json``: the latest finished training run of a consortium."""

    run_key: str
    layout: Layout | None = Field(
        default=None, description="Written for vertical runs; absent means horizontal"
    )
    manifest: str = Field(description="URI of the run's manifest")
    model: str | None = Field(default=None, description="URI of the exported model (horizontal)")

    @property
    def is_vertical(self) -> bool:
        return self.layout == "vertical"


# -- the latest-run pointer --------------------------------------------------------------------


def write_latest(coordinator: Store, latest: LatestRun) -> FileRef:
    return coordinator.write_json(
        "models", LATEST, latest.model_dump(mode="json", exclude_none=True)
    )


def read_latest(coordinator: Store) -> LatestRun | None:
    """The latest run, ``None`` before the first training."""
    if not coordinator.exists("models", LATEST):
        return None
    return LatestRun.model_validate(coordinator.read_json("models", LATEST))


# -- checkpoints -------------------------------------------------------------------------------


def checkpoint_name(run_key: str) -> str:
    """A horizontal run's latest checkpoint (coordinator store)."""
    return f"{run_key}-latest.json"


def round_checkpoint_name(run_key: str, round_: int) -> str:
    """A horizontal run's checkpoint after round ``round_`` (kept beside the latest)."""
    return f"{run_key}-r{round_:04d}.json"


def vertical_checkpoint_name(run_key: str) -> str:
    """A vertical run's latest label-party state (the label party's store)."""
    return f"{run_key}-vertical-latest.json"


def vertical_round_name(run_key: str, round_: int) -> str:
    """A vertical run's label-party state after round ``round_``: the score arrays' table
    (``checkpoints/``); the document is :func:`vertical_round_document_name`."""
    return f"{run_key}-vertical-r{round_:04d}"


def vertical_round_document_name(run_key: str, round_: int) -> str:
    """The document of a vertical run's label-party state after round ``round_``."""
    return f"{vertical_round_name(run_key, round_)}.json"


def read_checkpoint(coordinator: Store, run_key: str, model: type[M]) -> M | None:
    """A horizontal run's latest checkpoint as ``model``, ``None`` when there is none."""
    name = checkpoint_name(run_key)
    if not coordinator.exists("checkpoints", name):
        return None
    return model.model_validate(coordinator.read_json("checkpoints", name))


def write_checkpoint(coordinator: Store, run_key: str, round_: int, checkpoint: BaseModel) -> None:
    """Round ``round_``'s checkpoint, then the latest pointer (same content)."""
    body = checkpoint.model_dump(mode="json")
    coordinator.write_json("checkpoints", round_checkpoint_name(run_key, round_), body)
    coordinator.write_json("checkpoints", checkpoint_name(run_key), body)


# -- horizontal rounds -----------------------------------------------------------------------


def running_scores_name(run_key: str, round_: int) -> str:
    """A party's running raw scores after round ``round_`` (table, the party's ``models/``);
    round 0 holds the base score."""
    return f"{run_key}-scores-r{round_:04d}"


def update_name(run_key: str, round_: int, party: str) -> str:
    """A party's model update of round ``round_``, LightGBM text (coordinator ``models/``)."""
    return f"{run_key}-r{round_:04d}-{party}.txt"


# -- vertical rounds ---------------------------------------------------------------------------


def vertical_gradients_name(run_key: str, round_: int) -> str:
    """The label party's gradients of round ``round_`` (table, coordinator ``exchange/``)."""
    return f"{run_key}-gradients-r{round_:04d}"


def vertical_party_model_name(run_key: str, party: str, round_: int) -> str:
    """A party's model after round ``round_`` (the party's ``models/``)."""
    return f"{run_key}-vertical-{party}-r{round_:04d}.json"


def vertical_delta_name(run_key: str, party: str, round_: int) -> str:
    """A party's per-entity score deltas of round ``round_`` (table, coordinator
    ``exchange/``)."""
    return f"{run_key}-delta-{party}-r{round_:04d}"


def vertical_test_scores_name(run_key: str, party: str, upto_round: int) -> str:
    """A party's raw test-block scores up to round ``upto_round`` (table, coordinator
    ``exchange/``)."""
    return f"{run_key}-test-{party}-r{upto_round:04d}"


def vertical_labels_name(run_key: str) -> str:
    """The overlap's shared labels, one-shot mode (table, coordinator ``exchange/``)."""
    return f"{run_key}-labels"


def one_shot_model_name(run_key: str, party: str) -> str:
    """A party's one-shot model (the party's ``models/``)."""
    return f"{run_key}-oneshot-{party}.json"


def one_shot_scores_name(run_key: str, party: str) -> str:
    """A party's one-shot raw scores on valid and test (table, coordinator ``exchange/``)."""
    return f"{run_key}-oneshot-scores-{party}"


def vertical_scores_name(run_key: str, party: str) -> str:
    """A party's raw scores on every aligned row at inference (table, coordinator
    ``exchange/``)."""
    return f"{run_key}-scores-{party}"


def vertical_predictions_name(run_key: str) -> str:
    """The label party's fused predictions at inference (table, its ``reports/``)."""
    return f"{run_key}-predictions"


# -- manifests, models, reports ----------------------------------------------------------------


def manifest_name(run_key: str) -> str:
    """A horizontal run's ensemble manifest (``models/``)."""
    return f"{run_key}-manifest.json"


def vertical_manifest_name(run_key: str) -> str:
    return f"{run_key}-vertical-manifest.json"


def model_name(run_key: str) -> str:
    """A horizontal run's exported LightGBM model text (``models/``)."""
    return f"{run_key}-model.txt"


def report_name(run_key: str) -> str:
    return f"{run_key}-report.md"


def plot_name(run_key: str, plot: Literal["rounds", "importance"]) -> str:
    """A report's plot (``reports/``), e.g. ``<key>-rounds.png``."""
    return f"{run_key}-{plot}.png"


def write_vertical_manifest(coordinator: Store, run_key: str, manifest: BaseModel) -> FileRef:
    return coordinator.write_json(
        "models", vertical_manifest_name(run_key), manifest.model_dump(mode="json")
    )


# -- results of dispatched party runs ----------------------------------------------------------


def exchange_name(flow_run_id: str) -> str:
    return f"{flow_run_id}.json"


def write_exchange(coordinator: Store, flow_run_id: str, body: JsonValue) -> FileRef:
    """A dispatched party run's result, for the coordinator to read."""
    return coordinator.write_json("exchange", exchange_name(flow_run_id), body)


def exchange_location(coordinator: Store, flow_run_id: str) -> str:
    return coordinator.location("exchange", exchange_name(flow_run_id))


def read_exchange(coordinator: Store, flow_run_id: str) -> JsonValue | None:
    """A dispatched run's result, ``None`` when the run left none."""
    name = exchange_name(flow_run_id)
    if not coordinator.exists("exchange", name):
        return None
    body: JsonValue = coordinator.read_json("exchange", name)
    return body
