"""Federated vs centralised vs local-only on synthetic data (the DESIGN.md §4 setting).

make_classification(60000, 30 features, 10 informative, random_state=0); a random 20% is a
global IID test set; the rest is split over 5 parties IID or with Dirichlet label skew
(α = 1.0, 0.3). Every party validates on its own hash-split 20% (federated early stopping
on the size-weighted validation logloss). Prints the test AUC of each configuration.

    .venv/bin/python -m benchmarks.fed_quick [--only iid,a1.0,a0.3] [--configs T16,T64]

About 10 minutes per partition on two cores (single-threaded LightGBM per party).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from typing import Any

import numpy as np
import polars as pl
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score

from tasks.horizontal.baselines import train_centralised, train_local_only
from tasks.horizontal.ensemble import GlobalEnsemble, ensemble_size, predict_raw
from tasks.horizontal.loop import TrainingHistory, train_federated
from tasks.spec.models import TrainingSpec
from tasks.types import ENTITY_HASH, LABEL

PARTIES = 5
NAMES = [f"f{i:02d}" for i in range(30)]
PARTITIONS: dict[str, float | None] = {"iid": None, "a1.0": 1.0, "a0.3": 0.3}
#: The spec defaults: 30 rounds x 4 trees, learning rate 0.1, 31 leaves, patience 5.
DEFAULT = TrainingSpec(test_fraction=0.0)

#: (label, "cen" | "fed", spec overrides)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("centralised   T4  lr.1 R30       ", "cen", {}),
    ("centralised   T4  lr.1 R400      ", "cen", {"rounds": 400}),
    ("fed samples   T4  lr.1 R30       ", "fed", {}),
    ("fed lr_scaled T4  lr.1 R30       ", "fed", {"aggregation": "lr_scaled"}),
    ("fed uniform   T4  lr.1 R30       ", "fed", {"aggregation": "uniform"}),
    ("fed samples   T4  lr.1 R150      ", "fed", {"rounds": 150}),
    ("fed lr_scaled T4  lr.1 R150      ", "fed", {"rounds": 150, "aggregation": "lr_scaled"}),
    ("fed samples   T4  lr.3 R60       ", "fed", {"rounds": 60, "learning_rate": 0.3}),
    ("fed samples   T16 lr.1 R40       ", "fed", {"trees_per_round": 16, "rounds": 40}),
    ("fed samples   T16 lr.1 R80 63lvs ", "fed", {"trees_per_round": 16, "rounds": 80, "num_leaves": 63}),
    ("fed lr_scaled T16 lr.1 R80 63lvs ", "fed", {"trees_per_round": 16, "rounds": 80, "num_leaves": 63, "aggregation": "lr_scaled"}),
    ("fed samples   T64 lr.1 R20       ", "fed", {"trees_per_round": 64, "rounds": 20}),
    ("fed lr_scaled T64 lr.1 R20       ", "fed", {"trees_per_round": 64, "rounds": 20, "aggregation": "lr_scaled"}),
]  # fmt: skip


def make_data() -> tuple[pl.DataFrame, pl.DataFrame]:
    x, y = make_classification(60000, 30, n_informative=10, random_state=0)
    keys = [hashlib.sha256(f"e{i}".encode()).hexdigest() for i in range(len(y))]
    frame = pl.DataFrame({ENTITY_HASH: keys, LABEL: y.astype(np.int64)}).hstack(
        pl.DataFrame(x, schema=NAMES)
    )
    test = np.random.default_rng(0).random(len(y)) < 0.2
    return frame.filter(pl.Series(~test)), frame.filter(pl.Series(test))


def partition(frame: pl.DataFrame, alpha: float | None, seed: int = 0) -> dict[str, pl.DataFrame]:
    """IID (alpha None) or Dirichlet label skew: each class spread over parties ~ Dir(α)."""
    rng = np.random.default_rng(seed)
    owner = np.empty(frame.height, dtype=np.int64)
    y = frame[LABEL].to_numpy()
    if alpha is None:
        owner[:] = rng.integers(0, PARTIES, frame.height)
    else:
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            cuts = (np.cumsum(rng.dirichlet([alpha] * PARTIES))[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                owner[part] = k
    return {f"p{k}": frame.filter(pl.Series(owner == k)) for k in range(PARTIES)}


def auc(raw: np.ndarray, test: pl.DataFrame) -> float:
    return float(roc_auc_score(test[LABEL].to_numpy(), raw))


def run(
    kind: str, parts: dict[str, pl.DataFrame], spec: TrainingSpec
) -> tuple[GlobalEnsemble, TrainingHistory]:
    train = train_centralised if kind == "cen" else train_federated
    return train(
        parts, spec=spec, objective="binary", num_class=1, categorical=[], feature_names=NAMES
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(PARTITIONS))
    parser.add_argument("--configs", default="", help="comma-separated label substrings")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    wanted = [w for w in args.configs.split(",") if w]
    train, test = make_data()
    for name in args.only.split(","):
        parts = partition(train, PARTITIONS[name])
        sizes = {
            p: (f.height, round(float(f[LABEL].cast(pl.Float64).to_numpy().mean()), 2))
            for p, f in parts.items()
        }
        print(f"\n== {name}: party (rows, positive share) {sizes}", flush=True)
        local = train_local_only(
            parts,
            spec=DEFAULT,
            objective="binary",
            num_class=1,
            categorical=[],
            feature_names=NAMES,
        )
        aucs = [auc(predict_raw(e, test), test) for e, _ in local.values()]
        print(
            f"local-only mean (min..max)         {np.mean(aucs):.4f} ({min(aucs):.4f}..{max(aucs):.4f})"
        )
        n = np.array([h.n_train[p] for p, (_, h) in local.items()], dtype=np.float64)
        raw = np.zeros(test.height)
        for w, (e, _) in zip(n / n.sum(), local.values(), strict=True):
            raw += w * predict_raw(e, test)
        print(f"one-shot average of local models   {auc(raw, test):.4f}", flush=True)
        for label, kind, overrides in CONFIGS:
            if wanted and not any(w in label for w in wanted):
                continue
            t0 = time.perf_counter()
            ens, hist = run(kind, parts, DEFAULT.model_copy(update=overrides))
            trees = ensemble_size(ens, upto_round=hist.best_round).trees
            print(
                f"{label} {auc(predict_raw(ens, test), test):.4f}  best round {hist.best_round:3d}"
                f"/{len(hist.rounds):3d} ({hist.stop_reason:14s}) trees {trees:5d}"
                f"  {time.perf_counter() - t0:5.1f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
