"""Pure core of horizontal federated training: splits, params, party and coordinator steps.

Every party holds a fused table (``entity_hash``, ``label``, the consortium's feature
columns). Training is output averaging with residual rounds (see :mod:`tasks.horizontal.ensemble`):

1. each party splits its rows into train/valid/test from the entity hash
   (:func:`split_assignments`) and reports only label aggregates (:class:`LabelStats`);
2. the coordinator computes the base score F_0 (:func:`base_score`) and the parties'
   learning rates (:func:`party_learning_rates`);
3. per round, each party fits ``trees_per_round`` trees from its *running* raw scores
   F_{t-1}(x) as ``init_score`` (:func:`train_party`), the coordinator checks and weights the
   updates (:func:`aggregate_updates`), each party adds Σ_k w_k f_k(x) to its running scores
   and evaluates on its validation rows (:func:`apply_round`, :func:`evaluate_party`), and the
   coordinator aggregates the metrics (weighted by validation size) and applies federated
   early stopping (:class:`EarlyStopping`).

:func:`run_round` is one round wired in memory, :func:`train_federated` the whole loop; both
are references for the Prefect flows, which run the same pure steps as tasks. The comparison
baselines :func:`train_centralised` (pools raw rows: a benchmark only, never a production
mode) and :func:`train_local_only` reuse the same loop. Nothing here reads files or the clock,
and every random choice is seeded from the spec.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import lightgbm as lgb
import numpy as np
import polars as pl
from pydantic import BaseModel, Field
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, roc_auc_score

from tasks.horizontal.ensemble import (
    LGB_OBJECTIVE,
    GlobalEnsemble,
    MemberTuple,
    RoundUpdate,
    check_task,
    ensemble_size,
    feature_matrix,
    predict_raw,
    round_increment,
)
from tasks.horizontal.rounds import (
    Candidate,
    ModelRules,
    RoundError,
    StopReason,
    cannot_train,
    require_quorum,
    require_trainers,
    review_updates,
    round_trees,
    stop_before,
    strategy_for,
    weigh,
)
from tasks.horizontal.rounds import (
    label_span as rounds_label_span,
)
from tasks.horizontal.strategies import make_strategy
from tasks.links import sigmoid, softmax
from tasks.spec.models import RESERVED_PARAMS as RESERVED_PARAMS  # noqa: PLC0414  (re-exported)
from tasks.spec.models import TrainingSpec
from tasks.types import ENTITY_HASH, LABEL, Aggregation, Objective

logger = logging.getLogger(__name__)

Split = Literal["train", "valid", "test"]

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


def lgb_params(
    training_spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    *,
    seed: int,
    learning_rate: float | None = None,
) -> dict[str, Any]:
    """LightGBM params of one party's local fit: deterministic, quiet, single-threaded.

    ``num_class`` counts raw-score columns (1 for binary and regression). Categorical
    features are passed to the ``Dataset`` (native handling), not as a param. The spec's
    extra ``params`` may tune the trees (regularisation, ``max_bin``, ``num_threads``, ...)
    but not the keys in :data:`RESERVED_PARAMS`.
    """
    reserved = sorted(set(training_spec.params) & RESERVED_PARAMS)
    if reserved:
        raise ValueError(f"training.params may not set {reserved}: the round controls them")
    params: dict[str, Any] = {
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


def party_learning_rates(
    n_train: Mapping[str, int], learning_rate: float, mode: Aggregation
) -> dict[str, float]:
    """Local learning rate per party under the strategy ``mode`` (e.g. η, or η · n_k / Σ n
    for ``lr_scaled``, NVFlare bagging)."""
    return make_strategy(mode, learning_rate=learning_rate).learning_rates(n_train)


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
    params: Mapping[str, Any],
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


def aggregate_metrics(per_party: Mapping[str, tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """Size-weighted mean of each metric over the parties that report it.

    ``rmse`` is recomputed as sqrt of the pooled ``mse`` when that is reported (the pooled
    RMSE, not a mean of RMSEs). AUC is a size-weighted mean of per-party AUCs, which is not
    the AUC of the pooled rows.
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
# Party-side state and steps
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
    split = split_assignments(
        frame[ENTITY_HASH], validation_fraction=validation_fraction, test_fraction=test_fraction
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


@dataclass(frozen=True)
class PartyState:
    """A party's data and its running raw scores F_t on its train and valid rows."""

    data: PartyData
    raw_train: np.ndarray
    raw_valid: np.ndarray
    round: int = 0


def start_state(data: PartyData, base: Sequence[float], num_class: int) -> PartyState:
    def tile(n: int) -> np.ndarray:
        out = np.tile(np.asarray(base, dtype=np.float64), (n, 1))
        return out.reshape(n) if num_class == 1 else out

    return PartyState(
        data=data, raw_train=tile(len(data.y_train)), raw_valid=tile(len(data.y_valid))
    )


def train_party(
    state: PartyState,
    *,
    round_: int,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
    learning_rate: float,
) -> RoundUpdate:
    """Party step: fit this round's trees from the running scores."""
    seed = party_seed(spec.seed, state.data.party, round_)
    params = lgb_params(spec, objective, num_class, seed=seed, learning_rate=learning_rate)
    text = train_update(
        state.data.X_train,
        state.data.y_train,
        state.raw_train,
        params,
        spec.trees_per_round,
        categorical,
        feature_names=feature_names,
    )
    return RoundUpdate(
        party=state.data.party,
        round=round_,
        model_text=text,
        n_train=len(state.data.y_train),
        learning_rate=learning_rate,
        seed=seed,
    )


def apply_round(state: PartyState, members: Sequence[MemberTuple], num_class: int) -> PartyState:
    """Party step: add Σ_k w_k f_k(x) of an accepted round to the running scores."""
    d = state.data
    return replace(
        state,
        raw_train=state.raw_train + round_increment(members, d.X_train, num_class),
        raw_valid=state.raw_valid + round_increment(members, d.X_valid, num_class),
        round=state.round + 1,
    )


def evaluate_party(
    state: PartyState, objective: Objective, num_class: int
) -> tuple[int, dict[str, float]]:
    """Party step: (validation size, metrics of the running scores on it)."""
    d = state.data
    return len(d.y_valid), evaluate(d.y_valid, state.raw_valid, objective, num_class)


# --------------------------------------------------------------------------------------
# Coordinator-side steps
# --------------------------------------------------------------------------------------


def aggregate_updates(
    ensemble: GlobalEnsemble,
    updates: Sequence[RoundUpdate],
    *,
    round_: int,
    mode: Aggregation,
    min_parties: int,
    learning_rate: float = 0.1,
    planned: Sequence[str] | None = None,
    label_span: float = 0.0,
) -> tuple[GlobalEnsemble, dict[str, str]]:
    """Coordinator step in memory: the round rules of :mod:`tasks.horizontal.rounds` (the flow's own),
    then the accepted updates appended as the ensemble's next round.

    Returns the new ensemble and the rejected parties with their reasons. Raises
    :class:`RoundError` below ``min_parties`` accepted updates.
    """
    if round_ != len(ensemble.rounds) + 1:
        raise RoundError(f"round {round_} does not follow the ensemble's {len(ensemble.rounds)}")
    rules = ModelRules.for_training(
        feature_names=ensemble.feature_names,
        categorical=ensemble.categorical,
        objective=ensemble.objective,
        num_class=ensemble.num_class,
        trees_per_round=ensemble.trees_per_round,
        learning_rate=learning_rate,
        label_span=label_span,
    )
    candidates = [
        Candidate(party=u.party, round=u.round, n_train=u.n_train, text=u.model_text)
        for u in updates
    ]
    review = review_updates(candidates, round_=round_, rules=rules, planned=planned)
    for party, reason in review.rejected.items():
        logger.warning("round %d: update of %s rejected: %s", round_, party, reason)
    require_quorum(review, round_=round_, min_parties=min_parties)
    weights = weigh(review, make_strategy(mode, learning_rate=learning_rate))
    members = [(c.party, weights[c.party], c.text or "") for c in review.accepted]
    return ensemble.with_round(members), review.rejected


class RoundRecord(BaseModel):
    round: int
    weights: dict[str, float]
    rejected: dict[str, str] = Field(default_factory=dict)
    valid: dict[str, float]
    party_valid: dict[str, dict[str, float]]
    trees: int
    model_bytes: int


class TrainingHistory(BaseModel):
    rounds: list[RoundRecord] = Field(default_factory=list)
    best_round: int = 0
    best_loss: float | None = None
    stop_reason: StopReason = "rounds"
    left_out: dict[str, str] = Field(default_factory=dict, description="Parties that cannot train")
    n_train: dict[str, int] = Field(default_factory=dict)
    learning_rates: dict[str, float] = Field(default_factory=dict)
    test: dict[str, float] = Field(default_factory=dict)


def run_round(
    ensemble: GlobalEnsemble,
    states: Mapping[str, PartyState],
    *,
    round_: int,
    spec: TrainingSpec,
    learning_rates: Mapping[str, float],
    executor: Executor | None = None,
    label_span: float = 0.0,
) -> tuple[GlobalEnsemble, dict[str, PartyState], RoundRecord]:
    """One round in memory: train at the parties ``learning_rates`` names (the strategy's
    plan), aggregate, apply and evaluate everywhere, aggregate the metrics.

    With an ``executor`` the parties' fits and score updates run in it side by side (as the
    parties' own machines would; LightGBM releases the GIL); the results are the same.
    """
    k = ensemble.num_class
    run: Callable[..., Iterator[Any]] = map if executor is None else executor.map

    def fit(item: tuple[str, PartyState]) -> RoundUpdate:
        party, state = item
        return train_party(
            state,
            round_=round_,
            spec=spec,
            objective=ensemble.objective,
            num_class=k,
            categorical=ensemble.categorical,
            feature_names=ensemble.feature_names,
            learning_rate=learning_rates[party],
        )

    active = [(p, s) for p, s in states.items() if p in learning_rates and len(s.data.y_train)]
    updates: list[RoundUpdate] = list(run(fit, active))
    ensemble, rejected = aggregate_updates(
        ensemble,
        updates,
        round_=round_,
        mode=spec.aggregation,
        min_parties=spec.min_parties,
        learning_rate=spec.learning_rate,
        planned=list(learning_rates),
        label_span=label_span,
    )
    members = ensemble.rounds[-1]
    new_states = dict(
        zip(states, run(lambda s: apply_round(s, members, k), states.values()), strict=True)
    )
    per_party = {p: evaluate_party(s, ensemble.objective, k) for p, s in new_states.items()}
    valid = aggregate_metrics(per_party)
    ensemble = ensemble.with_metrics(round_, valid)
    size = ensemble_size(ensemble)
    record = RoundRecord(
        round=round_,
        weights={p: w for p, w, _ in members},
        rejected=rejected,
        valid=valid,
        party_valid={p: m for p, (_, m) in per_party.items()},
        trees=size.trees,
        model_bytes=size.bytes,
    )
    return ensemble, new_states, record


def train_federated(
    party_frames: Mapping[str, pl.DataFrame],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
    executor: Executor | None = None,
    idle_ok: bool = False,
) -> tuple[GlobalEnsemble, TrainingHistory]:
    """The in-memory loop of horizontal federated training, on the round rules of
    :mod:`tasks.horizontal.rounds` and the strategies of :mod:`tasks.horizontal.strategies` (as the flow).

    Parties that cannot train (:func:`~tasks.horizontal.rounds.cannot_train`) are left out
    (``history.left_out``) and still evaluated; ``idle_ok`` lets a run where nobody can
    train end with the prior alone (a one-class party's local-only model).

    Stops after ``spec.rounds``, on early stopping (``spec.patience`` rounds without a better
    aggregated validation loss, :data:`LOSS_METRIC`), or before a round that could take the
    ensemble past ``spec.max_trees`` LightGBM trees (all classes; a round adds at most
    parties × trees_per_round × num_class). The returned ensemble keeps every round run and
    sets ``best_round``; ``history.test`` holds the size-weighted test metrics at that round.
    ``executor`` runs the parties' steps of each round side by side (see :func:`run_round`).
    """
    check_task(objective, num_class)
    data = {
        p: party_data(
            frame,
            party=p,
            feature_names=feature_names,
            validation_fraction=spec.validation_fraction,
            test_fraction=spec.test_fraction,
        )
        for p, frame in party_frames.items()
    }
    stats = {p: label_stats(d.y_train, objective, num_class) for p, d in data.items()}
    n_train = {p: s.n_train for p, s in stats.items()}
    left_out = {p: why for p, st in stats.items() if (why := cannot_train(st, objective))}
    trainers = {p: (0 if p in left_out else n) for p, n in n_train.items()}
    able = sum(1 for n in trainers.values() if n)
    if not (idle_ok and able == 0):
        require_trainers(trainers, left_out, min_parties=spec.min_parties)
    base = base_score(stats, objective, num_class)
    strategy = strategy_for(spec)
    rates = strategy.learning_rates(n_train)
    ensemble = GlobalEnsemble(
        objective=objective,
        num_class=num_class,
        base_score=base,
        feature_names=list(feature_names),
        categorical=list(categorical),
        aggregation=spec.aggregation,
        trees_per_round=spec.trees_per_round,
    )
    states = {p: start_state(d, base, num_class) for p, d in data.items()}
    stopper = EarlyStopping(patience=spec.patience)
    history = TrainingHistory(n_train=n_train, learning_rates=rates, left_out=left_out)
    loss_name = LOSS_METRIC[objective]
    per_round = round_trees(strategy, trainers, spec.trees_per_round, num_class)
    span = rounds_label_span(list(stats.values())) if objective == "regression" else 0.0
    t = 0
    while able:
        t += 1
        reason = stop_before(
            t,
            rounds=spec.rounds,
            trees=ensemble_size(ensemble).trees,
            next_trees=per_round,
            max_trees=spec.max_trees,
        )
        if reason is not None:
            history.stop_reason = reason
            break
        plan = strategy.plan(t, trainers)
        ensemble, states, record = run_round(
            ensemble,
            states,
            round_=t,
            spec=spec,
            learning_rates=plan.learning_rates,
            executor=executor,
            label_span=span,
        )
        history.rounds.append(record)
        loss = record.valid.get(loss_name, math.nan)
        logger.info("round %d: valid %s, %d trees", t, record.valid, record.trees)
        if stopper.update(t, loss):
            history.stop_reason = "early_stopping"
            break
    if stopper.best_round == 0 and not any(len(d.y_valid) for d in data.values()):
        stopper.best_round = len(ensemble.rounds)  # nothing to validate on: keep every round
    ensemble = ensemble.model_copy(update={"best_round": stopper.best_round})
    history.best_round = stopper.best_round
    history.best_loss = stopper.best_loss
    history.test = aggregate_metrics(
        {
            p: (
                len(d.y_test),
                evaluate(d.y_test, predict_raw(ensemble, d.X_test), objective, num_class),
            )
            for p, d in data.items()
            if len(d.y_test)
        }
    )
    return ensemble, history


def train_centralised(
    party_frames: Mapping[str, pl.DataFrame],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
) -> tuple[GlobalEnsemble, TrainingHistory]:
    """COMPARISON BASELINE ONLY: pools every party's raw rows, which federation forbids.

    The same loop with a single party "pooled": same base score, splits, params, early
    stopping and tree budget (rounds × trees_per_round). Boosting ``trees_per_round`` trees
    from the running scores, round after round, is exactly continued LightGBM training.
    """
    pooled = pl.concat(
        [f.select(ENTITY_HASH, LABEL, *feature_names) for f in party_frames.values()],
        how="vertical",
    )
    single = spec.model_copy(update={"min_parties": 1, "aggregation": "samples"})
    return train_federated(
        {"pooled": pooled},
        spec=single,
        objective=objective,
        num_class=num_class,
        categorical=categorical,
        feature_names=feature_names,
    )


def train_local_only(
    party_frames: Mapping[str, pl.DataFrame],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    categorical: Sequence[str],
    feature_names: Sequence[str],
) -> dict[str, tuple[GlobalEnsemble, TrainingHistory]]:
    """Baseline: every party trains alone on its own rows (own base score and validation).
    A party that cannot train (one class only) keeps its prior: zero rounds."""
    single = spec.model_copy(update={"min_parties": 1, "aggregation": "samples", "order": None})
    out: dict[str, tuple[GlobalEnsemble, TrainingHistory]] = {}
    for party, frame in party_frames.items():
        kwargs: dict[str, Any] = {
            "objective": objective,
            "num_class": num_class,
            "categorical": categorical,
            "feature_names": feature_names,
        }
        out[party] = train_federated({party: frame}, spec=single, idle_ok=True, **kwargs)
    return out
