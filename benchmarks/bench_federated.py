"""Benchmark: federated training against local-only and centralised training on the demo data.

    python -m benchmarks.bench_federated [--customers 100000] [--parties 3 10]
        [--partitions iid a1.0 a0.3] [--seed 0] [--quick]

For every (parties, partition) configuration, generates the demo consortium
(``tasks.demo_data.write_demo_consortium``, horizontal layout; ``iid`` is the demo's own
split, ``aX`` a Dirichlet label skew with concentration X), prepares every party with the
pure pipeline steps of ``tasks.prepare.steps`` (preprocess -> features -> align -> fuse, no Prefect)
and caches the consortium and the fused tables under ``benchmarks/.data/`` keyed by the
parameters. Then trains, with the same training settings and tree budget:

* federated: ``tasks.horizontal.loop.train_federated`` over the parties' fused tables;
* local-only: ``train_local_only``, every party alone;
* centralised: ``train_centralised`` on the pooled fused tables. This POOLS DATA, which a
  federation forbids: it is a comparison only;
* lossless: ``tasks.horizontal.lossless.train_lossless``, LightGBM's data-parallel learner with one
  process per party holding only that party's rows (second table).

Every model is scored on the test split (``split_assignments``, from the hashed key), pooled
over all parties. Local-only is the mean of the parties' models' AUCs on that pooled test
split, weighted by the parties' test rows (the weights ``tasks.horizontal.baselines.compare`` uses);
the table also shows the figure ``compare`` itself reports, each local model on its own
party's test rows. Wall times are taken around the training calls only (single-threaded
LightGBM in both, runs one after the other).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

DATA = Path(__file__).resolve().parent / ".data"
PARTITIONS: dict[str, float | None] = {"iid": None, "a1.0": 1.0, "a0.3": 0.3}
#: AUC gap to centralised allowed per partition (the goals of the benchmark).
GAP_GOAL: dict[str, float] = {"iid": 0.003, "a1.0": 0.003, "a0.3": 0.01}
#: Federated wall time per round allowed, relative to centralised.
TIME_GOAL = 1.5
#: The key-hashing secret of the benchmark data (set in the env var the spec names).
BENCH_SECRET = "fedfuse-benchmark-secret-not-for-real-data"
#: Training settings: the demo spec's tree shape and learning rate, with 16 trees per round
#: and early stopping (patience 3) within at most 40 rounds; see benchmarks/README.md.
TRAINING: dict[str, Any] = {"trees_per_round": 16, "rounds": 40}


# -- data ------------------------------------------------------------------------------------
@dataclass
class Prepared:
    frames: dict[str, pl.DataFrame]
    names: list[str]
    categorical: list[str]
    spec_path: str


def config_dir(customers: int, parties: int, partition: str, seed: int) -> Path:
    return DATA / f"demo-c{customers}-p{parties}-{partition}-s{seed}"


def prepare_party(spec: Any, party_id: str) -> Any:
    """One party's pipeline without Prefect (``tasks.prepare.steps.run_party``): its ``FusedOutput``."""
    from tasks.prepare.steps import PartyContext, run_party

    return run_party(PartyContext.from_spec(spec, party_id), spec.party(party_id).sources)


def prepared(customers: int, parties: int, partition: str, seed: int) -> Prepared:
    """The fused tables of one configuration, generated and prepared once (cached)."""
    from storage.store import read_table
    from tasks.demo_data import write_demo_consortium
    from tasks.prepare.design import consortium_schema
    from tasks.spec.load import load_spec

    folder = config_dir(customers, parties, partition, seed)
    done = folder / "prepared" / "schema.json"
    if not done.exists():
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted earlier run
        started = time.perf_counter()
        spec_path = write_demo_consortium(
            str(folder / "consortium"),
            layout="horizontal",
            parties=parties,
            customers=customers,
            seed=seed,
            alpha=PARTITIONS[partition],
        )
        generated = time.perf_counter() - started
        spec = load_spec(spec_path)
        # a fixed secret, so the hashed keys (and so the splits) are the same in every run
        if spec.consortium.secret.env is None:
            raise SystemExit("the demo spec should read its secret from an env var")
        os.environ[spec.consortium.secret.env] = BENCH_SECRET
        fused = {p: prepare_party(spec, p) for p in spec.label_party_ids()}
        schema = consortium_schema({p: out.features for p, out in fused.items()})
        (folder / "prepared").mkdir()
        for party, out in fused.items():
            read_table(out.table).write_parquet(folder / "prepared" / f"{party}.parquet")
        tmp = done.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "spec": spec_path,
                    "parties": list(fused),
                    "names": schema.names,
                    "categorical": schema.categorical,
                }
            )
        )
        tmp.rename(done)
        print(
            f"  generated {customers:,} customers over {parties} parties ({partition}) in "
            f"{generated:.0f}s, prepared in {time.perf_counter() - started - generated:.0f}s",
            flush=True,
        )
    meta = json.loads(done.read_text())
    frames = {p: pl.read_parquet(folder / "prepared" / f"{p}.parquet") for p in meta["parties"]}
    names: list[str] = meta["names"]
    # a feature some party lacks is missing there (as tasks.horizontal.baselines does)
    frames = {
        p: f.with_columns([pl.lit(None, pl.Float64).alias(n) for n in names if n not in f.columns])
        for p, f in frames.items()
    }
    return Prepared(frames, names, meta["categorical"], meta["spec"])


# -- training and scoring --------------------------------------------------------------------
@dataclass
class Row:
    parties: int
    partition: str
    rows: int
    positive: float
    auc_fed: float
    auc_local: float
    auc_local_own: float
    auc_cen: float
    within_fed: float
    within_cen: float
    trees_fed: int
    trees_cen: int
    rounds_fed: int
    rounds_cen: int
    wall_fed: float
    wall_cen: float
    auc_loss: float = math.nan
    within_loss: float = math.nan
    trees_loss: int = 0
    rounds_loss: int = 0
    wall_loss: float = math.nan

    @property
    def gap(self) -> float:
        return self.auc_cen - self.auc_fed

    @property
    def within_gap(self) -> float:
        return self.within_cen - self.within_fed

    @property
    def ratio(self) -> float:
        """Federated over centralised wall time per round (same tree budget per round)."""
        return (self.wall_fed / self.rounds_fed) / (self.wall_cen / self.rounds_cen)

    @property
    def gap_loss(self) -> float:
        return self.auc_cen - self.auc_loss

    @property
    def ratio_loss(self) -> float:
        """Lossless over centralised wall time (whole training, not per round)."""
        return self.wall_loss / self.wall_cen

    @property
    def auc_ok(self) -> bool:
        return self.gap <= GAP_GOAL[self.partition]

    @property
    def time_ok(self) -> bool:
        return self.ratio <= TIME_GOAL


def run_config(
    customers: int,
    parties: int,
    partition: str,
    seed: int,
    overrides: dict[str, Any],
    *,
    party_threads: int = 1,
    repeat: int = 1,
) -> Row:
    from tasks.horizontal.baselines import train_centralised, train_local_only
    from tasks.horizontal.ensemble import GlobalEnsemble, ensemble_size, predict_raw
    from tasks.horizontal.loop import train_federated
    from tasks.horizontal.lossless import train_lossless
    from tasks.horizontal.training import party_data
    from tasks.spec.load import load_spec

    data = prepared(customers, parties, partition, seed)
    spec = load_spec(data.spec_path)
    training = spec.training.model_copy(update={**TRAINING, **overrides})
    kwargs: dict[str, Any] = {
        "spec": training,
        "objective": spec.consortium.task,
        "num_class": 1,
        "categorical": data.categorical,
        "feature_names": data.names,
    }
    splits = {
        p: party_data(
            f,
            party=p,
            feature_names=data.names,
            validation_fraction=training.validation_fraction,
            test_fraction=training.test_fraction,
        )
        for p, f in data.frames.items()
    }
    X_test = np.concatenate([d.X_test for d in splits.values()])
    y_test = np.concatenate([d.y_test for d in splits.values()])

    def auc(model: GlobalEnsemble, X: np.ndarray = X_test, y: np.ndarray = y_test) -> float:
        return float(roc_auc_score(y, predict_raw(model, X)))

    # training is deterministic: repeats only time it again (median), alternating the order
    walls: dict[str, list[float]] = {"fed": [], "cen": [], "loss": []}
    pool = ThreadPoolExecutor(party_threads) if party_threads > 1 else None
    for i in range(repeat):
        for kind in ("fed", "cen", "loss") if i % 2 == 0 else ("loss", "cen", "fed"):
            started = time.perf_counter()
            if kind == "fed":
                fed, fed_hist = train_federated(data.frames, **kwargs, executor=pool)
            elif kind == "cen":
                cen, cen_hist = train_centralised(data.frames, **kwargs)
            else:
                lossless = train_lossless(list(splits.values()), **kwargs)
            walls[kind].append(time.perf_counter() - started)
    loss = lossless.ensemble(
        objective=spec.consortium.task,
        num_class=1,
        feature_names=data.names,
        categorical=data.categorical,
    )
    if pool is not None:
        pool.shutdown()
    local = train_local_only(data.frames, **kwargs)
    sizes = {p: len(d.y_test) for p, d in splits.items()}
    total = sum(sizes.values())
    auc_local = sum(sizes[p] * auc(model) for p, (model, _) in local.items()) / total
    # within-party AUC: size-weighted over the parties whose test rows hold both classes
    both = [p for p, d in splits.items() if len(np.unique(d.y_test)) == 2]

    def within(models: dict[str, GlobalEnsemble]) -> float:
        return sum(
            sizes[p] * auc(models[p], splits[p].X_test, splits[p].y_test) for p in both
        ) / sum(sizes[p] for p in both)

    return Row(
        parties=parties,
        partition=partition,
        rows=sum(f.height for f in data.frames.values()),
        positive=float(np.mean(np.concatenate([d.y_train for d in splits.values()]))),
        auc_fed=auc(fed),
        auc_local=auc_local,
        auc_local_own=within({p: model for p, (model, _) in local.items()}),
        auc_cen=auc(cen),
        within_fed=within(dict.fromkeys(both, fed)),
        within_cen=within(dict.fromkeys(both, cen)),
        trees_fed=ensemble_size(fed, upto_round=fed_hist.best_round).trees,
        trees_cen=ensemble_size(cen, upto_round=cen_hist.best_round).trees,
        rounds_fed=len(fed_hist.rounds),
        rounds_cen=len(cen_hist.rounds),
        wall_fed=statistics.median(walls["fed"]),
        wall_cen=statistics.median(walls["cen"]),
        auc_loss=auc(loss),
        within_loss=within(dict.fromkeys(both, loss)),
        trees_loss=ensemble_size(loss).trees,
        rounds_loss=lossless.rounds_run,
        wall_loss=statistics.median(walls["loss"]),
    )


# -- report ----------------------------------------------------------------------------------
HEADER = (
    "| parties | partition | AUC fed | AUC local | AUC cen | gap | goal "
    "| within-party AUC fed / local / cen | within gap "
    "| trees fed / cen | fed wall (rounds) | cen wall (rounds) | ratio/round | goal |"
)


def table(rows: Sequence[Row]) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.parties} | {r.partition} | {r.auc_fed:.4f} | {r.auc_local:.4f} "
            f"| {r.auc_cen:.4f} | {r.gap:+.4f} "
            f"| {'pass' if r.auc_ok else 'FAIL'} (≤ {GAP_GOAL[r.partition]}) "
            f"| {r.within_fed:.4f} / {r.auc_local_own:.4f} / {r.within_cen:.4f} "
            f"| {r.within_gap:+.4f} "
            f"| {r.trees_fed} / {r.trees_cen} | {r.wall_fed:.1f} s ({r.rounds_fed}) "
            f"| {r.wall_cen:.1f} s ({r.rounds_cen}) | {r.ratio:.2f} "
            f"| {'pass' if r.time_ok else 'FAIL'} (≤ {TIME_GOAL}) |"
        )
    return "\n".join(lines)


LOSSLESS_HEADER = (
    "| parties | partition | AUC lossless | AUC cen | gap | within-party AUC lossless / cen "
    "| trees lossless / cen | lossless wall (rounds) | cen wall (rounds) | wall ratio |"
)


def lossless_table(rows: Sequence[Row]) -> str:
    lines = [LOSSLESS_HEADER, "|" + "---|" * (LOSSLESS_HEADER.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.parties} | {r.partition} | {r.auc_loss:.4f} | {r.auc_cen:.4f} "
            f"| {r.gap_loss:+.4f} | {r.within_loss:.4f} / {r.within_cen:.4f} "
            f"| {r.trees_loss} / {r.trees_cen} | {r.wall_loss:.1f} s ({r.rounds_loss}) "
            f"| {r.wall_cen:.1f} s ({r.rounds_cen}) | {r.ratio_loss:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--parties", type=int, nargs="+", default=[3, 10])
    parser.add_argument(
        "--partitions", nargs="+", choices=list(PARTITIONS), default=list(PARTITIONS)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--party-threads",
        type=int,
        default=1,
        help="run the parties' steps of each federated round in this many threads",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each training this many times (median)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3000 customers, 3 parties, iid"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting, e.g. --set aggregation=lr_scaled (JSON values)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.customers, args.parties, args.partitions = 3000, [3], ["iid"]
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    logging.basicConfig(level=logging.ERROR)
    settings = {**TRAINING, **overrides}
    print(
        f"{args.customers:,} customers; training overrides of the demo spec: {settings}; "
        f"party threads {args.party_threads}; timing repeats {args.repeat}"
    )
    rows: list[Row] = []
    for parties in args.parties:
        for partition in args.partitions:
            print(f"== {parties} parties, {partition}", flush=True)
            row = run_config(
                args.customers,
                parties,
                partition,
                args.seed,
                overrides,
                party_threads=args.party_threads,
                repeat=args.repeat,
            )
            print(
                f"  {row.rows:,} fused rows, {row.positive:.1%} positive; AUC fed "
                f"{row.auc_fed:.4f} local {row.auc_local:.4f} cen {row.auc_cen:.4f}; "
                f"fed {row.wall_fed:.1f}s/{row.rounds_fed} rounds, "
                f"cen {row.wall_cen:.1f}s/{row.rounds_cen} rounds; lossless AUC "
                f"{row.auc_loss:.4f} {row.wall_loss:.1f}s/{row.rounds_loss} rounds",
                flush=True,
            )
            rows.append(row)
    print()
    print(table(rows))
    print()
    print(lossless_table(rows))
    return rows


if __name__ == "__main__":
    main()
