"""The spec's ``[defaults]`` table: keys a party that omits them takes, ``{party}`` replaced.

Parties that export alike are written once: ``[defaults]`` gives ``store``, ``imports``,
``work_pool``, ``storage_options`` and ``sources``, and a party that leaves one of these
keys out takes it from there, with ``{party}`` in every string value replaced by the party's
id. A party that gives a key keeps its own value whole (no merge of lists or tables).

These functions work on the parsed TOML document (plain dicts and lists) before the models
check it: :func:`apply_defaults` expands the parties (run by
:class:`~tasks.spec.models.FedSpec` before its fields are validated),
:func:`placeholder_problems` finds the placeholders that cannot be replaced and
:func:`relocate` moves a problem found in a defaulted key of a party to the key of
``[defaults]`` it came from, e.g. ``defaults.sources[0].columns.x (for parties[2])``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from typing import Any

#: The placeholder a ``[defaults]`` string value may hold.
PARTY = "party"

#: Where in a source table (key paths relative to it) a value must be the same at every
#: party, so ``{party}`` is refused: its id, kind, grain, file format and encoding, its
#: feature options, and each column mapping's dtype, unit, time zone and timestamp format.
SAME_AT_EVERY_PARTY = re.compile(
    r"^\.(id|kind|grain|format|encoding)$|^\.features([.\[]|$)|^\.entity_map\.format$"
    r"|^(\.entity_map)?\.columns\.[^.]+\.(dtype|unit|tz|format)$"
)

_PARTY_KEY = re.compile(r"^parties\[(\d+)\]\.([A-Za-z_]+)(.*)$")


def _fields(text: str) -> list[tuple[str, str | None, str | None]] | None:
    """The replacement fields of ``text`` (name, conversion, format spec) in
    :meth:`str.format` syntax (``{{`` and ``}}`` are literal braces); None when a brace is
    unbalanced."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        return None
    return [(name, conv, spec) for _, name, spec, conv in parsed if name is not None]


def expand(text: str, party: str) -> str:
    """``text`` with ``{party}`` replaced by ``party`` and ``{{``/``}}`` by single braces;
    unchanged when it holds anything else (:func:`placeholder_problems` reports it)."""
    fields = _fields(text)
    if fields is None or any(f != (PARTY, None, "") for f in fields):
        return text
    return text.format(party=party)


def _expanded(value: Any, party: str) -> Any:
    if isinstance(value, str):
        return expand(value, party)
    if isinstance(value, list):
        return [_expanded(item, party) for item in value]
    if isinstance(value, dict):
        return {key: _expanded(item, party) for key, item in value.items()}
    return value


def defaulted_keys(data: object, keys: Iterable[str]) -> dict[int, list[str]]:
    """Party index -> the keys (of ``keys``) that party takes from ``[defaults]``."""
    if not isinstance(data, Mapping):
        return {}
    defaults, parties = data.get("defaults"), data.get("parties")
    if not isinstance(defaults, Mapping) or not isinstance(parties, list):
        return {}
    given = [k for k in keys if k in defaults]
    taken = {
        i: [k for k in given if k not in party]
        for i, party in enumerate(parties)
        if isinstance(party, Mapping)
    }
    return {i: found for i, found in taken.items() if found}


def apply_defaults(data: object, keys: Iterable[str]) -> object:
    """The document with every party's missing keys (of ``keys``) taken from ``[defaults]``,
    ``{party}`` replaced by the party's id (left as written when the id is not a string:
    that error is reported at the id). Anything not shaped as expected is returned as it is,
    for the models to report."""
    taken = defaulted_keys(data, keys)
    if not taken or not isinstance(data, Mapping):
        return data
    defaults, parties = data["defaults"], list(data["parties"])
    for i, found in taken.items():
        party = dict(parties[i])
        party_id = party.get("id")
        for key in found:
            value = defaults[key]
            party[key] = _expanded(value, party_id) if isinstance(party_id, str) else value
        parties[i] = party
    return {**data, "parties": parties}


def _strings(value: Any, path: str) -> list[tuple[str, str | None]]:
    """(path, string) for every string value under ``value``, and (path, None) for every
    table key holding a placeholder."""
    if isinstance(value, str):
        return [(path, value)]
    found: list[tuple[str, str | None]] = []
    if isinstance(value, list):
        for k, item in enumerate(value):
            found += _strings(item, f"{path}[{k}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _fields(key) != []:
                found.append((f"{path}.{key}", None))
            else:
                found += _strings(item, f"{path}.{key}")
    return found


def _problem(path: str, text: str | None, *, relative: str | None) -> str | None:
    """Why ``text`` at ``path`` cannot be expanded (``relative``: its path inside a source
    table, if it lies in one), or None."""
    if text is None:
        return "placeholders are replaced in values, not in table keys"
    fields = _fields(text)
    if fields is None:
        return "unbalanced brace; write {{ or }} for a literal brace"
    if any(f != (PARTY, None, "") for f in fields):
        return "unknown placeholder; only {party} (the party id) is replaced"
    if fields and relative is not None and SAME_AT_EVERY_PARTY.match(relative):
        key = relative.rsplit(".", 1)[-1]
        return f"{{party}} cannot be used in '{key}': it must be the same at every party"
    return None


def _own_placeholders(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``{party}`` in a value a party gives itself (it is replaced in ``[defaults]`` only)."""
    parties = data.get("parties")
    if not isinstance(parties, list):
        return []
    found: list[tuple[str, str]] = []
    for i, party in enumerate(parties):
        if not isinstance(party, Mapping):
            continue
        for path, text in _strings(dict(party), f"parties[{i}]"):
            if text is not None and (PARTY, None, "") in (_fields(text) or []):
                found.append(
                    (path, "{party} is replaced in [defaults] only; write the party's id here")
                )
    return found


def placeholder_problems(data: object) -> list[tuple[str, str]]:
    """(key path, message) for ``{party}`` in a party's own values, for every string of
    ``[defaults]`` holding a placeholder other than ``{party}`` or an unbalanced brace, for ``{party}`` in a source key whose value must
    be the same at every party (:data:`SAME_AT_EVERY_PARTY`) and for a placeholder in a
    table key; also for a ``store`` without ``{party}`` that several parties take (every
    party needs a store of its own)."""
    if not isinstance(data, Mapping):
        return []
    found = _own_placeholders(data)
    defaults = data.get("defaults")
    if not isinstance(defaults, Mapping):
        return found
    for path, text in _strings(dict(defaults), "defaults"):
        match = re.match(r"^defaults\.sources\[\d+\]", path)
        relative = path[match.end() :] if match else None
        why = _problem(path, text, relative=relative)
        if why is not None:
            found.append((path, why))
    store = defaults.get("store")
    takers = [i for i, keys in defaulted_keys(data, ["store"]).items() if keys]
    if isinstance(store, str) and len(takers) > 1 and not _fields(store):
        found.append(
            (
                "defaults.store",
                f"taken by {len(takers)} parties, so it must contain {{party}}: every party "
                "needs a store of its own",
            )
        )
    return found


def relocate(path: str, taken: Mapping[int, Iterable[str]]) -> str:
    """``path`` of a problem in the expanded spec, moved to the ``[defaults]`` key the value
    came from when the party took it from there (``parties[2].sources[0].columns.x`` ->
    ``defaults.sources[0].columns.x (for parties[2])``)."""
    match = _PARTY_KEY.match(path)
    if match is None:
        return path
    index, key, rest = int(match[1]), match[2], match[3]
    if key not in taken.get(index, ()):
        return path
    return f"defaults.{key}{rest} (for parties[{index}])"


def merge_relocated(problems: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Problems in order, those of one ``[defaults]`` key with the same message for several
    parties joined into one (``... (for parties[0], parties[3])``); exact repeats dropped
    (a problem of the ``[defaults]`` table itself and its copy at a party)."""
    suffix = re.compile(r"^(.*) \(for (parties\[\d+\])\)$")
    order: list[tuple[str, str]] = []
    who: dict[tuple[str, str], list[str]] = {}
    plain: set[tuple[str, str]] = set()
    for path, message in problems:
        match = suffix.match(path)
        item = (match[1] if match else path, message)
        if item not in who:
            who[item] = []
            order.append(item)
        if match is None:
            plain.add(item)
        elif match[2] not in who[item]:
            who[item].append(match[2])
    return [
        item if item in plain else (f"{item[0]} (for {', '.join(who[item])})", item[1])
        for item in order
    ]
