"""The whole private set intersection star in one process (tests, benchmarks, demos).

:func:`run_psi` plays every party: it makes one process pool for the whole run and keeps
it busy across steps (every party's own set at once, each re-blinding as soon as the label
party's set is ready, the label party's re-blinding of all sets at once). On this kind of
machine the run is then bound by X25519 itself: about 31k operations per core-second, 2.33
operations per key for three parties, plus a fifth of an operation per key for hashing onto
the curve.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from tasks.types import KeyNormalisation
from tasks.vertical.psi_curve import DEFAULT_CHUNK, PSIError, pool, prepare_keys
from tasks.vertical.psi_protocol import (
    Alignment,
    BlindedSet,
    Message,
    PartySecret,
    intersect,
    new_secret,
    receive_alignment,
    start_blind_own,
    start_reblind,
)


@dataclass(frozen=True)
class PSIRun:
    """Result of :func:`run_psi`: per-party alignments, every message in the order sent, and
    the X25519 operations each party performed."""

    alignments: dict[str, Alignment]
    transcript: list[Message]
    scalar_mults: dict[str, int]


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
