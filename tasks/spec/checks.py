"""Cross-reference checks of a consortium spec that pydantic cannot express field by field.

One function per section (training, parties, each source through its modality, the label,
the fusion and vertical opt-ins, confinement of stores and sources), each
returning the :class:`~tasks.spec.models.SpecProblem` s it finds; :func:`semantic_problems`
concatenates the section checks (confinement, which resolves paths, is run by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.files import (
    ConfinementError,
    confined,
    is_uri,
    join_location,
    lies_within,
    real_location,
)
from storage.store import FolderError, folder_files
from tasks.prepare.modalities import MODALITIES, modality_names, modality_of
from tasks.spec.models import FedSpec, SourceSpec, SpecProblem, infer_format, label_source
from tasks.types import SPLIT


def training_problems(spec: FedSpec) -> list[SpecProblem]:
    """``training.order`` names each party at most once; ``training.min_parties`` fits."""
    problems: list[SpecProblem] = []
    ids = [p.id for p in spec.parties]
    order = spec.training.order
    if order is not None:
        unknown = sorted(set(order) - set(ids))
        if not order:
            problems.append(
                SpecProblem(path="training.order", message="names no party; leave it out")
            )
        elif unknown or len(set(order)) != len(order):
            problems.append(
                SpecProblem(
                    path="training.order",
                    message=f"must name each party at most once; unknown {unknown}"
                    if unknown
                    else "names a party twice",
                )
            )
    if spec.training.min_parties > len(spec.parties):
        problems.append(
            SpecProblem(
                path="training.min_parties",
                message=f"{spec.training.min_parties} > number of parties ({len(spec.parties)})",
            )
        )
    return problems


def party_problems(spec: FedSpec) -> list[SpecProblem]:
    """Party ids and, per party, source ids are unique; every source passes
    :func:`source_problems`."""
    problems: list[SpecProblem] = []
    seen_parties: set[str] = set()
    for i, party in enumerate(spec.parties):
        where = f"parties[{i}]"
        if party.id in seen_parties:
            problems.append(
                SpecProblem(path=f"{where}.id", message=f"duplicate party id {party.id!r}")
            )
        seen_parties.add(party.id)
        seen_sources: set[str] = set()
        for j, source in enumerate(party.sources):
            at = f"{where}.sources[{j}]"
            if source.id in seen_sources:
                problems.append(
                    SpecProblem(path=f"{at}.id", message=f"duplicate source id {source.id!r}")
                )
            seen_sources.add(source.id)
            problems += source_problems(spec, source, at=at)
    return problems


def source_problems(spec: FedSpec, source: SourceSpec, *, at: str) -> list[SpecProblem]:
    """One source (``at``: its key path): its format, the columns and key its modality
    requires, and its column mappings."""
    problems: list[SpecProblem] = []
    modality = modality_of(source)
    if modality.reads_folders:
        if source.format is not None:
            problems.append(
                SpecProblem(
                    path=f"{at}.format",
                    message=f"a {source.kind} source is a folder of files; leave 'format' out",
                )
            )
    else:
        try:
            _ = source.file_format
        except ValueError as exc:
            problems.append(SpecProblem(path=f"{at}.format", message=str(exc)))
    for name in modality.required_columns(source):
        if name not in source.columns:
            problems.append(
                SpecProblem(
                    path=f"{at}.columns",
                    message=f"a {source.kind} source needs a '{name}' column mapping",
                )
            )
    problems += csv_problems(source, at=at)
    entity = spec.consortium.entity
    if source.key is None:
        problems += modality.key_problems(source, at=at, entity=entity)
    else:
        problems += key_spec_problems(source, at=at, entity=entity)
    return problems + column_problems(spec, source, at=at)


def csv_problems(source: SourceSpec, *, at: str) -> list[SpecProblem]:
    """CSV options are for a CSV source only."""
    if source.csv is None:
        return []
    if modality_of(source).reads_folders:
        fmt = "a folder of files"
    else:
        try:
            fmt = source.file_format
        except ValueError:
            return []  # reported at the format
    if fmt == "csv":
        return []
    return [
        SpecProblem(
            path=f"{at}.csv",
            message=f"CSV options apply to CSV sources only; this source is {fmt}",
        )
    ]


def key_spec_problems(source: SourceSpec, *, at: str, entity: str) -> list[SpecProblem]:
    """A ``key`` replaces the entity column of a source keyed by the entity: not both, and
    composite parts the spec can see (``csv.names``) exist."""
    key = source.key
    assert key is not None
    problems: list[SpecProblem] = []
    if modality_of(source).key_column(source, entity=entity) != entity:
        return [
            SpecProblem(
                path=f"{at}.key",
                message=f"a source of kind {source.kind!r} is not keyed by the entity "
                "(it reaches it otherwise); leave 'key' out",
            )
        ]
    if entity in source.columns:
        problems.append(
            SpecProblem(
                path=f"{at}.columns.{entity}",
                message=f"the source gives a 'key'; leave the entity column '{entity}' out "
                "of 'columns'",
            )
        )
    names = source.csv.names if source.csv is not None else None
    if names is not None:
        unknown = [c for c in key.columns if c not in names]
        if unknown:
            problems.append(
                SpecProblem(
                    path=f"{at}.key.columns",
                    message=f"{unknown} not among the columns in csv.names",
                )
            )
    return problems


def column_problems(spec: FedSpec, source: SourceSpec, *, at: str) -> list[SpecProblem]:
    """Each column mapping's options fit its dtype; categories have a vocabulary; the label
    comes from a source that may hold it."""
    problems: list[SpecProblem] = []
    add = problems.append
    holds_label = modality_of(source).holds_label(source)
    for name, column in source.columns.items():
        cat = f"{at}.columns.{name}"
        if column.values and column.dtype not in ("category", "bool", "str"):
            add(
                SpecProblem(
                    path=f"{cat}.values",
                    message=f"value maps apply to category/bool/str columns, not {column.dtype}",
                )
            )
        if (column.tz or column.format) and column.dtype not in ("datetime", "date"):
            add(SpecProblem(path=cat, message="tz/format apply only to datetime or date columns"))
        if column.unit and column.dtype not in ("float", "int"):
            add(SpecProblem(path=f"{cat}.unit", message="units apply to numeric columns"))
        if column.dtype == "category" and name not in spec.vocabularies:
            add(
                SpecProblem(
                    path=cat,
                    message=f"category column '{name}' has no [vocabularies].{name} entry",
                )
            )
        if name == spec.consortium.label.column and not holds_label:
            add(
                SpecProblem(
                    path=cat,
                    message="the label must come from a one-row-per-entity table source",
                )
            )
    return problems


def label_problems(spec: FedSpec) -> list[SpecProblem]:
    """Who maps the label fits the layout; multiclass gives its class count."""
    problems: list[SpecProblem] = []
    label = spec.consortium.label
    holders = spec.label_party_ids()
    ids = {p.id for p in spec.parties}
    if spec.consortium.layout == "horizontal":
        problems += [
            SpecProblem(
                path=f"parties[{i}].sources",
                message=(
                    f"horizontal layout: party {party.id!r} has no source mapping "
                    f"the label column '{label.column}'"
                ),
            )
            for i, party in enumerate(spec.parties)
            if party.id not in holders
        ]
    elif label.party is None:
        problems.append(
            SpecProblem(path="consortium.label.party", message="vertical layout needs it")
        )
    elif label.party not in ids:
        problems.append(
            SpecProblem(path="consortium.label.party", message=f"no party with id {label.party!r}")
        )
    elif holders != [label.party]:
        problems.append(
            SpecProblem(
                path="consortium.label",
                message=(
                    f"vertical layout: exactly party {label.party!r} must map the label "
                    f"column '{label.column}'; found it at {holders}"
                ),
            )
        )
    return problems


def opt_in_problems(spec: FedSpec) -> list[SpecProblem]:
    """A vertical training mode that shares per-entity data needs its opt-in."""
    problems: list[SpecProblem] = []
    if spec.consortium.layout != "vertical":
        return problems
    if spec.fusion.mode == "rounds" and not spec.fusion.share_gradients:
        problems.append(
            SpecProblem(
                path="fusion.share_gradients",
                message=(
                    "vertical rounds send per-entity gradients (which reveal the labels) "
                    "to every party: set it to true to opt in"
                ),
            )
        )
    if spec.fusion.mode == "one_shot" and not spec.fusion.share_labels:
        problems.append(
            SpecProblem(
                path="fusion.share_labels",
                message=(
                    "vertical one_shot sends the overlap's labels to every party: "
                    "set it to true to opt in"
                ),
            )
        )
    return problems


def class_count_problems(spec: FedSpec) -> list[SpecProblem]:
    """A multiclass task says how many classes its label has; a text label lists its
    classes in ``[vocabularies]`` (their order is the class index at every party)."""
    label = spec.consortium.label
    if spec.consortium.task != "multiclass":
        return []
    if label.num_classes is None:
        return [SpecProblem(path="consortium.label.num_classes", message="multiclass needs it")]
    if label.values is not None:
        return []  # the raw values are mapped to class indices
    text = any(
        source.columns[label.column].dtype in ("str", "category")
        for party in spec.parties
        if (source := label_source(spec, party)) is not None
    )
    if not text:
        return []
    vocabulary = spec.vocabularies.get(label.column)
    # a class named "other" in the list is a class: a label is never mapped to a bucket
    if vocabulary is not None and (vocabulary.learn or vocabulary.other):
        return [
            SpecProblem(
                path=f"vocabularies.{label.column}",
                message=(
                    f"the classes of the multiclass label '{label.column}' must be listed "
                    "explicitly, without learn or an other bucket: their order is the class "
                    "index at every party"
                ),
            )
        ]
    classes = vocabulary.values if vocabulary is not None else None
    if classes is None:
        return [
            SpecProblem(
                path=f"vocabularies.{label.column}",
                message=(
                    f"the multiclass label '{label.column}' is text: list its "
                    f"{label.num_classes} classes in order as [vocabularies].{label.column} "
                    "(the order is the class index at every party)"
                ),
            )
        ]
    if len(classes) != label.num_classes:
        return [
            SpecProblem(
                path=f"vocabularies.{label.column}",
                message=(
                    f"lists {len(classes)} classes but consortium.label.num_classes is "
                    f"{label.num_classes}"
                ),
            )
        ]
    return []


def vocabulary_problems(spec: FedSpec) -> list[SpecProblem]:
    """A learned vocabulary is for a column some source maps as a category (otherwise no
    party would count anything)."""
    mapped = {
        name
        for party in spec.parties
        for source in party.sources
        for name, column in source.columns.items()
        if column.dtype == "category"
    }
    return [
        SpecProblem(
            path=f"vocabularies.{name}",
            message=f"learn = true, but no source maps '{name}' as a category column",
        )
        for name in spec.learned_vocabularies()
        if name not in mapped
    ]


def split_problems(spec: FedSpec) -> list[SpecProblem]:
    """``training.split_column`` is mapped (as text) by a label source and is neither the
    entity key nor the label; ``test_path`` is on a label source, in the format of its
    ``path``; neither is used in the vertical layout (there the hashed key splits the
    overlap at every party alike)."""
    problems: list[SpecProblem] = []
    training = spec.training
    column = training.split_column
    vertical = spec.consortium.layout == "vertical"
    if column is None and "split_values" in training.model_fields_set:
        problems.append(
            SpecProblem(
                path="training.split_values", message="needs training.split_column; give it"
            )
        )
    if column is not None and vertical:
        problems.append(
            SpecProblem(
                path="training.split_column",
                message="the vertical layout splits the overlap by the hashed key at every "
                "party (only the label party could read a split column); leave it out",
            )
        )
    elif column is not None and column in (spec.consortium.entity, spec.consortium.label.column):
        problems.append(
            SpecProblem(
                path="training.split_column",
                message=f"'{column}' is the entity key or the label; name another column",
            )
        )
    elif column is not None:
        mapped = False
        for i, party in enumerate(spec.parties):
            holder = label_source(spec, party)
            if holder is None or column not in holder.columns:
                continue
            mapped = True
            j = party.sources.index(holder)
            if holder.columns[column].dtype != "str":
                problems.append(
                    SpecProblem(
                        path=f"parties[{i}].sources[{j}].columns.{column}.dtype",
                        message='the split column is compared as text: use dtype = "str"',
                    )
                )
        if not mapped:
            problems.append(
                SpecProblem(
                    path="training.split_column",
                    message=f"no label source maps the column '{column}'; map it in a label "
                    f'source\'s columns, e.g. {column} = {{ from = "set", dtype = "str" }}',
                )
            )
    for i, party in enumerate(spec.parties):
        holder = label_source(spec, party)
        for j, source in enumerate(party.sources):
            if SPLIT in source.columns:
                problems.append(
                    SpecProblem(
                        path=f"parties[{i}].sources[{j}].columns.{SPLIT}",
                        message="is the name of the split fedfuse derives; name the column "
                        "otherwise (and set training.split_column to it)",
                    )
                )
            if source.test_path is None:
                continue
            at = f"parties[{i}].sources[{j}].test_path"
            if vertical:
                message = "the vertical layout splits the overlap by the hashed key; leave it out"
            elif source is not holder:
                message = (
                    "only the party's label source takes a test_path (its other sources "
                    "hold the rows of every entity, test entities included)"
                )
            elif source.test_path == source.path:
                message = "is the source's path; give a separate test file"
            else:
                message = _test_format_problem(source)
            if message:
                problems.append(SpecProblem(path=at, message=message))
    return problems


def _test_format_problem(source: SourceSpec) -> str:
    """Why ``test_path`` cannot be read like ``path`` (empty when it can)."""
    if source.format is not None:
        return ""
    try:
        test_format = infer_format(source.test_path or "")
    except ValueError:
        return "unknown format; give it the suffix of path or set the source's 'format'"
    try:
        main_format = source.file_format
    except ValueError:
        return ""  # reported at the source's format
    if test_format != main_format:
        return f"is {test_format} but path is {main_format}; the test file has the same format"
    return ""


def fusion_problems(spec: FedSpec) -> list[SpecProblem]:
    """Fusion weights name known parties and are non-negative."""
    problems: list[SpecProblem] = []
    weights = spec.fusion.weights
    if weights is None:
        return problems
    unknown = sorted(set(weights) - {p.id for p in spec.parties})
    if unknown:
        problems.append(SpecProblem(path="fusion.weights", message=f"unknown parties {unknown}"))
    if any(w < 0 for w in weights.values()):
        problems.append(SpecProblem(path="fusion.weights", message="weights must be non-negative"))
    return problems


def text_problems(spec: FedSpec) -> list[SpecProblem]:
    """``[text] model`` needs a text source. Horizontal: at ``min_parties`` parties or more
    (they learn the consortium vocabulary together). Vertical: a training mode, whose opt-in
    (:func:`opt_in_problems`) shares what the text party fits its text block on (the
    round-1 gradients or the labels)."""
    text = spec.text
    if not text.model:
        return []
    problems: list[SpecProblem] = []
    holders = spec.text_parties()
    vertical = spec.consortium.layout == "vertical"
    if vertical and spec.fusion.mode is None:
        problems.append(
            SpecProblem(
                path="text.model",
                message="in the vertical layout the text party fits its text block on what "
                "the training mode shares: set fusion.mode ('rounds' with share_gradients = "
                "true, or 'one_shot' with share_labels = true)",
            )
        )
    if not holders:
        problems.append(SpecProblem(path="text.model", message="no party has a text source"))
    elif not vertical and text.min_parties > len(holders):
        problems.append(
            SpecProblem(
                path="text.min_parties",
                message=f"{text.min_parties} > number of parties with a text source "
                f"({len(holders)})",
            )
        )
    return problems


def semantic_problems(spec: FedSpec) -> list[SpecProblem]:
    """Every cross-reference problem of ``spec``, section by section."""
    return [
        *training_problems(spec),
        *party_problems(spec),
        *label_problems(spec),
        *opt_in_problems(spec),
        *class_count_problems(spec),
        *vocabulary_problems(spec),
        *label_value_problems(spec),
        *split_problems(spec),
        *fusion_problems(spec),
        *text_problems(spec),
    ]


def label_value_problems(spec: FedSpec) -> list[SpecProblem]:
    """``positive`` is for a binary task; ``values`` give the task's targets (binary: 0 or
    1; multiclass: class indices 0..num_classes-1); neither beside a value map on the label
    column itself (one mapping per label)."""
    label = spec.consortium.label
    task = spec.consortium.task
    problems: list[SpecProblem] = []
    if label.positive is not None and task != "binary":
        problems.append(
            SpecProblem(
                path="consortium.label.positive",
                message=f"applies to a binary task, not {task}; use 'values'",
            )
        )
    if label.values is not None:
        numbers = label.values.items()
        if task == "binary":
            bad = sorted(raw for raw, v in numbers if v not in (0.0, 1.0))
            wanted = "0 or 1 for a binary task"
        elif task == "multiclass" and label.num_classes is not None:
            bad = sorted(
                raw for raw, v in numbers if not (v.is_integer() and 0 <= v < label.num_classes)
            )
            wanted = f"an integer 0..{label.num_classes - 1} for a multiclass task"
        else:
            bad, wanted = [], ""
        if bad:
            problems.append(
                SpecProblem(path="consortium.label.values", message=f"{bad}: not {wanted}")
            )
    if label.positive is not None or label.values is not None:
        for i, party in enumerate(spec.parties):
            source = label_source(spec, party)
            if source is None:
                continue
            column = source.columns[label.column]
            at = f"parties[{i}].sources[{party.sources.index(source)}].columns.{label.column}"
            if column.values:
                problems.append(
                    SpecProblem(
                        path=f"{at}.values",
                        message="the label is mapped by consortium.label (positive or "
                        "values); leave this value map out",
                    )
                )
            if column.dtype != "str":
                problems.append(
                    SpecProblem(
                        path=f"{at}.dtype",
                        message="consortium.label.positive/values compare the raw text: "
                        f'map the label as dtype = "str", not {column.dtype}',
                    )
                )
    return problems


@dataclass(frozen=True)
class _Area:
    """A folder of the consortium: a party's store or import area, or the coordinator's store."""

    key: str
    owner: str | None  # party id; None: the coordinator
    what: str  # e.g. "the store of party 'a'"
    shown: str  # as written, plus where it leads when resolving changed it
    real: str


def _shown(written: str, base: str) -> tuple[str, str]:
    """``written`` resolved against ``base`` (``..`` and symlinks): (how to show it, real)."""
    joined = join_location(written, base)
    real = real_location(joined)
    lexical = joined.split("://", 1)[1] if joined.lower().startswith("file://") else joined
    return (written if lexical == real else f"{written} (leads to {real})"), real


def _areas(spec: FedSpec, base: str) -> list[_Area]:
    """The coordinator's store, the parties' stores, then their import areas (so a clash is
    reported at an import area rather than at the store it overlaps)."""
    folders: list[tuple[str, str | None, str, str]] = [
        ("coordinator.store", None, "the coordinator's store", spec.coordinator.store)
    ]
    for i, party in enumerate(spec.parties):
        folders.append(
            (f"parties[{i}].store", party.id, f"the store of party {party.id!r}", party.store)
        )
    for i, party in enumerate(spec.parties):
        folders += [
            (
                f"parties[{i}].imports[{k}]",
                party.id,
                f"an import area of party {party.id!r}",
                folder,
            )
            for k, folder in enumerate(party.imports)
        ]
    areas = []
    for key, owner, what, written in folders:
        shown, real = _shown(written, base)
        areas.append(_Area(key=key, owner=owner, what=what, shown=shown, real=real))
    return areas


def confinement_problems(spec: FedSpec, base: str) -> list[SpecProblem]:
    """Stores apart and sources at home, after resolving ``..`` and symlinks against ``base``.

    The coordinator's store and every party's store and import areas are separate folders,
    none inside another (a party's own store and import areas aside); every source and
    entity map of a party lies in its store or one of its import areas (``imports``).
    Nothing is read: messages name paths as the spec writes them and where they lead.
    A confined local source path that exists must also be what its kind reads
    (:func:`source_shape_problems`).
    """
    problems: list[SpecProblem] = []
    areas = _areas(spec, base)
    for k, area in enumerate(areas):
        for other in areas[:k]:
            if other.owner == area.owner and area.owner is not None:
                continue
            if area.real == other.real:
                relation = "is also"
            elif lies_within(area.real, other.real):
                relation = "lies inside"
            elif lies_within(other.real, area.real):
                relation = "contains"
            else:
                continue
            problems.append(
                SpecProblem(
                    path=area.key,
                    message=f"{area.shown} {relation} {other.what} ({other.shown}); every "
                    "party's store and import areas and the coordinator's store must be "
                    "separate folders, none inside another",
                )
            )
    for i, party in enumerate(spec.parties):
        roots = [a.real for a in areas if a.owner == party.id]
        allowed = f"the store of party {party.id!r} ({party.store})"
        if party.imports:
            allowed += f" and its import areas ({', '.join(party.imports)})"
        for j, source in enumerate(party.sources):
            paths = [(f"parties[{i}].sources[{j}].path", source.path)]
            if source.entity_map is not None:
                paths.append((f"parties[{i}].sources[{j}].entity_map.path", source.entity_map.path))
            if source.test_path is not None:
                paths.append((f"parties[{i}].sources[{j}].test_path", source.test_path))
            for key, written in paths:
                try:
                    confined(join_location(written, base), roots, name=written, area=allowed)
                except ConfinementError as exc:
                    problems.append(
                        SpecProblem(
                            path=key,
                            message=f"{exc}; to read it from elsewhere, list its folder in "
                            f"parties[{i}].imports",
                        )
                    )
                    continue
                if key == f"parties[{i}].sources[{j}].path":
                    problems += source_shape_problems(source, base, at=key)
                elif key == f"parties[{i}].sources[{j}].test_path":
                    test = source.model_copy(update={"path": written})
                    problems += source_shape_problems(test, base, at=key)
    return problems


def source_shape_problems(source: SourceSpec, base: str, *, at: str) -> list[SpecProblem]:
    """A local source path that exists is a folder exactly when its kind reads folders
    (:attr:`~tasks.prepare.modalities.base.Modality.reads_folders`), and a folder source
    holds no symbolic link; paths not there yet, and object stores, are checked at the read.
    Lists the folder's entries, reads no file."""
    location = join_location(source.path, base)
    if is_uri(location) and not location.lower().startswith(("file://", "local://")):
        return []
    real = Path(real_location(location))
    if not real.exists():
        return []
    modality = modality_of(source)
    if modality.reads_folders and not real.is_dir():
        return [
            SpecProblem(
                path=at,
                message=f"{source.path} is a file; a {source.kind} source is a folder of files",
            )
        ]
    if not modality.reads_folders and real.is_dir():
        folders = [k for k in modality_names() if MODALITIES[k].reads_folders]
        which = f" ({', '.join(folders)})" if folders else " (none is registered)"
        return [
            SpecProblem(
                path=at,
                message=f"{source.path} is a folder; a {source.kind} source reads one file "
                f"(csv, parquet, jsonl, arrow); only kinds that read folders take one{which}",
            )
        ]
    if modality.reads_folders:
        try:
            folder_files(location)
        except FolderError as exc:  # named as the spec writes it
            return [SpecProblem(path=at, message=str(exc).replace(location, source.path, 1))]
    return []
