"""Benchmark: private set intersection (tasks.vertical.psi_*) against the plain hash join.

    python -m benchmarks.bench_psi [--keys 1000000] [--parties 3] [--overlap 0.8] [--workers N]

Every party holds ``--keys`` normalised keys; a fraction ``--overlap`` of them is common to
all parties, the rest is the party's own. Prints:

* the X25519 rate of one core (``cryptography`` / OpenSSL, and PyNaCl / libsodium when it
  is installed) on this machine, for reference, and the one-core rate of each kind of
  protocol step (a party blinding its own keys; a party re-blinding a received set);
* the private intersection (``tasks.vertical.psi_memory.run_psi``: key checks, HMAC, hashing
  onto the curve, all X25519 operations over a process pool, matching, alignment) with its
  wall time, X25519 operations per second per core and keys per second per core;
* the plain baseline: ``tasks.prepare.align.hash_keys`` per party and a polars inner join of the
  HMAC-hashed keys (the non-private intersection), and the ratio of the two wall times.

Both must find the same number of common entities or the run fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import time

import polars as pl
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tasks.prepare.align import hash_keys
from tasks.vertical.psi_memory import run_psi
from tasks.vertical.psi_protocol import ALIGN_ID, BlindedSet, blind_own, new_secret, reblind

SECRET = b"benchmark-consortium-secret"


def make_parties(n_keys: int, n_parties: int, overlap: float) -> dict[str, pl.Series]:
    """Deterministic keys: ``overlap * n_keys`` shared by all, the rest unique per party."""
    shared = int(n_keys * overlap)
    parties: dict[str, pl.Series] = {}
    for i in range(n_parties):
        name = "ABCDEFGHIJ"[i]
        common = "cust" + pl.int_range(shared, eager=True).cast(pl.String).str.zfill(9)
        own = f"cust{name.lower()}" + pl.int_range(n_keys - shared, eager=True).cast(
            pl.String
        ).str.zfill(9)
        keys = pl.concat([common, own]).sample(fraction=1.0, shuffle=True, seed=i)
        parties[name] = keys.rename("key")
    return parties


def x25519_rates(n: int = 20_000) -> dict[str, float]:
    points = [hashlib.sha256(b"%d" % i).digest() for i in range(n)]
    scalar = os.urandom(32)
    rates: dict[str, float] = {}
    key = X25519PrivateKey.from_private_bytes(scalar)
    public = X25519PublicKey.from_public_bytes
    start = time.perf_counter()
    for p in points:
        key.exchange(public(p))
    rates["cryptography (OpenSSL) X25519PrivateKey.exchange"] = n / (time.perf_counter() - start)
    try:
        from nacl.bindings import crypto_scalarmult  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return rates
    start = time.perf_counter()
    for p in points:
        crypto_scalarmult(scalar, p)
    rates["PyNaCl (libsodium) crypto_scalarmult"] = n / (time.perf_counter() - start)
    return rates


def step_rates(keys: pl.Series, n: int = 20_000) -> dict[str, float]:
    """Values per second on one core for each kind of PSI step, on ``n`` of the keys."""
    hashed = hash_keys(keys.head(n), SECRET)
    secret, other = new_secret(), new_secret()
    start = time.perf_counter()
    own = blind_own(hashed, secret, party="A", to="B")
    blind_s = time.perf_counter() - start
    start = time.perf_counter()
    reblind(own, other, party="B")
    reblind_s = time.perf_counter() - start
    return {
        "blind own keys (hash onto the curve + X25519)": n / blind_s,
        "re-blind a received set (X25519)": n / reblind_s,
    }


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the worker pool)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def plain(parties: dict[str, pl.Series]) -> int:
    frames = [hash_keys(keys, SECRET).to_frame() for keys in parties.values()]
    joined = frames[0]
    for frame in frames[1:]:
        joined = joined.join(frame, on="entity_hash", how="inner", validate="1:1")
    return joined.height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys per party")
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--overlap", type=float, default=0.8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--chunk", type=int, default=25_000, help="values per worker task")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.2f} before the run")
    for name, rate in x25519_rates().items():
        print(f"X25519, one core, {name}: {rate:,.0f} ops/s")

    parties = make_parties(args.keys, args.parties, args.overlap)
    total_keys = sum(k.len() for k in parties.values())
    for name, rate in step_rates(parties["A"]).items():
        print(f"PSI step, one core, {name}: {rate:,.0f} keys/s")

    cpu, start = cpu_seconds(), time.perf_counter()
    expected = plain(parties)
    plain_s, plain_cpu = time.perf_counter() - start, cpu_seconds() - cpu

    cpu, start = cpu_seconds(), time.perf_counter()
    run = run_psi(
        parties, label_party="A", secret=SECRET, workers=args.workers, chunk_size=args.chunk
    )
    psi_s, psi_cpu = time.perf_counter() - start, cpu_seconds() - cpu
    found = run.alignments["A"].table.height
    if found != expected:
        raise SystemExit(f"PSI found {found} common entities, the plain join {expected}")
    ids = {p: set(a.table[ALIGN_ID].to_list()) for p, a in run.alignments.items()}
    if any(v != ids["A"] for v in ids.values()):
        raise SystemExit("alignment ids differ between parties")

    ops = sum(run.scalar_mults.values())
    sent = sum(
        len(m.values) if isinstance(m, BlindedSet) else len(m.positions) + len(m.ids)
        for m in run.transcript
    )
    print(
        f"\n{args.parties} parties x {args.keys:,} keys, overlap {args.overlap:.0%}: "
        f"{expected:,} common entities; {args.workers} worker process(es)"
    )
    print(f"{'':22}{'wall':>9}{'CPU':>9}{'keys/s':>11}{'keys/CPU-s':>12}{'X25519/CPU-s':>14}")
    print(
        f"{'private (run_psi)':22}{psi_s:8.1f}s{psi_cpu:8.1f}s{total_keys / psi_s:11,.0f}"
        f"{total_keys / psi_cpu:12,.0f}{ops / psi_cpu:14,.0f}"
    )
    print(
        f"{'plain (HMAC + join)':22}{plain_s:8.1f}s{plain_cpu:8.1f}s{total_keys / plain_s:11,.0f}"
        f"{total_keys / plain_cpu:12,.0f}"
    )
    print(f"ratio private / plain: {psi_s / plain_s:.1f}x wall, {psi_cpu / plain_cpu:.1f}x CPU")
    print(
        f"on {args.workers} idle cores the private run would take at least about "
        f"{psi_cpu / args.workers:.0f} s (CPU time / cores)"
    )
    print(f"X25519 operations: {ops:,} ({ops / total_keys:.2f} per key); bytes sent: {sent:,}")


if __name__ == "__main__":
    main()
