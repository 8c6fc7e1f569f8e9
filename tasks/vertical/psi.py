"""Private set intersection (ECDH over X25519) for the vertical layout.

The label party ``A`` and the feature parties ``B``, ``C``, ... learn which of their rows
describe the same customers, and nothing about customers outside the all-party intersection.

Protocol (a star around the label party; each party ``X`` has a secret scalar ``x``)::

    every party    H(k) for its keys k        hash onto Curve25519 (see hash_to_points)
    A -> P         shuffle(a·H(A))            blind_own, one message per feature party P
    P -> A         shuffle(p·H(P))            blind_own
    P -> A         p·(a·H(A)), order kept     reblind
    A              a·(p·H(P)), match          intersect: rows of A present at every P
    A -> P         (position in P's shuffled set, alignment id) for the all-party overlap
    P              position -> own row        receive_alignment

X25519 is an x-only Montgomery ladder with clamped scalars, and clamped scalar multiplication
commutes: ``X25519(a, X25519(p, u)) == X25519(p, X25519(a, u))``. Every key is multiplied
by exactly the scalars needed to compare it with the other side: with ``n`` parties of
``N`` keys each the protocol costs ``N`` (A blinds its own set once for all) ``+ 2N`` per
feature party (blind own, re-blind A's), i.e. ``7N`` X25519 operations for 3 parties.

Key hashing: a key's HMAC digest (``tasks.prepare.align.hash_keys`` with the consortium secret) is
hashed with domain-separated SHA-512 to two candidate u-coordinates, retried with a counter
until a u-coordinate is on the curve (not on its quadratic twist). X25519 accepts twist
points too, and a receiver could tell which of the two a blinded value lies on: one bit of
information about the key behind it. Keeping every point on the curve closes that; the test
is one Legendre symbol (gmpy2) per try, ~2 tries per key, and the whole hash costs about a
fifth of one X25519 operation.
Clamped scalars are multiples of the cofactor 8, so blinded points lie in the prime-order
subgroup. An all-zero result (a low-order input, practically impossible from the hash but
possible in a forged message) is refused with :class:`PSIError`.

What each side learns. Feature party ``P``: the size of A's set, and which of its own rows
are in the all-party intersection with their alignment ids. Label party ``A``: the sizes of
the other sets, and for each of its rows which parties hold it (pairwise overlaps are
inherent to a star of two-party DH-PSI runs; only the all-party overlap is aligned and
handed out). Coordinator (relaying messages): set sizes and the overlap size. Every set a
party sends of its own is shuffled with a permutation derived from its secret; a re-blinded
set keeps the order of the set it answers (that order is its recipient's own shuffle), and
alignment messages are sorted by the recipient's shuffled position.

Secrets. A :class:`PartySecret` holds a 32-byte seed from which the scalar, the shuffle
permutations and the alignment-id key are derived. A flow derives it per step with
:func:`derive_secret` from a party-local master secret and the run id, so the scalar lives
only in the memory of that step (and of its worker processes) and is never stored or sent.

Speed. Scalar multiplication runs in C (OpenSSL through ``cryptography``); the Python
overhead per value is a few percent. Pass a :class:`concurrent.futures.ProcessPoolExecutor`
as ``executor`` to spread chunks over cores; :func:`run_psi` makes one for the whole run
and keeps it busy across steps (``start_*`` put a step's multiplications in flight, the
label party's re-blinding of every set is submitted at once, and a feature party's two
steps run together in :func:`answer`). On this kind of machine the run is then bound by
X25519 itself: about 31k operations per core-second, 2.33 operations per key for three
parties, plus a fifth of an operation per key for hashing onto the curve.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

import gmpy2  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from tasks.prepare.align import hash_keys
from tasks.prepare.preprocess import normalise_key
from tasks.types import KeyNormalisation

logger = logging.getLogger(__name__)

#: Bytes of one X25519 u-coordinate (a blinded value).
POINT_BYTES = 32
#: Bytes of one alignment id.
ID_BYTES = 16
#: Columns of an :class:`Alignment` table.
ROW = "row"
ALIGN_ID = "align_id"
#: Column of a blinded set as an Arrow table.
POINT = "point"
POSITION = "position"

_P = 2**255 - 19
_P_MPZ = gmpy2.mpz(_P)
_A24 = 486662  # Montgomery coefficient A of Curve25519: v^2 = u^3 + A u^2 + u
_U_MASK = (1 << 255) - 1
_DOMAIN_POINT = b"fedfuse/psi/v2/hash-to-curve\x00"
_MAX_TRIES = 128
_ZERO = bytes(POINT_BYTES)
DEFAULT_CHUNK = 25_000

Role = Literal["own", "reblinded"]


class PSIError(ValueError):
    """The intersection cannot be computed or is unusable (messages name parties and rows)."""


# -- secrets -----------------------------------------------------------------------------------
@dataclass(frozen=True, repr=False)
class PartySecret:
    """A party's per-run secret. Its repr never shows the seed."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ValueError("a PSI party secret is 32 bytes")

    def __repr__(self) -> str:
        return "PartySecret(<hidden>)"

    def _derive(self, label: bytes) -> bytes:
        return hmac.new(self.seed, b"fedfuse/psi/v1/" + label, hashlib.sha256).digest()

    @property
    def scalar(self) -> bytes:
        """The X25519 private scalar (clamped by X25519 itself)."""
        return self._derive(b"scalar")

    @property
    def id_key(self) -> bytes:
        """Key of the alignment ids the label party hands out."""
        return self._derive(b"alignment-id")

    def permutation(self, n: int) -> npt.NDArray[np.int64]:
        """The shuffle of the party's own set: position ``k`` holds row ``perm[k]``."""
        stream = _keystream(self._derive(b"shuffle"), 8 * n)
        return np.argsort(np.frombuffer(stream, dtype="<u8"), kind="stable").astype(np.int64)


def new_secret() -> PartySecret:
    """A fresh random secret (for one-off runs; flows use :func:`derive_secret`)."""
    return PartySecret(os.urandom(32))


def derive_secret(master: bytes, *, run_id: str, party: str) -> PartySecret:
    """The party's secret for one run, from a master secret only that party holds."""
    if len(master) < 16:
        raise ValueError("the PSI master secret must hold at least 16 bytes")
    info = f"fedfuse/psi/v1/run\x00{run_id}\x00{party}".encode()
    return PartySecret(hmac.new(master, info, hashlib.sha256).digest())


def _keystream(key: bytes, size: int) -> bytes:
    """``size`` pseudorandom bytes from ChaCha20 under ``key`` (deterministic)."""
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return encryptor.update(bytes(size))


# -- messages and results ----------------------------------------------------------------------
def _check_packed(values: bytes, width: int, what: str) -> None:
    if len(values) % width:
        raise PSIError(f"{what}: {len(values)} bytes is not a whole number of {width}-byte values")


@dataclass(frozen=True)
class BlindedSet:
    """Blinded points one party sends another: packed 32-byte u-coordinates.

    ``role="own"``: the sender's own keys, blinded once and shuffled. ``role="reblinded"``:
    the recipient's own set, blinded again by the sender, in the order it was received.
    """

    sender: str
    recipient: str
    role: Role
    values: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_packed(self.values, POINT_BYTES, f"set from {self.sender}")

    def __len__(self) -> int:
        return len(self.values) // POINT_BYTES

    def points(self) -> list[bytes]:
        v = self.values
        return [v[i : i + POINT_BYTES] for i in range(0, len(v), POINT_BYTES)]

    def forward(self, recipient: str) -> BlindedSet:
        """The same values addressed to another party (the label party's broadcast)."""
        return replace(self, recipient=recipient)

    def to_arrow(self) -> pa.Table:
        column = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(POINT_BYTES), len(self), [None, pa.py_buffer(self.values)]
        )
        meta = {"kind": "blinded", "sender": self.sender, "recipient": self.recipient}
        return pa.table({POINT: column}).replace_schema_metadata(meta | {"role": self.role})


@dataclass(frozen=True)
class AlignmentMessage:
    """The label party's answer to a feature party: for each entity of the all-party overlap,
    its position in the recipient's own shuffled set and its alignment id (sorted by position).
    """

    sender: str
    recipient: str
    positions: bytes = field(repr=False)  # uint32 little-endian
    ids: bytes = field(repr=False)  # ID_BYTES each

    def __post_init__(self) -> None:
        _check_packed(self.positions, 4, f"alignment from {self.sender}")
        _check_packed(self.ids, ID_BYTES, f"alignment from {self.sender}")
        if len(self.positions) // 4 != len(self.ids) // ID_BYTES:
            raise PSIError(f"alignment from {self.sender}: positions and ids differ in count")

    def __len__(self) -> int:
        return len(self.positions) // 4

    def to_arrow(self) -> pa.Table:
        n = len(self)
        positions = pa.Array.from_buffers(pa.uint32(), n, [None, pa.py_buffer(self.positions)])
        ids = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(ID_BYTES), n, [None, pa.py_buffer(self.ids)]
        )
        meta = {"kind": "alignment", "sender": self.sender, "recipient": self.recipient}
        return pa.table({POSITION: positions, ALIGN_ID: ids}).replace_schema_metadata(meta)


Message = BlindedSet | AlignmentMessage


def message_from_arrow(table: pa.Table) -> Message:
    """Rebuild a message from :meth:`BlindedSet.to_arrow` / :meth:`AlignmentMessage.to_arrow`."""
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    try:
        kind, sender, recipient = meta["kind"], meta["sender"], meta["recipient"]
    except KeyError as exc:
        raise PSIError(f"not a PSI message: its metadata lacks {exc}") from None
    if kind == "blinded":
        role = meta.get("role")
        if role not in ("own", "reblinded"):
            raise PSIError(f"set from {sender}: unknown role {role!r}")
        values = _fixed_bytes(table, POINT, POINT_BYTES)
        return BlindedSet(sender, recipient, "own" if role == "own" else "reblinded", values)
    if kind == "alignment":
        positions = table.column(POSITION).combine_chunks().cast(pa.uint32())
        data = np.asarray(positions.to_numpy(zero_copy_only=False), dtype="<u4").tobytes()
        return AlignmentMessage(sender, recipient, data, _fixed_bytes(table, ALIGN_ID, ID_BYTES))
    raise PSIError(f"not a PSI message: unknown kind {kind!r}")


def _fixed_bytes(table: pa.Table, column: str, width: int) -> bytes:
    array = table.column(column).combine_chunks()
    if array.type != pa.binary(width) or array.null_count:
        raise PSIError(f"column {column!r} must hold {width}-byte values without nulls")
    buffer = array.buffers()[1]
    start = array.offset * width
    return bytes(buffer)[start : start + len(array) * width] if buffer is not None else b""


@dataclass(frozen=True)
class Alignment:
    """A party's private result: which of its rows are in the all-party overlap, and the
    opaque alignment id each one has at every party (table ``row``, ``align_id``; by row)."""

    party: str
    table: pl.DataFrame

    def __len__(self) -> int:
        return self.table.height


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


def _digests(keys_hashed: pl.Series, party: str) -> bytes:
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
    blob = _digests(keys_hashed, "?")
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


class _Product:
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


def _shuffle(blob: bytes, perm: npt.NDArray[np.int64], width: int) -> bytes:
    if not blob:
        return blob
    return np.frombuffer(blob, dtype=np.uint8).reshape(-1, width)[perm].tobytes()


# -- protocol steps -----------------------------------------------------------------------------
def start_blind_own(
    keys_hashed: pl.Series,
    secret: PartySecret,
    *,
    party: str,
    to: str,
    executor: Executor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Callable[[], BlindedSet]:
    """:func:`blind_own` with its multiplications put in flight now; call the result to
    wait for them (lets one pool work on several steps at once)."""
    blob = _digests(keys_hashed, party)
    product = _Product(
        blob,
        secret.scalar,
        hashed=True,
        what=f"party {party}: own keys",
        executor=executor,
        chunk_size=chunk_size,
    )

    def finish() -> BlindedSet:
        blinded = product.result()
        n = len(blob) // POINT_BYTES
        logger.info("PSI: %s blinded its %d keys", party, n)
        return BlindedSet(party, to, "own", _shuffle(blinded, secret.permutation(n), POINT_BYTES))

    return finish


def blind_own(
    keys_hashed: pl.Series,
    secret: PartySecret,
    *,
    party: str,
    to: str,
    executor: Executor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> BlindedSet:
    """Step 1, every party: hash its keys onto the curve, blind them, shuffle.

    ``keys_hashed`` come from :func:`prepare_keys` (one per row, in row order). The label
    party sends the same set to every feature party (:meth:`BlindedSet.forward`).
    """
    return start_blind_own(
        keys_hashed, secret, party=party, to=to, executor=executor, chunk_size=chunk_size
    )()


def start_reblind(
    received: BlindedSet,
    secret: PartySecret,
    *,
    party: str,
    executor: Executor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Callable[[], BlindedSet]:
    """:func:`reblind` with its multiplications put in flight now (see
    :func:`start_blind_own`)."""
    _expect(received, party, "own")
    product = _Product(
        received.values,
        secret.scalar,
        hashed=False,
        what=f"set from {received.sender}",
        executor=executor,
        chunk_size=chunk_size,
    )

    def finish() -> BlindedSet:
        values = product.result()
        logger.info("PSI: %s re-blinded %d values from %s", party, len(received), received.sender)
        return BlindedSet(party, received.sender, "reblinded", values)

    return finish


def reblind(
    received: BlindedSet,
    secret: PartySecret,
    *,
    party: str,
    executor: Executor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> BlindedSet:
    """Step 2, feature party: blind the label party's set again, keeping its order."""
    return start_reblind(received, secret, party=party, executor=executor, chunk_size=chunk_size)()


def answer(
    keys_hashed: pl.Series,
    received: BlindedSet,
    secret: PartySecret,
    *,
    party: str,
    executor: Executor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[BlindedSet, BlindedSet]:
    """Steps 1 and 2 of a feature party together: its own set blinded and the label
    party's set re-blinded, both in flight on ``executor`` at once."""
    back = start_reblind(received, secret, party=party, executor=executor, chunk_size=chunk_size)
    own = start_blind_own(
        keys_hashed,
        secret,
        party=party,
        to=received.sender,
        executor=executor,
        chunk_size=chunk_size,
    )
    return own(), back()


def _expect(message: BlindedSet, party: str, role: Role) -> None:
    if message.recipient != party:
        raise PSIError(
            f"set from {message.sender} is addressed to {message.recipient}, not {party}"
        )
    if message.role != role:
        raise PSIError(f"set from {message.sender} to {party}: expected {role}, got {message.role}")


def _points_frame(values: bytes, index: str) -> pl.DataFrame:
    n = len(values) // POINT_BYTES
    column = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(POINT_BYTES), n, [None, pa.py_buffer(values)]
    )
    points = pl.Series(POINT, column.cast(pa.binary()))
    return pl.DataFrame({POINT: points, index: pl.int_range(n, dtype=pl.UInt32, eager=True)})


def intersect(
    own_count: int,
    secret: PartySecret,
    *,
    party: str,
    reblinded: Mapping[str, BlindedSet],
    blinded: Mapping[str, BlindedSet],
    min_overlap: int = 1,
    executor: Executor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Alignment, dict[str, AlignmentMessage]]:
    """Step 3, label party: the all-party overlap, its own alignment and one message per party.

    ``blinded[P]`` is P's own blinded set, ``reblinded[P]`` P's re-blinding of the label
    party's set (``own_count`` values in the label party's shuffled order).
    """
    others = sorted(blinded)
    if not others or sorted(reblinded) != others:
        raise PSIError(
            f"party {party}: need both sets from every other party; own sets from {others}, "
            f"re-blinded sets from {sorted(reblinded)}"
        )
    perm = secret.permutation(own_count)
    for other in others:
        back, theirs = reblinded[other], blinded[other]
        _expect(back, party, "reblinded")
        _expect(theirs, party, "own")
        if back.sender != other or theirs.sender != other:
            raise PSIError(f"party {party}: sets filed under {other} come from another sender")
        if len(back) != own_count:
            raise PSIError(
                f"party {party}: {other} returned {len(back)} re-blinded values for "
                f"{own_count} sent"
            )
    # every party's set goes to the pool at once; matching overlaps with the rest
    products = {
        other: _Product(
            blinded[other].values,
            secret.scalar,
            hashed=False,
            what=f"set from {other}",
            executor=executor,
            chunk_size=chunk_size,
        )
        for other in others
    }
    common: pl.DataFrame | None = None
    pairwise: dict[str, int] = {}
    for other in others:
        mine = products[other].result()
        try:
            matched = _points_frame(reblinded[other].values, "k").join(
                _points_frame(mine, other), on=POINT, how="inner", validate="1:1"
            )
        except pl.exceptions.ComputeError:
            raise PSIError(f"party {party}: a set from {other} repeats values") from None
        pairwise[other] = matched.height
        pairs = matched.drop(POINT)
        common = pairs if common is None else common.join(pairs, on="k", how="inner")
    assert common is not None
    sizes = {party: own_count} | {o: len(blinded[o]) for o in others}
    overlap = common.height
    logger.info("PSI: %s found %d entities common to %s", party, overlap, sorted(sizes))
    if overlap < min_overlap:
        names = ", ".join([party, *others])
        rows = ", ".join(f"{p} {n}" for p, n in sizes.items())
        shared = ", ".join(f"{o} {pairwise[o]}" for o in others)
        lead = "no entity is" if overlap == 0 else f"only {overlap} entities are"
        hint = (
            "; check that every party uses the same consortium secret and key normalisation"
            if overlap == 0
            else ""
        )
        raise PSIError(
            f"private set intersection: {lead} common to all parties {names} (rows: {rows}; "
            f"shared with {party}: {shared}), fewer than fusion.min_overlap = {min_overlap}"
            f"{hint}"
        )
    rows_own = perm[common["k"].to_numpy()]
    id_key = secret.id_key
    ids = [
        hmac.new(id_key, int(r).to_bytes(8, "little"), hashlib.sha256).digest()[:ID_BYTES]
        for r in rows_own
    ]
    ids_series = pl.Series(ALIGN_ID, ids, dtype=pl.Binary)
    table = (
        pl.DataFrame({ROW: pl.Series(ROW, rows_own, dtype=pl.UInt32), ALIGN_ID: ids_series})
        .with_columns(pl.col(ALIGN_ID).bin.encode("hex"))
        .sort(ROW)
    )
    messages: dict[str, AlignmentMessage] = {}
    for other in others:
        order = common.select(pl.col(other), ids_series).sort(other)
        positions = order[other].to_numpy().astype("<u4").tobytes()
        messages[other] = AlignmentMessage(
            party, other, positions, b"".join(order[ALIGN_ID].to_list())
        )
    return Alignment(party, table), messages


def receive_alignment(
    message: AlignmentMessage, secret: PartySecret, *, party: str, own_count: int
) -> Alignment:
    """Step 4, feature party: map positions in its shuffled set back to its own rows."""
    if message.recipient != party:
        raise PSIError(f"alignment from {message.sender} is addressed to {message.recipient}")
    positions = np.frombuffer(message.positions, dtype="<u4").astype(np.int64)
    if positions.size and (
        positions.max() >= own_count or np.unique(positions).size < positions.size
    ):
        raise PSIError(f"alignment from {message.sender}: positions out of range or repeated")
    rows = secret.permutation(own_count)[positions]
    ids = [message.ids[i : i + ID_BYTES] for i in range(0, len(message.ids), ID_BYTES)]
    table = (
        pl.DataFrame(
            {
                ROW: pl.Series(ROW, rows, dtype=pl.UInt32),
                ALIGN_ID: pl.Series(ALIGN_ID, ids, dtype=pl.Binary),
            }
        )
        .with_columns(pl.col(ALIGN_ID).bin.encode("hex"))
        .sort(ROW)
    )
    logger.info("PSI: %s aligned %d rows", party, table.height)
    return Alignment(party, table)


# -- the whole star in memory -------------------------------------------------------------------
@dataclass(frozen=True)
class PSIRun:
    """Result of :func:`run_psi`: per-party alignments, every message in the order sent, and
    the X25519 operations each party performed."""

    alignments: dict[str, Alignment]
    transcript: list[Message]
    scalar_mults: dict[str, int]


def pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A process pool for the scalar multiplications (``spawn``: no forked threads)."""
    return ProcessPoolExecutor(
        max_workers=workers or os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")
    )


def run_psi(
    parties: Mapping[str, pl.Series],
    *,
    label_party: str,
    secret: bytes,
    normalisation: KeyNormalisation = "strip_lower",
    min_overlap: int = 1,
    secrets: Mapping[str, PartySecret] | None = None,
    workers: int | None = 1,
    chunk_size: int = DEFAULT_CHUNK,
    on_message: Callable[[Message], None] | None = None,
) -> PSIRun:
    """Run the star protocol for all parties in this process (tests, benchmarks, demos).

    ``parties`` maps party id to its normalised entity keys (row order); ``secret`` is the
    consortium hashing secret. ``secrets`` fixes each party's secret (deterministic runs),
    otherwise fresh ones are drawn. ``workers`` > 1 spreads X25519 over a process pool.
    ``on_message`` sees every message as it is sent (e.g. to write it to a store).
    A party's keys are checked and hashed just before its first step, while the pool
    already works on the parties before it.
    """

    def keys(party: str) -> pl.Series:
        return prepare_keys(parties[party], party=party, normalisation=normalisation, secret=secret)

    return _run_star(
        list(parties),
        keys,
        label_party=label_party,
        min_overlap=min_overlap,
        secrets=secrets,
        workers=workers,
        chunk_size=chunk_size,
        on_message=on_message,
    )


def run_psi_hashed(
    keys: Mapping[str, pl.Series],
    *,
    label_party: str,
    min_overlap: int = 1,
    secrets: Mapping[str, PartySecret] | None = None,
    workers: int | None = 1,
    chunk_size: int = DEFAULT_CHUNK,
    on_message: Callable[[Message], None] | None = None,
) -> PSIRun:
    """:func:`run_psi` on keys already HMAC-hashed with the consortium secret (the
    ``entity_hash`` column of the parties' fused tables)."""
    return _run_star(
        list(keys),
        keys.__getitem__,
        label_party=label_party,
        min_overlap=min_overlap,
        secrets=secrets,
        workers=workers,
        chunk_size=chunk_size,
        on_message=on_message,
    )


def _run_star(
    parties: Sequence[str],
    keys_of: Callable[[str], pl.Series],
    *,
    label_party: str,
    min_overlap: int,
    secrets: Mapping[str, PartySecret] | None,
    workers: int | None,
    chunk_size: int,
    on_message: Callable[[Message], None] | None,
) -> PSIRun:
    """The star with every step's multiplications in flight as soon as its input exists:
    all own sets at once, each re-blinding as soon as the label party's set is ready, and
    the label party's re-blinding of all sets at once. Messages are sent in protocol order.
    """
    if label_party not in parties:
        raise PSIError(f"label party {label_party!r} is not among the parties {sorted(parties)}")
    a = label_party
    others = [p for p in parties if p != a]
    if not others:
        raise PSIError("private set intersection needs at least two parties")
    party_secrets = {p: (secrets or {}).get(p) or new_secret() for p in parties}
    transcript: list[Message] = []

    def send(message: Message) -> None:
        transcript.append(message)
        if on_message is not None:
            on_message(message)

    executor = pool(workers) if workers is not None and workers > 1 else None
    try:
        ex, cs = executor, chunk_size
        n: dict[str, int] = {}
        own_started: dict[str, Callable[[], BlindedSet]] = {}
        for party in [a, *others]:
            keys = keys_of(party)
            n[party] = keys.len()
            to = others[0] if party == a else a
            own_started[party] = start_blind_own(
                keys, party_secrets[party], party=party, to=to, executor=ex, chunk_size=cs
            )
        sent = own_started[a]()
        for other in others:
            send(sent.forward(other))
        back_started = {
            other: start_reblind(
                sent.forward(other), party_secrets[other], party=other, executor=ex, chunk_size=cs
            )
            for other in others
        }
        own: dict[str, BlindedSet] = {}
        back: dict[str, BlindedSet] = {}
        for other in others:
            own[other] = own_started[other]()
            send(own[other])
            back[other] = back_started[other]()
            send(back[other])
        alignment, messages = intersect(
            n[a],
            party_secrets[a],
            party=a,
            reblinded=back,
            blinded=own,
            min_overlap=min_overlap,
            executor=ex,
            chunk_size=cs,
        )
        alignments = {a: alignment}
        for other in others:
            send(messages[other])
            alignments[other] = receive_alignment(
                messages[other], party_secrets[other], party=other, own_count=n[other]
            )
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    mults = {a: n[a] + sum(n[o] for o in others)} | {o: n[o] + n[a] for o in others}
    return PSIRun(alignments, transcript, mults)
