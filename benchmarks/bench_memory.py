"""Benchmark: peak memory of a party's pipeline, whole sources against entity-hash shards.

    python -m benchmarks.bench_memory [--customers 50000 200000] [--events-per-device 40]
        [--shards 8] [--seed 1]

Generates (once per size, cached under ``benchmarks/.data/``) one party of the demo
consortium (``tasks/demo_data.py``: customers CSV, transactions CSV, feedback JSONL, device
events Parquet with its device map), with many events per device, then runs the party's
whole pipeline (``tasks.prepare.steps.run_party``: the steps the ``party-pipeline`` flow runs,
no Prefect) in a fresh interpreter per run, side by side in one run, alternating which goes
first: once with whole sources (``[run] shards = 1``) and once in ``--shards`` entity-hash
shards. Peak memory is each child's ``ru_maxrss`` (``os.wait4``); wall time is taken inside
the child around the work. Both runs must give the same fused table (content hash). Prints
per size the events, raw size, wall time and peak RSS of both and their ratios, and how the
peak grows with the size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / ".data"
SECRET_ENV = "FEDFUSE_SECRET"
BENCH_SECRET = "bench-memory-secret-0123456789abcdef"


@dataclass
class Run:
    wall: float
    rss_mib: float
    fused: str


def child(job: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """One job in a fresh interpreter: what it reports and its peak RSS (MiB)."""
    env = dict(os.environ, **{SECRET_ENV: BENCH_SECRET, "POLARS_MAX_THREADS": "2"})
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_memory", "--child", json.dumps(job)],
            stdout=out,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed: {job}")
    return json.loads(text.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def consortium(customers: int, per_device: float, seed: int) -> Path:
    folder = DATA / f"memory-c{customers}-e{per_device:g}-s{seed}"
    spec = folder / "consortium" / "spec.toml"
    if not (folder / "generated").exists():
        if folder.exists():
            shutil.rmtree(folder)
        started = time.perf_counter()
        job = {"kind": "generate", "out": str(folder / "consortium"), "customers": customers}
        child(job | {"per_device": per_device, "seed": seed})
        (folder / "generated").write_text("ok\n")
        print(f"  generated {customers:,} customers in {time.perf_counter() - started:.0f}s")
    return spec


def raw_mib(spec: Path) -> float:
    raw = spec.parent / "stores" / "site-a" / "raw"
    return sum(p.stat().st_size for p in raw.iterdir()) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--events-per-device", type=float, default=40.0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return
    rows = []
    for i, customers in enumerate(args.customers):
        spec = consortium(customers, args.events_per_device, args.seed)
        order = [1, args.shards] if i % 2 == 0 else [args.shards, 1]
        runs: dict[int, Run] = {}
        events = 0
        for shards in order:
            out, rss = child({"kind": "party", "spec": str(spec), "shards": shards})
            runs[shards] = Run(wall=out["wall"], rss_mib=rss, fused=out["fused"])
            events = out["events"]
            print(
                f"  {customers:,} customers, shards {shards}: {out['wall']:.1f}s, "
                f"{rss:.0f} MiB peak"
            )
        whole, sharded = runs[1], runs[args.shards]
        if whole.fused != sharded.fused:
            raise SystemExit(f"{customers}: the sharded fused table differs from the whole one")
        rows.append((customers, events, raw_mib(spec), whole, sharded))
    print()
    print(
        f"| customers (one party) | events | raw | whole: wall | whole: peak RSS | "
        f"{args.shards} shards: wall | {args.shards} shards: peak RSS | RSS ratio | wall ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for customers, events, raw, whole, sharded in rows:
        print(
            f"| {customers:,} | {events:,} | {raw:.0f} MiB | {whole.wall:.1f} s | "
            f"{whole.rss_mib:.0f} MiB | {sharded.wall:.1f} s | {sharded.rss_mib:.0f} MiB | "
            f"{sharded.rss_mib / whole.rss_mib:.2f} | {sharded.wall / whole.wall:.2f} |"
        )
    if len(rows) > 1:
        (c0, e0, _, w0, s0), (c1, e1, _, w1, s1) = rows[0], rows[-1]
        print(
            f"\ngrowth {c0:,} -> {c1:,} customers ({e1 / e0:.1f}x events): whole "
            f"{w1.rss_mib / w0.rss_mib:.2f}x peak RSS, {args.shards} shards "
            f"{s1.rss_mib / s0.rss_mib:.2f}x peak RSS"
        )


def run_child(job: dict[str, Any]) -> None:
    if job["kind"] == "generate":
        from tasks.demo_data import write_demo_consortium

        write_demo_consortium(
            job["out"],
            layout="horizontal",
            parties=1,
            customers=job["customers"],
            seed=job["seed"],
            events_per_device=job["per_device"],
        )
        sys.stdout.write(json.dumps({}) + "\n")
        return
    import polars as pl

    from tasks.prepare.steps import PartyContext, run_party
    from tasks.spec.load import load_spec

    spec = load_spec(job["spec"])
    party = spec.parties[0]
    events = sum(
        pl.scan_parquet(s.path).select(pl.len()).collect().item()
        for s in party.sources
        if s.kind == "events"
    )
    started = time.perf_counter()
    fused = run_party(PartyContext.from_spec(spec, party.id), party.sources, job["shards"])
    wall = time.perf_counter() - started
    sys.stdout.write(json.dumps({"wall": wall, "fused": fused.table.sha256, "events": events}))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
