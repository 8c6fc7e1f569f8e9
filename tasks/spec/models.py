"""The consortium spec: its pydantic models, the problem and error types.

A spec is one TOML file. These models check it field by field; the cross-reference checks
live in :mod:`tasks.spec.checks` and reading a file in :mod:`tasks.spec.load`. Every
problem is a :class:`SpecProblem` with the key path it is about, e.g.
``parties[1].sources[0].columns.amount: ...``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import zoneinfo
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from tasks.prepare.units import UNITS
from tasks.types import (
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
    """The ``features`` options every kind of source has; a modality's options model
    (:attr:`tasks.prepare.modalities.base.Modality.options`) adds its own."""

    prefix: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Feature name prefix (default: the kind's, e.g. txn, profile, text, events)",
    )


class SourceSpec(SpecModel):
    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    kind: SourceKind = Field(
        description="A registered modality (tasks/prepare/modalities: table, text, events, ...)"
    )
    path: str
    test_path: str | None = Field(
        default=None,
        description="Label source only: an external test file of the same format and columns "
        "as path; its entities are the test split (confined to the party's store like path)",
    )
    format: FileFormat | None = None
    grain: TableGrain = "transaction"
    encoding: str = "utf8"
    columns: dict[str, ColumnSpec]
    entity_map: EntityMapSpec | None = None
    features: SerializeAsAny[FeatureOptions] = Field(
        default_factory=FeatureOptions,
        validate_default=True,
        description="Feature options; which keys a source takes depends on its kind",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from tasks.prepare.modalities import modality_names

        known = modality_names()
        if value not in known:
            raise ValueError(f"unknown kind {value!r}; known: {', '.join(known)}")
        return value

    @field_validator("features", mode="before")
    @classmethod
    def _kind_options(cls, value: object, info: ValidationInfo) -> object:
        """Validate the options with the model of the source's kind (not at all when the
        kind is unknown: that error is reported at ``kind``)."""
        kind = info.data.get("kind")
        if kind is None:
            return FeatureOptions()
        from tasks.prepare.modalities import modality

        model = modality(kind).options
        if isinstance(value, model):
            return value
        if isinstance(value, FeatureOptions):
            value = value.model_dump(exclude_unset=True)
        # an option of another kind (e.g. windows on a text source) would have no effect:
        # refused like an unknown key, at its own key path
        return model.model_validate(value)

    @property
    def file_format(self) -> FileFormat:
        return self.format or infer_format(self.path)


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


#: The canonical split names, as the split column of a fused table holds them.
SPLIT_NAMES: dict[str, str] = {"train": "train", "validation": "valid", "test": "test"}


class SplitValues(SpecModel):
    """Which raw values of the split column put an entity in which split."""

    train: str | list[str] = Field(
        default="train", description="Raw value(s) of the split column meaning the train split"
    )
    validation: str | list[str] = Field(
        default="valid",
        description="Raw value(s) meaning the validation split (early stopping)",
    )
    test: str | list[str] = Field(default="test", description="Raw value(s) meaning the test split")

    @model_validator(mode="after")
    def _distinct(self) -> SplitValues:
        seen: dict[str, str] = {}
        for split in SPLIT_NAMES:
            values = getattr(self, split)
            listed = [values] if isinstance(values, str) else values
            if not listed:
                raise ValueError(f"'{split}' lists no value")
            for value in listed:
                if not value.strip():
                    raise ValueError(f"'{split}' holds an empty value")
                if value in seen and seen[value] != split:
                    raise ValueError(f"a value is listed for both '{seen[value]}' and '{split}'")
                seen[value] = split
        return self

    def mapping(self) -> dict[str, str]:
        """Raw value -> canonical split name (``train``, ``valid``, ``test``)."""
        out: dict[str, str] = {}
        for split, name in SPLIT_NAMES.items():
            values = getattr(self, split)
            for value in [values] if isinstance(values, str) else values:
                out[value] = name
        return out


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
    split_column: str | None = Field(
        default=None,
        min_length=1,
        description="Canonical column of the label source whose value decides each entity's "
        "split (instead of the hashed key); mapped with dtype str",
    )
    split_values: SplitValues = Field(
        default_factory=SplitValues,
        description="Raw values of split_column for the train, validation and test splits",
    )
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


def label_source(spec: FedSpec, party: PartySpec) -> SourceSpec | None:
    for source in party.sources:
        if spec.consortium.label.column in source.columns:
            return source
    return None
