"""Pure core of vertical federated training: gradient rounds, one-shot models, score fusion.

Setting: the parties hold different feature blocks of the same entities. One party (the
*label party*) also holds the labels; it plays the coordinator's role. Alignment (PSI) is
done elsewhere: here every party's block comes as matrices whose rows follow the label
party's entity order, split into train / valid / test (:class:`PartyBlock`), and scores
travel as tables keyed by the alignment id (:func:`score_table`).

Gradient mode (``fusion.mode = "rounds"``, opt-in ``fusion.share_gradients``)
------------------------------------------------------------------------------
The global model is additive over blocks::

    F(x) = F_0 + Σ_p c_p · f_p(x_p)      (f_p: party p's own LightGBM model on its block)

Round t:

1. the label party computes gradients and hessians of the loss at F_{t-1} on the train
   entities (:func:`gradient_message`: binary logloss, multiclass softmax with LightGBM's
   K/(K-1) hessian factor, L2 regression);
2. each party fits ``trees_per_round`` trees on its block with a LightGBM custom objective
   (:func:`train_party_round`). It has no labels, so within the round it follows the
   second-order approximation g_t = g + h · δ_own (δ_own: the output of this round's own
   trees so far), and every further tree keeps reducing the loss as if the party were alone.
   The trees are appended to the party's single LightGBM model (continued training), which
   never leaves the party; it returns only its per-entity raw deltas on the train and valid
   entities (:class:`PartyDelta`);
3. the label party adds F += Σ_p c_p δ_p, evaluates the validation loss and applies federated
   early stopping (:func:`combine_round`, :class:`tasks.horizontal.training.EarlyStopping`).

Scale of the coefficients (:func:`round_coefficients`): the fusion weights w_p (spec
``fusion.weights``, normalised; uniform by default) are multiplied by the number of parties:
c_p = P · w_p, i.e. with uniform weights every party's delta is *summed* (c_p = 1) and the
learning rate is the only shrinkage. Each party fits a block-coordinate Newton step as if
alone; for complementary blocks the steps add up, while averaging (c_p = w_p) divides every
block's step by P and needs about P times the rounds. ``benchmarks/vertical_quick.py``
measures both (``combine="mean"`` keeps averaging available). On 50k rows in 3 blocks,
summing reached the same test AUC as averaging (within 0.001) with 2.7x fewer trees and 6x
less time when the signal crosses blocks, and a better one (0.9065 vs 0.9038, averaging
still improving at the 100-round cap) when it is additive over blocks; it is the default.

Limit of the model class: every tree sees one party's features only, so F is additive over
blocks and cannot use interactions *across* blocks. Gradient rounds reach the best model of
that form (centralised LightGBM with ``interaction_constraints`` = the blocks) but stay below
an unconstrained centralised model when the signal lives in cross-block interactions.

Privacy: gradients of the logloss reveal the labels (sign of g = p - y), so this mode is an
explicit opt-in; the parties learn nothing of each other's features, only the label party
sees per-entity deltas.

Inference is F_0 + Σ_p c_p · model_p.predict(block_p, raw_score=True) with each party's
model cut at the best round (:func:`party_model_text`, :func:`score_block`,
:func:`rounds_fusion`).

Checkpoints: :class:`LabelState` (pydantic :class:`VerticalProgress` + the numpy arrays of
global train/valid raw scores) splits into a JSON document and named float64 arrays
(:meth:`LabelState.checkpoint`, with their sha256 in the JSON) that storage can write as
``.npy`` files; :meth:`LabelState.from_checkpoint` verifies and restores them. A party's
state is :class:`PartyModel` (model text + iterations after each round; JSON). A resumed
run repeats exactly what an uninterrupted one does: every round starts from the model text
and the seeds depend only on (spec seed, party, round).

One-shot mode (``fusion.mode = "one_shot"``, opt-in ``fusion.share_labels``)
----------------------------------------------------------------------------
Each party trains a complete LightGBM model on its block with the shared labels of the
overlap, early-stopped on the shared validation labels (:func:`train_one_shot`), and
returns raw scores for its train / valid / test entities. The scores are then fused.

Score-level fusion and entities a party does not know
-----------------------------------------------------
Scores are joined on the alignment id (:func:`join_scores`, 1:1 joins). With the party's
*delta* δ_p (its raw score minus the prior F_0 for full-model scores, or its model output in
rounds mode), every fusion is F = F_0 + Σ_p c_p δ_p, in three kinds (:class:`Fusion`):

* ``fixed``   -- c_p = normalised spec weights: a weighted mean of the parties' raw scores;
* ``learned`` -- the label party fits the combination on validation scores: logistic
  stacking (binary; multinomial for multiclass on all P·K score columns) or non-negative
  least squares (regression) (:func:`learn_fusion`);
* ``rounds``  -- c_p of the gradient rounds (additive components).

Rule for an entity a party does not know: that party contributes δ_p = 0, i.e. the prior.
For ``fixed`` weights (a mean of estimates of the same quantity) the weights are in
addition renormalised over the parties present, so the fused score is the weighted mean of
the scores that exist; an entity no party knows gets F_0. ``learned`` and ``rounds``
coefficients are not renormalised: there each delta is a separate piece of evidence fitted
jointly, and a missing piece is "no evidence" (stacking is fitted with the same zero
imputation on validation entities some party lacks, so it learns under the same rule).

Everything here is pure: no files, no clock, seeded randomness only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.linear_model import LinearRegression, LogisticRegression

from tasks.horizontal.model_text import check_task, count_trees, load_booster
from tasks.horizontal.rounds import StopReason, stop_before
from tasks.horizontal.training import (
    LOSS_METRIC,
    EarlyStopping,
    base_score,
    check_labels,
    evaluate,
    label_stats,
    lgb_params,
    party_seed,
)
from tasks.links import sigmoid, softmax
from tasks.spec.models import FusionSpec, TrainingSpec
from tasks.types import Objective

#: How the label party scales the fusion weights in gradient rounds (see module docstring).
Combine = Literal["mean", "sum"]
FusionKind = Literal["fixed", "learned", "rounds"]
#: Score columns hold full raw scores (one-shot) or deltas from the prior (rounds).
ScoreKind = Literal["raw", "delta"]

DEFAULT_COMBINE: Combine = "sum"
SCORE = "score"
#: Validation metric of one-shot early stopping (the loss of :data:`LOSS_METRIC`).
ONE_SHOT_METRIC: dict[str, str] = {
    "binary": "binary_logloss",
    "multiclass": "multi_logloss",
    "regression": "l2",
}
HESSIAN_FLOOR = 1e-16


# --------------------------------------------------------------------------------------
# Data held by the parties
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelData:
    """The label party's labels, in the aligned entity order of each split."""

    y_train: np.ndarray
    y_valid: np.ndarray
    y_test: np.ndarray | None = None


@dataclass(frozen=True)
class PartyBlock:
    """One party's aligned feature block (rows follow the label party's order per split)."""

    party: str
    feature_names: tuple[str, ...]
    X_train: np.ndarray
    X_valid: np.ndarray
    X_test: np.ndarray | None = None
    categorical: tuple[str, ...] = ()


def _shape(raw: np.ndarray, n: int, num_class: int) -> np.ndarray:
    return raw.reshape(n) if num_class == 1 else raw.reshape(n, num_class)


def _tile(base: Sequence[float], n: int, num_class: int) -> np.ndarray:
    return _shape(np.tile(np.asarray(base, dtype=np.float64), (n, 1)), n, num_class)


def check_block(block: PartyBlock, labels: LabelData) -> None:
    """Rows of the block must match the label party's splits one to one."""
    pairs = [("train", block.X_train, labels.y_train), ("valid", block.X_valid, labels.y_valid)]
    if block.X_test is not None and labels.y_test is not None:
        pairs.append(("test", block.X_test, labels.y_test))
    for split, X, y in pairs:
        if X.ndim != 2 or X.shape[1] != len(block.feature_names):
            raise ValueError(
                f"party {block.party!r}: {split} block has shape {X.shape}, "
                f"expected (n, {len(block.feature_names)})"
            )
        if X.shape[0] != len(y):
            raise ValueError(
                f"party {block.party!r}: {split} block has {X.shape[0]} rows, the label party "
                f"{len(y)} (blocks must be aligned to the label party's entities)"
            )
    unknown = [c for c in block.categorical if c not in block.feature_names]
    if unknown:
        raise ValueError(f"party {block.party!r}: categorical {unknown} are not features")


# --------------------------------------------------------------------------------------
# Loss derivatives (label party)
# --------------------------------------------------------------------------------------


def gradients(
    y: np.ndarray, raw: np.ndarray, objective: Objective, num_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """First and second derivatives of the loss in the raw score, as LightGBM computes them.

    Binary logloss: g = p - y, h = p(1-p). Multiclass softmax: g = p_k - [y = k],
    h = K/(K-1) · p_k(1-p_k) (LightGBM's factor). Regression L2: g = F - y, h = 1.
    Hessians are floored at 1e-16. Shapes follow ``raw``: (n,) or (n, K).
    """
    y = np.asarray(y, dtype=np.float64)
    raw = np.asarray(raw, dtype=np.float64)
    if objective == "binary":
        p = sigmoid(raw.reshape(-1))
        return p - y, np.maximum(p * (1.0 - p), HESSIAN_FLOOR)
    if objective == "multiclass":
        probs = softmax(raw.reshape(len(y), num_class))
        onehot = np.zeros_like(probs)
        onehot[np.arange(len(y)), y.astype(np.int64)] = 1.0
        factor = num_class / (num_class - 1.0)
        return probs - onehot, np.maximum(factor * probs * (1.0 - probs), HESSIAN_FLOOR)
    return raw.reshape(-1) - y, np.ones(len(y))


@dataclass(frozen=True)
class GradientMessage:
    """Label party -> every party, round ``round``: g and h on the aligned train entities."""

    round: int
    grad: np.ndarray
    hess: np.ndarray


# --------------------------------------------------------------------------------------
# Party side: one LightGBM model per party, continued round after round
# --------------------------------------------------------------------------------------


class PartyModel(BaseModel):
    """A party's own state in gradient rounds (JSON-serialisable; stays at the party).

    ``iterations[t-1]`` is the number of boosting iterations of the model after round t
    (a round may add fewer than ``trees_per_round`` when no split is possible, none when the
    party missed it). ``model_text`` is ``None`` before the first tree.
    """

    model_config = ConfigDict(frozen=True)

    party: str
    num_class: int = Field(default=1, ge=1)
    model_text: str | None = None
    iterations: list[int] = Field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.iterations)

    def iterations_at(self, round_: int) -> int:
        """Iterations after round ``round_`` (0 = none; rounds past the last repeat it)."""
        if round_ < 0:
            raise ValueError(f"round {round_}")
        if round_ == 0 or not self.iterations:
            return 0
        return self.iterations[min(round_, len(self.iterations)) - 1]


@dataclass(frozen=True)
class PartyDelta:
    """Party -> label party: its raw score deltas of one round, nothing else."""

    party: str
    round: int
    train: np.ndarray
    valid: np.ndarray
    trees: int = 0


def _truncate(text: str | None, iterations: int) -> str | None:
    if text is None or iterations <= 0:
        return None
    booster = load_booster(text)
    if booster.current_iteration() == iterations:
        return text
    if booster.current_iteration() < iterations:
        raise ValueError(
            f"model has {booster.current_iteration()} iterations, {iterations} requested"
        )
    return str(booster.model_to_string(num_iteration=iterations))


def rewind(model: PartyModel, round_: int) -> PartyModel:
    """The party's model as it was after round ``round_`` (catch-up pads missed rounds)."""
    if round_ <= model.rounds:
        n = model.iterations_at(round_)
        return model.model_copy(
            update={
                "model_text": _truncate(model.model_text, n),
                "iterations": model.iterations[:round_],
            }
        )
    last = model.iterations_at(model.rounds)
    return model.model_copy(
        update={"iterations": [*model.iterations, *[last] * (round_ - model.rounds)]}
    )


def newton_objective(
    grad: np.ndarray, hess: np.ndarray
) -> Callable[[np.ndarray, lgb.Dataset], tuple[np.ndarray, np.ndarray]]:
    """LightGBM custom objective of one round: g + h · δ_own, h.

    δ_own is the raw output of the trees grown in this call: LightGBM passes the booster's
    current raw scores, whose value at the first call (the previous rounds' trees, the init
    score of continued training) is remembered.
    """
    grad = np.asarray(grad, dtype=np.float64)
    hess = np.asarray(hess, dtype=np.float64)
    start: list[np.ndarray] = []

    def objective(preds: np.ndarray, _data: lgb.Dataset) -> tuple[np.ndarray, np.ndarray]:
        current = np.asarray(preds, dtype=np.float64).reshape(grad.shape)
        if not start:
            start.append(current.copy())
        return grad + hess * (current - start[0]), hess

    return objective


def _raw(booster: lgb.Booster, X: np.ndarray, num_class: int, start: int, count: int) -> np.ndarray:
    if count <= 0:
        return np.zeros((X.shape[0], num_class) if num_class > 1 else X.shape[0])
    out = booster.predict(
        X, raw_score=True, start_iteration=start, num_iteration=count, num_threads=1
    )
    return _shape(np.asarray(out, dtype=np.float64), X.shape[0], num_class)


def train_party_round(
    model: PartyModel,
    block: PartyBlock,
    message: GradientMessage,
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
) -> tuple[PartyModel, PartyDelta]:
    """Party step of round ``message.round``: grow this round's trees, return the deltas.

    The model is first brought to the end of the previous round (:func:`rewind`), so a party
    that ran ahead of a resumed label party, or missed rounds, rejoins consistently.
    """
    check_task(objective, num_class)
    t = message.round
    n = block.X_train.shape[0]
    want = (n,) if num_class == 1 else (n, num_class)
    if message.grad.shape != want or message.hess.shape != want:
        raise ValueError(f"gradients of shape {message.grad.shape}, expected {want}")
    model = rewind(model, t - 1)
    before = model.iterations_at(t - 1)
    params = lgb_params(spec, objective, num_class, seed=party_seed(spec.seed, block.party, t))
    params["objective"] = newton_objective(message.grad, message.hess)
    dataset = lgb.Dataset(
        block.X_train,
        feature_name=list(block.feature_names),
        categorical_feature=list(block.categorical),
        free_raw_data=True,
    )
    init = None if model.model_text is None else lgb.Booster(model_str=model.model_text)
    booster = lgb.train(params, dataset, num_boost_round=spec.trees_per_round, init_model=init)
    after = booster.current_iteration()
    text = str(booster.model_to_string()) if after > 0 else None
    added = after - before
    delta = PartyDelta(
        party=block.party,
        round=t,
        train=_raw(booster, block.X_train, num_class, before, added),
        valid=_raw(booster, block.X_valid, num_class, before, added),
        trees=added * num_class,
    )
    updated = model.model_copy(
        update={
            "model_text": text,
            "iterations": [*model.iterations, after],
            "num_class": num_class,
        }
    )
    return updated, delta


def party_model_text(model: PartyModel, upto_round: int) -> str | None:
    """The party's LightGBM model text cut after round ``upto_round`` (None: no trees)."""
    return _truncate(model.model_text, model.iterations_at(upto_round))


def score_block(model_text: str | None, X: np.ndarray, num_class: int = 1) -> np.ndarray:
    """Raw output of a party's model on its block; zeros when it has no trees."""
    X = np.asarray(X, dtype=np.float64)
    if model_text is None:
        return np.zeros((X.shape[0], num_class) if num_class > 1 else X.shape[0])
    out = load_booster(model_text).predict(X, raw_score=True, num_threads=1)
    return _shape(np.asarray(out, dtype=np.float64), X.shape[0], num_class)


# --------------------------------------------------------------------------------------
# Label party: state, coefficients, combination, early stopping
# --------------------------------------------------------------------------------------


def fusion_weights(parties: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    """Normalised weights per party: ``fusion.weights`` or uniform."""
    if not parties:
        raise ValueError("no parties")
    if weights is None:
        return {p: 1.0 / len(parties) for p in parties}
    missing = [p for p in parties if p not in weights]
    if missing:
        raise ValueError(f"fusion.weights has no weight for parties {missing}")
    values = {p: float(weights[p]) for p in parties}
    total = sum(values.values())
    if any(w < 0 or not math.isfinite(w) for w in values.values()) or total <= 0:
        raise ValueError(f"fusion.weights must be non-negative with a positive sum: {values}")
    return {p: w / total for p, w in values.items()}


def round_coefficients(
    parties: Sequence[str], weights: Mapping[str, float] | None, combine: Combine
) -> dict[str, float]:
    """c_p of the gradient rounds: P · w_p (``sum``) or w_p (``mean``)."""
    w = fusion_weights(parties, weights)
    scale = float(len(w)) if combine == "sum" else 1.0
    return {p: scale * v for p, v in w.items()}


class VerticalRoundRecord(BaseModel):
    round: int
    parties: list[str]
    valid: dict[str, float]
    trees: dict[str, int] = Field(description="Trees each party added in the round")


class VerticalProgress(BaseModel):
    """The JSON part of the label party's checkpoint."""

    objective: Objective
    num_class: int = Field(ge=1)
    base_score: list[float]
    parties: list[str]
    coefficients: dict[str, float]
    patience: int = Field(ge=1)
    round: int = 0
    best_round: int = 0
    best_loss: float | None = None
    stop_reason: StopReason | None = None
    history: list[VerticalRoundRecord] = Field(default_factory=list)
    arrays: dict[str, str] = Field(
        default_factory=dict, description="sha256 of each checkpoint array (set in documents)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> VerticalProgress:
        check_task(self.objective, self.num_class)
        if len(self.base_score) != self.num_class:
            raise ValueError(f"base_score has {len(self.base_score)} values")
        if set(self.coefficients) != set(self.parties):
            raise ValueError("coefficients must name exactly the parties")
        return self

    @property
    def total_trees(self) -> int:
        return sum(sum(r.trees.values()) for r in self.history)


def _array_sha256(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array, dtype=np.float64)
    header = f"{a.shape}".encode()
    return hashlib.sha256(header + a.tobytes()).hexdigest()


@dataclass(frozen=True)
class LabelState:
    """Label party state: progress plus global raw scores F_t on train and valid entities."""

    progress: VerticalProgress
    raw_train: np.ndarray
    raw_valid: np.ndarray

    def checkpoint(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON document, named float64 arrays); storage writes both, e.g. arrays as .npy."""
        arrays = {
            "raw_train": np.ascontiguousarray(self.raw_train, dtype=np.float64),
            "raw_valid": np.ascontiguousarray(self.raw_valid, dtype=np.float64),
        }
        progress = self.progress.model_copy(
            update={"arrays": {k: _array_sha256(v) for k, v in arrays.items()}}
        )
        return progress.model_dump(mode="json"), arrays

    @classmethod
    def from_checkpoint(
        cls, document: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
    ) -> LabelState:
        progress = VerticalProgress.model_validate(dict(document))
        for name in ("raw_train", "raw_valid"):
            if name not in arrays:
                raise ValueError(f"checkpoint lacks array {name!r}")
            want = progress.arrays.get(name)
            if want is not None and _array_sha256(arrays[name]) != want:
                raise ValueError(f"checkpoint array {name!r} does not match its sha256")
        return cls(
            progress=progress.model_copy(update={"arrays": {}}),
            raw_train=np.array(arrays["raw_train"], dtype=np.float64),
            raw_valid=np.array(arrays["raw_valid"], dtype=np.float64),
        )


def start_label_state(
    labels: LabelData,
    *,
    parties: Sequence[str],
    objective: Objective,
    num_class: int,
    patience: int,
    weights: Mapping[str, float] | None = None,
    combine: Combine = DEFAULT_COMBINE,
) -> LabelState:
    """Round 0: F_0 from the label party's training labels, coefficients from the weights."""
    check_task(objective, num_class)
    for name, y in (("train", labels.y_train), ("valid", labels.y_valid)):
        check_labels(np.asarray(y, dtype=np.float64), objective, num_class)
        if name == "train" and len(y) == 0:
            raise ValueError("no training entities")
    base = base_score([label_stats(labels.y_train, objective, num_class)], objective, num_class)
    progress = VerticalProgress(
        objective=objective,
        num_class=num_class,
        base_score=base,
        parties=list(parties),
        coefficients=round_coefficients(parties, weights, combine),
        patience=patience,
    )
    return LabelState(
        progress=progress,
        raw_train=_tile(base, len(labels.y_train), num_class),
        raw_valid=_tile(base, len(labels.y_valid), num_class),
    )


def gradient_message(state: LabelState, labels: LabelData) -> GradientMessage:
    """Label party step: g and h at F_{t-1} on the train entities for round t."""
    p = state.progress
    grad, hess = gradients(labels.y_train, state.raw_train, p.objective, p.num_class)
    shape = state.raw_train.shape
    return GradientMessage(round=p.round + 1, grad=grad.reshape(shape), hess=hess.reshape(shape))


def _delta_problems(delta: PartyDelta, state: LabelState, round_: int) -> list[str]:
    problems = []
    if delta.round != round_:
        problems.append(f"delta is for round {delta.round}, not {round_}")
    if delta.party not in state.progress.coefficients:
        problems.append("not a party of this run")
    for name, got, want in (
        ("train", delta.train, state.raw_train),
        ("valid", delta.valid, state.raw_valid),
    ):
        if np.shape(got) != want.shape:
            problems.append(f"{name} deltas have shape {np.shape(got)}, expected {want.shape}")
        elif not np.all(np.isfinite(got)):
            problems.append(f"non-finite {name} deltas")
    return problems


def combine_round(
    state: LabelState,
    deltas: Sequence[PartyDelta],
    labels: LabelData,
    *,
    min_parties: int = 1,
) -> LabelState:
    """Label party step: F += Σ_p c_p δ_p, validation loss, early stopping, history.

    A party missing from ``deltas`` contributes nothing this round. Raises ``ValueError`` on
    a malformed or duplicate delta and when fewer than ``min_parties`` deltas arrive.
    """
    p = state.progress
    if p.stop_reason is not None:
        raise ValueError(f"training already stopped ({p.stop_reason})")
    t = p.round + 1
    seen: set[str] = set()
    for delta in deltas:
        problems = _delta_problems(delta, state, t)
        if delta.party in seen:
            problems.append("second delta from the same party")
        seen.add(delta.party)
        if problems:
            raise ValueError(f"round {t}: delta of {delta.party!r}: {'; '.join(problems)}")
    if len(deltas) < min_parties:
        raise ValueError(f"round {t}: {len(deltas)} delta(s), min_parties is {min_parties}")
    raw_train = state.raw_train.copy()
    raw_valid = state.raw_valid.copy()
    for delta in sorted(deltas, key=lambda d: p.parties.index(d.party)):
        c = p.coefficients[delta.party]
        raw_train += c * delta.train
        raw_valid += c * delta.valid
    valid = evaluate(labels.y_valid, raw_valid, p.objective, p.num_class)
    stopper = EarlyStopping(
        patience=p.patience, best_round=p.best_round, best_loss=p.best_loss, last_round=p.round
    )
    stop = stopper.update(t, valid.get(LOSS_METRIC[p.objective], math.nan))
    record = VerticalRoundRecord(
        round=t,
        parties=[d.party for d in deltas],
        valid=valid,
        trees={d.party: d.trees for d in deltas},
    )
    progress = p.model_copy(
        update={
            "round": t,
            "best_round": stopper.best_round if len(labels.y_valid) else t,
            "best_loss": stopper.best_loss,
            "stop_reason": "early_stopping" if stop and len(labels.y_valid) else None,
            "history": [*p.history, record],
        }
    )
    return LabelState(progress=progress, raw_train=raw_train, raw_valid=raw_valid)


def next_round_allowed(state: LabelState, spec: TrainingSpec) -> StopReason | None:
    """None when another round may run, else why not (rounds, early stopping, max_trees)."""
    p = state.progress
    if p.stop_reason is not None:
        return p.stop_reason
    return stop_before(
        p.round + 1,
        rounds=spec.rounds,
        trees=p.total_trees,
        next_trees=len(p.parties) * spec.trees_per_round * p.num_class,
        max_trees=spec.max_trees,
    )


def finish(state: LabelState, spec: TrainingSpec) -> LabelState:
    """Mark the run as stopped (when it is) so the checkpoint says why."""
    reason = next_round_allowed(state, spec)
    if reason is None or state.progress.stop_reason == reason:
        return state
    return replace(state, progress=state.progress.model_copy(update={"stop_reason": reason}))


# --------------------------------------------------------------------------------------
# Score tables and fusion
# --------------------------------------------------------------------------------------


def score_columns(num_class: int) -> list[str]:
    return [SCORE] if num_class == 1 else [f"{SCORE}_{k}" for k in range(num_class)]


def score_table(ids: pl.Series, raw: np.ndarray, *, key: str, num_class: int = 1) -> pl.DataFrame:
    """A party's scores keyed by the alignment id: ``key`` + score column(s), Float64."""
    raw = np.asarray(raw, dtype=np.float64).reshape(len(ids), num_class)
    columns = {name: raw[:, k] for k, name in enumerate(score_columns(num_class))}
    return pl.DataFrame({key: ids}).hstack(pl.DataFrame(columns))


def join_scores(
    tables: Mapping[str, pl.DataFrame],
    *,
    key: str,
    num_class: int = 1,
    ids: pl.Series | None = None,
) -> pl.DataFrame:
    """One row per id (``ids``, default: every id of any table in first-seen order) with
    ``{party}:{score column}`` columns, null where the party does not know the entity.

    Keys must be unique in every table (1:1 joins fail loudly otherwise).
    """
    if ids is None:
        ids = pl.concat([t[key] for t in tables.values()]).unique(maintain_order=True)
    out = pl.DataFrame({key: ids})
    if out[key].is_duplicated().any():
        raise ValueError(f"duplicate ids in '{key}'")
    cols = score_columns(num_class)
    for party, table in tables.items():
        missing = [c for c in [key, *cols] if c not in table.columns]
        if missing:
            raise ValueError(f"score table of {party!r} lacks columns {missing}")
        renamed = table.select(
            pl.col(key), *[pl.col(c).cast(pl.Float64).alias(f"{party}:{c}") for c in cols]
        )
        out = out.join(renamed, on=key, how="left", validate="1:1", maintain_order="left")
    return out


class Fusion(BaseModel):
    """How per-party scores become one raw score (see the module docstring for the rule)."""

    model_config = ConfigDict(frozen=True)

    kind: FusionKind
    objective: Objective
    num_class: int = Field(ge=1)
    parties: list[str]
    base_score: list[float]
    score_kind: ScoreKind = "raw"
    weights: list[float] = Field(default_factory=list, description="c_p (fixed, rounds)")
    renormalise: bool = False
    coef: list[list[float]] = Field(default_factory=list, description="learned: K x P·K")
    intercept: list[float] = Field(default_factory=list, description="learned: K")

    @model_validator(mode="after")
    def _consistent(self) -> Fusion:
        check_task(self.objective, self.num_class)
        if len(self.base_score) != self.num_class:
            raise ValueError(f"base_score has {len(self.base_score)} values")
        if self.kind == "learned":
            width = len(self.parties) * self.num_class
            if len(self.coef) != self.num_class or any(len(r) != width for r in self.coef):
                raise ValueError(f"coef must be {self.num_class} x {width}")
            if len(self.intercept) != self.num_class:
                raise ValueError(f"intercept must have {self.num_class} values")
        elif len(self.weights) != len(self.parties):
            raise ValueError("weights must have one value per party")
        return self


def fixed_fusion(
    parties: Sequence[str],
    weights: Mapping[str, float] | None,
    *,
    objective: Objective,
    num_class: int,
    base: Sequence[float],
) -> Fusion:
    """Weighted mean of the parties' raw scores (renormalised over present parties)."""
    w = fusion_weights(parties, weights)
    return Fusion(
        kind="fixed",
        objective=objective,
        num_class=num_class,
        parties=list(parties),
        base_score=list(base),
        weights=[w[p] for p in parties],
        renormalise=True,
    )


def rounds_fusion(progress: VerticalProgress) -> Fusion:
    """The gradient-rounds model as a fusion of the parties' model outputs."""
    return Fusion(
        kind="rounds",
        objective=progress.objective,
        num_class=progress.num_class,
        parties=list(progress.parties),
        base_score=list(progress.base_score),
        score_kind="delta",
        weights=[progress.coefficients[p] for p in progress.parties],
        renormalise=False,
    )


def _deltas(joined: pl.DataFrame, fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    """(n, P, K) deltas with 0 where absent, and the (n, P) presence mask."""
    k = fusion.num_class
    cols = score_columns(k)
    n = joined.height
    deltas = np.zeros((n, len(fusion.parties), k))
    present = np.zeros((n, len(fusion.parties)), dtype=bool)
    offset = np.zeros(k) if fusion.score_kind == "delta" else np.asarray(fusion.base_score)
    for j, party in enumerate(fusion.parties):
        names = [f"{party}:{c}" for c in cols]
        if not all(name in joined.columns for name in names):
            continue
        values = joined.select(names).to_numpy().astype(np.float64)
        ok = np.all(np.isfinite(values), axis=1)
        present[:, j] = ok
        deltas[ok, j, :] = values[ok] - offset
    return deltas, present


def apply_fusion(joined: pl.DataFrame, fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    """Fused raw scores ((n,) or (n, K)) and the number of parties present per row, from
    a :func:`join_scores` table. A null or non-finite score counts as absent."""
    k = fusion.num_class
    deltas, present = _deltas(joined, fusion)
    n = joined.height
    if fusion.kind == "learned":
        coef = np.asarray(fusion.coef, dtype=np.float64)
        raw = deltas.reshape(n, -1) @ coef.T + np.asarray(fusion.intercept)
    else:
        c = np.asarray(fusion.weights, dtype=np.float64)
        total = (deltas * c[None, :, None]).sum(axis=1)
        if fusion.renormalise:
            mass = present @ c
            scale = np.divide(c.sum(), mass, out=np.zeros(n), where=mass > 0)
            total = total * scale[:, None]
        raw = np.asarray(fusion.base_score)[None, :] + total
    return _shape(raw, n, k), present.sum(axis=1)


def fuse_scores(
    tables: Mapping[str, pl.DataFrame],
    fusion: Fusion,
    *,
    key: str,
    ids: pl.Series | None = None,
) -> pl.DataFrame:
    """Join the parties' score tables and fuse them: ``key``, score column(s), ``parties``."""
    joined = join_scores(tables, key=key, num_class=fusion.num_class, ids=ids)
    raw, count = apply_fusion(joined, fusion)
    out = score_table(joined[key], raw, key=key, num_class=fusion.num_class)
    return out.with_columns(pl.Series("parties", count, dtype=pl.Int32))


def learn_fusion(
    tables: Mapping[str, pl.DataFrame],
    labels: pl.DataFrame,
    *,
    key: str,
    objective: Objective,
    num_class: int,
    base: Sequence[float],
    score_kind: ScoreKind = "raw",
    label: str = "label",
    C: float = 1.0,
) -> Fusion:
    """Label party: fit the fusion on held-out (validation) scores of its labelled entities.

    Binary: logistic regression on the parties' deltas; multiclass: multinomial logistic
    regression on all P·K delta columns; regression: least squares with non-negative
    coefficients. Absent scores are zero deltas, as when the fusion is applied.
    """
    check_task(objective, num_class)
    parties = list(tables)
    joined = join_scores(tables, key=key, num_class=num_class, ids=labels[key])
    y = labels[label].cast(pl.Float64).to_numpy()
    check_labels(y, objective, num_class)
    template = Fusion(
        kind="learned",
        objective=objective,
        num_class=num_class,
        parties=parties,
        base_score=list(base),
        score_kind=score_kind,
        coef=[[0.0] * (len(parties) * num_class) for _ in range(num_class)],
        intercept=[0.0] * num_class,
    )
    deltas, _ = _deltas(joined, template)
    X = deltas.reshape(len(y), -1)
    if objective == "regression":
        reg = LinearRegression(positive=True).fit(X, y)
        coef = [[float(v) for v in np.ravel(reg.coef_)]]
        intercept = [float(reg.intercept_)]
    else:
        classes = np.unique(y)
        want = np.arange(2 if objective == "binary" else num_class)
        if not np.array_equal(classes, want):
            raise ValueError(f"learned fusion needs every class in the labels, got {classes}")
        clf = LogisticRegression(C=C, max_iter=2000).fit(X, y.astype(np.int64))
        coef = [[float(v) for v in row] for row in np.atleast_2d(clf.coef_)]
        intercept = [float(v) for v in np.ravel(clf.intercept_)]
    return template.model_copy(update={"coef": coef, "intercept": intercept})


# --------------------------------------------------------------------------------------
# One-shot mode (labels shared with the parties)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OneShotResult:
    """A party's full model on its block and its raw scores per split."""

    party: str
    model_text: str
    iterations: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray | None


def train_one_shot(
    block: PartyBlock,
    labels: LabelData,
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
) -> OneShotResult:
    """Party step (one-shot): LightGBM on its block with the shared labels of the overlap.

    Budget rounds × trees_per_round iterations, boosting from the average (so the model text
    scores alone), early stopping after patience × trees_per_round iterations without a
    better validation loss; the model keeps the best iteration.
    """
    check_task(objective, num_class)
    check_block(block, labels)
    check_labels(np.asarray(labels.y_train, dtype=np.float64), objective, num_class)
    params = lgb_params(spec, objective, num_class, seed=party_seed(spec.seed, block.party, 0))
    params["boost_from_average"] = True
    params["metric"] = ONE_SHOT_METRIC[objective]
    names = list(block.feature_names)
    cats = list(block.categorical)
    train = lgb.Dataset(
        block.X_train,
        label=np.asarray(labels.y_train, dtype=np.float64),
        feature_name=names,
        categorical_feature=cats,
        free_raw_data=True,
    )
    valid_sets: list[lgb.Dataset] = []
    callbacks: list[Callable[..., Any]] = []
    if len(labels.y_valid):
        valid = lgb.Dataset(
            block.X_valid,
            label=np.asarray(labels.y_valid, dtype=np.float64),
            feature_name=names,
            categorical_feature=cats,
            reference=train,
            free_raw_data=True,
        )
        valid_sets = [valid]
        callbacks = [lgb.early_stopping(spec.patience * spec.trees_per_round, verbose=False)]
    booster = lgb.train(
        params,
        train,
        num_boost_round=spec.rounds * spec.trees_per_round,
        valid_sets=valid_sets,
        callbacks=callbacks,
    )
    best = booster.best_iteration or booster.current_iteration()
    text = str(booster.model_to_string(num_iteration=best))
    return OneShotResult(
        party=block.party,
        model_text=text,
        iterations=best,
        train=score_block(text, block.X_train, num_class),
        valid=score_block(text, block.X_valid, num_class),
        test=None if block.X_test is None else score_block(text, block.X_test, num_class),
    )


# --------------------------------------------------------------------------------------
# In-memory reference loops
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerticalRun:
    """Result of :func:`train_vertical_rounds`: the label state and every party's model."""

    state: LabelState
    models: dict[str, PartyModel]
    test: dict[str, float]


def predict_rounds(
    state: LabelState,
    models: Mapping[str, PartyModel],
    blocks: Mapping[str, np.ndarray],
    *,
    upto_round: int | None = None,
) -> np.ndarray:
    """F_0 + Σ_p c_p · model_p(block_p) at the best round (aligned blocks, all parties)."""
    p = state.progress
    r = p.best_round if upto_round is None else upto_round
    n = next(iter(blocks.values())).shape[0]
    out = _tile(p.base_score, n, p.num_class)
    for party in p.parties:
        text = party_model_text(models[party], r)
        out = out + p.coefficients[party] * score_block(text, blocks[party], p.num_class)
    return out


def train_vertical_rounds(
    labels: LabelData,
    blocks: Mapping[str, PartyBlock],
    *,
    spec: TrainingSpec,
    objective: Objective,
    num_class: int,
    fusion: FusionSpec | None = None,
    combine: Combine = DEFAULT_COMBINE,
    state: LabelState | None = None,
    models: Mapping[str, PartyModel] | None = None,
    stop_after: int | None = None,
) -> VerticalRun:
    """The in-memory reference loop of gradient rounds; resumes from ``state``/``models``.

    ``stop_after`` ends the call after that round (as a killed run would) without marking the
    run stopped. Test metrics use the best round when ``labels.y_test`` and the blocks'
    ``X_test`` are given.
    """
    for block in blocks.values():
        check_block(block, labels)
    parties = list(blocks)
    if state is None:
        state = start_label_state(
            labels,
            parties=parties,
            objective=objective,
            num_class=num_class,
            patience=spec.patience,
            weights=None if fusion is None else fusion.weights,
            combine=combine,
        )
    current = {p: PartyModel(party=p, num_class=num_class) for p in parties}
    current.update(models or {})
    while next_round_allowed(state, spec) is None:
        if stop_after is not None and state.progress.round >= stop_after:
            return VerticalRun(state=state, models=current, test={})
        message = gradient_message(state, labels)
        deltas = []
        for party in parties:
            current[party], delta = train_party_round(
                current[party],
                blocks[party],
                message,
                spec=spec,
                objective=objective,
                num_class=num_class,
            )
            deltas.append(delta)
        state = combine_round(state, deltas, labels, min_parties=spec.min_parties)
    state = finish(state, spec)
    test: dict[str, float] = {}
    if labels.y_test is not None and all(b.X_test is not None for b in blocks.values()):
        raw = predict_rounds(
            state, current, {p: b.X_test for p, b in blocks.items() if b.X_test is not None}
        )
        test = evaluate(labels.y_test, raw, objective, num_class)
    return VerticalRun(state=state, models=current, test=test)


def model_trees(model: PartyModel, upto_round: int | None = None) -> int:
    """LightGBM trees (all classes) in a party's model, optionally cut at a round."""
    text = model.model_text if upto_round is None else party_model_text(model, upto_round)
    return 0 if text is None else count_trees(text)
