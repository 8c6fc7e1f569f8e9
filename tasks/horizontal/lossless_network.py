"""Process and network setup of lossless mode: one OS process per party, messages over
pipes, listen ports and LightGBM's network settings.

LightGBM's network is global to a process, so every party of a data-parallel fit runs in
its own OS process (``spawn`` context: no parent state is inherited). :class:`PartyProcesses`
starts them, sends them messages, gathers one message of an expected type from each with a
deadline (a :class:`Failure` a party reports is raised as :class:`LosslessError`, or as
:class:`PortInUse` when LightGBM could not bind its port) and ends them.
:func:`network_params` gives one party its LightGBM network settings,
:func:`without_network_params` removes them from a trained model text, :func:`free_ports`
finds listen ports and :class:`LightGBMLog` quiets LightGBM's network chatter. What the
parties compute and what the coordinator decides each round is :mod:`tasks.horizontal.lossless`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Generic, Protocol, TypeVar

from tasks.horizontal.model_text import without_params
from tasks.horizontal.training import LgbParams

logger = logging.getLogger(__name__)

#: Host the party processes listen on (they all run on this machine).
LOCALHOST = "127.0.0.1"
#: Parameters-section keys that differ per party or only describe the network.
NETWORK_PARAMS = frozenset(
    {"machines", "local_listen_port", "num_machines", "time_out", "machine_list_filename"}
)
#: Attempts with fresh ports when a port found free was taken before LightGBM bound it.
PORT_ATTEMPTS = 3


class LosslessError(RuntimeError):
    """A party process failed, or the parties disagree on the trained model."""


class PortInUse(LosslessError):
    """LightGBM could not bind a listen port (taken between probing and binding)."""


@dataclass(frozen=True)
class Failure:
    """What a party process sends instead of its next message when it fails."""

    text: str


def network_params(
    params: LgbParams, machines: Sequence[str], rank: int, *, timeout_minutes: int
) -> LgbParams:
    """``params`` plus the data-parallel network settings of the party at ``rank`` of
    ``machines`` (every party's ``host:port``, in rank order)."""
    out = dict(params)
    out.update(
        {
            "tree_learner": "data",
            "num_machines": len(machines),
            "machines": ",".join(machines),
            "local_listen_port": port_of(machines[rank]),
            "pre_partition": True,
            "num_threads": 1,
            "time_out": timeout_minutes,
        }
    )
    return out


def local_machines(ports: Sequence[int]) -> list[str]:
    """``127.0.0.1:<port>`` for each port: parties that all run on this machine."""
    return [f"{LOCALHOST}:{p}" for p in ports]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port (port 0..65535)")
    return host, int(port)


def port_of(address: str) -> int:
    return split_address(address)[1]


def without_network_params(model_text: str) -> str:
    """The model text without the per-party network lines of its parameters section."""
    return without_params(model_text, NETWORK_PARAMS)


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports the OS reports free (bound to port 0, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LightGBMLog:
    """LightGBM's C++ log in a party process: network chatter (binding, connecting, the
    retries while the other parties start) is debug output; other warnings stay warnings."""

    def info(self, message: str) -> None:
        if message.strip():
            logger.debug("LightGBM: %s", message.strip())

    def warning(self, message: str) -> None:
        text = message.strip()
        if "waiting for" in text or "TCP_NODELAY" in text:
            logger.debug("LightGBM: %s", text)
        elif text:
            logger.warning("LightGBM: %s", text)


J = TypeVar("J")
M = TypeVar("M")


class Parties(Protocol):
    """The coordinator's side of the parties of one lossless run: processes beside it
    (:class:`PartyProcesses`) or steps on the parties' own pools
    (:class:`tasks.horizontal.lossless_remote.RemoteParties`)."""

    def gather(self, kind: str, timeout: float, expect: type[M]) -> list[M]: ...

    def send(self, messages: Sequence[object]) -> None: ...

    def close(self, *, failed: bool) -> None: ...


def failure_error(text: str) -> LosslessError:
    """The error a party's :class:`Failure` raises (:class:`PortInUse` for a port LightGBM
    could not bind)."""
    return PortInUse(text) if "binding port" in text.lower() else LosslessError(text)


class PartyProcesses(Generic[J]):
    """The running party processes (one per job, ``target(job, pipe)`` in each) and their
    pipes; ``names`` name them in errors (default: ``party process <i>``)."""

    def __init__(
        self,
        target: Callable[[J, Connection], None],
        jobs: Sequence[J],
        names: Sequence[str] | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.names = (
            list(names) if names is not None else [f"party process {i}" for i in range(len(jobs))]
        )
        self.conns: list[Connection] = []
        self.procs: list[mp.process.BaseProcess] = []
        for i, job in enumerate(jobs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=target, args=(job, child), name=f"lossless-party-{i}", daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def gather(self, kind: str, timeout: float, expect: type[M]) -> list[M]:
        """One ``kind`` message (an ``expect``) from every party, in rank order; raises on
        any failure."""
        out: dict[int, M] = {}
        deadline = time.monotonic() + timeout
        while len(out) < len(self.conns):
            pending = [i for i in range(len(self.conns)) if i not in out]
            left = deadline - time.monotonic()
            if left <= 0:
                missing = ", ".join(self.names[i] for i in pending)
                raise LosslessError(f"no {kind} from {missing} within {timeout:.0f} s")
            # a process that dies before taking its pipe end never closes it: watch both
            ready = wait(
                [self.conns[i] for i in pending] + [self.procs[i].sentinel for i in pending],
                timeout=left,
            )
            for i in pending:
                conn = self.conns[i]
                if conn not in ready and self.procs[i].sentinel not in ready:
                    continue
                try:
                    if not conn.poll():
                        raise EOFError
                    message = conn.recv()
                except EOFError:
                    code = self.procs[i].exitcode
                    raise LosslessError(
                        f"{self.names[i]} exited (code {code}) without its {kind}"
                    ) from None
                if isinstance(message, Failure):
                    raise failure_error(f"{self.names[i]}: {message.text}")
                if not isinstance(message, expect):
                    raise LosslessError(
                        f"{self.names[i]} sent a {type(message).__name__} instead of its {kind}"
                    )
                out[i] = message
        return [out[i] for i in range(len(self.conns))]

    def send(self, messages: Sequence[object]) -> None:
        """One message to every party, in rank order."""
        for conn, message in zip(self.conns, messages, strict=True):
            conn.send(message)

    def close(self, *, failed: bool) -> None:
        """Wait for the processes to exit (end them at once after a failure)."""
        for proc in self.procs:
            if failed and proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
