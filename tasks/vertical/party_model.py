"""Gradient rounds, a party's side: its own LightGBM model, continued round after round
against the label party's gradients, rewound to any round, and scored on its block.

Each party fits ``trees_per_round`` trees on its block with a LightGBM custom objective
(:func:`train_party_round`). It has no labels, so within the round it follows the
second-order approximation g_t = g + h · δ_own (δ_own: the output of this round's own trees
so far, :func:`newton_objective`), and every further tree keeps reducing the loss as if the
party were alone. The trees are appended to the party's single LightGBM model (continued
training), which never leaves the party; it returns only its per-entity raw deltas.

A party's state is :class:`PartyModel` (model text + iterations after each round; JSON).
Every round starts from the model text and the seeds depend only on (spec seed, party,
round), so a resumed run repeats exactly what an uninterrupted one does; :func:`rewind`
brings a model that ran ahead or missed rounds to the round the label party asks for.
"""

from __future__ import annotations

from collections.abc import Callable

import lightgbm as lgb
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.horizontal.model_text import check_task, count_trees, load_booster
from tasks.horizontal.training import lgb_params, party_seed
from tasks.spec.models import TrainingSpec
from tasks.types import Objective
from tasks.vertical.data import PartyBlock, raw_shape
from tasks.vertical.rounds import GradientMessage, PartyDelta


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
    return raw_shape(np.asarray(out, dtype=np.float64), X.shape[0], num_class)


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
    return raw_shape(np.asarray(out, dtype=np.float64), X.shape[0], num_class)


def model_trees(model: PartyModel, upto_round: int | None = None) -> int:
    """LightGBM trees (all classes) in a party's model, optionally cut at a round."""
    text = model.model_text if upto_round is None else party_model_text(model, upto_round)
    return 0 if text is None else count_trees(text)
