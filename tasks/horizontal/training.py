"""A party's local side of horizontal training: splits, LightGBM params, label statistics,
base score, local update fits, evaluation, metric aggregation and early stopping.

Every party holds a fused table (``entity_hash``, ``label``, the consortium's feature
columns). It splits its rows into train/valid/test from the entity hash
(:func:`split_assignments`) or the label source's decided split (:func:`frame_splits`), reports only label aggregates (:class:`LabelStats`) from which
the coordinator computes the base score F_0 (:func:`base_score`), fits each round's trees
from its running raw scores as ``init_score`` (:func:`train_update`, params from
:func:`lgb_params`) and evaluates raw scores (:func:`evaluate`); the coordinator aggregates
the metrics (:func:`aggregate_metrics`, weighted by validation size) and applies federated
early stopping (:class:`EarlyStopping`). The in-memory loop (:mod:`tasks.horizontal.loop`),
the Prefect steps (:mod:`tasks.horizontal.steps`), lossless mode and the vertical layout
reuse these. Nothing here reads files or the clock, and every random choice is seeded from
the spec.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import lightgbm as lgb
import numpy as np
import polars as pl
from pydantic import BaseModel, Field
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, roc_auc_score

from tasks.horizontal.ensemble import feature_matrix
from tasks.horizontal.model_text import LGB_OBJECTIVE, without_params
from tasks.horizontal.score_histograms import ScoreHistogram, pooled_auc, sum_histograms
from tasks.links import sigmoid, softmax
from tasks.spec.models import RESERVED_PARAMS as RESERVED_PARAMS  # noqa: PLC0414  (re-exported)
from tasks.spec.models import ParamValue, TrainingSpec
from tasks.types import ENTITY_HASH, LABEL, SPLIT, Objective

Split = Literal["train", "valid", "test"]

#: A LightGBM param value: a scalar, or a custom objective function (``objective=fn``).
LgbParamValue = ParamValue | Callable[..., object]
#: LightGBM params of one local fit.
LgbParams = dict[str, LgbParamValue]

#: Validation metric that drives early stopping (lower is better).
LOSS_METRIC: dict[str, str] = {"binary": "logloss", "multiclass": "logloss", "regression": "rmse"}


# --------------------------------------------------------------------------------------
# Splits, params, label statistics, base score
# --------------------------------------------------------------------------------------


def split_assignments(
    entity_hash: pl.Series, *, validation_fraction: float, test_fraction: float
) -> pl.Series:
    """ "train" / "valid" / "test" per row, from the entity hash alone (no RNG, no clock).

    u = int(first 8 hex digits) / 2**32 is uniform on [0, 1) for HMAC keys; rows with
    u < test_fraction are test, then the next ``validation_fraction`` valid, the rest train.
    The same entity lands in the same split at every party and in every run.
    """
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1):
        raise ValueError("fractions must be in [0, 1)")
    if validation_fraction + test_fraction >= 1:
        raise ValueError("validation_fraction + test_fraction leaves no training rows")
    if entity_hash.null_count():
        raise ValueError(f"'{entity_hash.name}' has {entity_hash.null_count()} null keys")
    prefix = entity_hash.cast(pl.String).str.slice(0, 8)
    if (prefix.str.len_chars() < 8).any():
        raise ValueError(f"'{entity_hash.name}' holds keys shorter than 8 hex digits")
    try:
        u = prefix.str.to_integer(base=16, strict=True).cast(pl.Float64) / 2.0**32
    except pl.exceptions.PolarsError:  # polars' message quotes the keys: count them instead
        bad = ~prefix.str.contains("^[0-9A-Fa-f]{8}$")
        raise ValueError(
            f"'{entity_hash.name}' holds non-hex keys ({int(bad.sum())} row(s), first at row "
            f"{int(bad.arg_true()[0])})"
        ) from None
    frame = pl.DataFrame({"u": u})
    out = frame.select(
        pl.when(pl.col("u") < test_fraction)
        .then(pl.lit("test"))
        .when(pl.col("u") < test_fraction + validation_fraction)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split")
    )
    return out.to_series()


def frame_splits(
    frame: pl.DataFrame, *, validation_fraction: float, test_fraction: float
) -> pl.Series:
    """The split of every row of a fused table: its ``__split`` column where the label
    source decided it (a split column, an external test file), else the hashed key
    (:func:`split_assignments`).

    A party whose decided splits hold no validation row carves its validation rows from its
    train rows by the hashed key (``validation_fraction`` of them), so federated early
    stopping is defined at every party; its test rows stay exactly those decided.
    """
    hashed = split_assignments(
        frame[ENTITY_HASH], validation_fraction=validation_fraction, test_fraction=test_fraction
    )
    if SPLIT not in frame.columns:
        return hashed
    decided = frame[SPLIT].cast(pl.String)
    unknown = decided.is_not_null() & ~decided.is_in(["train", "valid", "test"])
    if unknown.any():
        raise ValueError(
            f"'{SPLIT}' holds {int(unknown.sum())} row(s) that are not train, valid or test "
            "(prepare writes only those: rerun it)"
        )
    carve = split_assignments(
        frame[ENTITY_HASH], validation_fraction=validation_fraction, test_fraction=0.0
    )
    out = pl.DataFrame({"d": decided, "h": hashed, "c": carve}).select(
        pl.when(pl.col("d").is_null())
        .then(pl.col("h"))
        .when((pl.col("d") == "train") & ~(pl.col("d") == "valid").any() & (pl.col("c") == "valid"))
        .then(pl.lit("valid"))
        .otherwise(pl.col("d"))
        .alias("split")
    )
    return out.to_series()


def lgb_params(
    training_spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    *,
    seed: int,
    learning_rate: float | None = None,
) -> LgbParams:
    """LightGBM params of one party's local fit: deterministic, quiet, single-threaded.

    ``num_class`` counts raw-score columns (1 for binary and regression). Categorical
    features are passed to the ``Dataset`` (native handling), not as a param. The spec's
    extra ``params`` may tune the trees (regularisation, ``max_bin``, ``num_threads``, ...)
    but not the keys in :data:`RESERVED_PARAMS`.
    """
    reserved = sorted(set(training_spec.params) & RESERVED_PARAMS)
    if reserved:
        raise ValueError(f"training.params may not set {reserved}: the round controls them")
    params: LgbParams = {
        "objective": LGB_OBJECTIVE[objective],
        "learning_rate": training_spec.learning_rate if learning_rate is None else learning_rate,
        "num_leaves": training_spec.num_leaves,
        "min_data_in_leaf": training_spec.min_data_in_leaf,
        "boosting": "gbdt",
        "boost_from_average": False,
        "deterministic": True,
        "force_col_wise": True,
        "num_threads": 1,
        "seed": seed,
        "verbose": -1,
        "feature_pre_filter": False,
    }
    if objective == "multiclass":
        params["num_class"] = num_class
    params.update(training_spec.params)
    return params


def party_seed(seed: int, party: str, round_: int) -> int:
    """A stable per-party, per-round seed (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{party}:{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


class LabelStats(BaseModel):
    """Label aggregates of one party's training split: all the base score needs."""

    n_train: int = Field(ge=0)
    label_sum: float = 0.0
    label_sq_sum: float = 0.0
    class_counts: list[int] = Field(default_factory=list)


class LabelStatsLike(Protocol):
    @property
    def n_train(self) -> int: ...
    @property
    def label_sum(self) -> float: ...
    @property
    def class_counts(self) -> Sequence[int]: ...


def check_labels(y: np.ndarray, objective: Objective, num_class: int) -> None:
    if not np.all(np.isfinite(y)):
        raise ValueError("labels contain null/NaN/inf values")
    if objective == "binary" and not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    if objective == "multiclass" and not (
        np.all(y == np.round(y)) and np.all((y >= 0) & (y < num_class))
    ):
        raise ValueError(f"multiclass labels must be integers 0..{num_class - 1}")


def label_stats(y: np.ndarray, objective: Objective, num_class: int) -> LabelStats:
    y = np.asarray(y, dtype=np.float64)
    check_labels(y, objective, num_class)
    counts = (
        np.bincount(y.astype(np.int64), minlength=num_class).tolist()
        if objective == "multiclass"
        else []
    )
    return LabelStats(
        n_train=len(y),
        label_sum=float(y.sum()),
        label_sq_sum=float((y**2).sum()),
        class_counts=[int(c) for c in counts],
    )


PRIOR_FLOOR = 1e-7


def base_score(
    stats: Mapping[str, LabelStatsLike] | Iterable[LabelStatsLike],
    objective: Objective,
    num_class: int = 1,
) -> list[float]:
    """F_0 from per-party aggregates only: pooled log-odds, log priors or mean.

    Probabilities are floored at 1e-7 so a class nobody holds does not give -inf.
    """
    items = list(stats.values()) if isinstance(stats, Mapping) else list(stats)
    n = sum(s.n_train for s in items)
    if n <= 0:
        raise ValueError("no training rows at any party")
    if objective == "binary":
        p = min(max(sum(s.label_sum for s in items) / n, PRIOR_FLOOR), 1 - PRIOR_FLOOR)
        return [math.log(p / (1 - p))]
    if objective == "multiclass":
        counts = np.zeros(num_class)
        for s in items:
            if len(s.class_counts) != num_class:
                raise ValueError(f"class_counts has {len(s.class_counts)} entries, K={num_class}")
            counts += np.asarray(s.class_counts, dtype=np.float64)
        priors = np.maximum(counts / counts.sum(), PRIOR_FLOOR)
        return [float(v) for v in np.log(priors)]
    return [sum(s.label_sum for s in items) / n]


# --------------------------------------------------------------------------------------
# Local training and evaluation
# --------------------------------------------------------------------------------------


def train_update(
    X_train: pl.DataFrame | np.ndarray,
    y_train: np.ndarray,
    init_score: np.ndarray,
    params: Mapping[str, LgbParamValue],
    trees: int,
    categorical: Sequence[str] | Sequence[int],
    *,
    feature_names: Sequence[str] | None = None,
) -> str:
    """Fit ``trees`` boosting iterations from ``init_score``; the LightGBM model text.

    ``categorical`` gives feature names or column indices; ``feature_names`` is needed when
    ``X_train`` is a matrix. The text holds only the new trees (no init score): its raw
    prediction is the party's increment f_k(x).
    """
    if isinstance(X_train, pl.DataFrame):
        names = list(feature_names or X_train.columns)
    elif feature_names is None:
        raise ValueError("feature_names is required when X_train is a matrix")
    else:
        names = list(feature_names)
    matrix = feature_matrix(X_train, names)
    cats = [c if isinstance(c, str) else names[c] for c in categorical]
    unknown = [c for c in cats if c not in names]
    if unknown:
        raise ValueError(f"categorical features {unknown} are not feature columns")
    if matrix.shape[0] == 0:
        raise ValueError("no training rows")
    dataset = lgb.Dataset(
        matrix,
        label=np.asarray(y_train, dtype=np.float64),
        init_score=np.asarray(init_score, dtype=np.float64),
        feature_name=names,
        categorical_feature=cats,
        free_raw_data=True,
    )
    booster = lgb.train(dict(params), dataset, num_boost_round=trees)
    return str(booster.model_to_string())


def fit_round(
    X_train: np.ndarray,
    y_train: np.ndarray,
    init_score: np.ndarray,
    *,
    training: TrainingSpec,
    objective: Objective,
    num_class: int,
    party: str,
    round_: int,
    learning_rate: float,
    categorical: Sequence[str] | Sequence[int],
    feature_names: Sequence[str],
    bin_params: Mapping[str, LgbParamValue] | None = None,
) -> tuple[str, int]:
    """A party's fit of round ``round_``: ``trees_per_round`` trees from its running scores
    ``init_score`` with its per-round seed (:func:`party_seed`); the model text and the
    seed. ``bin_params`` bins with the consortium's boundaries
    (:func:`tasks.horizontal.bins.forced_bin_params`). The in-memory loop and the Prefect step
    fit through this one function."""
    seed = party_seed(training.seed, party, round_)
    params = lgb_params(training, objective, num_class, seed=seed, learning_rate=learning_rate)
    params.update(bin_params or {})
    text = train_update(
        X_train,
        y_train,
        init_score,
        params,
        training.trees_per_round,
        categorical,
        feature_names=feature_names,
    )
    if bin_params:  # the forced-bins path is the party's own: it does not leave it
        text = without_params(text, set(bin_params))
    return text, seed


def evaluate(
    y: np.ndarray, raw: np.ndarray, objective: Objective, num_class: int
) -> dict[str, float]:
    """Metrics of raw scores: binary auc + logloss, multiclass logloss + accuracy,
    regression rmse + mse. Undefined metrics (AUC on one class, no rows) are left out."""
    y = np.asarray(y, dtype=np.float64)
    raw = np.asarray(raw, dtype=np.float64)
    if len(y) == 0:
        return {}
    if objective == "binary":
        p = sigmoid(raw.reshape(-1))
        out = {"logloss": float(log_loss(y, p, labels=[0, 1]))}
        if len(np.unique(y)) == 2:
            out["auc"] = float(roc_auc_score(y, p))
        return out
    if objective == "multiclass":
        probs = softmax(raw.reshape(len(y), num_class))
        return {
            "logloss": float(log_loss(y, probs, labels=list(range(num_class)))),
            "accuracy": float(accuracy_score(y, probs.argmax(axis=1))),
        }
    mse = float(mean_squared_error(y, raw.reshape(-1)))
    return {"mse": mse, "rmse": math.sqrt(mse)}


def split_metrics(
    y: np.ndarray,
    raw: np.ndarray,
    split: np.ndarray,
    parts: Sequence[Split],
    objective: Objective,
    num_class: int,
) -> dict[Split, dict[str, float]]:
    """:func:`evaluate` on the rows of each split in ``parts`` (empty for a split without
    rows)."""
    out: dict[Split, dict[str, float]] = {}
    for part in parts:
        mask = split == part
        out[part] = evaluate(y[mask], raw[mask], objective, num_class) if mask.any() else {}
    return out


def aggregate_metrics(
    per_party: Mapping[str, tuple[int, Mapping[str, float]]],
    histograms: Mapping[str, ScoreHistogram | None] | None = None,
) -> dict[str, float]:
    """Size-weighted mean of each metric over the parties that report it, and the AUC of
    the pooled rows from the parties' score histograms.

    ``rmse`` is recomputed as sqrt of the pooled ``mse`` when that is reported (the pooled
    RMSE, not a mean of RMSEs). The size-weighted mean of per-party AUCs is not the AUC of
    the pooled rows and is kept as ``auc_weighted_mean``; ``auc`` is the pooled AUC
    (multiclass: one-vs-rest macro) from the summed ``histograms`` and ``auc_bound`` its
    error bound (:mod:`tasks.horizontal.score_histograms`). A party with one class has no
    AUC of its own but its rows count in the pooled one.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in per_party.values():
        if n <= 0:
            continue
        for name, value in metrics.items():
            if math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + n * value
                weights[name] = weights.get(name, 0.0) + n
    out = {name: sums[name] / weights[name] for name in sums}
    if "mse" in out:
        out["rmse"] = math.sqrt(out["mse"])
    if "auc" in out:
        out["auc_weighted_mean"] = out.pop("auc")
    summed = sum_histograms({p: h for p, h in (histograms or {}).items() if h is not None})
    if summed is not None:
        out.update(pooled_auc(summed))
    return out


@dataclass
class EarlyStopping:
    """Federated early stopping on the aggregated validation loss (lower is better).

    ``best_round`` 0 means no finite loss yet. Resumable: construct with the checkpointed
    ``best_round`` / ``best_loss`` and keep calling :meth:`update` with explicit rounds.
    """

    patience: int
    best_round: int = 0
    best_loss: float | None = None
    last_round: int = 0
    min_delta: float = 0.0

    def update(self, round_: int, loss: float) -> bool:
        """Record round ``round_``'s loss; True when ``patience`` rounds passed without a
        new best (so the caller stops and keeps ``best_round``)."""
        self.last_round = round_
        if math.isfinite(loss) and (
            self.best_loss is None or loss < self.best_loss - self.min_delta
        ):
            self.best_loss = loss
            self.best_round = round_
        return round_ - self.best_round >= self.patience

    def should_stop(self, loss: float) -> bool:
        """:meth:`update` for the round after the last one seen."""
        return self.update(self.last_round + 1, loss)

    @classmethod
    def from_losses(cls, losses: Sequence[float], patience: int) -> EarlyStopping:
        stopper = cls(patience=patience)
        for loss in losses:
            stopper.should_stop(loss)
        return stopper


# --------------------------------------------------------------------------------------
# A party's rows
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartyData:
    """One party's rows as matrices (stays at the party)."""

    party: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_valid: np.ndarray
    y_valid: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def party_data(
    frame: pl.DataFrame,
    *,
    party: str,
    feature_names: Sequence[str],
    validation_fraction: float,
    test_fraction: float,
) -> PartyData:
    split = frame_splits(
        frame, validation_fraction=validation_fraction, test_fraction=test_fraction
    ).to_numpy()
    X = feature_matrix(frame, feature_names)
    y = frame[LABEL].cast(pl.Float64).to_numpy()
    return split_party_data(party, X, y, split)


def split_party_data(party: str, X: np.ndarray, y: np.ndarray, split: np.ndarray) -> PartyData:
    """Rows cut into train / valid / test by their ``split`` assignment."""
    parts = {s: split == s for s in ("train", "valid", "test")}
    return PartyData(
        party=party,
        X_train=X[parts["train"]],
        y_train=y[parts["train"]],
        X_valid=X[parts["valid"]],
        y_valid=y[parts["valid"]],
        X_test=X[parts["test"]],
        y_test=y[parts["test"]],
    )
