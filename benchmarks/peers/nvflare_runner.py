"""NVFlare peer of ``benchmarks.bench_peers``: XGBoost histogram-based, bagging or cyclic.

Run by the Python of ``benchmarks/.peers/nvflare`` (NVFlare 2.9, XGBoost 3.2), never
imported by fedfuse:

    python nvflare_runner.py --folder PARTITION --out RESULT.json --trees 200 --mode histogram

NVFlare's own recipes, each site reading ``site-N/train.csv`` / ``valid.csv`` of the partition
folder with NVFlare's ``CSVDataLoader`` (label first, no header), run in its simulator
(``SimEnv``, one client per site):

* histogram: ``XGBHorizontalRecipe`` (XGBoost's federated histogram aggregation), one tree per
  round, ``trees`` rounds, early stopping on the sites' validation AUC after
  ``--early-stopping`` rounds without a gain (the recipe's default is 2; the benchmark passes
  20, the patience of the pooled reference);
* bagging: ``XGBBaggingRecipe(training_mode="bagging", lr_mode="scaled")``: every site adds one
  tree per round with its learning rate scaled by its share of the training rows;
  ``trees / sites`` rounds;
* cyclic: ``XGBBaggingRecipe(training_mode="cyclic")``: each round passes the model through
  every site in turn, one tree each; ``trees / sites`` rounds.

The final global model (site-1's copy for histogram, the server's for bagging and cyclic)
scores ``test.csv``; the result is one JSON object written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import xgboost as xgb
from nvflare.app_opt.xgboost.histogram_based_v2.csv_data_loader import CSVDataLoader
from nvflare.app_opt.xgboost.recipes import XGBBaggingRecipe, XGBHorizontalRecipe
from nvflare.recipe import SimEnv, set_per_site_config
from sklearn.metrics import roc_auc_score

ETA = 0.1
MAX_DEPTH = 8
NTHREAD = 1  # one thread per site on the shared machine


def rows(path: Path) -> int:
    with path.open() as f:
        return sum(1 for line in f if line.strip())


def find_model(workspace: Path, name: str, under: str) -> Path:
    found = sorted(p for p in workspace.rglob(name) if under in p.parts)
    if not found:
        raise FileNotFoundError(f"no {name} under {under}/ in {workspace}")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--mode", choices=["histogram", "bagging", "cyclic"], required=True)
    parser.add_argument("--early-stopping", type=int, default=20)
    args = parser.parse_args()
    folder = args.folder.resolve()
    sites = json.loads((folder / "meta.json").read_text())["sites"]
    name = f"xgb-{args.mode}"
    if args.mode == "histogram":
        rounds = args.trees
        recipe = XGBHorizontalRecipe(
            name=name,
            min_clients=len(sites),
            num_rounds=rounds,
            early_stopping_rounds=args.early_stopping,
            xgb_params={
                "max_depth": MAX_DEPTH,
                "eta": ETA,
                "objective": "binary:logistic",
                "eval_metric": "auc",
                "tree_method": "hist",
                "nthread": NTHREAD,
            },
        )
        config = {s: {"data_loader": CSVDataLoader(folder=str(folder))} for s in sites}
    else:
        rounds = max(1, args.trees // len(sites))
        recipe = XGBBaggingRecipe(
            name=name,
            min_clients=len(sites),
            training_mode=args.mode,
            num_rounds=rounds,
            num_local_parallel_tree=1,
            local_subsample=1.0,
            learning_rate=ETA,
            max_depth=MAX_DEPTH,
            nthread=NTHREAD,
            lr_mode="scaled" if args.mode == "bagging" else "uniform",
        )
        counts = {s: rows(folder / s / "train.csv") for s in sites}
        total = sum(counts.values())
        config = {
            s: {"data_loader": CSVDataLoader(folder=str(folder)), "lr_scale": counts[s] / total}
            for s in sites
        }
    set_per_site_config(recipe, config)
    with tempfile.TemporaryDirectory(prefix="nvflare-sim-") as tmp:
        env = SimEnv(clients=list(sites), num_threads=len(sites), workspace_root=tmp)
        run = recipe.execute(env)
        workspace = Path(run.get_result() or Path(tmp) / name)
        if args.mode == "histogram":
            model_path = find_model(workspace, "model.json", sites[0])
        else:
            model_path = find_model(workspace, "xgboost_model.json", "server")
        bst = xgb.Booster()
        bst.load_model(str(model_path))
    table = np.loadtxt(folder / "test.csv", delimiter=",", ndmin=2)
    score = bst.predict(xgb.DMatrix(table[:, 1:]))
    result = {
        "auc": float(roc_auc_score(table[:, 0], score)),
        "trees": len(bst.get_dump()),
        "rounds": rounds,
    }
    args.out.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
