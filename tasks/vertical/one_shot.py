"""One-shot mode (``fusion.mode = "one_shot"``, opt-in ``fusion.share_labels``): each
party trains a complete LightGBM model on its block with the shared labels of the overlap.

The model is early-stopped on the shared validation labels (:func:`train_one_shot`); the
party returns raw scores for its train / valid / test entities, which the label party then
fuses (:mod:`tasks.vertical.fusion`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np

from tasks.horizontal.model_text import check_task
from tasks.horizontal.training import check_labels, lgb_params, party_seed
from tasks.spec.models import TrainingSpec
from tasks.types import Objective
from tasks.vertical.data import LabelData, PartyBlock, check_block
from tasks.vertical.party_model import score_block

#: Validation metric of one-shot early stopping (the loss of ``LOSS_METRIC``).
ONE_SHOT_METRIC: dict[str, str] = {
    "binary": "binary_logloss",
    "multiclass": "multi_logloss",
    "regression": "l2",
}


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
