"""The private set intersection protocol (ECDH over X25519): party secrets, the messages
parties exchange, and the four protocol steps.

The label party ``A`` and the feature parties ``B``, ``C``, ... learn which of their rows
describe the same customers, and nothing about customers outside the all-party intersection.

Protocol (a star around the label party; each party ``X`` has a secret scalar ``x``)::

    every party    H(k) for its keys k        hash onto Curve25519 (tasks.vertical.psi_curve)
    A -> P         shuffle(a·H(A))            blind_own, one message per feature party P
    P -> A         shuffle(p·H(P))            blind_own
    P -> A         p·(a·H(A)), order kept     reblind
    A              a·(p·H(P)), match          intersect: rows of A present at every P
    A -> P         (position in P's shuffled set, alignment id) for the all-party overlap
    P              position -> own row        receive_alignment

Blinding commutes (see :mod:`tasks.vertical.psi_curve`), so every key is multiplied by
exactly the scalars needed to compare it with the other side: with ``n`` parties of ``N``
keys each the protocol costs ``N`` (A blinds its own set once for all) ``+ 2N`` per feature
party (blind own, re-blind A's), i.e. ``7N`` X25519 operations for 3 parties.

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

Concurrency. Every step takes an optional ``executor`` (:func:`tasks.vertical.psi_curve.pool`)
to spread its multiplications over cores; ``start_*`` put a step's multiplications in
flight and return a function that waits for them, so one pool can work on several steps at
once; a feature party's two steps run together in :func:`answer`, and the label party's
re-blinding of every set in :func:`intersect` is submitted at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from tasks.vertical.psi_curve import (
    DEFAULT_CHUNK,
    POINT_BYTES,
    PSIError,
    ScalarProduct,
    key_digests,
    shuffle_packed,
)

logger = logging.getLogger(__name__)

#: Bytes of one alignment id.
ID_BYTES = 16
#: Columns of an :class:`Alignment` table.
ROW = "row"
ALIGN_ID = "align_id"
#: Column of a blinded set as an Arrow table.
POINT = "point"
POSITION = "position"

Role = Literal["own", "reblinded"]


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
    blob = key_digests(keys_hashed, party)
    product = ScalarProduct(
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
        return BlindedSet(
            party, to, "own", shuffle_packed(blinded, secret.permutation(n), POINT_BYTES)
        )

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

    ``keys_hashed`` come from :func:`tasks.vertical.psi_curve.prepare_keys` (one per row, in
    row order). The label party sends the same set to every feature party
    (:meth:`BlindedSet.forward`).
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
    product = ScalarProduct(
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
        other: ScalarProduct(
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
