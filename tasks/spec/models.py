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
import os
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

    env: str | None = Field(default=None, description="Name of an environment variable")
    block: str | None = Field(default=None, description="Name of a Prefect Secret block")

    @model_validator(mode="after")
    def _one_of(self) -> SecretRef:
        if (self.env is None) == (self.block is None):
            raise ValueError("give exactly one of 'env' (environment variable) or 'block'")
        return self


class LabelSpec(SpecModel):
    column: str = Field(description="Canonical name of the label column")
    party: str | None = Field(default=None, description="Label-holding party (vertical layout)")
    num_classes: int | None = Field(
        default=None, ge=3, description="Number of classes of a multiclass task"
    )
    positive: str | None = Field(
        default=None,
        min_length=1,
        description="Binary task: the raw label value that is class 1 (compared to the cell "
        "with surrounding spaces removed); every other non-missing value is class 0",
    )
    values: dict[str, float] | None = Field(
        default=None,
        min_length=1,
        description="Raw label value -> label value (finite numbers; binary: 0 or 1); a cell "
        "outside the map is quarantined",
    )

    @field_validator("values")
    @classmethod
    def _finite_values(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            bad = sorted(raw for raw, number in value.items() if not math.isfinite(number))
            if bad:
                raise ValueError(f"label values must be finite numbers, not for {bad}")
        return value

    @model_validator(mode="after")
    def _one_mapping(self) -> LabelSpec:
        if self.positive is not None and self.values is not None:
            raise ValueError("give 'positive' or 'values', not both")
        return self


class ConsortiumSpec(SpecModel):
    name: str = Field(min_length=1, description="Name of the consortium")
    layout: Layout = Field(
        default="horizontal",
        description="horizontal: parties hold different entities with the same features; "
        "vertical: the same entities with different features",
    )
    entity: str = Field(
        default="customer_id", min_length=1, description="Canonical name of the entity key"
    )
    key_normalisation: KeyNormalisation = Field(
        default="strip_lower",
        description="How entity keys are normalised before hashing (strip_lower also "
        "NFKC-normalises)",
    )
    secret: SecretRef = Field(
        description="Where the key-hashing secret lives (env or block); never the secret"
    )
    task: Objective = Field(default="binary", description="The learning task")
    label: LabelSpec = Field(description="The label column and who holds it")
    as_of: dt.date = Field(description="End of every feature window (never the wall clock)")


class ColumnSpec(SpecModel):
    """One canonical column and where it comes from in the party's own export."""

    source: str | None = Field(default=None, alias="from", description="Raw column name")
    dtype: ColumnType = Field(description="Canonical type the raw values are coerced to")
    unit: str | None = Field(
        default=None, description="Unit of the raw values, converted to the canonical unit"
    )
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

    path: str = Field(description="Location of the map (relative to the spec's folder)")
    format: FileFormat | None = Field(
        default=None, description="File format (default: from the file's suffix)"
    )
    columns: dict[str, ColumnSpec] = Field(
        description="Canonical column -> mapping; the source key and the entity key"
    )


class CsvOptions(SpecModel):
    """How a CSV source is laid out: header, column names, delimiter, missing values,
    preamble and comment lines, quoting."""

    header: bool = Field(
        default=True, description="Whether the first line (after skip_rows) is a header"
    )
    names: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Column names in file order; required when header = false, replaces the "
        "header otherwise",
    )
    delimiter: str = Field(
        default=",", min_length=1, max_length=1, description="Field delimiter (one character)"
    )
    null_values: list[str] = Field(
        default_factory=list,
        description="Cell texts read as missing (besides the empty cell), e.g. ['?', 'NA']",
    )
    skip_rows: int = Field(
        default=0, ge=0, le=1_000_000, description="Lines skipped before the header (preamble)"
    )
    comment_prefix: str | None = Field(
        default=None,
        min_length=1,
        max_length=5,
        description="Lines starting with it are comments, skipped (not counted as data rows)",
    )
    quote_char: str = Field(
        default='"', max_length=1, description='Quote character (one character; "" for none)'
    )

    @field_validator("names")
    @classmethod
    def _distinct_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if any(not name for name in value):
            raise ValueError("column names must not be empty")
        reserved = sorted(name for name in value if name.startswith("__"))
        if reserved:
            raise ValueError(f"names starting with '__' are fedfuse's own columns: {reserved}")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"duplicate column names {repeated}")
        return value

    @field_validator("delimiter", "quote_char")
    @classmethod
    def _not_a_line_break(cls, value: str) -> str:
        if value in ("\n", "\r"):
            raise ValueError("must not be a line break")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CsvOptions:
        if not self.header and self.names is None:
            raise ValueError("header = false needs 'names' (the column names in file order)")
        if self.delimiter == self.quote_char:
            raise ValueError("delimiter and quote_char must differ")
        if self.comment_prefix is not None and self.comment_prefix.startswith(self.delimiter):
            raise ValueError("comment_prefix must not start with the delimiter")
        return self


class KeySpec(SpecModel):
    """How a source's rows reach the entity key when no column holds it: the data row
    number, or a composite of raw columns."""

    row_number: bool = Field(
        default=False, description="The 1-based data row number is the entity id"
    )
    columns: list[str] = Field(
        default_factory=list,
        description="Raw columns (as named in the export) whose values, joined by '|', are "
        "the entity id",
    )

    @field_validator("columns")
    @classmethod
    def _distinct_columns(cls, value: list[str]) -> list[str]:
        if any(not name for name in value):
            raise ValueError("column names must not be empty")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"duplicate key columns {repeated}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> KeySpec:
        if self.row_number == bool(self.columns):
            raise ValueError("give exactly one of 'row_number = true' or 'columns = [...]'")
        return self


class FeatureOptions(SpecModel):
    """The ``features`` options every kind of source has; a modality's options model
    (:attr:`tasks.prepare.modalities.base.Modality.options`) adds its own."""

    prefix: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Feature name prefix (default: the kind's, e.g. txn, profile, text, events)",
    )


class SourceSpec(SpecModel):
    id: str = Field(
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="Source id, unique within its party (names its tables and reports)",
    )
    kind: SourceKind = Field(
        description="A registered modality (tasks/prepare/modalities: table, text, events, ...)"
    )
    path: str = Field(
        description="Location of the export, a file or (for kinds that read folders) a "
        "folder; relative to the spec's folder"
    )
    test_path: str | None = Field(
        default=None,
        description="Label source only: an external test file of the same format and columns "
        "as path; its entities are the test split (confined to the party's store like path)",
    )
    format: FileFormat | None = Field(
        default=None, description="File format (default: from the file's suffix)"
    )
    grain: TableGrain = Field(
        default="transaction",
        description="table sources: one row per entity (entity) or per event (transaction)",
    )
    encoding: str = Field(default="utf8", description="Text encoding of the export")
    columns: dict[str, ColumnSpec] = Field(
        description="Canonical column -> where it comes from in the export"
    )
    entity_map: EntityMapSpec | None = Field(
        default=None, description="events sources: the device -> entity table"
    )
    csv: CsvOptions | None = Field(
        default=None, description="CSV layout options (CSV sources only)"
    )
    key: KeySpec | None = Field(
        default=None,
        description="The entity key from the row number or a composite of raw columns "
        "(instead of an entity column in 'columns')",
    )
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
    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="Party id, unique")
    store: str = Field(
        description="The party's store: a local folder (relative to the spec's folder) or a "
        "file-system URI (s3://, gs://, ...)"
    )
    imports: list[str] = Field(
        default_factory=list,
        description="Folders outside the store this party's sources may be read from",
    )
    work_pool: str | None = Field(
        default=None,
        description="Prefect work pool whose worker runs this party's steps (default: in process)",
    )
    lossless_address: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9.\-]+:[0-9]{1,5}$",
        description="Lossless mode with parties on their own pools: host:port this party's "
        "LightGBM listens on, an address of its machine the other parties reach (a private "
        "network or tunnel: LightGBM's sockets are plain TCP); port 0: a free port picked at "
        "start",
    )
    storage_options: SecretRef | None = Field(
        default=None,
        description="Where the fsspec storage options (credentials) of the store live: a JSON "
        "object in an environment variable or a Prefect Secret block; never the options",
    )
    sources: list[SourceSpec] = Field(min_length=1, description="The party's exports")

    @field_validator("lossless_address")
    @classmethod
    def _port_in_range(cls, value: str | None) -> str | None:
        if value is not None and int(value.rpartition(":")[2]) > 65535:
            raise ValueError(f"port of {value!r} is above 65535")
        return value

    @property
    def roots(self) -> list[str]:
        """The folders this party's sources may be read from: its store and import areas."""
        return [self.store, *self.imports]


class CoordinatorSpec(SpecModel):
    store: str = Field(
        description="The coordinator's store (models, checkpoints, reports): a local folder or "
        "a file-system URI"
    )
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
        "the consortium's bin boundaries are forced", "training.bins",
        "forcedbins_filename", "max_bin_by_feature",
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
    rounds: int = Field(default=30, ge=1, le=10_000, description="Round limit")
    trees_per_round: int = Field(
        default=4, ge=1, le=1000, description="Trees each party fits per round"
    )
    learning_rate: float = Field(
        default=0.1, gt=0, le=1, allow_inf_nan=False, description="LightGBM learning rate"
    )
    num_leaves: int = Field(
        default=31, ge=2, le=131_072, description="Leaves per tree, at most LightGBM's 131072"
    )
    min_data_in_leaf: int = Field(
        default=20, ge=1, le=1_000_000, description="Fewest rows in a leaf"
    )
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
    patience: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Early stopping: rounds without a better pooled validation loss",
    )
    validation_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=0.5,
        allow_inf_nan=False,
        description="Share of entities in the validation split (from the hashed key)",
    )
    test_fraction: float = Field(
        default=0.2,
        ge=0,
        lt=0.5,
        allow_inf_nan=False,
        description="Share of entities in the test split (from the hashed key)",
    )
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
    min_parties: int = Field(
        default=1, ge=1, le=1000, description="Quorum: accepted updates a round needs"
    )
    max_trees: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Tree budget of a run (none: no budget)"
    )
    max_seconds: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TRAINING_SECONDS,
        allow_inf_nan=False,
        description="Stop training after this many seconds of wall time (the round running "
        "then finishes)",
    )
    seed: int = Field(default=0, description="Seeds every party's fits")
    mode: Literal["averaging", "lossless"] = Field(
        default="averaging",
        description="averaging: party models averaged per round; lossless: LightGBM data-parallel",
    )
    bins: Literal["consortium", "party"] = Field(
        default="party",
        description="Horizontal layout. consortium: every party's LightGBM bins numerical "
        "features with boundaries merged from all parties' KLL quantile sketches (only "
        "sketches leave a party); party: each LightGBM bins from its own rows",
    )
    leaf_values: Literal["party", "consortium"] = Field(
        default="party",
        description="Averaging mode. consortium: each accepted tree keeps its party's "
        "structure and gets the consortium's Newton leaf values from every party's per-leaf "
        "gradient sums (leaves with fewer than min_data_in_leaf of a party's rows count as "
        "empty there); party: the values its party fitted",
    )
    min_sketch_rows: int = Field(
        default=200,
        ge=1,
        le=1_000_000_000,
        description="Fewest training rows a party needs to send its sketches (below it the "
        "party sends none and still bins with the consortium's boundaries)",
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
    join: JoinKind = Field(
        default="left",
        description="How a party's aligned sources are joined on the hashed key: left keeps "
        "every labelled entity (without a label: every entity of any source), inner only the "
        "entities every source knows",
    )
    weights: dict[str, float] | None = Field(
        default=None,
        description="Vertical: party id -> weight of its output in the fused score "
        "(default: equal)",
    )
    learned: bool = Field(
        default=False,
        description="Vertical one_shot: learn the weights on the validation scores "
        "(logistic stacking; non-negative least squares for regression)",
    )
    min_overlap: int = Field(
        default=100, ge=1, description="Vertical: fewest entities at every party (PSI)"
    )
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


#: Upper bound of ``[run] max_parallel_parties`` and ``max_parallel_sources``.
MAX_PARALLEL = 64


def default_parallelism() -> int:
    """The CPU count of this machine, within 1..:data:`MAX_PARALLEL`."""
    return max(1, min(os.cpu_count() or 1, MAX_PARALLEL))


#: Most entity-hash shards a source can be split into.
MAX_SHARDS = 4096
#: Where a party's shard steps run.
Engine = Literal["local", "dask"]
#: A Dask scheduler address: protocol, host and port.
DASK_ADDRESS = r"^(tcp|tls|ucx|inproc)://[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$"


class RunSpec(SpecModel):
    results: str | None = Field(
        default=None, description="Folder for persisted task results (default: .fedfuse/results)"
    )
    party_timeout: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds the coordinator waits for a step dispatched to a party's pool",
    )
    join_timeout: float = Field(
        default=600.0,
        gt=0,
        le=86400,
        description="Lossless mode with parties on their own pools (horizontal): seconds every party has to "
        "join (its worker starts the step, reads its rows and reports its address); a party "
        "that has not fails the run with its name",
    )
    storage_options: SecretRef | None = Field(
        default=None,
        description="Storage options of the results location, referenced like the secret "
        "(default: the coordinator's)",
    )
    max_parallel_parties: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=MAX_PARALLEL,
        description="Party pipelines prepare runs at once, in process or on the parties' "
        "pools (default: the coordinator machine's CPU count, at most 64)",
    )
    max_parallel_sources: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=MAX_PARALLEL,
        description="Steps of one party's sources that run at once in a pipeline run in "
        "process (default: the CPU count, at most 64; a party's pool uses its machine's)",
    )

    shards: int = Field(
        default=1,
        strict=True,
        ge=1,
        le=MAX_SHARDS,
        description="Entity-hash shards each source of a party is read, preprocessed and "
        "featurised in (each shard only its own entities' rows; the shards' feature tables "
        "are concatenated per source; results do not depend on it)",
    )
    engine: Engine = Field(
        default="local",
        description="Where shard steps run: local (the pipeline's own threads) or dask (a "
        "Dask cluster of the party's, at dask_address or the address in dask_address_env)",
    )
    dask_address: str | None = Field(
        default=None,
        pattern=DASK_ADDRESS,
        description="engine = dask: the scheduler address, e.g. 'tcp://10.0.0.5:8786'",
    )
    dask_address_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="engine = dask: environment variable holding the scheduler address, read "
        "where the party's pipeline runs (each party can point at its own cluster)",
    )

    @model_validator(mode="after")
    def _dask_address(self) -> RunSpec:
        given = [k for k in ("dask_address", "dask_address_env") if getattr(self, k) is not None]
        if self.engine == "dask" and len(given) != 1:
            raise ValueError(
                "engine = 'dask' needs exactly one of 'dask_address' (e.g. "
                "'tcp://10.0.0.5:8786') or 'dask_address_env' (an environment variable "
                f"holding it); {'both are' if given else 'neither is'} given"
            )
        if self.engine != "dask" and given:
            raise ValueError(
                f"'{given[0]}' is set but engine is {self.engine!r}; set engine = 'dask'"
            )
        return self

    def parallel_parties(self) -> int:
        """How many party pipelines run at once."""
        return self.max_parallel_parties or default_parallelism()

    def parallel_sources(self) -> int:
        """How many source steps of one party run at once."""
        return self.max_parallel_sources or default_parallelism()


#: The bucket a vocabulary with ``other`` maps every value outside it to.
OTHER = "other"
#: Largest ``max_size`` a vocabulary may give.
MAX_VOCABULARY_SIZE = 100_000
#: Longest vocabulary value: values become parts of feature names (``txn__share_<value>``).
MAX_VALUE_LENGTH = 64
#: Characters a vocabulary value may not hold: LightGBM refuses them in feature names.
FORBIDDEN_VALUE_CHARACTERS = frozenset('",:[]{}')


def vocabulary_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be a vocabulary value (``None`` when it can): empty, padded with
    spaces (cells are compared stripped), too long, or holding a character a feature name
    may not hold. The reason never quotes the value."""
    if not value or value.strip() != value:
        return "is empty or has surrounding spaces (cells are compared stripped)"
    if len(value) > MAX_VALUE_LENGTH:
        return f"is longer than {MAX_VALUE_LENGTH} characters (values name features)"
    if any(c in FORBIDDEN_VALUE_CHARACTERS or not c.isprintable() for c in value):
        return 'holds a control character or one of " , : [ ] { } (values name features)'
    return None


class VocabularySpec(SpecModel):
    """The consortium's values of one category column: listed, or learned from the parties'
    thresholded entity counts at ``prepare``. A plain list is short for ``values = [...]``."""

    values: list[str] | None = Field(
        default=None,
        description="The values, in order (a multiclass label's order is its class index)",
    )
    learn: bool = Field(
        default=False,
        description="Learn the values at prepare from the parties' entity counts per value "
        "(only counts of values held by at least min_entities entities leave a party)",
    )
    min_entities: int = Field(
        default=10,
        ge=1,
        description="learn: a party counts a value only when at least this many of its "
        "entities hold it",
    )
    max_size: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VOCABULARY_SIZE,
        description="At most this many values (learn: the most frequent; the other bucket "
        "comes in addition)",
    )
    other: bool = Field(
        default=False,
        description="Map values outside the vocabulary to an 'other' value instead of missing "
        "(a list holding 'other' does the same)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: object) -> object:
        return {"values": value} if isinstance(value, list) else value

    @field_validator("values")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("an empty vocabulary: list at least one value (or learn = true)")
        seen: dict[str, int] = {}
        for i, item in enumerate(value):
            problem = vocabulary_value_problem(item)
            if problem is not None:
                raise ValueError(f"value {i + 1} {problem}")
            if item in seen:
                raise ValueError(
                    f"duplicate value {item!r} (positions {seen[item] + 1} and {i + 1})"
                )
            seen[item] = i
        return value

    @model_validator(mode="after")
    def _one_source(self) -> VocabularySpec:
        if (self.values is None) == (not self.learn):
            raise ValueError(
                "give exactly one of 'values' (a list) or learn = true"
                if self.values is None
                else "give either 'values' or learn = true, not both"
            )
        if not self.learn and "min_entities" in self.model_fields_set:
            raise ValueError("min_entities applies to learn = true only")
        if self.values is not None and self.max_size is not None:
            listed = len([v for v in self.values if v != OTHER])
            if listed > self.max_size:
                raise ValueError(f"lists {listed} values, more than max_size = {self.max_size}")
        return self

    @property
    def has_other(self) -> bool:
        """Whether values outside the vocabulary map to :data:`OTHER`."""
        return self.other or (self.values is not None and OTHER in self.values)


class TextSpec(SpecModel):
    """The consortium TF-IDF vocabulary and federated linear text model (horizontal), or
    each text party's linear text block (vertical)."""

    model: bool = Field(
        default=False,
        description="Horizontal: learn a consortium TF-IDF vocabulary at prepare, train a "
        "linear model on it by FedAvg and add its out-of-fold score to every text source's "
        "features. Vertical: each text party fits a linear model on its own TF-IDF vectors "
        "against the round-1 gradients (rounds) or the shared labels (one_shot) and adds "
        "its out-of-fold score to its block",
    )
    min_documents: int = Field(
        default=5,
        ge=1,
        description="k: a party reports a term only when at least this many of its texts hold it",
    )
    min_parties: int = Field(
        default=2,
        ge=1,
        description="m: a term enters the vocabulary only when at least this many parties "
        "report it (at most the number of parties with a text source)",
    )
    max_terms: int = Field(
        default=5000, ge=1, le=100_000, description="Most frequent terms kept (TF-IDF columns)"
    )
    ngram_max: int = Field(default=2, ge=1, le=3, description="Longest word n-gram of a term")
    folds: int = Field(
        default=5, ge=2, le=20, description="Cross-fitting folds (by a hash of the entity key)"
    )
    rounds: int = Field(default=5, ge=1, le=100, description="FedAvg rounds of the text model")
    epochs: int = Field(default=2, ge=1, le=50, description="Local SGD epochs per round")
    learning_rate: float = Field(
        default=0.5, gt=0, le=10, description="Constant SGD step of the text model"
    )
    alpha: float = Field(default=1e-5, gt=0, le=1, description="L2 penalty of the text model")


class DefaultsSpec(SpecModel):
    """Keys a party that leaves them out takes, ``{party}`` in every string value replaced by
    the party's id (:mod:`tasks.spec.defaults`); a party that gives a key keeps its own."""

    store: str | None = Field(
        default=None, description="Store of every party that gives none, e.g. 'stores/{party}'"
    )
    imports: list[str] | None = Field(
        default=None, description="Import areas of every party that gives none"
    )
    work_pool: str | None = Field(
        default=None, description="Work pool of every party that gives none, e.g. 'pool-{party}'"
    )
    storage_options: SecretRef | None = Field(
        default=None,
        description="Storage options reference of every party that gives none "
        "(e.g. env = 'FEDFUSE_S3_{party}')",
    )
    sources: list[SourceSpec] | None = Field(
        default=None,
        description="Source tables of every party that gives none, as [[parties.sources]] "
        "(a party that lists sources lists all of its own)",
    )


class FedSpec(SpecModel):
    consortium: ConsortiumSpec = Field(description="Who, what and how of the consortium")
    parties: list[PartySpec] = Field(min_length=1, description="The parties and their sources")
    coordinator: CoordinatorSpec = Field(description="The coordinator's store")
    vocabularies: dict[str, VocabularySpec] = Field(
        default_factory=dict,
        description="Category vocabularies by canonical column: a list of values (short for "
        "values = [...]) or a table with values or learn = true",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training settings")
    fusion: FusionSpec = Field(
        default_factory=FusionSpec, description="Joining sources and vertical fusion"
    )
    run: RunSpec = Field(default_factory=RunSpec, description="Where results persist")
    text: TextSpec = Field(
        default_factory=TextSpec, description="Consortium TF-IDF vocabulary and text model"
    )
    defaults: DefaultsSpec | None = Field(
        default=None,
        exclude=True,
        description="Keys a party that omits them takes ({party} replaced by its id); "
        "already applied to the parties, and left out of the spec's dumps and fingerprints",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_defaults(cls, data: object) -> object:
        """Every party takes the ``[defaults]`` keys it leaves out, before validation."""
        from tasks.spec.defaults import apply_defaults

        return apply_defaults(data, DefaultsSpec.model_fields)

    def party(self, party_id: str) -> PartySpec:
        for party in self.parties:
            if party.id == party_id:
                return party
        raise KeyError(f"no party {party_id!r} in consortium {self.consortium.name!r}")

    def learned_vocabularies(self) -> dict[str, VocabularySpec]:
        """The vocabularies learned at ``prepare`` (``learn = true``), by column."""
        return {name: v for name, v in self.vocabularies.items() if v.learn}

    def vocabulary_fingerprint(self) -> str:
        """Hash of what decides a learned vocabulary: the consortium section (``as_of``
        aside), the parties' ids and sources (not their stores or pools), and the
        vocabularies section."""
        blob = json.dumps(
            {
                "consortium": self.consortium.model_dump(mode="json", exclude={"as_of"}),
                "parties": [
                    p.model_dump(mode="json", by_alias=True, include={"id", "sources"})
                    for p in self.parties
                ],
                "vocabularies": {
                    k: v.model_dump(mode="json") for k, v in sorted(self.vocabularies.items())
                },
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def text_fingerprint(self) -> str:
        """Hash of what decides the text vocabulary and model: the vocabulary fingerprint's
        parts, the ``[text]`` section and the training split settings."""
        blob = json.dumps(
            {
                "vocabulary": self.vocabulary_fingerprint(),
                "text": self.text.model_dump(mode="json"),
                "split": self.training.model_dump(
                    mode="json",
                    include={"validation_fraction", "test_fraction", "split_column", "seed"},
                ),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def consortium_text_model(self) -> bool:
        """Whether ``prepare`` learns the consortium text model (``[text] model`` in the
        horizontal layout; a vertical text party fits its own block at training)."""
        return self.text.model and self.consortium.layout == "horizontal"

    def text_parties(self) -> list[str]:
        """The parties with a text source."""
        return [p.id for p in self.parties if any(s.kind == "text" for s in p.sources)]

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
