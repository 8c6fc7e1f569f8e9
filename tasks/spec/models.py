"""The consortium spec: pydantic models, semantic checks and error formatting.

A spec is one TOML file. Structural problems come from pydantic, semantic ones
(cross-references between parties, sources, label and vocabularies) from
:func:`semantic_problems`; both are reported as :class:`SpecProblem` with the key
path they are about, e.g. ``parties[1].sources[0].columns.amount: ...``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from storage.files import (
    ConfinementError,
    StorageOptionsError,
    confined,
    is_uri,
    join_location,
    lies_within,
    read_text,
    real_location,
    register_options,
    resolve_location,
    resolve_storage_options,
)
from storage.results import DEFAULT_RESULTS
from tasks.prepare.units import UNITS
from tasks.types import (
    AMOUNT,
    DEVICE,
    TEXT,
    TIMESTAMP,
    Aggregation,
    ColumnType,
    FileFormat,
    JoinKind,
    KeyNormalisation,
    Layout,
    Objective,
    SourceKind,
    TableGrain,
)

logger = logging.getLogger(__name__)


class SpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SecretRef(SpecModel):
    """Where the consortium hashing secret lives. Never the secret itself."""

    env: str | None = None
    block: str | None = Field(default=None, description="Name of a Prefect Secret block")

    @model_validator(mode="after")
    def _one_of(self) -> SecretRef:
        if (self.env is None) == (self.block is None):
            raise ValueError("give exactly one of 'env' (environment variable) or 'block'")
        return self


class LabelSpec(SpecModel):
    column: str = Field(description="Canonical name of the label column")
    party: str | None = Field(default=None, description="Label-holding party (vertical layout)")
    num_classes: int | None = Field(default=None, ge=3)


class ConsortiumSpec(SpecModel):
    name: str = Field(min_length=1)
    layout: Layout = "horizontal"
    entity: str = Field(default="customer_id", min_length=1)
    key_normalisation: KeyNormalisation = "strip_lower"
    secret: SecretRef
    task: Objective = "binary"
    label: LabelSpec
    as_of: dt.date = Field(description="End of every feature window (never the wall clock)")


class ColumnSpec(SpecModel):
    """One canonical column and where it comes from in the party's own export."""

    source: str | None = Field(default=None, alias="from", description="Raw column name")
    dtype: ColumnType
    unit: str | None = None
    tz: str | None = Field(default=None, description="Zone of naive timestamps (default UTC)")
    format: str | None = Field(default=None, description="strptime format of raw timestamps")
    values: dict[str, str] = Field(default_factory=dict, description="Raw value -> canonical")
    required: bool = Field(default=False, description="Reject rows where this is null")

    @field_validator("tz")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None and value not in zoneinfo.available_timezones():
            raise ValueError(f"unknown time zone {value!r}")
        return value

    @field_validator("unit")
    @classmethod
    def _known_unit(cls, value: str | None) -> str | None:
        if value is not None and value not in UNITS:
            raise ValueError(f"unknown unit {value!r}; known: {', '.join(sorted(UNITS))}")
        return value


class EntityMapSpec(SpecModel):
    """A side table mapping a source key (e.g. device id) to the entity key."""

    path: str
    format: FileFormat | None = None
    columns: dict[str, ColumnSpec]


class FeatureOptions(SpecModel):
    prefix: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Feature name prefix (default: txn, profile, text or events by kind)",
    )
    windows: list[int] = Field(default_factory=lambda: [30, 90])
    text_width: int = Field(default=16, ge=2, le=256, description="Token components per entity")
    text_max_chars: int = Field(default=5000, ge=1)

    @field_validator("windows")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(w <= 0 for w in value):
            raise ValueError("windows must be a non-empty list of positive day counts")
        return sorted(set(value))


class SourceSpec(SpecModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    kind: SourceKind
    path: str
    format: FileFormat | None = None
    grain: TableGrain = "transaction"
    encoding: str = "utf8"
    columns: dict[str, ColumnSpec]
    entity_map: EntityMapSpec | None = None
    features: FeatureOptions = Field(default_factory=FeatureOptions)

    @property
    def file_format(self) -> FileFormat:
        return self.format or infer_format(self.path)

    @property
    def feature_prefix(self) -> str:
        if self.features.prefix:
            return self.features.prefix
        if self.kind == "table":
            return "txn" if self.grain == "transaction" else "profile"
        return self.kind


class PartySpec(SpecModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    store: str
    imports: list[str] = Field(
        default_factory=list,
        description="Folders outside the store this party's sources may be read from",
    )
    work_pool: str | None = None
    storage_options: SecretRef | None = Field(
        default=None,
        description="Where the fsspec storage options (credentials) of the store live: a JSON "
        "object in an environment variable or a Prefect Secret block; never the options",
    )
    sources: list[SourceSpec] = Field(min_length=1)

    @property
    def roots(self) -> list[str]:
        """The folders this party's sources may be read from: its store and import areas."""
        return [self.store, *self.imports]


class CoordinatorSpec(SpecModel):
    store: str
    storage_options: SecretRef | None = Field(
        default=None,
        description="Where the fsspec storage options (credentials) of the store live: a JSON "
        "object in an environment variable or a Prefect Secret block; never the options",
    )


#: One week: the largest wall-time budget ``training.max_seconds`` may give.
MAX_TRAINING_SECONDS = 7 * 24 * 3600.0


def _reserved(why: str, instead: str | None, *keys: str) -> dict[str, tuple[str, str | None]]:
    return dict.fromkeys(keys, (why, instead))


#: Extra LightGBM params a spec may not set, LightGBM aliases included, with why and the spec
#: key to use instead (if any): they would break the residual-round algorithm or clash with
#: what the round controls. :func:`tasks.horizontal.training.lgb_params` refuses them too.
RESERVED_PARAM_REASONS: dict[str, tuple[str, str | None]] = {
    **_reserved(
        "the task decides it", None,
        "objective", "objective_type", "app", "application", "loss",
    ),
    **_reserved(
        "the label decides it", "consortium.label.num_classes", "num_class", "num_classes"
    ),
    **_reserved(
        "the round sets it per party", "training.learning_rate",
        "learning_rate", "shrinkage_rate", "eta",
    ),
    **_reserved(
        "the rounds decide it", "training.rounds and training.trees_per_round",
        "num_iterations", "num_iteration", "n_iter", "num_tree", "num_trees", "num_round",
        "num_rounds", "nrounds", "num_boost_round", "n_estimators", "max_iter",
    ),
    **_reserved(
        "residual rounds need gbdt", None, "boosting", "boosting_type", "boost"
    ),
    **_reserved(
        "the ensemble holds constant-leaf trees only", None, "linear_tree", "linear_trees"
    ),
    **_reserved(
        "each round starts from the running scores", None,
        "init_score", "init_score_file", "input_model", "model_in", "model_input",
        "boost_from_average",
    ),
    **_reserved(
        "early stopping is federated", "training.patience",
        "early_stopping_round", "early_stopping_rounds", "early_stopping", "n_iter_no_change",
    ),
    **_reserved(
        "category columns are categorical", None,
        "categorical_feature", "categorical_features", "cat_feature", "categorical_column",
        "cat_column",
    ),
    **_reserved("the task decides the link", None, "sigmoid", "reg_sqrt"),
    **_reserved(
        "the training mode decides it", "training.mode",
        "tree_learner", "tree", "tree_type", "tree_learner_type",
        "num_machines", "num_machine", "machines", "workers", "nodes", "pre_partition",
        "is_pre_partition",
    ),
    **_reserved(
        "each party and round gets its own seed", "training.seed",
        "seed", "random_seed", "random_state",
    ),
    **_reserved(
        "the spec has a key for it", "training.num_leaves",
        "num_leaves", "num_leaf", "max_leaves", "max_leaf", "max_leaf_nodes",
    ),
    **_reserved(
        "the spec has a key for it", "training.min_data_in_leaf",
        "min_data_in_leaf", "min_data_per_leaf", "min_data", "min_child_samples",
        "min_samples_leaf",
    ),
}  # fmt: skip

RESERVED_PARAMS = frozenset(RESERVED_PARAM_REASONS)

#: What ``training.params`` values may be: JSON scalars (LightGBM takes lists as strings too).
ParamValue = str | bool | int | float


def reserved_param_message(key: str) -> str:
    """Why ``training.params`` may not set ``key`` (one of :data:`RESERVED_PARAMS`)."""
    why, instead = RESERVED_PARAM_REASONS[key]
    remedy = f"use {instead} instead" if instead else "remove it"
    return f"{key!r} is set by fedfuse ({why}); {remedy}"


def _param_value_problem(key: str, value: object) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key!r} must be a finite number, not {value}"
    if isinstance(value, str | bool | int | float):
        return None
    if isinstance(value, list | tuple):
        got = 'a list (LightGBM takes a list as a string too, e.g. "1,-1,0")'
    elif isinstance(value, dict):
        got = "a table"
    else:
        got = f"a {type(value).__name__}"
    return f"{key!r} must be a string, number or boolean, not {got}"


class TrainingSpec(SpecModel):
    rounds: int = Field(default=30, ge=1, le=10_000)
    trees_per_round: int = Field(default=4, ge=1, le=1000)
    learning_rate: float = Field(default=0.1, gt=0, le=1, allow_inf_nan=False)
    num_leaves: int = Field(default=31, ge=2, le=131_072, description="At most LightGBM's 131072")
    min_data_in_leaf: int = Field(default=20, ge=1, le=1_000_000)
    params: dict[str, ParamValue] = Field(
        default_factory=dict,
        description="Extra LightGBM params (string, number or boolean values); not the keys "
        "fedfuse sets itself (RESERVED_PARAMS)",
    )
    aggregation: Aggregation = Field(
        default="samples",
        description="Aggregation strategy: samples, uniform, lr_scaled or cyclic "
        "(tasks/horizontal/strategies: one module each)",
    )
    order: list[str] | None = Field(
        default=None,
        description="cyclic: the parties' turns (default: shuffled by the seed)",
    )
    patience: int = Field(default=5, ge=1, le=1000)
    validation_fraction: float = Field(default=0.2, gt=0, lt=0.5, allow_inf_nan=False)
    test_fraction: float = Field(default=0.2, ge=0, lt=0.5, allow_inf_nan=False)
    min_parties: int = Field(default=1, ge=1, le=1000)
    max_trees: int | None = Field(default=None, ge=1, le=1_000_000)
    max_seconds: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TRAINING_SECONDS,
        allow_inf_nan=False,
        description="Stop training after this many seconds of wall time (the round running "
        "then finishes)",
    )
    seed: int = 0
    mode: Literal["averaging", "lossless"] = Field(
        default="averaging",
        description="averaging: party models averaged per round; lossless: LightGBM data-parallel",
    )

    @field_validator("aggregation")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from tasks.horizontal.strategies import strategy_names

        known = strategy_names()
        if value not in known:
            raise ValueError(f"unknown aggregation {value!r}; known: {', '.join(known)}")
        return value

    @field_validator("params", mode="before")
    @classmethod
    def _allowed_params(cls, value: object) -> object:
        """Every reserved key and every non-scalar value, each named, in one error (joined by |)."""
        if not isinstance(value, dict):
            return value  # pydantic reports the wrong type
        problems = [
            reserved_param_message(key) if key in RESERVED_PARAMS else _param_value_problem(key, v)
            for key, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        ]
        found = [p for p in problems if p is not None]
        if found:
            raise PydanticCustomError(
                "training_params", "{problems}", {"problems": " | ".join(found)}
            )
        return value


#: Vertical training: gradient rounds or one-shot models fused at score level.
VerticalMode = Literal["rounds", "one_shot"]


class FusionSpec(SpecModel):
    join: JoinKind = "left"
    weights: dict[str, float] | None = None
    learned: bool = False
    min_overlap: int = Field(default=100, ge=1)
    mode: VerticalMode | None = Field(
        default=None,
        description="Vertical training mode: rounds (opt in with share_gradients) or one_shot "
        "(opt in with share_labels); a vertical spec without one can be prepared, not trained",
    )
    share_gradients: bool = Field(
        default=False,
        description="Opt in: the label party sends per-entity gradients to the parties (rounds)",
    )
    share_labels: bool = Field(
        default=False,
        description="Opt in: the label party sends the overlap's labels to the parties (one_shot)",
    )
    combine: Literal["sum", "mean"] = Field(
        default="sum",
        description="Vertical rounds: add the parties' weighted outputs (sum; fewer trees) or "
        "average them (mean; smaller steps, more rounds)",
    )


class RunSpec(SpecModel):
    results: str | None = Field(
        default=None, description="Folder for persisted task results (default: .fedfuse/results)"
    )
    party_timeout: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds the coordinator waits for a step dispatched to a party's pool",
    )
    storage_options: SecretRef | None = Field(
        default=None,
        description="Storage options of the results location, referenced like the secret "
        "(default: the coordinator's)",
    )


class FedSpec(SpecModel):
    consortium: ConsortiumSpec
    parties: list[PartySpec] = Field(min_length=1)
    coordinator: CoordinatorSpec
    vocabularies: dict[str, list[str]] = Field(default_factory=dict)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    fusion: FusionSpec = Field(default_factory=FusionSpec)
    run: RunSpec = Field(default_factory=RunSpec)

    def party(self, party_id: str) -> PartySpec:
        for party in self.parties:
            if party.id == party_id:
                return party
        raise KeyError(f"no party {party_id!r} in consortium {self.consortium.name!r}")

    def label_party_ids(self) -> list[str]:
        return [p.id for p in self.parties if label_source(self, p) is not None]

    def fingerprint(self) -> str:
        """Stable hash of the whole spec (no secret is ever in it)."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


class SpecProblem(BaseModel):
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(Exception):
    """A spec failed validation; carries every problem found."""

    def __init__(self, source: str, problems: Sequence[SpecProblem]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the spec\n{lines}")


FORMATS_BY_SUFFIX: dict[str, FileFormat] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}


def infer_format(path: str) -> FileFormat:
    suffix = PurePosixPath(path).suffix.lower()
    try:
        return FORMATS_BY_SUFFIX[suffix]
    except KeyError:
        known = ", ".join(sorted(FORMATS_BY_SUFFIX))
        raise ValueError(
            f"{path}: unknown format {suffix or '(no suffix)'!r}; give 'format' or use one of {known}"
        ) from None


def format_loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def label_source(spec: FedSpec, party: PartySpec) -> SourceSpec | None:
    for source in party.sources:
        if spec.consortium.label.column in source.columns:
            return source
    return None


REQUIRED_BY_KIND: dict[str, tuple[str, ...]] = {
    "table:transaction": (TIMESTAMP, AMOUNT),
    "table:entity": (),
    "text": (TEXT,),
    "events": (DEVICE, TIMESTAMP),
}


def _kind_key(source: SourceSpec) -> str:
    return f"table:{source.grain}" if source.kind == "table" else source.kind


def semantic_problems(spec: FedSpec) -> list[SpecProblem]:
    """Cross-reference checks pydantic cannot express field by field."""
    problems: list[SpecProblem] = []
    add = problems.append
    ids = [p.id for p in spec.parties]
    order = spec.training.order
    if order is not None:
        unknown = sorted(set(order) - set(ids))
        if not order:
            add(SpecProblem(path="training.order", message="names no party; leave it out"))
        elif unknown or len(set(order)) != len(order):
            add(
                SpecProblem(
                    path="training.order",
                    message=f"must name each party at most once; unknown {unknown}"
                    if unknown
                    else "names a party twice",
                )
            )
    entity = spec.consortium.entity
    label = spec.consortium.label
    seen_parties: set[str] = set()
    for i, party in enumerate(spec.parties):
        where = f"parties[{i}]"
        if party.id in seen_parties:
            add(SpecProblem(path=f"{where}.id", message=f"duplicate party id {party.id!r}"))
        seen_parties.add(party.id)
        seen_sources: set[str] = set()
        for j, source in enumerate(party.sources):
            at = f"{where}.sources[{j}]"
            if source.id in seen_sources:
                add(SpecProblem(path=f"{at}.id", message=f"duplicate source id {source.id!r}"))
            seen_sources.add(source.id)
            try:
                _ = source.file_format
            except ValueError as exc:
                add(SpecProblem(path=f"{at}.format", message=str(exc)))
            for name in REQUIRED_BY_KIND[_kind_key(source)]:
                if name not in source.columns:
                    add(
                        SpecProblem(
                            path=f"{at}.columns",
                            message=f"a {source.kind} source needs a '{name}' column mapping",
                        )
                    )
            if source.kind == "events":
                if source.entity_map is None:
                    add(
                        SpecProblem(
                            path=f"{at}.entity_map",
                            message="an events source needs an entity_map (device -> entity)",
                        )
                    )
                else:
                    for name in (DEVICE, entity):
                        if name not in source.entity_map.columns:
                            add(
                                SpecProblem(
                                    path=f"{at}.entity_map.columns",
                                    message=f"needs a '{name}' column mapping",
                                )
                            )
            elif entity not in source.columns:
                add(
                    SpecProblem(
                        path=f"{at}.columns",
                        message=f"needs a mapping for the entity key '{entity}'",
                    )
                )
            for name, column in source.columns.items():
                cat = f"{at}.columns.{name}"
                if column.values and column.dtype not in ("category", "bool", "str"):
                    add(
                        SpecProblem(
                            path=f"{cat}.values",
                            message=f"value maps apply to category/bool/str columns, not {column.dtype}",
                        )
                    )
                if (column.tz or column.format) and column.dtype not in ("datetime", "date"):
                    add(
                        SpecProblem(
                            path=cat, message="tz/format apply only to datetime or date columns"
                        )
                    )
                if column.unit and column.dtype not in ("float", "int"):
                    add(SpecProblem(path=f"{cat}.unit", message="units apply to numeric columns"))
                if column.dtype == "category" and name not in spec.vocabularies:
                    add(
                        SpecProblem(
                            path=cat,
                            message=f"category column '{name}' has no [vocabularies].{name} entry",
                        )
                    )
                if name == label.column and source.grain != "entity":
                    add(
                        SpecProblem(
                            path=cat,
                            message="the label must come from a one-row-per-entity table source",
                        )
                    )
    label_holders = spec.label_party_ids()
    if spec.consortium.layout == "horizontal":
        for i, party in enumerate(spec.parties):
            if party.id not in label_holders:
                add(
                    SpecProblem(
                        path=f"parties[{i}].sources",
                        message=(
                            f"horizontal layout: party {party.id!r} has no source mapping "
                            f"the label column '{label.column}'"
                        ),
                    )
                )
    elif label.party is None:
        add(SpecProblem(path="consortium.label.party", message="vertical layout needs it"))
    elif label.party not in seen_parties:
        add(SpecProblem(path="consortium.label.party", message=f"no party with id {label.party!r}"))
    elif label_holders != [label.party]:
        add(
            SpecProblem(
                path="consortium.label",
                message=(
                    f"vertical layout: exactly party {label.party!r} must map the label "
                    f"column '{label.column}'; found it at {label_holders}"
                ),
            )
        )
    if spec.consortium.layout == "vertical":
        if spec.fusion.mode == "rounds" and not spec.fusion.share_gradients:
            add(
                SpecProblem(
                    path="fusion.share_gradients",
                    message=(
                        "vertical rounds send per-entity gradients (which reveal the labels) "
                        "to every party: set it to true to opt in"
                    ),
                )
            )
        if spec.fusion.mode == "one_shot" and not spec.fusion.share_labels:
            add(
                SpecProblem(
                    path="fusion.share_labels",
                    message=(
                        "vertical one_shot sends the overlap's labels to every party: "
                        "set it to true to opt in"
                    ),
                )
            )
    if spec.consortium.task == "multiclass" and label.num_classes is None:
        add(SpecProblem(path="consortium.label.num_classes", message="multiclass needs it"))
    if spec.fusion.weights is not None:
        unknown = sorted(set(spec.fusion.weights) - seen_parties)
        if unknown:
            add(SpecProblem(path="fusion.weights", message=f"unknown parties {unknown}"))
        if any(w < 0 for w in spec.fusion.weights.values()):
            add(SpecProblem(path="fusion.weights", message="weights must be non-negative"))
    if spec.training.min_parties > len(spec.parties):
        add(
            SpecProblem(
                path="training.min_parties",
                message=f"{spec.training.min_parties} > number of parties ({len(spec.parties)})",
            )
        )
    return problems


@dataclass(frozen=True)
class _Area:
    """A folder of the consortium: a party's store or import area, or the coordinator's store."""

    key: str
    owner: str | None  # party id; None: the coordinator
    what: str  # e.g. "the store of party 'a'"
    shown: str  # as written, plus where it leads when resolving changed it
    real: str


def _shown(written: str, base: str) -> tuple[str, str]:
    """``written`` resolved against ``base`` (``..`` and symlinks): (how to show it, real)."""
    joined = join_location(written, base)
    real = real_location(joined)
    lexical = joined.split("://", 1)[1] if joined.lower().startswith("file://") else joined
    return (written if lexical == real else f"{written} (leads to {real})"), real


def _areas(spec: FedSpec, base: str) -> list[_Area]:
    """The coordinator's store, the parties' stores, then their import areas (so a clash is
    reported at an import area rather than at the store it overlaps)."""
    folders: list[tuple[str, str | None, str, str]] = [
        ("coordinator.store", None, "the coordinator's store", spec.coordinator.store)
    ]
    for i, party in enumerate(spec.parties):
        folders.append(
            (f"parties[{i}].store", party.id, f"the store of party {party.id!r}", party.store)
        )
    for i, party in enumerate(spec.parties):
        folders += [
            (
                f"parties[{i}].imports[{k}]",
                party.id,
                f"an import area of party {party.id!r}",
                folder,
            )
            for k, folder in enumerate(party.imports)
        ]
    areas = []
    for key, owner, what, written in folders:
        shown, real = _shown(written, base)
        areas.append(_Area(key=key, owner=owner, what=what, shown=shown, real=real))
    return areas


def confinement_problems(spec: FedSpec, base: str) -> list[SpecProblem]:
    """Stores apart and sources at home, after resolving ``..`` and symlinks against ``base``.

    The coordinator's store and every party's store and import areas are separate folders,
    none inside another (a party's own store and import areas aside); every source and
    entity map of a party lies in its store or one of its import areas (``imports``).
    Nothing is read: messages name paths as the spec writes them and where they lead.
    """
    problems: list[SpecProblem] = []
    areas = _areas(spec, base)
    for k, area in enumerate(areas):
        for other in areas[:k]:
            if other.owner == area.owner and area.owner is not None:
                continue
            if area.real == other.real:
                relation = "is also"
            elif lies_within(area.real, other.real):
                relation = "lies inside"
            elif lies_within(other.real, area.real):
                relation = "contains"
            else:
                continue
            problems.append(
                SpecProblem(
                    path=area.key,
                    message=f"{area.shown} {relation} {other.what} ({other.shown}); every "
                    "party's store and import areas and the coordinator's store must be "
                    "separate folders, none inside another",
                )
            )
    for i, party in enumerate(spec.parties):
        roots = [a.real for a in areas if a.owner == party.id]
        allowed = f"the store of party {party.id!r} ({party.store})"
        if party.imports:
            allowed += f" and its import areas ({', '.join(party.imports)})"
        for j, source in enumerate(party.sources):
            paths = [(f"parties[{i}].sources[{j}].path", source.path)]
            if source.entity_map is not None:
                paths.append((f"parties[{i}].sources[{j}].entity_map.path", source.entity_map.path))
            for key, written in paths:
                try:
                    confined(join_location(written, base), roots, name=written, area=allowed)
                except ConfinementError as exc:
                    problems.append(
                        SpecProblem(
                            path=key,
                            message=f"{exc}; to read it from elsewhere, list its folder in "
                            f"parties[{i}].imports",
                        )
                    )
    return problems


def _resolve_paths(spec: FedSpec, base: str) -> FedSpec:
    """Return the spec with every relative path resolved against ``base``."""

    def source(s: SourceSpec) -> SourceSpec:
        emap = s.entity_map
        if emap is not None:
            emap = emap.model_copy(update={"path": resolve_location(emap.path, base)})
        return s.model_copy(update={"path": resolve_location(s.path, base), "entity_map": emap})

    parties = [
        p.model_copy(
            update={
                "store": resolve_location(p.store, base),
                "imports": [resolve_location(folder, base) for folder in p.imports],
                "sources": [source(s) for s in p.sources],
            }
        )
        for p in spec.parties
    ]
    coordinator = spec.coordinator.model_copy(
        update={"store": resolve_location(spec.coordinator.store, base)}
    )
    run = spec.run.model_copy(
        update={"results": resolve_location(spec.run.results or DEFAULT_RESULTS, base)}
    )
    return spec.model_copy(update={"parties": parties, "coordinator": coordinator, "run": run})


def parse_spec(data: dict[str, Any], *, source: str, base: str) -> FedSpec:
    """Validate a parsed TOML document; raise :class:`SpecError` listing every problem."""
    try:
        spec = FedSpec.model_validate(data)
    except ValidationError as exc:
        problems = [
            SpecProblem(path=format_loc(err["loc"]), message=err["msg"]) for err in exc.errors()
        ]
        raise SpecError(source, problems) from None
    problems = semantic_problems(spec) + confinement_problems(spec, base)
    if problems:
        raise SpecError(source, problems)
    return _resolve_paths(spec, base)


def load_spec(path: str) -> FedSpec:
    """Read and validate a spec file; relative paths resolve against its folder."""
    import tomllib

    text = read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, [SpecProblem(path="", message=f"not valid TOML: {exc}")]) from None
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    if not is_uri(base):
        from pathlib import Path

        base = str(Path(base).resolve())
    spec = parse_spec(data, source=path, base=base)
    register_storage_options(spec, source=path)
    return spec


def register_storage_options(spec: FedSpec, *, source: str = "spec") -> None:
    """Resolve the storage options each store of ``spec`` references and register them for
    its root (:func:`storage.files.register_options`, this process's memory only); the
    results location gets ``run.storage_options`` or else the coordinator's. A reference
    whose environment variable is not set here is skipped (that party's credentials live on
    its own machine); malformed options raise :class:`SpecError` naming the key."""
    roots: list[tuple[str, str, SecretRef | None]] = [
        ("coordinator.storage_options", spec.coordinator.store, spec.coordinator.storage_options)
    ]
    roots += [
        (f"parties[{i}].storage_options", p.store, p.storage_options)
        for i, p in enumerate(spec.parties)
    ]
    results = spec.run.results or DEFAULT_RESULTS
    if is_uri(results):
        roots.append(
            (
                "run.storage_options",
                results,
                spec.run.storage_options or spec.coordinator.storage_options,
            )
        )
    problems: list[SpecProblem] = []
    for key, root, ref in roots:
        if ref is None:
            continue
        try:
            options = resolve_storage_options(env=ref.env, block=ref.block)
        except StorageOptionsError as exc:
            problems.append(SpecProblem(path=key, message=str(exc)))
            continue
        if options:
            register_options(root, options)
        else:
            logger.info("%s: %s is not set here; %s uses default credentials", key, ref.env, root)
    if problems:
        raise SpecError(source, problems)


def summary(spec: FedSpec) -> str:
    c = spec.consortium
    lines = [
        f"consortium {c.name!r}: {c.layout} layout, {c.task} task, label '{c.label.column}', "
        f"entity '{c.entity}', as_of {c.as_of.isoformat()}",
    ]
    for party in spec.parties:
        kinds = ", ".join(
            f"{s.id} ({s.kind}{'/' + s.grain if s.kind == 'table' else ''}, {s.file_format})"
            for s in party.sources
        )
        pool = f", work pool {party.work_pool}" if party.work_pool else ""
        lines.append(f"  party {party.id}: {len(party.sources)} source(s): {kinds}{pool}")
    t = spec.training
    lines.append(
        f"  training: {t.rounds} rounds x {t.trees_per_round} trees, aggregation {t.aggregation}"
    )
    return "\n".join(lines)
