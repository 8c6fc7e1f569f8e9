"""Flower peer of ``benchmarks.bench_peers``: ``FedXgbBagging`` or ``FedXgbCyclic``.

Run by the Python of ``benchmarks/.peers/flower`` (``flwr[simulation]`` 1.42, XGBoost 3.2),
never imported by fedfuse:

    python flower_runner.py --folder PARTITION --out RESULT.json --trees 200 --mode bagging

A ``ServerApp`` runs Flower's own strategy (``strategy.start``) and a ``ClientApp`` trains on
``site-N/train.csv`` of the partition folder (one supernode per site) as in Flower's
``xgboost-comprehensive`` example: the first round trains from scratch, later rounds load
the global model and boost locally; bagging sends back the new trees, cyclic the whole
model. Everything runs in Flower's simulation engine (``run_simulation``). The final global
model scores ``test.csv``; the result is one JSON object written to ``--out``.

Tree budget: every local round adds one tree per selected client. Bagging trains all sites
each round (``trees / sites`` rounds, each adding ``sites`` trees); cyclic trains one site
per round (``trees`` rounds of one tree).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedXgbBagging, FedXgbCyclic
from flwr.simulation import run_simulation
from sklearn.metrics import roc_auc_score

# The documented example's booster settings, one thread per site on the shared machine.
PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "eta": 0.1,
    "max_depth": 8,
    "eval_metric": "auc",
    "nthread": 1,
    "num_parallel_tree": 1,
    "subsample": 1.0,
    "tree_method": "hist",
}
LOCAL_ROUNDS = 1


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(path, delimiter=",", ndmin=2)
    return table[:, 1:], table[:, 0]


def model_bytes(record: ArrayRecord) -> bytearray:
    return bytearray(record["0"].numpy().tobytes())


def build_apps(
    folder: Path, mode: str, rounds: int, out_model: Path
) -> tuple[ServerApp, ClientApp]:
    sites = json.loads((folder / "meta.json").read_text())["sites"]
    server_app = ServerApp()
    client_app = ClientApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        arrays = ArrayRecord([np.frombuffer(b"", dtype=np.uint8)])
        # every site in every bagging round and in every cycle (the default minimum of 2
        # lets round 1 start before all supernodes are up)
        n = len(sites)
        strategy = (
            FedXgbBagging(
                fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
            )
            if mode == "bagging"
            else FedXgbCyclic(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n)
        )
        result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
        out_model.write_bytes(bytes(model_bytes(result.arrays)))

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        site = sites[int(context.node_config["partition-id"])]
        X, y = read_csv(folder / site / "train.csv")
        dtrain = xgb.DMatrix(X, label=y)
        if msg.content["config"]["server-round"] == 1:
            bst = xgb.train(PARAMS, dtrain, num_boost_round=LOCAL_ROUNDS)
        else:
            bst = xgb.Booster(params=PARAMS)
            bst.load_model(model_bytes(msg.content["arrays"]))
            for _ in range(LOCAL_ROUNDS):
                bst.update(dtrain, bst.num_boosted_rounds())
            if mode == "bagging":  # only the new trees go back
                n = bst.num_boosted_rounds()
                bst = bst[n - LOCAL_ROUNDS : n]
        local = np.frombuffer(bst.save_raw("json"), dtype=np.uint8)
        content = RecordDict(
            {
                "arrays": ArrayRecord([local]),
                "metrics": MetricRecord({"num-examples": len(y)}),
            }
        )
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        # FedXgbCyclic asks one site per round even with fraction_evaluate=0.0
        site = sites[int(context.node_config["partition-id"])]
        X, y = read_csv(folder / site / "valid.csv")
        bst = xgb.Booster(params=PARAMS)
        bst.load_model(model_bytes(msg.content["arrays"]))
        auc = float(roc_auc_score(y, bst.predict(xgb.DMatrix(X)))) if len(set(y)) > 1 else 0.5
        metrics = MetricRecord({"auc": auc, "num-examples": len(y)})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return server_app, client_app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--mode", choices=["bagging", "cyclic"], required=True)
    args = parser.parse_args()
    sites = len(json.loads((args.folder / "meta.json").read_text())["sites"])
    rounds = max(1, args.trees // sites) if args.mode == "bagging" else args.trees
    model_path = args.out.with_suffix(".model.json")
    server_app, client_app = build_apps(args.folder, args.mode, rounds, model_path)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    bst = xgb.Booster(params=PARAMS)
    bst.load_model(bytearray(model_path.read_bytes()))
    X_test, y_test = read_csv(args.folder / "test.csv")
    score = bst.predict(xgb.DMatrix(X_test))
    result = {
        "auc": float(roc_auc_score(y_test, score)),
        "trees": len(bst.get_dump()),
        "rounds": rounds,
    }
    args.out.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
