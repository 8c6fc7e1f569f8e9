"""Names and tags of the runs a person reads in the Prefect UI and in ``fedfuse status``.

Flow runs read ``<consortium>: train``, subflow runs ``round 3`` or ``party-pipeline site-b``,
task runs ``site-b / transactions: preprocess``, ``site-b: train round 3`` or ``aggregate round
3``. Runs of a party or a round also carry the tags ``party:<id>`` and ``round:<n>`` (the UI
filters on them; ``fedfuse status`` shows them as columns).

Names and tags are made of the spec's consortium, party and source ids and of round numbers
only, never of data: no entity id, raw or hashed, is ever part of one. They are labels: cache
keys and the identity a retried run matches its finished children by do not depend on them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prefect import tags

from flows.common import run_name

PARTY_TAG = "party:"
ROUND_TAG = "round:"


def party_tag(party: str) -> str:
    return f"{PARTY_TAG}{party}"


def round_tag(round_: int) -> str:
    return f"{ROUND_TAG}{round_}"


@contextmanager
def tagged(*, party: str | None = None, round_: int | None = None) -> Iterator[None]:
    """Tag every run created inside (task runs, subflow runs, dispatched party runs) with its
    party and round."""
    labels = [party_tag(party)] if party else []
    labels += [round_tag(round_)] if round_ else []
    with tags(*labels):
        yield


def tag_value(run_tags: Iterable[str], prefix: str) -> str | None:
    """The value of the last ``prefix`` tag (``party:site-b`` -> ``site-b``), if any."""
    found = [t[len(prefix) :] for t in run_tags if t.startswith(prefix)]
    return found[-1] if found else None


def consortium_of(spec_path: object) -> str:
    """The consortium's name for a run name; the spec file's stem when the spec cannot be
    read (the flow itself then fails with the spec's own error)."""
    from tasks.spec.load import load_spec

    path = str(spec_path)
    try:
        return load_spec(path).consortium.name
    except Exception:
        stem = posixpath.basename(path.replace("\\", "/")).rsplit(".", 1)[0]
        return stem or "fedfuse"


class RunName:
    """A ``flow_run_name`` callable whose text is a function of the run's parameters: Prefect
    calls it inside the run; :meth:`of` gives the same text before the run exists, so a run
    created for a deployment (``fedfuse run``, a party's step) carries its name from the start,
    not a random one until a worker starts it (or forever, if its process dies first)."""

    def __init__(self, text: Callable[[Mapping[str, Any]], str], name: str) -> None:
        self._text = text
        self.__name__ = name

    def of(self, parameters: Mapping[str, Any]) -> str:
        return self._text(parameters)

    def __call__(self) -> str:
        from prefect.runtime import flow_run

        return self._text(flow_run.parameters or {})


def planned_run_name(flow_run_name: object, parameters: Mapping[str, Any]) -> str | None:
    """The name a flow gives its run with these parameters (its ``flow_run_name``), or
    ``None`` when that cannot be told before the run (Prefect then picks one)."""
    if isinstance(flow_run_name, RunName):
        return flow_run_name.of(parameters)
    if isinstance(flow_run_name, str):
        try:
            return flow_run_name.format(**parameters)
        except (KeyError, IndexError, AttributeError, ValueError):
            return None
    return None


def spec_run_name(verb: str, *, party: bool = False) -> RunName:
    """A ``flow_run_name``: ``<consortium>: <verb>`` (with ``party``: ``<consortium>: <verb>
    <party>`` when the run has a party parameter), read from the run's parameters."""

    def text(params: Mapping[str, Any]) -> str:
        out = f"{consortium_of(params.get('spec_path', ''))}: {verb}"
        if party and isinstance(params.get("party"), str):
            out = f"{out} {params['party']}"
        return out

    return RunName(text, f"{verb.replace(' ', '_')}_run_name")


#: The run names of the coordinator's deployable flows, by flow name: each flow's
#: ``flow_run_name``, and the name ``fedfuse run`` gives a run it creates (without importing
#: the flow's module and its dependencies).
FLOW_RUN_NAMES: dict[str, RunName] = {
    "prepare": spec_run_name("prepare"),
    "federated-training": spec_run_name("train"),
    "score": spec_run_name("score", party=True),
    "vertical-training": spec_run_name("vertical train"),
    "vertical-score": spec_run_name("vertical score", party=True),
}


def source_step_name(party: str, source: str, step: str) -> str:
    """``site-b / transactions: preprocess`` (a fixed task run name)."""
    return run_name(f"{party} / {source}: {step}")


def party_step_name(party: str, step: str) -> str:
    """``site-b: fuse`` (a fixed task run name)."""
    return run_name(f"{party}: {step}")


def party_and_round(
    run_tags: Iterable[str], parameters: Mapping[str, Any] | None
) -> tuple[str | None, int | None]:
    """A run's party and round: from its ``party:``/``round:`` tags, else from its parameters
    (a party pipeline's ``party``, a party step's job, a round's state)."""
    party = tag_value(run_tags, PARTY_TAG)
    round_text = tag_value(run_tags, ROUND_TAG)
    round_ = int(round_text) if round_text and round_text.isdigit() else None
    params = parameters or {}
    job = params.get("job")
    if party is None:
        if isinstance(params.get("party"), str):
            party = params["party"]
        elif isinstance(job, dict) and isinstance(job.get("setup"), dict):
            found = job["setup"].get("party")
            party = found if isinstance(found, str) else None
    if round_ is None:
        state = params.get("state")
        for holder in (state, job):
            value = holder.get("round") if isinstance(holder, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                round_ = value
                break
    return party, round_
