"""Benchmark: the party pipeline (preprocess, features, align, fuse) against a plain polars script.

    python -m benchmarks.bench_prepare [--customers 100000 1000000] [--parties 3] [--seed 1]
        [--no-flow] [--quick]

Generates (once per size, cached under ``benchmarks/.data/``) the demo consortium of
``fedfuse demo-data`` in the horizontal layout, then, per party and per step, runs in its own
subprocess each of:

- **fedfuse**: the step functions ``tasks.prepare.steps.run_party`` calls (``run_preprocess``
  per source, ``run_features``, ``run_align``, ``run_fuse``), in-process, no Prefect; each step
  reads the references the previous step's child left behind;
- **plain**: a hand-written polars script reading the same files (``pl.read_csv`` with every
  cell as text, ``pl.read_ndjson``, ``pl.read_parquet``) and doing the same work with no
  fedfuse code: the spec's renames, type coercion (numbers, dates, local times to UTC, value
  maps), unit conversion, required-column checks (failing rows counted and written apart),
  key normalisation, exact-duplicate removal, the device-to-customer map, per-entity window
  aggregations, HMAC-SHA256 of the keys and the join of the party's tables.

The two sides alternate their order step by step. Wall time is taken inside the child around
the work (imports and start-up excluded); peak memory is the child's ``ru_maxrss`` from
``os.wait4``, so each side's figure is its own (the parent never loads polars or data: Linux
carries a parent's high-water mark into its children). Then one whole ``prepare`` flow
(``refresh=True``, a temporary Prefect server, the server's start-up not timed) against the
plain script's total. Prints per step and in total the wall times, peak RSS and their
ratios, and the growth from the smallest to the largest size.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / ".data"
SECRET_ENV = "FEDFUSE_SECRET"
BENCH_SECRET = "bench-prepare-secret-0123456789abcdef"
SIDES = ("fedfuse", "plain")


# -- the parent ------------------------------------------------------------------------------
@dataclass
class Measure:
    wall: float
    rss_mib: float


@dataclass
class Row:
    customers: int
    party: str
    step: str
    fedfuse: Measure
    plain: Measure

    @property
    def wall_ratio(self) -> float:
        return self.fedfuse.wall / self.plain.wall if self.plain.wall else float("inf")

    @property
    def rss_ratio(self) -> float:
        return self.fedfuse.rss_mib / self.plain.rss_mib if self.plain.rss_mib else float("inf")


def child(job: dict[str, Any]) -> Measure:
    """Run one job in a fresh interpreter: its wall time (reported by it) and peak RSS."""
    env = dict(os.environ, **{SECRET_ENV: BENCH_SECRET, "POLARS_MAX_THREADS": "2"})
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_prepare", "--child", json.dumps(job)],
            stdout=out,
            cwd=Path(__file__).resolve().parent.parent,
            env=env,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark child failed: {job['side']} {job['step']}")
    result = json.loads(text.strip().splitlines()[-1])
    return Measure(wall=float(result["wall"]), rss_mib=usage.ru_maxrss / 1024)


def consortium(customers: int, parties: int, seed: int) -> Path:
    """The demo consortium of one size, generated once (in a child: its memory stays there)."""
    folder = DATA / f"prepare-c{customers}-p{parties}-s{seed}"
    spec = folder / "consortium" / "spec.toml"
    done = folder / "generated"
    if not done.exists():
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted earlier run
        started = time.perf_counter()
        job: dict[str, Any] = {"side": "generate", "step": "generate"}
        job |= {"out": str(folder / "consortium"), "customers": customers}
        job |= {"parties": parties, "seed": seed}
        child(job)
        done.write_text("ok\n")
        print(f"  generated {customers:,} customers in {time.perf_counter() - started:.0f}s")
    return spec


def party_steps(spec: Path) -> list[tuple[str, str]]:
    """(party, step) in pipeline order: preprocess, features, align per source, then fuse."""
    document = tomllib.loads(spec.read_text())
    steps: list[tuple[str, str]] = []
    for party in document["parties"]:
        sources = [s["id"] for s in party["sources"]]
        for stage in ("preprocess", "features", "align"):
            steps += [(party["id"], f"{stage}:{s}") for s in sources]
        steps.append((party["id"], "fuse"))
    return steps


def run_size(customers: int, parties: int, seed: int, flow: bool) -> tuple[list[Row], Row | None]:
    spec = consortium(customers, parties, seed)
    work = spec.parent.parent / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    rows: list[Row] = []
    for i, (party, step) in enumerate(party_steps(spec)):
        measured: dict[str, Measure] = {}
        for side in SIDES if i % 2 == 0 else SIDES[::-1]:
            job = {"side": side, "step": step, "spec": str(spec), "party": party}
            measured[side] = child(job | {"work": str(work / side)})
        row = Row(customers, party, step, measured["fedfuse"], measured["plain"])
        rows.append(row)
        print(
            f"  {customers:>9,} {party:<7} {step:<24} fedfuse {row.fedfuse.wall:7.2f}s "
            f"{row.fedfuse.rss_mib:6.0f} MiB   plain {row.plain.wall:7.2f}s "
            f"{row.plain.rss_mib:6.0f} MiB",
            flush=True,
        )
    whole = None
    if flow:
        job = {"side": "flow", "step": "prepare", "spec": str(spec)}
        flow_measure = child(job)
        plain_total = Measure(sum(r.plain.wall for r in rows), max(r.plain.rss_mib for r in rows))
        whole = Row(customers, "all", "prepare flow", flow_measure, plain_total)
        print(f"  {customers:>9,} prepare flow {flow_measure.wall:.2f}s", flush=True)
    return rows, whole


def totals(rows: list[Row]) -> Row:
    """All steps of a size: summed wall times, the highest peak of any step."""
    return Row(
        rows[0].customers,
        "all",
        "all steps",
        Measure(sum(r.fedfuse.wall for r in rows), max(r.fedfuse.rss_mib for r in rows)),
        Measure(sum(r.plain.wall for r in rows), max(r.plain.rss_mib for r in rows)),
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| customers | party | step | fedfuse wall | plain wall | ratio | fedfuse peak RSS "
        "| plain peak RSS | ratio |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.customers:,} | {r.party} | {r.step} | {r.fedfuse.wall:.2f} s | "
            f"{r.plain.wall:.2f} s | {r.wall_ratio:.2f} | {r.fedfuse.rss_mib:.0f} MiB | "
            f"{r.plain.rss_mib:.0f} MiB | {r.rss_ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[int, list[Row]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-flow", action="store_true", help="skip the whole prepare flow run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3000 customers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return {}
    sizes = [3000] if args.quick else sorted(args.customers)
    results: dict[int, list[Row]] = {}
    for customers in sizes:
        rows, whole = run_size(customers, args.parties, args.seed, not args.no_flow)
        results[customers] = [*rows, totals(rows), *([whole] if whole else [])]
    print()
    for customers, rows in results.items():
        print(f"{customers:,} customers, {args.parties} parties:\n")
        print(table(rows))
        print()
    if len(sizes) > 1:
        small, large = results[sizes[0]][-1], results[sizes[-1]][-1]
        ss = next(r for r in results[sizes[0]] if r.step == "all steps")
        ls = next(r for r in results[sizes[-1]] if r.step == "all steps")
        factor = sizes[-1] / sizes[0]
        print(f"growth {sizes[0]:,} -> {sizes[-1]:,} customers ({factor:.0f}x the data):")
        print(
            f"  all steps: fedfuse {ls.fedfuse.wall / ss.fedfuse.wall:.1f}x wall, "
            f"{ls.fedfuse.rss_mib / ss.fedfuse.rss_mib:.1f}x peak RSS; plain "
            f"{ls.plain.wall / ss.plain.wall:.1f}x wall, "
            f"{ls.plain.rss_mib / ss.plain.rss_mib:.1f}x peak RSS"
        )
        if small.step == "prepare flow" and large.step == "prepare flow":
            print(f"  prepare flow: {large.fedfuse.wall / small.fedfuse.wall:.1f}x wall")
    return results


# -- the children ----------------------------------------------------------------------------
def run_child(job: dict[str, Any]) -> None:
    side, step = job["side"], job["step"]
    if side == "generate":
        from tasks.demo_data import write_demo_consortium

        started = time.perf_counter()
        write_demo_consortium(
            job["out"],
            layout="horizontal",
            parties=job["parties"],
            customers=job["customers"],
            seed=job["seed"],
        )
        wall = time.perf_counter() - started
    elif side == "flow":
        wall = flow_child(job["spec"])
    elif side == "fedfuse":
        wall = fedfuse_child(job["spec"], job["party"], step, Path(job["work"]))
    else:
        wall = plain_child(job["spec"], job["party"], step, Path(job["work"]))
    sys.stdout.write(json.dumps({"wall": wall}) + "\n")


def flow_child(spec_path: str) -> float:
    from prefect.testing.utilities import prefect_test_harness

    from flows.prepare import prepare

    with prefect_test_harness():
        started = time.perf_counter()
        prepare(spec_path, refresh=True)
        return time.perf_counter() - started


def fedfuse_child(spec_path: str, party: str, step: str, work: Path) -> float:
    """One step of ``run_party``; its output reference saved for the next step's child."""
    from storage.store import fingerprint
    from tasks.prepare import steps
    from tasks.spec.load import load_spec

    spec = load_spec(spec_path)
    ctx = steps.PartyContext.from_spec(spec, party)
    sources = {s.id: s for s in spec.party(party).sources}
    folder = work / party
    folder.mkdir(parents=True, exist_ok=True)
    stage, _, name = step.partition(":")
    started = time.perf_counter()
    if stage == "preprocess":
        source = sources[name]
        roots = ctx.roots or None
        raw = fingerprint(source.path, roots=roots)
        emap = fingerprint(source.entity_map.path, roots=roots) if source.entity_map else None
        out: Any = steps.run_preprocess(ctx, source, raw, emap)
    elif stage == "features":
        clean = steps.CleanOutput.model_validate_json((folder / f"{name}.clean").read_text())
        out = steps.run_features(ctx, sources[name], clean)
    elif stage == "align":
        from storage.store import TableRef

        features = TableRef.model_validate_json((folder / f"{name}.features").read_text())
        out = steps.run_align(ctx, sources[name], features, steps.secret_tag(ctx.secret))
    else:
        aligned = [
            steps.AlignedOutput.model_validate_json((folder / f"{s}.align").read_text())
            for s in sources
        ]
        quality = [
            steps.CleanOutput.model_validate_json((folder / f"{s}.clean").read_text()).quality
            for s in sources
        ]
        out = steps.run_fuse(ctx, aligned, quality)
    wall = time.perf_counter() - started
    (folder / f"{name or 'fused'}.{stage}".replace(".preprocess", ".clean")).write_text(
        out.model_dump_json()
    )
    return wall


# -- the plain script: no fedfuse code below this line ---------------------------------------
FALSE_TRUE = {"true": True, "false": False}
UNIT_SCALE = {"cents": (0.01, 0.0), "Wh": (0.001, 0.0), "F": (5 / 9, -32 * 5 / 9)}


def plain_child(spec_path: str, party: str, step: str, work: Path) -> float:
    import polars as pl

    document = tomllib.loads(Path(spec_path).read_text())
    base = Path(spec_path).parent
    consortium_ = document["consortium"]
    entity = consortium_["entity"]
    as_of = consortium_["as_of"]
    spec_party = next(p for p in document["parties"] if p["id"] == party)
    sources = {s["id"]: s for s in spec_party["sources"]}
    folder = work / party
    folder.mkdir(parents=True, exist_ok=True)
    stage, _, name = step.partition(":")
    started = time.perf_counter()
    if stage == "preprocess":
        clean, rejected = plain_clean(pl, base, sources[name], entity, document["vocabularies"])
        clean.write_parquet(folder / f"{name}.clean.parquet")
        rejected.write_parquet(folder / f"{name}.rejected.parquet")
    elif stage == "features":
        scan = pl.scan_parquet(folder / f"{name}.clean.parquet")
        features = plain_features(pl, scan, sources[name], entity, as_of, document)
        features.write_parquet(folder / f"{name}.features.parquet")
    elif stage == "align":
        frame = pl.read_parquet(folder / f"{name}.features.parquet")
        secret = os.environ[consortium_["secret"]["env"]].encode()
        base_mac = hmac.new(secret, digestmod=hashlib.sha256)

        def mac(key: str) -> str:
            h = base_mac.copy()
            h.update(key.encode())
            return h.hexdigest()

        hashed = pl.Series("entity_hash", [mac(k) for k in frame[entity].to_list()])
        aligned = frame.drop(entity).select(
            pl.all().name.prefix(f"{sources[name]['kind']}__{name}__")
        )
        aligned.insert_column(0, hashed).write_parquet(folder / f"{name}.aligned.parquet")
    else:
        tables = [pl.read_parquet(folder / f"{s}.aligned.parquet") for s in sources]
        fused = tables[0]
        for other in tables[1:]:
            fused = fused.join(other, on="entity_hash", how="left", validate="1:1")
        fused.write_parquet(folder / "fused.parquet")
    return time.perf_counter() - started


def plain_read(pl: Any, path: Path, fmt: str) -> Any:
    if fmt == "csv":
        return pl.read_csv(path, infer_schema=False, truncate_ragged_lines=True)
    if fmt == "jsonl":
        return pl.read_ndjson(path, infer_schema_length=None)
    return pl.read_parquet(path)


def plain_coerce(pl: Any, dtype_of: Any, raw: str, col: dict[str, Any]) -> Any:
    expr = pl.col(raw)
    text = expr.cast(pl.String).str.strip_chars()
    if "values" in col:
        expr = text.replace_strict(col["values"], default=None)
        text = expr
    kind = col["dtype"]
    if kind == "str":
        out = text
    elif kind in ("int", "float"):
        out = (text if dtype_of == pl.String else expr).cast(pl.Float64, strict=False)
        if kind == "int":
            out = out.cast(pl.Int64, strict=False)
    elif kind == "bool":
        out = text.str.to_lowercase().replace_strict(FALSE_TRUE, default=None)
    elif kind == "date":
        out = expr if dtype_of == pl.Date else text.str.to_date(strict=False)
    elif kind == "datetime":
        if dtype_of == pl.String or "values" in col:
            if "format" in col:
                out = text.str.to_datetime(col["format"], strict=False, time_unit="us")
                out = out.dt.replace_time_zone(col.get("tz", "UTC"), ambiguous="null")
            else:
                out = text.str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
        else:
            out = expr
            if getattr(dtype_of, "time_zone", None) is None:
                out = out.dt.replace_time_zone(col.get("tz", "UTC"))
        out = out.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    else:  # category
        out = text.str.to_lowercase()
    if col.get("unit") in UNIT_SCALE:
        scale, offset = UNIT_SCALE[col["unit"]]
        out = out * scale + offset
    return out.alias(raw)


def plain_clean(
    pl: Any, base: Path, source: dict[str, Any], entity: str, vocabularies: dict[str, Any]
) -> tuple[Any, Any]:
    path = base / source["path"]
    raw = plain_read(pl, path, path.suffix.lstrip("."))
    raw = raw.with_row_index("row", offset=1)
    columns: dict[str, dict[str, Any]] = source["columns"]
    typed = raw.select(
        "row",
        *[
            plain_coerce(pl, raw.schema[c["from"]], c["from"], c).alias(name)
            for name, c in columns.items()
        ],
    )
    key = entity if entity in columns else "device_id"
    typed = typed.with_columns(pl.col(key).str.strip_chars().str.to_lowercase())
    # a cell that was given but did not parse, or a required one missing, rejects its row
    failed = [
        (pl.col(name).is_null() & raw[c["from"]].is_not_null().alias("given"))
        | (pl.col(name).is_null() & pl.lit(c.get("required", False) or name == key))
        for name, c in columns.items()
    ]
    typed = typed.with_columns(pl.any_horizontal(failed).alias("failed"))
    # a category outside its vocabulary becomes missing (and is counted)
    outside = {
        name: typed.filter(
            pl.col(name).is_not_null() & ~pl.col(name).is_in(vocabularies[name])
        ).height
        for name in columns
        if name in vocabularies
    }
    typed = typed.with_columns(
        pl.when(pl.col(name).is_in(vocabularies[name])).then(pl.col(name)).alias(name)
        for name in outside
    )
    rejected = typed.filter("failed").select("row")
    good = typed.filter(~pl.col("failed")).drop("failed")
    clean = good.unique(subset=list(columns), keep="first", maintain_order=True).drop("row")
    if "entity_map" in source:
        emap = source["entity_map"]
        mapping = pl.read_csv(base / emap["path"], infer_schema=False).select(
            pl.col(c["from"]).str.strip_chars().str.to_lowercase().alias(n)
            for n, c in emap["columns"].items()
        )
        clean = clean.join(mapping.unique(), on="device_id", how="inner")
    if source.get("grain") == "entity":
        clean = clean.unique(subset=[entity], keep="first", maintain_order=True)
    return clean, rejected


def plain_features(
    pl: Any, frame: Any, source: dict[str, Any], entity: str, as_of: Any, document: dict[str, Any]
) -> Any:
    import datetime as dt

    end = dt.datetime.combine(as_of, dt.time(), tzinfo=dt.UTC) + dt.timedelta(days=1)
    columns: dict[str, dict[str, Any]] = source["columns"]
    vocabularies = document["vocabularies"]
    if source.get("grain") == "entity":
        keep = [pl.col(entity)]
        for name, c in columns.items():
            if name == entity:
                continue
            if c["dtype"] == "date":
                keep.append((pl.lit(as_of) - pl.col(name)).dt.total_days().alias(name))
            elif name in vocabularies:
                keep += [
                    (pl.col(name) == v).cast(pl.Int8).alias(f"{name}={v}")
                    for v in vocabularies[name]
                ]
            else:
                keep.append(pl.col(name).cast(pl.Float64))
        return frame.select(keep).collect()
    frame = frame.filter(pl.col("timestamp") < end)
    numeric = [n for n, c in columns.items() if c["dtype"] in ("int", "float", "bool")]
    windows = source.get("features", {}).get("windows", [])
    aggs = [
        pl.len().alias("count"),
        ((pl.lit(end) - pl.col("timestamp").max()).dt.total_seconds() / 86400).alias(
            "recency_days"
        ),
    ]
    for w in [*windows, None]:
        inside = pl.col("timestamp") >= end - dt.timedelta(days=w) if w else pl.lit(True)
        tag = f"{w}d" if w else "all"
        aggs.append(inside.sum().alias(f"count_{tag}"))
        for n in numeric:
            value = pl.col(n).cast(pl.Float64).filter(inside)
            aggs += [
                value.sum().alias(f"{n}_sum_{tag}"),
                value.mean().alias(f"{n}_mean_{tag}"),
                value.max().alias(f"{n}_max_{tag}"),
            ]
    for name in columns:
        if name in vocabularies:
            aggs += [
                (pl.col(name) == v).mean().alias(f"{name}={v}_share") for v in vocabularies[name]
            ]
    if source["kind"] == "text":
        text = pl.col("text")
        aggs += [
            text.str.len_chars().mean().alias("length_mean"),
            text.str.split(" ").list.len().mean().alias("tokens_mean"),
        ]
    return frame.group_by(entity).agg(aggs).collect()


if __name__ == "__main__":
    main()
