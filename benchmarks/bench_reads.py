"""Benchmark: fedfuse's source reader (``storage.sources.read_source``) on a CSV and a JSONL
file, whole and for one of 8 entity-hash shards, against a plain polars read of the whole
file, each read in its own fresh process (peak RSS of that process), side by side in one run.

    python -m benchmarks.bench_reads [--rows 3000000] [--repeat 3]

The files are generated in a temporary directory (seeded): a CSV of ``--rows`` transactions
(key, amount, timestamp, category) and a JSONL of ``--rows`` / 6 feedback lines. A shard's
read keeps only its rows while it reads (the file is read in line-aligned batches), so its
peak RSS is bounded by the batch and the shard, not by the file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

SHARDS = 8

CHILD = f"""
import json, resource, sys, time
import polars as pl
side, path, fmt = sys.argv[1:4]
from storage.sources import read_source
keep = (pl.col("customer").hash() % {SHARDS}) == 0
start = time.perf_counter()
if side == "plain":
    rows = (pl.read_csv(path) if fmt == "csv" else pl.read_ndjson(path)).height
else:
    rows = read_source(path, fmt, keep=keep if side == "shard" else None).frame.height
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"wall": wall, "rss": rss, "rows": rows}}))
"""


def write_files(root: Path, rows: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    csv = root / "transactions.csv"
    pl.DataFrame(
        {
            "customer": [f"c{i}" for i in rng.integers(0, max(rows // 3, 1), rows)],
            "amount": rng.random(rows) * 100,
            "ts": ["2024-01-01T00:00:00"] * rows,
            "category": rng.choice(["food", "travel", "home"], rows),
        }
    ).write_csv(csv)
    lines = max(rows // 6, 1)
    jsonl = root / "feedback.jsonl"
    pl.DataFrame(
        {
            "customer": [f"c{i}" for i in range(lines)],
            "text": ["great product, would buy again; delivery was slow"] * lines,
        }
    ).write_ndjson(jsonl)
    return {"csv": csv, "jsonl": jsonl}


def run_child(side: str, path: Path, fmt: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, side, str(path), fmt],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    sides = ("plain", "whole", "shard")
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-reads-") as tmp:
        # generated in a child: a process's peak RSS carries over to the programs it starts
        # (Linux keeps it across exec), so the parent must stay small
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from benchmarks.bench_reads import write_files; "
                f"from pathlib import Path; write_files(Path({tmp!r}), {args.rows})",
            ],
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        files = {"csv": Path(tmp) / "transactions.csv", "jsonl": Path(tmp) / "feedback.jsonl"}
        for fmt, path in files.items():
            runs: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
            for i in range(args.repeat):
                order = sides if i % 2 == 0 else tuple(reversed(sides))
                for side in order:
                    runs[side].append(run_child(side, path, fmt))
            size = path.stat().st_size / 2**20
            print(f"{fmt}: {path.name}, {size:.0f} MiB, median of {args.repeat}")
            plain_wall = statistics.median(r["wall"] for r in runs["plain"])
            plain_rss = statistics.median(r["rss"] for r in runs["plain"])
            for side in sides:
                wall = statistics.median(r["wall"] for r in runs[side])
                rss = statistics.median(r["rss"] for r in runs[side])
                rows = int(runs[side][0]["rows"])
                figures[f"{fmt}-{side}"] = {"wall": wall, "rss": rss}
                print(
                    f"  {side:5}  {rows:>9,} rows  {wall:6.2f} s ({wall / plain_wall:4.2f}x plain)"
                    f"  peak RSS {rss:6.0f} MiB ({rss / plain_rss:4.2f}x plain)"
                )
    return figures


if __name__ == "__main__":
    main()
