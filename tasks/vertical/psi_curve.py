"""Curve25519 side of private set intersection: keys checked and hashed onto the curve,
and scalar multiplication (blinding) in chunks, in process or over a process pool.

Key hashing: a key's HMAC digest (``tasks.prepare.align.hash_keys`` with the consortium secret) is
hashed with domain-separated SHA-512 to two candidate u-coordinates, retried with a counter
until a u-coordinate is on the curve (not on its quadratic twist). X25519 accepts twist
points too, and a receiver could tell which of the two a blinded value lies on: one bit of
information about the key behind it. Keeping every point on the curve closes that; the test
is one Legendre symbol (gmpy2) per try, ~2 tries per key, and the whole hash costs about a
fifth of one X25519 operation.

X25519 is an x-only Montgomery ladder with clamped scalars, and clamped scalar multiplication
commutes: ``X25519(a, X25519(p, u)) == X25519(p, X25519(a, u))``. Clamped scalars are
multiples of the cofactor 8, so blinded points lie in the prime-order subgroup. An all-zero
result (a low-order input, practically impossible from the hash but possible in a forged
message) is refused with :class:`PSIError`.

Speed. Scalar multiplication runs in C (OpenSSL through ``cryptography``); the Python
overhead per value is a few percent. A :class:`ScalarProduct` splits its values into chunks
and, given a :class:`concurrent.futures.ProcessPoolExecutor` (:func:`pool`), puts them in
flight at once, so several products can share one pool and keep its cores busy.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager

import gmpy2  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import polars as pl
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tasks.prepare.align import hash_keys
from tasks.prepare.preprocess import normalise_key
from tasks.types import KeyNormalisation

#: Bytes of one X25519 u-coordinate (a blinded value).
POINT_BYTES = 32

_P = 2**255 - 19
_P_MPZ = gmpy2.mpz(_P)
_A24 = 486662  # Montgomery coefficient A of Curve25519: v^2 = u^3 + A u^2 + u
_U_MASK = (1 << 255) - 1
_DOMAIN_POINT = b"fedfuse/psi/v2/hash-to-curve\x00"
_MAX_TRIES = 128
DEFAULT_CHUNK = 25_000
#: Below this many X25519 operations a process pool costs more than it saves.
POOL_MIN_OPS = 50_000


class PSIError(ValueError):
    """The intersection cannot be computed or is unusable (messages name parties and rows)."""


# -- key checks and hashing -----------------------------------------------------------------
def check_keys(keys: pl.Series, *, party: str, normalisation: KeyNormalisation) -> None:
    """Refuse null, non-normalised or duplicate keys; errors name rows, never key values."""
    if keys.len() == 0:
        raise PSIError(f"party {party}: no entity keys to intersect")
    if keys.null_count():
        first = int(keys.is_null().arg_true()[0])
        raise PSIError(
            f"party {party}: {keys.null_count()} of {keys.len()} entity keys are missing "
            f"(first at row {first})"
        )
    text = keys.cast(pl.String)
    normalised = pl.select(normalise_key(pl.lit(text), normalisation)).to_series()
    off = (normalised.is_null() | (normalised != text)).fill_null(True)
    if off.any():
        first = int(off.arg_true()[0])
        raise PSIError(
            f"party {party}: {int(off.sum())} of {keys.len()} entity keys are not in the "
            f"consortium's normalised form (key_normalisation = {normalisation!r}; first at "
            f"row {first}); every party must normalise keys the same way before the "
            f"intersection, or shared customers are missed"
        )
    _check_unique(text, party)


def _check_unique(keys: pl.Series, party: str) -> None:
    repeated = ~keys.is_first_distinct()
    if repeated.any():
        row = int(repeated.arg_true()[0])
        first = int((keys == keys[row]).arg_true()[0])
        raise PSIError(
            f"party {party}: the entity key at row {row} repeats the key at row {first} "
            f"({int(repeated.sum())} repeated rows in all); one row per entity is required"
        )


def prepare_keys(
    keys: pl.Series, *, party: str, normalisation: KeyNormalisation, secret: bytes
) -> pl.Series:
    """Checked keys, HMAC-hashed with the consortium secret (``tasks.prepare.align.hash_keys``)."""
    check_keys(keys, party=party, normalisation=normalisation)
    return hash_keys(keys.cast(pl.String), secret)


def key_digests(keys_hashed: pl.Series, party: str) -> bytes:
    """Hashed keys (:func:`prepare_keys`) as packed 32-byte digests, checked and unique."""
    if keys_hashed.len() == 0:
        raise PSIError(f"party {party}: no entity keys to intersect")
    ok = keys_hashed.cast(pl.String).str.contains("^[0-9a-f]{64}$").fill_null(False)
    if not ok.all():
        first = int((~ok).arg_true()[0])
        raise PSIError(
            f"party {party}: hashed keys must be 64 lower-case hex characters "
            f"(tasks.prepare.align.hash_keys); row {first} is not"
        )
    _check_unique(keys_hashed, party)
    return bytes.fromhex("".join(keys_hashed.to_list()))


def hash_to_point(digest: bytes) -> bytes:
    """A key's HMAC digest as a Curve25519 u-coordinate (on the curve, not its twist)."""
    for counter in range(_MAX_TRIES // 2):
        block = hashlib.sha512(_DOMAIN_POINT + bytes((counter,)) + digest).digest()
        for candidate in (block[:POINT_BYTES], block[POINT_BYTES:]):
            u = int.from_bytes(candidate, "little") & _U_MASK
            if u < _P and gmpy2.legendre(u * (u * (u + _A24) + 1), _P_MPZ) == 1:
                return u.to_bytes(POINT_BYTES, "little")
    raise PSIError(f"no curve point after {_MAX_TRIES} tries")  # pragma: no cover - p < 2^-128


def hash_to_points(keys_hashed: pl.Series) -> bytes:
    """``H(key)`` for each hashed key, packed; never leaves the party (used by tests)."""
    blob = key_digests(keys_hashed, "?")
    return b"".join(hash_to_point(blob[i : i + 32]) for i in range(0, len(blob), 32))


# -- scalar multiplication kernels (run in worker processes) ---------------------------------
def _public_key_loader() -> Callable[[bytes], X25519PublicKey]:
    """``X25519PublicKey.from_public_bytes`` without its per-call backend check.

    The public classmethod re-checks backend support on every call, about 5% of the cost of
    one X25519 operation; the binding it forwards to is used directly when it is there.
    """
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust_openssl

        loader: Callable[[bytes], X25519PublicKey] = rust_openssl.x25519.from_public_bytes
    except (ImportError, AttributeError):  # pragma: no cover - other cryptography layouts
        return X25519PublicKey.from_public_bytes
    return loader


def _mult_chunk(scalar: bytes, blob: bytes, hashed: bool) -> tuple[bytes, int]:
    """Multiply each packed value by ``scalar``; with ``hashed`` the values are HMAC digests
    hashed onto the curve first. Returns the packed result and the first bad index (or -1)."""
    exchange = X25519PrivateKey.from_private_bytes(scalar).exchange
    public = _public_key_loader()
    out: list[bytes] = []
    append = out.append
    h2p = hash_to_point
    for i in range(0, len(blob), POINT_BYTES):
        u = blob[i : i + POINT_BYTES]
        if hashed:
            u = h2p(u)
        try:
            append(exchange(public(u)))
        except ValueError:  # all-zero shared value: u is a low-order point
            return b"", i // POINT_BYTES
    return b"".join(out), -1


class ScalarProduct:
    """Scalar multiplications in flight: chunks submitted to an executor (or computed on
    :meth:`result` without one). Several products can be in flight on one pool at once,
    so the cores stay busy across protocol steps instead of idling at each step's tail."""

    def __init__(
        self,
        blob: bytes,
        scalar: bytes,
        *,
        hashed: bool,
        what: str,
        executor: Executor | None,
        chunk_size: int,
    ) -> None:
        self._size = max(1, chunk_size)
        step = self._size * POINT_BYTES
        self._chunks = [blob[i : i + step] for i in range(0, len(blob), step)]
        self._scalar, self._hashed, self._what = scalar, hashed, what
        self._futures: list[Future[tuple[bytes, int]]] | None = None
        if executor is not None and len(self._chunks) > 1:
            self._futures = [
                executor.submit(_mult_chunk, scalar, chunk, hashed) for chunk in self._chunks
            ]

    def result(self) -> bytes:
        """The products in input order; a low-order value raises :class:`PSIError`."""
        futures = self._futures
        results: Iterator[tuple[bytes, int]] = (
            (f.result() for f in futures)
            if futures is not None
            else (_mult_chunk(self._scalar, c, self._hashed) for c in self._chunks)
        )
        out: list[bytes] = []
        for index, (values, bad) in enumerate(results):
            if bad >= 0:
                if futures is not None:
                    for future in futures:
                        future.cancel()
                raise self._error(index * self._size + bad)
            out.append(values)
        return b"".join(out)

    def _error(self, position: int) -> PSIError:
        if self._hashed:  # needs a SHA-512 preimage of a low-order point
            return PSIError(
                f"{self._what}: the key at row {position} hashes to a low-order point (X25519 "
                f"gives all zeros); this should never happen, please report it"
            )
        return PSIError(
            f"{self._what}: value at position {position} is a low-order point (X25519 gives "
            f"all zeros); the message is corrupt or forged"
        )


def shuffle_packed(blob: bytes, perm: npt.NDArray[np.int64], width: int) -> bytes:
    """Packed ``width``-byte values reordered: position ``k`` holds value ``perm[k]``."""
    if not blob:
        return blob
    return np.frombuffer(blob, dtype=np.uint8).reshape(-1, width)[perm].tobytes()


def pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool for the scalar multiplications (``spawn``: no forked threads)."""
    return ProcessPoolExecutor(
        max_workers=workers or os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")
    )


@contextmanager
def pool_for(ops: int) -> Iterator[Executor | None]:
    """A process pool over the machine's cores for a step of ``ops`` X25519 operations when
    that pays (:data:`POOL_MIN_OPS`, at least two cores), else none."""
    if ops < POOL_MIN_OPS or (os.cpu_count() or 1) < 2:
        yield None
        return
    executor = pool()
    try:
        yield executor
    finally:
        executor.shutdown()
