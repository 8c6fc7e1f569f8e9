"""Benchmark: events feature extraction (fedfuse) against a plain hand-written polars script.

    python -m benchmarks.bench_events [--events 10000000] [--repeat 3]

Generates (once, cached under ``benchmarks/.data/``, deterministic from the seed) an events
table: ~50 events per entity, 1-3 devices per entity, two measures with ~3% missing readings,
an error flag and ~120 days of timestamps with per-entity off periods, written in time order
as a device log would be. Then, ``--repeat`` times with the order alternating, runs each
contender in its own subprocess reading the Parquet file with ``pl.scan_parquet``; the wall
time of the computation is taken inside the child and the peak resident memory of the whole
child (``ru_maxrss`` from ``os.wait4``) by the parent. Both results must be equal (with a
float tolerance) or the benchmark fails. Prints per-run figures and the medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

if TYPE_CHECKING:
    import polars as pl

Engine = Literal["in-memory", "streaming"]

DATA = Path(__file__).resolve().parent / ".data"
ENTITY = "customer_id"
MEASURES = ("temperature", "power")
WINDOWS = (7, 30)
AS_OF = dt.date(2024, 6, 30)
FIRST_DAY = dt.datetime(2024, 3, 6, tzinfo=dt.UTC)  # 120 days: the last 4 fall after AS_OF
SPAN_DAYS = 120
DAY_US = 86_400_000_000
EVENTS_PER_ENTITY = 50
CONTENDERS = ("fedfuse", "plain")


# -- data ------------------------------------------------------------------------------------
def generate(n_events: int, seed: int) -> pl.DataFrame:
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    n_entities = max(1, n_events // EVENTS_PER_ENTITY)
    weights = rng.lognormal(0.0, 1.0, n_entities)
    counts = np.maximum(np.floor(weights / weights.sum() * n_events).astype(np.int64), 1)
    short = n_events - int(counts.sum())
    if short > 0:
        np.add.at(counts, rng.integers(0, n_entities, short), 1)
    while short < 0:  # only when n_events is tiny: trim the largest entities
        top = int(np.argmax(counts))
        take = min(-short, int(counts[top]) - 1)
        counts[top] -= take
        short += take
    n = int(counts.sum())
    owner = np.repeat(np.arange(n_entities), counts)
    devices = rng.integers(1, 4, n_entities)
    first_device = np.concatenate([[0], np.cumsum(devices)[:-1]])
    device = first_device[owner] + rng.integers(0, 3, n) % devices[owner]
    # each entity starts somewhere in the first 60% of the span; half of them go quiet for up
    # to 30% of their active span at a random point
    start = rng.uniform(0.0, 0.6, n_entities)[owner]
    off_len = (rng.uniform(0.0, 0.3, n_entities) * (rng.uniform(size=n_entities) < 0.5))[owner]
    off_at = rng.uniform(size=n_entities)[owner]
    live = (1.0 - start) * (1.0 - off_len)
    pos = start + rng.uniform(size=n) * live
    off_from = start + off_at * live
    pos = np.where(pos >= off_from, pos + off_len * (1.0 - start), pos)
    offset_us = (pos * SPAN_DAYS * DAY_US).astype(np.int64)
    days = offset_us / DAY_US
    temperature = rng.normal(20.0, 5.0, n) + (owner % 7) * 0.01 * days
    power = rng.gamma(2.0, 3.0, n)
    temperature[rng.uniform(size=n) < 0.03] = np.nan
    power[rng.uniform(size=n) < 0.03] = np.nan
    error = rng.uniform(size=n) < 0.02
    order = np.argsort(offset_us, kind="stable")
    first_us = int(FIRST_DAY.timestamp()) * 1_000_000
    return pl.DataFrame(
        {
            ENTITY: pl.Series(owner[order]).cast(pl.String).str.zfill(7),
            "device_id": pl.Series(device[order]).cast(pl.String).str.zfill(7),
            "timestamp": pl.Series(offset_us[order] + first_us).cast(pl.Datetime("us", "UTC")),
            "temperature": pl.Series(temperature[order]).fill_nan(None),
            "power": pl.Series(power[order]).fill_nan(None),
            "error": pl.Series(error[order]),
        }
    ).with_columns(
        ("c" + pl.col(ENTITY)).alias(ENTITY), ("d" + pl.col("device_id")).alias("device_id")
    )


def write_dataset(n_events: int, seed: int, path: Path) -> None:
    started = time.perf_counter()
    frame = generate(n_events, seed)
    DATA.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.write_parquet(tmp, compression="zstd")
    tmp.rename(path)
    print(f"generated {path} ({frame.height:,} events) in {time.perf_counter() - started:.1f}s")


def dataset(n_events: int, seed: int) -> Path:
    """The cached data set, generated in a subprocess if missing (see :func:`spawn`)."""
    path = DATA / f"events-{n_events}-seed{seed}.parquet"
    if not path.exists():
        stdout, _ = spawn(["--generate", str(n_events), "--seed", str(seed), "--path", str(path)])
        print(stdout.strip())
    return path


def spawn(args: list[str]) -> tuple[str, float]:
    """Run this module in a fresh interpreter; (its stdout, its peak RSS in MiB).

    The peak comes from ``os.wait4`` (``ru_maxrss`` of that one child). Linux carries the
    parent's high-water mark into a child across fork + exec, so this parent process never
    loads data or polars before the measurements: its own peak stays a few MiB.
    """
    cmd = [sys.executable, "-m", "benchmarks.bench_events", *args]
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: failed with exit code {proc.returncode}")
    return stdout, usage.ru_maxrss / 1024  # Linux reports KiB


# -- contenders ------------------------------------------------------------------------------
def run_fedfuse(path: Path, engine: Engine | None) -> pl.DataFrame:
    import polars as pl

    from tasks.prepare.modalities.events import events_features

    source = pl.scan_parquet(path)
    if engine is None:
        return events_features(
            source, entity=ENTITY, measures=MEASURES, as_of=AS_OF, windows=WINDOWS
        )
    return events_features(
        source, entity=ENTITY, measures=MEASURES, as_of=AS_OF, windows=WINDOWS, engine=engine
    )


def run_plain(path: Path, engine: Engine | None) -> pl.DataFrame:
    """The same features as a competent polars user would write them by hand."""
    import polars as pl

    end = dt.datetime.combine(AS_OF + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    ts = pl.col("timestamp")
    x = (ts - end).dt.total_microseconds() / DAY_US
    events = (
        pl.scan_parquet(path)
        .filter(ts < end)
        .sort(ENTITY, "timestamp")
        .with_columns(
            prev=ts.shift(1).over(ENTITY),
            gap=ts.diff().over(ENTITY).dt.total_microseconds() / DAY_US,
        )
    )
    aggs = [
        ((pl.lit(end) - ts.max()).dt.total_microseconds() / DAY_US).alias("days_since_last_event"),
        pl.col("device_id").n_unique().cast(pl.Int64).alias("n_devices"),
        *(pl.col(m).drop_nulls().last().alias(f"{m}_last") for m in MEASURES),
    ]
    suffixes = []
    for w in [*WINDOWS, None]:
        s = f"{w}d" if w else "all"
        suffixes.append(s)
        start = end - dt.timedelta(days=w) if w else None
        inside = ts >= start if w else pl.lit(True)
        aggs += [
            (inside.sum() if w else pl.len()).cast(pl.Int64).alias(f"n_events_{s}"),
            ts.dt.date().filter(inside).n_unique().cast(pl.Int64).alias(f"active_days_{s}"),
            pl.col("error").filter(inside).mean().alias(f"error_rate_{s}"),
            (pl.col("gap").filter(pl.col("prev") >= start) if w else pl.col("gap"))
            .max()
            .alias(f"gap_{s}"),
        ]
        for m in MEASURES:
            v = pl.col(m).filter(inside)
            ok = inside & pl.col(m).is_not_null()
            xv, yv = x.filter(ok), pl.col(m).filter(ok)
            n = yv.count()
            slope = (n * (xv * yv).sum() - xv.sum() * yv.sum()) / (
                n * (xv * xv).sum() - xv.sum() ** 2
            )
            aggs += [
                v.mean().alias(f"{m}_mean_{s}"),
                v.std().alias(f"{m}_std_{s}"),
                v.min().alias(f"{m}_min_{s}"),
                v.max().alias(f"{m}_max_{s}"),
                pl.when(v.len() > 0).then(v.null_count() / v.len()).alias(f"{m}_missing_rate_{s}"),
                pl.when((n >= 2) & (xv.max() > xv.min())).then(slope).alias(f"{m}_slope_{s}"),
            ]
    gaps = [
        pl.when(pl.col(f"n_events_{s}") > 0)
        .then(pl.max_horizontal(f"gap_{s}", "days_since_last_event"))
        .alias(f"longest_gap_days_{s}")
        for s in suffixes
    ]
    query = events.group_by(ENTITY).agg(aggs).with_columns(gaps).drop("^gap_.*$").sort(ENTITY)
    return query.collect() if engine is None else query.collect(engine=engine)


def child(contender: str, path: Path, out: Path | None, engine: Engine | None) -> None:
    run = run_fedfuse if contender == "fedfuse" else run_plain
    started = time.perf_counter()
    result = run(path, engine)
    wall = time.perf_counter() - started
    if out is not None:
        result.write_parquet(out)
    print(json.dumps({"wall": wall, "rows": result.height, "cols": result.width}))


def measure(
    contender: str, path: Path, out: Path | None, engine: Engine | None
) -> tuple[float, float]:
    """Run one contender in its own interpreter; (wall seconds, peak RSS MiB of the child)."""
    args = ["--child", contender, "--path", str(path)]
    if out is not None:
        args += ["--out", str(out)]
    if engine is not None:
        args += ["--engine", engine]
    stdout, rss = spawn(args)
    report = json.loads(stdout.strip().splitlines()[-1])
    return float(report["wall"]), rss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20240630)
    parser.add_argument(
        "--engine",
        choices=["in-memory", "streaming"],
        default=None,
        help="polars engine for both contenders (default: each one's own default)",
    )
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.path, args.out, cast("Engine | None", args.engine))
        return
    if args.generate:
        write_dataset(args.generate, args.seed, args.path)
        return

    path = dataset(args.events, args.seed)
    figures: dict[str, list[tuple[float, float]]] = {c: [] for c in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {c: Path(tmp) / f"{c}.parquet" for c in CONTENDERS}
        for i in range(args.repeat):
            order = CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]
            for contender in order:
                out = outputs[contender] if i < 2 else None
                wall, rss = measure(contender, path, out, cast("Engine | None", args.engine))
                figures[contender].append((wall, rss))
                print(f"run {i + 1} {contender:8s} wall {wall:6.2f}s  peak RSS {rss:7.0f} MiB")
        import polars as pl
        from polars.testing import assert_frame_equal

        fedfuse, plain = (pl.read_parquet(outputs[c]) for c in CONTENDERS)
    assert_frame_equal(
        fedfuse, plain.select(fedfuse.columns), check_exact=False, rel_tol=1e-6, abs_tol=1e-9
    )
    print(f"outputs equal: {fedfuse.height:,} entities x {fedfuse.width} columns")

    medians = {
        c: (statistics.median(w for w, _ in runs), statistics.median(r for _, r in runs))
        for c, runs in figures.items()
    }
    engine = args.engine or "default"
    print(
        f"\n{args.events:,} events, {args.repeat} runs each (alternating order), "
        f"engine {engine}, polars {pl.__version__}, {os.cpu_count()} CPUs; medians:\n"
    )
    print(f"| {'':8s} | {'wall (s)':>9s} | {'peak RSS (MiB)':>14s} |")
    print(f"|{'-' * 10}|{'-' * 11}|{'-' * 16}|")
    for contender, (wall, rss) in medians.items():
        print(f"| {contender:8s} | {wall:9.2f} | {rss:14.0f} |")
    (fw, fr), (pw, pr) = medians["fedfuse"], medians["plain"]
    print(f"| {'ratio':8s} | {fw / pw:9.2f} | {fr / pr:14.2f} |")
    print(f"\ngoals: wall <= 1.25x plain ({'met' if fw <= 1.25 * pw else 'MISSED'}), ", end="")
    print(f"peak memory <= 1.5x plain ({'met' if fr <= 1.5 * pr else 'MISSED'})")


if __name__ == "__main__":
    main()
