"""Names of run artefacts, in one place: checkpoints, manifests, exported models, reports,
the ``models/latest.json`` pointer to the latest training run, the learned vocabularies, the
consortium bin boundaries and each party's forced-bins file, the
``exchange/<flow-run-id>.json`` results of dispatched party runs, and the per-round files of
a run (running scores, model updates, the vertical exchange tables and party models).

A name here is the file name (``.json``/``.txt``) or, for a table, the stem the store adds
its content hash and ``.parquet`` to; the folder (``models``, ``exchange``, ...) is the
caller's.

Everything else reads and writes these through the functions here, with typed models; a
caller passes the model class of what it reads (storage knows no task-level type).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, JsonValue

from storage.files import is_uri
from storage.store import FileRef, Store, fingerprint, read_verified_text

M = TypeVar("M", bound=BaseModel)

LATEST = "latest.json"
RUNS = "runs.json"

Layout = Literal["horizontal", "vertical"]
#: The plots of a training report.
PlotName = Literal["rounds", "importance"]


class LatestRun(BaseModel):
    """A finished training run of a consortium: ``models/latest.json`` (the latest of any
    spec), ``models/latest-<spec>.json`` (the latest of one spec) and the entries of
    ``models/runs.json``."""

    run_key: str
    layout: Layout | None = Field(
        default=None, description="Written for vertical runs; absent means horizontal"
    )
    manifest: str = Field(description="URI of the run's manifest")
    model: str | None = Field(default=None, description="URI of the exported model (horizontal)")
    spec: str | None = Field(
        default=None, description="Identity of the spec that trained it (absent in old stores)"
    )

    @property
    def is_vertical(self) -> bool:
        return self.layout == "vertical"

    def describe(self) -> str:
        return f"{self.run_key} ({self.layout or 'horizontal'}, spec {self.spec or 'unknown'})"


class RunIndex(BaseModel):
    """``models/runs.json``: every finished run, oldest first (one entry per run key)."""

    runs: list[LatestRun] = Field(default_factory=list)


class RunChoiceError(ValueError):
    """The coordinator store cannot tell which run a spec's prediction should use."""


# -- the latest-run pointers and the run index -------------------------------------------------


def latest_spec_name(spec: str) -> str:
    """The latest run of one spec identity (``models/``)."""
    return f"latest-{spec}.json"


def read_runs(coordinator: Store) -> list[LatestRun]:
    """Every recorded run, oldest first; an old store's single pointer counts as one run."""
    if coordinator.exists("models", RUNS):
        return RunIndex.model_validate(coordinator.read_json("models", RUNS)).runs
    latest = read_latest(coordinator)
    return [latest] if latest is not None else []


def write_latest(coordinator: Store, latest: LatestRun) -> FileRef:
    """Record a finished run: the run index, the spec's pointer and ``latest.json``."""
    body = latest.model_dump(mode="json", exclude_none=True)
    runs = [r for r in read_runs(coordinator) if r.run_key != latest.run_key]
    index = RunIndex(runs=[*runs, latest])
    coordinator.write_json("models", RUNS, index.model_dump(mode="json", exclude_none=True))
    if latest.spec is not None:
        coordinator.write_json("models", latest_spec_name(latest.spec), body)
    return coordinator.write_json("models", LATEST, body)


def read_latest(coordinator: Store) -> LatestRun | None:
    """The latest run of any spec, ``None`` before the first training."""
    if not coordinator.exists("models", LATEST):
        return None
    return LatestRun.model_validate(coordinator.read_json("models", LATEST))


def choose_run(coordinator: Store, spec: str, run_key: str | None = None) -> LatestRun | None:
    """The run a spec predicts with: ``run_key`` when given, else the spec's latest run, else
    the only run of an old store that recorded no spec identity; ``None`` before the first
    training. Raises :class:`RunChoiceError`, listing the runs, when none fits."""
    runs = read_runs(coordinator)
    listing = "; ".join(r.describe() for r in runs) or "none"
    if run_key is not None:
        for run in reversed(runs):
            if run.run_key == run_key:
                return run
        raise RunChoiceError(
            f"{coordinator.root}: no run {run_key} in the coordinator store (runs: {listing})"
        )
    if coordinator.exists("models", latest_spec_name(spec)):
        return LatestRun.model_validate(coordinator.read_json("models", latest_spec_name(spec)))
    if not runs:
        return None
    unnamed = [r for r in runs if r.spec is None]
    if len(runs) == len(unnamed) == 1:
        return runs[0]
    raise RunChoiceError(
        f"{coordinator.root}: no run of this spec ({spec}) among the coordinator's runs; "
        f"pick one with --run RUN_KEY (runs: {listing})"
    )


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


def refit_name(run_key: str, round_: int, party: str) -> str:
    """A party's update of round ``round_`` with the consortium's leaf values (``models/``)."""
    return f"{run_key}-r{round_:04d}-{party}-refit.txt"


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


def vertical_text_model_name(run_key: str, party: str) -> str:
    """A text party's linear text block of a vertical run (the party's ``models/``)."""
    return f"{run_key}-vertical-text-{party}.json"


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


def model_card_name(run_key: str, kind: Literal["json", "md"]) -> str:
    """A run's model card (``models/``, next to the exported model): the card as JSON, and
    the same content as Markdown."""
    return f"{run_key}-model-card.{kind}"


def write_model_card(
    coordinator: Store, run_key: str, card: BaseModel, markdown: str
) -> tuple[FileRef, FileRef]:
    """The model card, JSON and Markdown, next to the run's model."""
    body = card.model_dump(mode="json")
    written = coordinator.write_json("models", model_card_name(run_key, "json"), body)
    text = coordinator.write_text("models", model_card_name(run_key, "md"), markdown)
    return written, text


def plot_name(run_key: str, plot: PlotName) -> str:
    """A report's plot (``reports/``), e.g. ``<key>-rounds.png``."""
    return f"{run_key}-{plot}.png"


def write_vertical_manifest(coordinator: Store, run_key: str, manifest: BaseModel) -> FileRef:
    return coordinator.write_json(
        "models", vertical_manifest_name(run_key), manifest.model_dump(mode="json")
    )


# -- learned vocabularies ----------------------------------------------------------------------


def learned_vocabularies_name(spec_fingerprint: str) -> str:
    """The vocabularies learned for one spec (its vocabulary fingerprint), ``models/``: what
    its training and every later prediction use."""
    return f"vocabularies-{spec_fingerprint[:16]}.json"


def write_learned_vocabularies(
    coordinator: Store, spec_fingerprint: str, learned: BaseModel
) -> FileRef:
    """Store learned vocabularies (written to a temporary name, then renamed into place)."""
    return coordinator.write_json(
        "models", learned_vocabularies_name(spec_fingerprint), learned.model_dump(mode="json")
    )


def read_learned_vocabularies(
    coordinator: Store, spec_fingerprint: str, model: type[M]
) -> M | None:
    """The vocabularies learned for a spec as ``model``, ``None`` before they are learned."""
    name = learned_vocabularies_name(spec_fingerprint)
    if not coordinator.exists("models", name):
        return None
    return model.model_validate(coordinator.read_json("models", name))


# -- the consortium text model -----------------------------------------------------------------

#: Largest stored text model a party reads (vocabulary and weights as JSON).
TEXT_MODEL_MAX_BYTES = 256 * 1024 * 1024


def text_model_name(text_fingerprint: str) -> str:
    """The text vocabulary and model trained for one spec (its text fingerprint), ``models/``:
    what its features and every later prediction use."""
    return f"text-model-{text_fingerprint[:16]}.json"


def write_text_model(coordinator: Store, text_fingerprint: str, model: BaseModel) -> FileRef:
    """Store the text model (written to a temporary name, then renamed into place)."""
    return coordinator.write_json(
        "models", text_model_name(text_fingerprint), model.model_dump(mode="json")
    )


def text_model_ref(coordinator: Store, text_fingerprint: str) -> FileRef | None:
    """A reference (uri + content hash) to the stored text model, ``None`` before it is
    trained."""
    name = text_model_name(text_fingerprint)
    if not coordinator.exists("models", name):
        return None
    return fingerprint(coordinator.location("models", name))


def read_text_model(ref: FileRef, model: type[M]) -> M:
    """The referenced text model, its content hash checked."""
    return model.model_validate_json(read_verified_text(ref, max_bytes=TEXT_MODEL_MAX_BYTES))


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


# -- the lossless mailbox of parties on their own pools ----------------------------------------

LosslessDirection = Literal["to", "from"]


def lossless_message_name(session: str, party: str, direction: LosslessDirection, seq: int) -> str:
    """Message ``seq`` of one lossless session between the coordinator and ``party``
    (``to`` the party or ``from`` it), coordinator ``exchange/``."""
    return f"lossless-{session}-{party}-{direction}-{seq:05d}.json"


def write_lossless_message(
    coordinator: Store,
    session: str,
    party: str,
    direction: LosslessDirection,
    seq: int,
    body: JsonValue,
) -> FileRef:
    """Post one lossless message (written to a temporary name, then renamed: a reader never
    sees half a message)."""
    name = lossless_message_name(session, party, direction, seq)
    return coordinator.write_json("exchange", name, body)


def read_lossless_message(
    coordinator: Store, session: str, party: str, direction: LosslessDirection, seq: int
) -> JsonValue | None:
    """Lossless message ``seq``, ``None`` while it has not been posted."""
    name = lossless_message_name(session, party, direction, seq)
    if not coordinator.exists("exchange", name):
        return None
    body: JsonValue = coordinator.read_json("exchange", name)
    return body


# -- consortium bin boundaries -----------------------------------------------------------------

#: Largest consortium bins document read back (a few KB per feature).
MAX_BINS_BYTES = 64 << 20


def bins_name(run_key: str) -> str:
    """The consortium's bin boundaries of one training run, ``models/`` of the coordinator
    store (the document carries its format version)."""
    return f"bins-{run_key}.json"


def write_bins(coordinator: Store, run_key: str, bins: BaseModel) -> FileRef:
    """Store a run's consortium bins (temporary name, then renamed into place)."""
    return coordinator.write_json("models", bins_name(run_key), bins.model_dump(mode="json"))


def read_bins(ref: FileRef, model: type[M]) -> M:
    """The consortium bins a reference names, verified against its sha256."""
    text = read_verified_text(ref, max_bytes=MAX_BINS_BYTES)
    return model.model_validate_json(text)


def forced_bins_name(run_key: str) -> str:
    """A party's LightGBM forced-bins file of one run, ``models/`` of the party's store."""
    return f"forcedbins-{run_key}.json"


def write_forced_bins(store_root: str | None, run_key: str, text: str) -> str:
    """Write a party's forced-bins file where its LightGBM reads it; the local path.

    LightGBM opens the file itself, so it must be on a local disk: in the party's store when
    that is a local folder, else (an object store, or no store) in a temporary folder of the
    party's machine.
    """
    name = forced_bins_name(run_key)
    if store_root is not None and not is_uri(store_root):
        return Store(store_root).write_text("models", name, text).uri
    path = Path(tempfile.mkdtemp(prefix="fedfuse-bins-")) / name
    path.write_text(text, encoding="utf-8")
    return str(path)
