"""FOR COMPARISON ONLY: baselines that pool every party's block and the labels in one
process (each block alone, and a centralised model on the joined blocks), to measure what
vertical training gives up against models no consortium could train.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightgbm as lgb
import numpy as np

from storage.store import TableRef
from tasks.horizontal.training import evaluate, lgb_params
from tasks.vertical.inputs import label_data, party_block
from tasks.vertical.one_shot import train_one_shot
from tasks.vertical.refs import VerticalSetup


def pooled_baselines(
    setups: Mapping[str, VerticalSetup], alignments: Mapping[str, TableRef], label_party: str
) -> dict[str, dict[str, float]]:
    """FOR COMPARISON ONLY, pools every party's block and the labels in one process: each
    party's block alone (one model on its block with the overlap's labels) and a centralised
    model on the joined blocks, same parameters, budget rounds x trees_per_round x parties
    and early stopping on the validation split."""
    data = label_data(setups[label_party], alignments[label_party])
    blocks = {p: party_block(s, alignments[p]) for p, s in setups.items()}
    first = setups[label_party]
    out: dict[str, dict[str, float]] = {}
    for party, block in blocks.items():
        shot = train_one_shot(
            block, data, spec=first.training, objective=first.objective, num_class=first.num_class
        )
        assert shot.test is not None and data.y_test is not None
        out[f"{party} alone"] = evaluate(data.y_test, shot.test, first.objective, first.num_class)
    t = first.training
    params = lgb_params(t, first.objective, first.num_class, seed=t.seed) | {
        "boost_from_average": True
    }
    names = [n for b in blocks.values() for n in b.feature_names]
    cats = [n for b in blocks.values() for n in b.categorical]
    x_train = np.hstack([b.X_train for b in blocks.values()])
    x_valid = np.hstack([b.X_valid for b in blocks.values()])
    x_test = np.hstack([b.X_test for b in blocks.values() if b.X_test is not None])
    train_set = lgb.Dataset(
        x_train, data.y_train, feature_name=names, categorical_feature=cats, free_raw_data=False
    )
    valid_set = lgb.Dataset(x_valid, data.y_valid, reference=train_set)
    budget = t.rounds * t.trees_per_round * len(blocks)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=budget,
        valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(t.patience * t.trees_per_round, verbose=False)],
    )
    assert data.y_test is not None
    raw = np.asarray(booster.predict(x_test, raw_score=True, num_iteration=booster.best_iteration))
    out["centralised (pooled data)"] = evaluate(data.y_test, raw, first.objective, first.num_class)
    return out
