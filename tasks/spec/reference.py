"""The spec reference, generated from the pydantic models: ``python -m tasks.spec.reference``.

Walks :class:`~tasks.spec.models.FedSpec` field by field, into every model a field holds
(directly, in a list, a table or a union), and writes one Markdown table per section: key,
type, default, allowed values and bounds, and the field's ``description``. The ``features``
options of a source are documented per registered modality of :mod:`tasks.prepare.modalities`
(its ``options`` model). ``docs/spec.md`` is this output; a test fails when it drifts.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tasks.spec.models import FeatureOptions, FedSpec

#: The command that writes the reference.
COMMAND = "python -m tasks.spec.reference > docs/spec.md"

_SCALARS: dict[object, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dt.date: "date",
    dt.datetime: "date-time",
    type(None): "none",
}

_BOUNDS = (
    ("ge", "≥ {}"),
    ("gt", "> {}"),
    ("le", "≤ {}"),
    ("lt", "< {}"),
    ("min_length", "at least {} {}"),
    ("max_length", "at most {} {}"),
    ("pattern", "matches `{}`"),
)


@dataclass(frozen=True)
class Section:
    """One table of the reference: the TOML header it documents and the model behind it."""

    header: str
    model: type[BaseModel]
    note: str = ""


def _unwrap(annotation: Any) -> Any:
    """``annotation`` without ``Annotated`` wrappers (``SerializeAsAny`` included)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _models(annotation: Any, header: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """(TOML header, model) for every model ``annotation`` holds under ``header``."""
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if _is_model(annotation):
        yield header, annotation
    elif _is_union(annotation):
        for member in typing.get_args(annotation):
            yield from _models(member, header)
    elif origin is list:
        for member in typing.get_args(annotation):
            yield from _models(member, f"{header}[]")
    elif origin is dict:
        yield from _models(typing.get_args(annotation)[1], f"{header}.<name>")


def _title(header: str) -> str:
    """``parties[].sources[]`` -> ``[[parties.sources]]``; ``a.b`` -> ``[a.b]``."""
    plain = header.replace("[]", "")
    return f"`[[{plain}]]`" if header.endswith("[]") else f"`[{plain}]`"


def _options_models() -> list[tuple[type[FeatureOptions], list[str]]]:
    """The ``features`` options model of every modality of :mod:`tasks.prepare.modalities`
    (modalities registered from elsewhere are left out), with the kinds that use it."""
    from tasks.prepare.modalities import MODALITIES, modality_names

    found: dict[type[FeatureOptions], list[str]] = {}
    for kind in modality_names():
        modality = MODALITIES[kind]
        if type(modality).__module__.startswith("tasks.prepare.modalities."):
            found.setdefault(modality.options, []).append(kind)
    return list(found.items())


def sections(root: type[BaseModel] = FedSpec) -> list[Section]:
    """Every section of the spec (of ``root``) in reading order, each model documented once
    (at the first place it appears; later places name that section)."""
    out: list[Section] = [Section("", root)]
    seen: set[type[BaseModel]] = {root}
    k = 0
    while k < len(out):
        section = out[k]
        k += 1
        prefix = f"{section.header}." if section.header else ""
        nested: list[Section] = []
        for name, field in section.model.model_fields.items():
            key = field.alias or name
            for header, model in _models(field.annotation, f"{prefix}{key}"):
                if model is FeatureOptions:
                    for options, kinds in _options_models():
                        if options not in seen:
                            seen.add(options)
                            which = ", ".join(f'"{kind}"' for kind in kinds)
                            nested.append(Section(header, options, note=f"kind = {which}"))
                elif model not in seen:
                    seen.add(model)
                    nested.append(Section(header, model))
        out[k:k] = nested
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def type_name(annotation: Any, where: dict[type[BaseModel], str]) -> str:
    """How the reference names a field's type (``where``: the section of each model)."""
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if origin is Literal:
        kinds = {type(v) for v in typing.get_args(annotation)}
        return " or ".join(sorted(_SCALARS.get(t, t.__name__) for t in kinds))
    if _is_model(annotation):
        if issubclass(annotation, FeatureOptions):
            return "table (the source kind's `features` options)"
        return f"table, keys as {where.get(annotation, annotation.__name__)}"
    if _is_union(annotation):
        members = [m for m in typing.get_args(annotation) if m is not type(None)]
        return " or ".join(type_name(m, where) for m in members)
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0], where)}"
    if origin is dict:
        return f"table of {type_name(typing.get_args(annotation)[1], where)}"
    return getattr(annotation, "__name__", str(annotation))


def _literals(annotation: Any) -> list[object]:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _literals(arg)]


def allowed(field: FieldInfo) -> str:
    """The field's allowed values (its ``Literal`` choices) and bounds."""
    parts = [", ".join(f"`{_toml(v)}`" for v in _literals(field.annotation))]
    text = _unwrap(field.annotation) is str
    for item in field.metadata:
        for attr, form in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(form.format(value, "character(s)" if text else "item(s)"))
        if getattr(item, "allow_inf_nan", None) is False:
            parts.append("finite")
    return "; ".join(p for p in parts if p)


def _toml(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def default(field: FieldInfo) -> str:
    """The field's default as TOML would write it (in backticks), ``required``, or
    ``its keys' defaults`` for a table."""
    if field.default_factory is not None:
        factory: Any = field.default_factory
        value = factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "its keys' defaults"
    return f"`{_toml(value)}`"


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def _doc(model: type[BaseModel]) -> str:
    """The first paragraph of the model's own docstring, in Markdown."""
    doc = model.__doc__ or ""
    text = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return _ROLE.sub(r"`\1`", text).replace("``", "`")


def reference(root: type[BaseModel] = FedSpec) -> str:
    """The whole reference (of the spec ``root``) as Markdown."""
    found = sections(root)
    where = {s.model: _title(s.header) for s in found if s.header}
    lines = [
        "# Spec reference",
        "",
        "Every key of the consortium spec, generated from the pydantic models in "
        f"`tasks/spec/models.py` and the registered modalities: `{COMMAND}`. "
        'Do not edit by hand. Examples and explanations: README.md, "The consortium spec".',
    ]
    for section in found:
        title = _title(section.header) if section.header else "Top level"
        if section.note:
            title += f" ({section.note})"
        lines += ["", f"## {title}", ""]
        doc = _doc(section.model)
        if doc:
            lines += [_cell(doc), ""]
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for name, field in section.model.model_fields.items():
            cells = [
                f"`{field.alias or name}`",
                type_name(field.annotation, where),
                default(field),
                allowed(field),
                field.description or "",
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Write the reference to standard output."""
    sys.stdout.write(reference())


if __name__ == "__main__":
    main()
