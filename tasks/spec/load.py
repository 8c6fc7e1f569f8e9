"""Reading a consortium spec: parse and check a TOML document, resolve its paths, register
the storage options its stores reference, and summarise it in a few lines."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from storage.files import (
    StorageOptionsError,
    is_uri,
    read_text,
    register_options,
    resolve_location,
    resolve_storage_options,
)
from storage.results import DEFAULT_RESULTS
from tasks.prepare.modalities import modality_of
from tasks.spec.checks import confinement_problems, semantic_problems
from tasks.spec.defaults import defaulted_keys, merge_relocated, placeholder_problems, relocate
from tasks.spec.models import (
    OTHER,
    DefaultsSpec,
    FedSpec,
    SecretRef,
    SourceSpec,
    SpecError,
    SpecProblem,
    VocabularySpec,
    label_source,
)

logger = logging.getLogger(__name__)


def format_loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _resolve_paths(spec: FedSpec, base: str) -> FedSpec:
    """Return the spec with every relative path resolved against ``base``."""

    def source(s: SourceSpec) -> SourceSpec:
        emap = s.entity_map
        if emap is not None:
            emap = emap.model_copy(update={"path": resolve_location(emap.path, base)})
        test = resolve_location(s.test_path, base) if s.test_path is not None else None
        return s.model_copy(
            update={"path": resolve_location(s.path, base), "entity_map": emap, "test_path": test}
        )

    parties = [
        p.model_copy(
            update={
                "store": resolve_location(p.store, base),
                "imports": [resolve_location(folder, base) for folder in p.imports],
                "sources": [source(s) for s in p.sources],
            }
        )
        for p in spec.parties
    ]
    coordinator = spec.coordinator.model_copy(
        update={"store": resolve_location(spec.coordinator.store, base)}
    )
    run = spec.run.model_copy(
        update={"results": resolve_location(spec.run.results or DEFAULT_RESULTS, base)}
    )
    return spec.model_copy(update={"parties": parties, "coordinator": coordinator, "run": run})


def _unknown_default(err: ErrorDetails) -> str:
    """The message of a pydantic error, plainer for a key ``[defaults]`` does not take."""
    loc = err["loc"]
    if err["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "defaults":
        return f"not a key [defaults] takes; it takes {', '.join(DefaultsSpec.model_fields)}"
    return err["msg"]


def _located(
    problems: Iterable[tuple[str, str]], data: dict[str, Any], *, first: Iterable[tuple[str, str]]
) -> list[SpecProblem]:
    """``first`` then ``problems``, those in a key a party took from ``[defaults]`` moved to
    that key (:func:`tasks.spec.defaults.relocate`), as are the keys their messages name;
    repeats joined; a problem at a key
    ``first`` already names (for any party) is left out."""
    taken = defaulted_keys(data, DefaultsSpec.model_fields)
    first = list(first)
    named = {path for path, _ in first}
    keys = re.compile(r"parties\[\d+\]\.[A-Za-z_]+")

    def key(match: re.Match[str]) -> str:  # a key the message names, e.g. as a remedy
        return relocate(match[0], taken).split(" (for ")[0]

    moved = [(relocate(path, taken), keys.sub(key, message)) for path, message in problems]
    kept = [(path, message) for path, message in moved if path.split(" (for ")[0] not in named]
    return [SpecProblem(path=p, message=m) for p, m in merge_relocated([*first, *kept])]


def parse_spec(data: dict[str, Any], *, source: str, base: str) -> FedSpec:
    """Validate a parsed TOML document; raise :class:`SpecError` listing every problem.

    Parties take the ``[defaults]`` keys they leave out (:mod:`tasks.spec.defaults`); a
    problem in such a key is reported at the ``[defaults]`` key with the party it is for,
    e.g. ``defaults.sources[0].columns.x (for parties[2])``."""
    placeholders = placeholder_problems(data)
    try:
        spec = FedSpec.model_validate(data)
    except ValidationError as exc:
        errors = [(format_loc(err["loc"]), _unknown_default(err)) for err in exc.errors()]
        raise SpecError(source, _located(errors, data, first=placeholders)) from None
    if placeholders:
        raise SpecError(source, _located([], data, first=placeholders))
    found = semantic_problems(spec) + confinement_problems(spec, base)
    if found:
        raise SpecError(source, _located([(p.path, p.message) for p in found], data, first=[]))
    return _resolve_paths(spec, base)


def load_spec(path: str) -> FedSpec:
    """Read and validate a spec file; relative paths resolve against its folder."""
    import tomllib

    text = read_text(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, [SpecProblem(path="", message=f"not valid TOML: {exc}")]) from None
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    if not is_uri(base):
        from pathlib import Path

        base = str(Path(base).resolve())
    spec = parse_spec(data, source=path, base=base)
    register_storage_options(spec, source=path)
    return spec


def register_storage_options(spec: FedSpec, *, source: str = "spec") -> None:
    """Resolve the storage options each store of ``spec`` references and register them for
    its root (:func:`storage.files.register_options`, this process's memory only); the
    results location gets ``run.storage_options`` or else the coordinator's. A reference
    whose environment variable is not set here is skipped (that party's credentials live on
    its own machine); malformed options raise :class:`SpecError` naming the key."""
    roots: list[tuple[str, str, SecretRef | None]] = [
        ("coordinator.storage_options", spec.coordinator.store, spec.coordinator.storage_options)
    ]
    roots += [
        (f"parties[{i}].storage_options", p.store, p.storage_options)
        for i, p in enumerate(spec.parties)
    ]
    results = spec.run.results or DEFAULT_RESULTS
    if is_uri(results):
        roots.append(
            (
                "run.storage_options",
                results,
                spec.run.storage_options or spec.coordinator.storage_options,
            )
        )
    problems: list[SpecProblem] = []
    for key, root, ref in roots:
        if ref is None:
            continue
        try:
            options = resolve_storage_options(env=ref.env, block=ref.block)
        except StorageOptionsError as exc:
            problems.append(SpecProblem(path=key, message=str(exc)))
            continue
        if options:
            register_options(root, options)
        else:
            logger.info("%s: %s is not set here; %s uses default credentials", key, ref.env, root)
    if problems:
        raise SpecError(source, problems)


def summary(spec: FedSpec) -> str:
    c = spec.consortium
    lines = [
        f"consortium {c.name!r}: {c.layout} layout, {c.task} task, label '{c.label.column}', "
        f"entity '{c.entity}', as_of {c.as_of.isoformat()}",
    ]
    if spec.defaults is not None:
        given = [k for k in DefaultsSpec.model_fields if getattr(spec.defaults, k) is not None]
        lines.append(
            f"  [defaults]: {', '.join(given) or 'nothing'} (for every party that omits them; "
            "parties below as expanded)"
        )
    for party in spec.parties:
        kinds = ", ".join(
            f"{s.id} ({modality_of(s).describe(s)}, "
            f"{'folder' if modality_of(s).reads_folders else s.file_format})"
            for s in party.sources
        )
        pool = f", work pool {party.work_pool}" if party.work_pool else ""
        lines.append(
            f"  party {party.id}: {len(party.sources)} source(s): {kinds}{pool}, "
            f"store {party.store}"
        )
    if spec.vocabularies:
        lines.append(
            "  vocabularies: " + ", ".join(_vocabulary(n, v) for n, v in spec.vocabularies.items())
        )
    t = spec.training
    lines.append(
        f"  training: {t.rounds} rounds x {t.trees_per_round} trees, aggregation {t.aggregation}"
    )
    lines.append(f"  splits: {split_summary(spec)}")
    return "\n".join(lines)


def _vocabulary(name: str, vocabulary: VocabularySpec) -> str:
    """``category (5 values, other)``, ``merchant (learned: k=10, at most 64, other)``."""
    if vocabulary.values is not None:
        listed = len([v for v in vocabulary.values if v != OTHER])
        what = [f"{listed} values"]
    else:
        what = [f"learned: k={vocabulary.min_entities}"]
        if vocabulary.max_size is not None:
            what.append(f"at most {vocabulary.max_size}")
    if vocabulary.has_other:
        what.append("other")
    return f"{name} ({', '.join(what)})"


def split_summary(spec: FedSpec) -> str:
    """Who decides each party's split: its label source's split column, its test file, or
    the hashed key."""
    t = spec.training
    hashed = f"hashed key (validation {t.validation_fraction:g}, test {t.test_fraction:g})"
    decided: list[str] = []
    rest = 0
    for party in spec.parties:
        holder = label_source(spec, party)
        ways = []
        if holder is not None and t.split_column is not None and t.split_column in holder.columns:
            ways.append(f"column '{t.split_column}'")
        if holder is not None and holder.test_path is not None:
            ways.append("test file")
        if ways:
            decided.append(f"{party.id} by {' and '.join(ways)}")
        else:
            rest += 1
    if not decided:
        return hashed
    return "; ".join([*decided, *([f"the others by {hashed}"] if rest else [])])
