"""Pooled XGBoost with the peers' booster settings: the reference for their own gaps.

Run by the Python of ``benchmarks/.peers/nvflare`` (XGBoost 3.2), never imported by fedfuse:

    python xgboost_runner.py --folder PARTITION --out RESULT.json --trees 200 --mode pooled

POOLS DATA: every site's ``train.csv`` is concatenated and one booster is trained with the
settings the Flower and NVFlare runners use (η 0.1, depth 8, ``hist``), early stopping after
20 rounds without a gain on the pooled ``valid.csv`` (as the pooled LightGBM reference), and
the model scores ``test.csv``. The gap between this and the peers is what federation costs
them; the gap between this and the pooled LightGBM is what the booster settings cost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import xgboost as xgb
from sklearn.metrics import roc_auc_score

PARAMS = {
    "objective": "binary:logistic",
    "eta": 0.1,
    "max_depth": 8,
    "eval_metric": "auc",
    "tree_method": "hist",
    "nthread": 1,
}


def read(paths: list[Path]) -> xgb.DMatrix:
    table = np.concatenate([np.loadtxt(p, delimiter=",", ndmin=2) for p in paths])
    return xgb.DMatrix(table[:, 1:], label=table[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--mode", choices=["pooled"], default="pooled")
    args = parser.parse_args()
    sites = json.loads((args.folder / "meta.json").read_text())["sites"]
    train = read([args.folder / s / "train.csv" for s in sites])
    valid = read([args.folder / s / "valid.csv" for s in sites])
    bst = xgb.train(
        PARAMS,
        train,
        num_boost_round=args.trees,
        evals=[(valid, "valid")],
        early_stopping_rounds=20,
        verbose_eval=False,
    )
    test = np.loadtxt(args.folder / "test.csv", delimiter=",", ndmin=2)
    used = bst.best_iteration + 1
    score = bst.predict(xgb.DMatrix(test[:, 1:]), iteration_range=(0, used))
    result = {"auc": float(roc_auc_score(test[:, 0], score)), "trees": used}
    args.out.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
