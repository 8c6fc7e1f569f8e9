"""Vertical federated training vs single blocks vs centralised on synthetic data.

``--data classification`` (default): make_classification(rows, 30 features, 12 informative,
no redundant, shuffle=False, random_state=0); column i goes to party "ABC"[i % 3], so every
party holds 10 features of which 4 are informative and the blocks are complementary. The
classes are clusters in the 12-dimensional informative space: the signal lives in
*interactions across blocks*. ``--data additive``: 30 N(0, 1) features, log-odds = 1.5 ×
(one nonlinear function per block of 10): complementary blocks, no cross-block interaction.

Entities are split 60/20/20 train/valid/test from a hash of their id
(:func:`tasks.horizontal.training.split_assignments`); every model early-stops on the validation
logloss and is scored on the test entities. Rows (test AUC, test logloss, trees, seconds):

* ``block X alone``        -- LightGBM on one party's block (what that party gets alone);
* ``rounds sum|mean``      -- gradient rounds, coefficients c_p = 1 (sum) or 1/3 (mean);
* ``one-shot fixed``       -- one full model per block, uniform mean of raw scores;
* ``one-shot learned``     -- the same scores, logistic stacking fitted on validation;
* ``centralised``          -- LightGBM on all 30 features, budget rounds × trees_per_round
  iterations (``x3``: parties × that, the rounds' total tree budget);
* ``centralised x3, no cross-block interactions`` -- the same with LightGBM
  ``interaction_constraints`` = the blocks: the best model of the additive form
  Σ_p f_p(x_p) that every vertical mode here fits.

    .venv/bin/python -m benchmarks.vertical_quick [--data classification|additive]
        [--rows 50000] [--rounds 100] [--trees 4] [--lr 0.1]
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import polars as pl
from sklearn.datasets import make_classification

from tasks.horizontal.model_text import count_trees
from tasks.horizontal.training import evaluate, split_assignments
from tasks.spec.models import TrainingSpec
from tasks.vertical.data import LabelData, PartyBlock
from tasks.vertical.fusion import fixed_fusion, fuse_scores, learn_fusion, score_table
from tasks.vertical.loop import train_vertical_rounds
from tasks.vertical.one_shot import train_one_shot
from tasks.vertical.party_model import model_trees

PARTIES = ("A", "B", "C")
KEY = "alignment_id"
T = TypeVar("T")


def additive(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Log-odds = sum of one nonlinear function per block (no cross-block interaction)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 30))

    def block(j: int) -> np.ndarray:
        a, b, c, d = (x[:, j + 3 * k] for k in range(4))
        return np.sin(2 * a) + b * c + 0.5 * (d**2 - 1)

    logit = 1.5 * (block(0) + block(1) + block(2))
    y = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return x, y


def make_data(
    rows: int, data: str = "classification"
) -> tuple[LabelData, dict[str, PartyBlock], PartyBlock, pl.Series]:
    if data == "classification":
        x, y = make_classification(
            rows, 30, n_informative=12, n_redundant=0, shuffle=False, random_state=0
        )
    else:
        x, y = additive(rows)
    ids = pl.Series(KEY, [hashlib.sha256(f"e{i}".encode()).hexdigest() for i in range(rows)])
    split = split_assignments(ids, validation_fraction=0.2, test_fraction=0.2).to_numpy()
    parts = {s: split == s for s in ("train", "valid", "test")}
    labels = LabelData(
        y_train=y[parts["train"]].astype(np.float64),
        y_valid=y[parts["valid"]].astype(np.float64),
        y_test=y[parts["test"]].astype(np.float64),
    )

    def block(party: str, cols: list[int]) -> PartyBlock:
        return PartyBlock(
            party=party,
            feature_names=tuple(f"f{c:02d}" for c in cols),
            X_train=x[parts["train"]][:, cols],
            X_valid=x[parts["valid"]][:, cols],
            X_test=x[parts["test"]][:, cols],
        )

    blocks = {p: block(p, [c for c in range(30) if c % 3 == i]) for i, p in enumerate(PARTIES)}
    return labels, blocks, block("all", list(range(30))), ids


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--trees", type=int, default=4, help="trees per round")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--data", choices=["classification", "additive"], default="classification")
    args = parser.parse_args()
    spec = TrainingSpec(
        rounds=args.rounds,
        trees_per_round=args.trees,
        learning_rate=args.lr,
        patience=5,
        num_leaves=31,
    )
    labels, blocks, everything, _ids = make_data(args.rows, args.data)
    assert labels.y_test is not None
    y_test = labels.y_test
    rows: list[tuple[str, dict[str, float], int, float]] = []

    one_shot = {}
    for party, block in blocks.items():
        res, secs = timed(
            lambda b=block: train_one_shot(b, labels, spec=spec, objective="binary", num_class=1)
        )
        one_shot[party] = res
        assert res.test is not None
        metrics = evaluate(y_test, res.test, "binary", 1)
        rows.append((f"block {party} alone", metrics, count_trees(res.model_text), secs))

    for combine in ("sum", "mean"):
        run, secs = timed(
            lambda c=combine: train_vertical_rounds(
                labels, blocks, spec=spec, objective="binary", num_class=1, combine=c
            )
        )
        best = run.state.progress.best_round
        trees = sum(model_trees(m, best) for m in run.models.values())
        label = f"rounds {combine} (best round {best}/{run.state.progress.round})"
        rows.append((label, run.test, trees, secs))

    base = [float(np.log(labels.y_train.mean() / (1 - labels.y_train.mean())))]
    valid_ids = pl.Series(KEY, [f"v{i}" for i in range(len(labels.y_valid))])
    test_ids = pl.Series(KEY, [f"t{i}" for i in range(len(y_test))])
    one_shot_trees = sum(count_trees(r.model_text) for r in one_shot.values())
    one_shot_secs = sum(s for _, _, _, s in rows[: len(PARTIES)])
    test_tables = {
        p: score_table(test_ids, r.test, key=KEY) for p, r in one_shot.items() if r.test is not None
    }
    fixed = fixed_fusion(list(PARTIES), None, objective="binary", num_class=1, base=base)
    fused = fuse_scores(test_tables, fixed, key=KEY, ids=test_ids)["score"].to_numpy()
    rows.append(
        (
            "one-shot fixed (uniform)",
            evaluate(y_test, fused, "binary", 1),
            one_shot_trees,
            one_shot_secs,
        )
    )
    learned, secs = timed(
        lambda: learn_fusion(
            {p: score_table(valid_ids, r.valid, key=KEY) for p, r in one_shot.items()},
            pl.DataFrame({KEY: valid_ids, "label": labels.y_valid}),
            key=KEY,
            objective="binary",
            num_class=1,
            base=base,
        )
    )
    fused = fuse_scores(test_tables, learned, key=KEY, ids=test_ids)["score"].to_numpy()
    rows.append(
        (
            "one-shot learned (stacking)",
            evaluate(y_test, fused, "binary", 1),
            one_shot_trees,
            one_shot_secs + secs,
        )
    )

    for scale, suffix in ((1, ""), (len(PARTIES), " x3")):
        cen_spec = spec.model_copy(update={"rounds": spec.rounds * scale})
        res, secs = timed(
            lambda s=cen_spec: train_one_shot(
                everything, labels, spec=s, objective="binary", num_class=1
            )
        )
        assert res.test is not None
        rows.append(
            (
                f"centralised{suffix} ({res.iterations} of {cen_spec.rounds * spec.trees_per_round})",
                evaluate(y_test, res.test, "binary", 1),
                count_trees(res.model_text),
                secs,
            )
        )

    index = {name: j for j, name in enumerate(everything.feature_names)}
    constraints = [[index[f] for f in b.feature_names] for b in blocks.values()]
    cen_spec = spec.model_copy(
        update={
            "rounds": spec.rounds * len(PARTIES),
            "params": {"interaction_constraints": constraints},
        }
    )
    res, secs = timed(
        lambda: train_one_shot(everything, labels, spec=cen_spec, objective="binary", num_class=1)
    )
    assert res.test is not None
    rows.append(
        (
            "centralised x3, no cross-block interactions",
            evaluate(y_test, res.test, "binary", 1),
            count_trees(res.model_text),
            secs,
        )
    )

    print(
        f"data={args.data} rows={args.rows} rounds={spec.rounds} trees/round={spec.trees_per_round} "
        f"lr={spec.learning_rate} leaves={spec.num_leaves} patience={spec.patience}"
    )
    print(f"{'model':<44} {'test AUC':>9} {'logloss':>8} {'trees':>6} {'sec':>6}")
    for label, metrics, trees, secs in rows:
        print(
            f"{label:<44} {metrics.get('auc', float('nan')):9.4f} "
            f"{metrics.get('logloss', float('nan')):8.4f} {trees:6d} {secs:6.1f}"
        )


if __name__ == "__main__":
    main()
