"""Sensor features on a real multi-axis recording set: fedfuse's events features, federated
over a few parties, against centralised per-recording statistics + LightGBM.

Data: BasicMotions, shipped inside the ``sktime`` package (sktime 1.2.0,
``sktime/datasets/data/BasicMotions/BasicMotions_TRAIN.ts`` and ``..._TEST.ts``; read from
the installed package, nothing is downloaded): 80 smartwatch recordings of 4 activities
(standing, walking, running, badminton), 3-axis accelerometer and 3-axis gyroscope, 100
readings each at 10 Hz. The files have no subject column, so the split is by recording: the
package's own 40/40 train/test split, and seeded stratified 50/50 resplits of all 80.

* **fedfuse**: each recording is an entity of an events source (``ax..gz``, windows
  ``1s`` and ``5s`` ending at the last event, ``sampling_hz = 10``, axes ``ax, ay, az``),
  featurised by the events modality itself (:meth:`Events.extract`, windowed statistics +
  signal features) at each party on its own recordings; the training recordings are split
  over :data:`PARTIES` parties and trained by fedfuse's federated loop
  (:func:`tasks.horizontal.loop.train_federated`).
* **centralised**: per-recording mean, std, min, max, median and quartiles of each axis,
  one plain polars group_by over all training recordings, and one LightGBM model.

Both use the same LightGBM settings (:data:`TREES`, small leaves: 40 training recordings).
Then the features' wall time for :data:`VOLUME` entities (the 80 recordings replicated
under new ids, 10M readings), fedfuse's features vs the plain statistics, side by side in
one run (alternating order, median of ``--repeat``).

    .venv/bin/python -m benchmarks.bench_sensors [--resplits 10] [--volume 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from tasks.horizontal.ensemble import predict_raw
from tasks.horizontal.loop import train_federated
from tasks.prepare.modalities.base import FeatureInputs
from tasks.prepare.modalities.events import EVENTS
from tasks.spec.models import SourceSpec, TrainingSpec
from tasks.types import ENTITY_HASH, LABEL, TIMESTAMP

SKTIME_VERSION = "1.2.0"
ENTITY = "recording"
AXES = ["ax", "ay", "az", "gx", "gy", "gz"]  # BasicMotions' six dimensions, in file order
CLASSES = ["Standing", "Running", "Walking", "Badminton"]
HZ = 10
AS_OF = dt.date(2026, 3, 31)
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
PARTIES = 3
TREES = 100
VOLUME = 100_000
LGB_PARAMS: dict[str, Any] = {
    "learning_rate": 0.1,
    "num_leaves": 7,
    "min_data_in_leaf": 3,
}
SOURCE = SourceSpec.model_validate(
    {
        "id": "watch",
        "kind": "events",
        "path": "watch.csv",
        "columns": {
            ENTITY: {"from": ENTITY, "dtype": "str"},
            TIMESTAMP: {"from": "t", "dtype": "datetime"},
            **{a: {"from": a, "dtype": "float"} for a in AXES},
        },
        "features": {
            "windows": ["1s", "5s"],
            "window_end": "last_event",
            "sampling_hz": HZ,
            "axes": ["ax", "ay", "az"],
        },
    }
)


# -- the data ---------------------------------------------------------------------------------
def package_file(name: str) -> Path:
    """One BasicMotions file of the installed sktime package (located, not imported)."""
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"install sktime=={SKTIME_VERSION} (pip install -e '.[bench]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/BasicMotions" / name
    if not path.is_file():
        raise SystemExit(f"sktime has no {path}")
    return path


def read_ts(path: Path, first: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A ``.ts`` file of equal-length series: long readings (recording, t, six axes) and
    labels (recording, class index). Recordings are numbered from ``first``."""
    rows = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith(("#", "@"))
    ]
    frames, labels = [], []
    for i, line in enumerate(rows):
        *dims, label = line.split(":")
        values = np.array([[float(v) for v in d.split(",")] for d in dims]).T  # (n, 6)
        rid = f"r{first + i:03d}"
        frames.append(
            pl.DataFrame(values, schema=AXES).with_columns(
                pl.lit(rid).alias(ENTITY), pl.int_range(pl.len()).alias("i")
            )
        )
        labels.append((rid, CLASSES.index(label)))
    readings = pl.concat(frames).select(ENTITY, "i", *AXES)
    return readings, pl.DataFrame(labels, schema=[ENTITY, LABEL], orient="row")


def load() -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
    """All 80 recordings, their labels, and the package's test recordings."""
    train, train_y = read_ts(package_file("BasicMotions_TRAIN.ts"), 0)
    test, test_y = read_ts(package_file("BasicMotions_TEST.ts"), train_y.height)
    return pl.concat([train, test]), pl.concat([train_y, test_y]), test_y[ENTITY].to_list()


def as_events(readings: pl.DataFrame) -> pl.DataFrame:
    """Readings as a clean events table: each recording from T0 at 10 Hz."""
    step = 1_000_000 // HZ
    return readings.select(
        ENTITY,
        (pl.lit(T0) + pl.duration(microseconds=pl.col("i") * step)).alias(TIMESTAMP),
        *AXES,
    )


# -- the two pipelines ----------------------------------------------------------------------
def fedfuse_features(events: pl.DataFrame) -> pl.DataFrame:
    """The events modality's features, as a party's extract step computes them."""
    inputs = FeatureInputs(entity=ENTITY, as_of=AS_OF, vocabularies={})
    return EVENTS.extract(events.lazy(), SOURCE, inputs)


def plain_features(events: pl.DataFrame) -> pl.DataFrame:
    """Centralised per-recording statistics, as written by hand."""
    stats = [
        e
        for a in AXES
        for e in (
            pl.col(a).mean().alias(f"{a}_mean"),
            pl.col(a).std().alias(f"{a}_std"),
            pl.col(a).min().alias(f"{a}_min"),
            pl.col(a).max().alias(f"{a}_max"),
            pl.col(a).median().alias(f"{a}_median"),
            pl.col(a).quantile(0.25).alias(f"{a}_q25"),
            pl.col(a).quantile(0.75).alias(f"{a}_q75"),
        )
    ]
    return events.lazy().group_by(ENTITY).agg(stats).sort(ENTITY).collect()


def _keyed(features: pl.DataFrame, labels: pl.DataFrame) -> pl.DataFrame:
    return features.join(labels, on=ENTITY, validate="1:1").with_columns(
        pl.col(ENTITY)
        .map_elements(lambda r: hashlib.sha256(r.encode()).hexdigest(), return_dtype=pl.String)
        .alias(ENTITY_HASH),
        pl.col(LABEL).cast(pl.Int64),
    )


def federated_accuracy(
    features: pl.DataFrame,
    labels: pl.DataFrame,
    train_ids: list[str],
    test_ids: list[str],
    seed: int,
) -> float:
    """fedfuse: the training recordings split over the parties, each party's features its
    own, federated training; accuracy on the test recordings."""
    names = [c for c in features.columns if c != ENTITY]
    data = _keyed(features, labels)
    rng = np.random.default_rng(seed)
    owner = dict(zip(train_ids, rng.permutation(len(train_ids)) % PARTIES, strict=True))
    train = data.filter(pl.col(ENTITY).is_in(train_ids))
    parts = {
        f"p{k}": train.filter(pl.col(ENTITY).replace_strict(owner, default=-1) == k)
        for k in range(PARTIES)
    }
    spec = TrainingSpec(
        rounds=TREES // 4,
        trees_per_round=4,
        learning_rate=LGB_PARAMS["learning_rate"],
        num_leaves=LGB_PARAMS["num_leaves"],
        min_data_in_leaf=LGB_PARAMS["min_data_in_leaf"],
        # as few validation rows as the loop takes; every round is kept (fixed trees, like
        # the baseline's): no early stopping on a handful of rows
        validation_fraction=0.01,
        test_fraction=0.0,
        patience=TREES,
        seed=seed,
    )
    ensemble, _ = train_federated(
        parts,
        spec=spec,
        objective="multiclass",
        num_class=len(CLASSES),
        categorical=[],
        feature_names=names,
    )
    test = data.filter(pl.col(ENTITY).is_in(test_ids)).sort(ENTITY)
    raw = predict_raw(ensemble, test.select(names), upto_round=len(ensemble.rounds))
    predicted = raw.argmax(axis=1)
    return float(np.mean(predicted == test[LABEL].to_numpy()))


def centralised_accuracy(
    features: pl.DataFrame,
    labels: pl.DataFrame,
    train_ids: list[str],
    test_ids: list[str],
    seed: int,
) -> float:
    names = [c for c in features.columns if c != ENTITY]
    data = features.join(labels, on=ENTITY, validate="1:1")
    train = data.filter(pl.col(ENTITY).is_in(train_ids))
    test = data.filter(pl.col(ENTITY).is_in(test_ids))
    model = lgb.LGBMClassifier(
        n_estimators=TREES,
        learning_rate=LGB_PARAMS["learning_rate"],
        num_leaves=LGB_PARAMS["num_leaves"],
        min_child_samples=LGB_PARAMS["min_data_in_leaf"],
        random_state=seed,
        verbose=-1,
    )
    model.fit(train.select(names).to_numpy(), train[LABEL].to_numpy())
    predicted = model.predict(test.select(names).to_numpy())
    return float(np.mean(predicted == test[LABEL].to_numpy()))


def resplit(labels: pl.DataFrame, seed: int) -> tuple[list[str], list[str]]:
    """A stratified 50/50 split of all recordings."""
    rng = np.random.default_rng(seed)
    train: list[str] = []
    for c in range(len(CLASSES)):
        ids = labels.filter(pl.col(LABEL) == c)[ENTITY].to_list()
        train += [ids[i] for i in rng.permutation(len(ids))[: len(ids) // 2]]
    return sorted(train), sorted(set(labels[ENTITY].to_list()) - set(train))


def replicate(readings: pl.DataFrame, entities: int) -> pl.DataFrame:
    """``entities`` recordings: the 80 cycled under new ids (synthesised volume)."""
    ids = readings[ENTITY].unique(maintain_order=True).to_list()
    copies = -(-entities // len(ids))
    big = pl.concat(
        [readings.with_columns((pl.col(ENTITY) + f"-{c}").alias(ENTITY)) for c in range(copies)]
    )
    keep = pl.Series([f"{r}-{c}" for c in range(copies) for r in ids][:entities])
    return big.filter(pl.col(ENTITY).is_in(keep.implode()))


def timed(fn: Any, events: pl.DataFrame) -> tuple[float, pl.DataFrame]:
    start = time.perf_counter()
    out = fn(events)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resplits", type=int, default=10)
    parser.add_argument("--volume", type=int, default=VOLUME)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    readings, labels, test_ids = load()
    events = as_events(readings)
    ours, plain = fedfuse_features(events), plain_features(events)
    print(
        f"BasicMotions (sktime {SKTIME_VERSION}): {labels.height} recordings x "
        f"{readings.height // labels.height} readings x {len(AXES)} axes; features: fedfuse "
        f"{ours.width - 1}, centralised statistics {plain.width - 1}"
    )
    splits = [(sorted(set(labels[ENTITY].to_list()) - set(test_ids)), test_ids)]
    splits += [resplit(labels, seed) for seed in range(1, args.resplits + 1)]
    fed, cen = [], []
    for k, (train_ids, split_test) in enumerate(splits):
        fed.append(federated_accuracy(ours, labels, train_ids, split_test, seed=k))
        cen.append(centralised_accuracy(plain, labels, train_ids, split_test, seed=k))
        name = "package split" if k == 0 else f"resplit {k:2d}   "
        print(
            f"  {name}: fedfuse federated ({PARTIES} parties) {fed[-1]:.3f}   "
            f"centralised stats + LightGBM {cen[-1]:.3f}   gap {fed[-1] - cen[-1]:+.3f}"
        )
    print(
        f"accuracy, mean of {len(splits)} splits: fedfuse {np.mean(fed):.3f}, centralised "
        f"{np.mean(cen):.3f}, gap {round(float(np.mean(fed) - np.mean(cen)), 9) + 0.0:+.3f} "
        "(goal: >= 0)"
    )
    big = as_events(replicate(readings, args.volume))
    print(
        f"wall time of the features, {args.volume} entities ({big.height} readings; the 80 "
        f"recordings replicated), median of {args.repeat}:"
    )
    times: dict[str, list[float]] = {"fedfuse": [], "plain": []}
    for r in range(args.repeat):
        order = [("fedfuse", fedfuse_features), ("plain", plain_features)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            seconds, out = timed(fn, big)
            assert out.height == args.volume, (name, out.height)
            times[name].append(seconds)
    ours_s, plain_s = (statistics.median(times[k]) for k in ("fedfuse", "plain"))
    print(
        f"  fedfuse {ours_s:.2f} s, plain centralised statistics {plain_s:.2f} s, "
        f"ratio {ours_s / plain_s:.2f}x (goal: <= 2x)"
    )


if __name__ == "__main__":
    main()
