"""Benchmark: ``prepare`` with the parties one at a time against side by side.

    python -m benchmarks.bench_parallel [--customers 200000] [--parties 3] [--parallel 1 3]

Generates (once, cached under ``benchmarks/.data/``, deterministic from the seed) the demo
consortium (``fedfuse demo-data``: customers, transactions, feedback texts and IoT events
per party). Then, for every value of ``--parallel`` (``[run] max_parallel_parties``; the
sources setting stays at its default), copies the raw exports to a fresh folder (no cached
step) and runs the real ``prepare`` flow there in its own subprocess, on the embedded
default: every party in process, on one machine. The child takes the wall time of the flow
call and its own peak resident memory (``ru_maxrss`` of the flow's process, where every
in-process pipeline runs; Prefect's temporary API server is a process of its own and not
counted). The fused tables of every setting must have the same content hashes or the
benchmark fails. Prints one row per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / ".data"
#: The key-hashing secret of the benchmark data (set in the env var the spec names).
BENCH_SECRET = "fedfuse-benchmark-secret-not-for-real-data"
SECRET_ENV = "FEDFUSE_SECRET"


def consortium(customers: int, parties: int, seed: int) -> Path:
    """The demo consortium's folder (spec and raw exports), generated once."""
    from tasks.demo_data import write_demo_consortium

    folder = DATA / f"parallel-{customers}-{parties}-{seed}"
    done = folder / "done"
    if not done.exists():
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted earlier run
        started = time.perf_counter()
        write_demo_consortium(
            str(folder / "consortium"), parties=parties, customers=customers, seed=seed
        )
        done.write_text("ok\n")
        print(
            f"  generated {customers:,} customers over {parties} parties in "
            f"{time.perf_counter() - started:.0f}s",
            flush=True,
        )
    return folder / "consortium"


def fresh_copy(source: Path, target: Path, parallel: int) -> Path:
    """The consortium's spec and raw exports under ``target``, with ``max_parallel_parties``."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".fedfuse"))
    for store in (target / "stores").iterdir():
        for layer in store.iterdir():
            if layer.name != "raw":
                shutil.rmtree(layer)
    spec = target / "spec.toml"
    with spec.open("a", encoding="utf-8") as handle:
        handle.write(f"\n[run]\nmax_parallel_parties = {parallel}\n")
    return spec


def child(spec: str) -> None:
    """Run the prepare flow on ``spec``; print wall time, peak RSS and the fused hashes."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    from flows.prepare import prepare

    started = time.perf_counter()
    outputs = prepare(spec)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    hashes = {party: out.table.sha256 for party, out in outputs.items()}
    print(json.dumps({"wall": wall, "peak_mib": peak, "fused": hashes}))


def spawn(spec: Path, home: Path) -> dict[str, object]:
    env = {
        **os.environ,
        SECRET_ENV: BENCH_SECRET,
        "PREFECT_HOME": str(home),
        "PREFECT_LOGGING_LEVEL": "ERROR",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    env.pop("PREFECT_API_URL", None)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.bench_parallel", "--child", str(spec)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"prepare on {spec} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return []
    source = consortium(args.customers, args.parties, args.seed)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        for parallel in args.parallel:
            run = Path(tmp) / f"parallel-{parallel}"
            spec = fresh_copy(source, run / "consortium", parallel)
            result = spawn(spec, run / "prefect-home")
            rows.append({"parallel": parallel, **result})
            print(
                f"  max_parallel_parties = {parallel}: wall {result['wall']:.1f} s, "
                f"peak RSS {result['peak_mib']:.0f} MiB",
                flush=True,
            )
    fused = {json.dumps(row["fused"], sort_keys=True) for row in rows}
    if len(fused) != 1:
        raise SystemExit("the fused tables differ between settings")
    print(f"\n{args.customers:,} customers, {args.parties} parties, {os.cpu_count()} CPUs")
    print("| max_parallel_parties | wall (s) | peak RSS (MiB) |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['parallel']} | {row['wall']:.1f} | {row['peak_mib']:.0f} |")
    print("fused tables identical in every setting (content hashes)")
    return rows


if __name__ == "__main__":
    main()
