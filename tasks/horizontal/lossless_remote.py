"""Lossless mode across machines: every party's LightGBM process on that party's own worker.

The protocol is :mod:`tasks.horizontal.lossless`'s, unchanged; only the carrier of its
messages differs. Beside the coordinator, a party process talks to it over a pipe. On its
own pool, a party runs the ``lossless`` step (:func:`serve_party`, dispatched like every
other step, :mod:`flows.transport`): it starts its LightGBM process beside itself and relays
that process's messages to and from a session's *mailbox* in the coordinator store
(``exchange/lossless-<session>-<party>-{to,from}-<seq>.json``, JSON, never pickles; the
same store dispatched steps already hand their results back through). The coordinator
reaches the parties through :class:`RemoteParties`, which reads and writes that mailbox.

Rendezvous: a party binds its LightGBM listen address ``host:port`` from the spec (port 0:
a free port of its machine, picked at start) and reports it with its label statistics, its
*join*. The coordinator waits ``join_timeout`` seconds for every party to join (a party
that does not fails the run with its name), then hands each party the machine list: the
other parties' addresses and its own, nothing else of them. A party that fails, or a
coordinator that stops the run, ends every LightGBM process: the others get a stop message
(or LightGBM's socket time-out) and their steps end their processes before failing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import JsonValue, TypeAdapter

from storage.runs import (
    LosslessDirection,
    read_bins,
    read_lossless_message,
    write_lossless_message,
)
from storage.store import IntegrityError, Store, UnverifiedError
from tasks.horizontal.bins import ConsortiumBins
from tasks.horizontal.lossless import (
    SOCKET_TIMEOUT_MINUTES,
    FusedSource,
    PartyJob,
    PartyResult,
    _party_process,
    _RoundReport,
    _Stats,
    _Train,
    party_job,
)
from tasks.horizontal.lossless_network import (
    Failure,
    LosslessError,
    PartyProcesses,
    failure_error,
    free_ports,
    split_address,
)
from tasks.horizontal.steps import TrainSetup

logger = logging.getLogger(__name__)
M = TypeVar("M")

#: Seconds between two looks at the mailbox.
POLL_SECONDS = 0.1
#: What a party's step is told when the coordinator ends the run before it finished.
STOPPED = "the coordinator stopped the run"


def _message_types() -> dict[str, Any]:
    return {
        "stats": _Stats,
        "train": _Train,
        "round": _RoundReport,
        "result": PartyResult,
        "failure": Failure,
        "decision": str,
    }


def encode(message: object) -> JsonValue:
    """A protocol message as JSON: ``{"kind": ..., "body": ...}``."""
    for kind, type_ in _message_types().items():
        if type(message) is type_:
            body: JsonValue = TypeAdapter(type_).dump_python(message, mode="json")
            return {"kind": kind, "body": body}
    raise TypeError(f"not a lossless message: {type(message).__name__}")


def decode(body: JsonValue) -> object:
    """The message a JSON body holds; a clear error for anything else."""
    types = _message_types()
    if not isinstance(body, dict) or body.get("kind") not in types:
        raise LosslessError("a lossless message of no known kind")
    message: object = TypeAdapter(types[str(body["kind"])]).validate_python(body.get("body"))
    if body["kind"] == "decision" and message not in ("go", "stop"):
        raise LosslessError("a lossless decision other than go or stop")
    return message


@dataclass
class Mailbox:
    """One party's messages of one session in the coordinator store."""

    coordinator: str
    session: str
    party: str

    def post(self, direction: LosslessDirection, seq: int, message: object) -> None:
        store = Store(self.coordinator)
        write_lossless_message(store, self.session, self.party, direction, seq, encode(message))

    def peek(self, direction: LosslessDirection, seq: int) -> object | None:
        """Message ``seq`` if it has been posted."""
        store = Store(self.coordinator)
        body = read_lossless_message(store, self.session, self.party, direction, seq)
        return None if body is None else decode(body)

    def wait(self, direction: LosslessDirection, seq: int, timeout: float) -> object:
        deadline = time.monotonic() + timeout
        while (message := self.peek(direction, seq)) is None:
            if time.monotonic() > deadline:
                raise LosslessError(
                    f"party {self.party}: no message from the coordinator within {timeout:.0f} s"
                )
            time.sleep(POLL_SECONDS)
        return message


class RemoteParties:
    """The coordinator's side of parties that each run on their own pool, through their
    mailboxes. ``ended(party)`` says why a party's step ended (``None`` while it runs), so a
    party whose step failed before it joined fails the run at once."""

    def __init__(
        self,
        coordinator: str,
        session: str,
        parties: Sequence[str],
        ended: Callable[[str], str | None] = lambda _: None,
    ) -> None:
        self.boxes = [Mailbox(coordinator, session, p) for p in parties]
        self.ended = ended
        self.sent = [0] * len(parties)
        self.received = [0] * len(parties)

    def gather(self, kind: str, timeout: float, expect: type[M]) -> list[M]:
        """One ``kind`` message (an ``expect``) from every party, in rank order."""
        out: dict[int, M] = {}
        deadline = time.monotonic() + timeout
        while len(out) < len(self.boxes):
            for i, box in enumerate(self.boxes):
                if i in out:
                    continue
                message = box.peek("from", self.received[i])
                if message is None:
                    why = self.ended(box.party)
                    if why is not None:
                        raise LosslessError(
                            f"party {box.party}: its step ended ({why}) before its {kind}"
                        )
                    continue
                self.received[i] += 1
                if isinstance(message, Failure):
                    raise failure_error(f"party {box.party}: {message.text}")
                if not isinstance(message, expect):
                    raise LosslessError(
                        f"party {box.party} sent a {type(message).__name__} instead of its {kind}"
                    )
                out[i] = message
            if len(out) < len(self.boxes):
                if time.monotonic() > deadline:
                    missing = [b.party for i, b in enumerate(self.boxes) if i not in out]
                    who = f"part{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)}"
                    what = "did not join" if kind == "label stats" else f"sent no {kind}"
                    raise LosslessError(f"{who} {what} within {timeout:.0f} s")
                time.sleep(POLL_SECONDS)
        return [out[i] for i in range(len(self.boxes))]

    def send(self, messages: Sequence[object]) -> None:
        """One message to every party, in rank order."""
        for i, (box, message) in enumerate(zip(self.boxes, messages, strict=True)):
            box.post("to", self.sent[i], message)
            self.sent[i] += 1

    def close(self, *, failed: bool) -> None:
        """After a failure, tell every party to stop (each ends its LightGBM process)."""
        if not failed:
            return
        for i, box in enumerate(self.boxes):
            try:
                box.post("to", self.sent[i], Failure(STOPPED))
            except OSError as exc:  # the run fails anyway, with the first error
                logger.warning("party %s: the stop message was not posted: %s", box.party, exc)


def listen_address(address: str) -> str:
    """The ``host:port`` a party's LightGBM listens on: ``address`` from the spec, port 0
    replaced by a free port of this machine."""
    host, port = split_address(address)
    return f"{host}:{port or free_ports(1)[0]}"


def serve_party(job: PartyJob, box: Mailbox, *, address: str, timeout: float) -> PartyResult:
    """A party's side on its own worker: run its LightGBM process beside this one and relay
    its messages to and from the coordinator through ``box``, the join carrying ``address``.
    Returns the party's :class:`tasks.horizontal.lossless.PartyResult`; raises (after ending
    the process) when the process fails, the coordinator stops the run or goes silent for
    ``timeout`` seconds."""
    procs = PartyProcesses(_party_process, [job], ["its LightGBM process"])
    failed = True
    sent = received = 0
    try:
        while True:
            try:
                [message] = procs.gather("next message", timeout, object)
            except LosslessError as exc:
                box.post("from", sent, Failure(str(exc)))
                raise
            if isinstance(message, _Stats):
                message = replace(message, address=address)
            box.post("from", sent, message)
            sent += 1
            if isinstance(message, PartyResult):
                failed = False
                return message
            reply = box.wait("to", received, timeout)
            received += 1
            if isinstance(reply, Failure):
                raise LosslessError(f"party {box.party}: {reply.text}")
            procs.send([reply])
    finally:
        procs.close(failed=failed)


def train_lossless_party(
    setup: TrainSetup, session: str, address: str, join_timeout: float
) -> PartyResult:
    """The ``lossless`` step of a party: its LightGBM machine of the session, on its rows
    (read in its process), with the consortium's bins when the run has them."""
    bins = None
    if setup.bins is not None:
        try:
            bins = read_bins(setup.bins, ConsortiumBins)
        except UnverifiedError as exc:
            raise IntegrityError(f"party {setup.party}: consortium bins: {exc}") from None
    training = setup.training
    source = FusedSource(
        party=setup.party,
        fused=setup.fused,
        schema=setup.schema_,
        validation_fraction=training.validation_fraction,
        test_fraction=training.test_fraction,
        store=setup.store,
    )
    job = party_job(
        source,
        spec=training,
        objective=setup.objective,
        num_class=setup.num_class,
        categorical=setup.schema_.categorical,
        feature_names=setup.schema_.names,
        bins=bins,
        run_key=setup.run_key,
    )
    box = Mailbox(setup.coordinator, session, setup.party)
    mine = listen_address(address)
    logger.info("party %s: lossless session %s, LightGBM listens on %s", setup.party, session, mine)
    timeout = 60.0 * SOCKET_TIMEOUT_MINUTES + join_timeout
    return serve_party(job, box, address=mine, timeout=timeout)


lossless_party = task(name="train-lossless-party", cache_policy=NO_CACHE)(train_lossless_party)
