"""LightGBM's text model format: parse, check, load and merge.

A party's update is a LightGBM text model (``Booster.model_to_string()``), never a pickle.
Untrusted model texts can crash or hang LightGBM's C++ loader (a wrong ``tree_sizes`` header
aborts the process; a child index pointing back up the tree makes prediction loop forever),
so :func:`check_update` validates the text structurally in Python *before* LightGBM sees it
(including that a ``tree_sizes`` header is exact, so the accepted text is safe for any
LightGBM loader), and :func:`load_booster` always drops ``tree_sizes`` so any remaining parse
error is raised as an exception instead of aborting in a parallel section. Load member texts
only through :func:`load_booster`. :func:`leaf_bound` gives an optional bound on leaf values.

:func:`merge_model_texts` writes weighted updates plus a base score as one native LightGBM
model (what :func:`tasks.horizontal.ensemble.export_model` exports). Everything here is
pure: no files, no clock.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import lightgbm as lgb

from tasks.types import Objective

logger = logging.getLogger(__name__)


#: LightGBM objective names by task.
LGB_OBJECTIVE: dict[str, str] = {
    "binary": "binary",
    "multiclass": "multiclass",
    "regression": "regression",
}


class ModelTextError(ValueError):
    """A text is not a LightGBM text model we can safely load."""


# --------------------------------------------------------------------------------------
# LightGBM model text: parsing and checks
# --------------------------------------------------------------------------------------


@dataclass
class ParsedTree:
    """One ``Tree=<i>`` block: its ``key=value`` lines and its size in the original text.

    ``size`` is the block's length in UTF-8 bytes from the ``Tree=<i>`` line up to the next
    ``Tree=`` or ``end of trees`` line (blank lines included, ``\\r\\n`` counted as two
    bytes): exactly what LightGBM's ``tree_sizes`` header must say for this tree.
    """

    index: int
    fields: dict[str, str]
    size: int = 0


@dataclass
class ParsedModel:
    header: dict[str, str]
    trees: list[ParsedTree] = field(default_factory=list)
    tail: str = ""


#: LightGBM's largest ``num_leaves`` (its config refuses more): a tree claiming more is
#: rejected before any of its arrays is looked at.
MAX_NUM_LEAVES = 131072
#: LightGBM writes about a dozen header lines; far more is not one of its models.
_MAX_HEADER_LINES = 64
#: At most this many problems are listed (then a count of the rest).
_MAX_PROBLEMS = 20
#: The keys LightGBM's tree parser reads (``Tree::Tree(const char*, size_t*)``). It reads at
#: most 22 lines per tree and lets a repeated key overwrite the first, so unknown or repeated
#: keys could make it see a different tree than the one checked here: both are rejected.
_TREE_KEYS = frozenset(
    {
        "num_leaves",
        "num_cat",
        "split_feature",
        "split_gain",
        "threshold",
        "decision_type",
        "left_child",
        "right_child",
        "leaf_value",
        "leaf_weight",
        "leaf_count",
        "internal_value",
        "internal_weight",
        "internal_count",
        "cat_boundaries",
        "cat_threshold",
        "is_linear",
        "shrinkage",
        "leaf_const",
        "num_features",
        "leaf_features",
        "leaf_coeff",
    }
)
# Numbers exactly as LightGBM writes them (ASCII only: Python's int()/float() would also take
# "1_000", " 7", "١٢" or "infinity", which LightGBM's C parser reads differently).
_TREE_LINE = re.compile(r"Tree=([0-9]{1,9})")
_INT_TOKEN = re.compile(r"-?[0-9]{1,18}")
_FLOAT_TOKEN = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|-?inf|-?nan")
_UINT32_TOKEN = re.compile(r"[0-9]{1,10}")
_SIZE_TOKEN = re.compile(r"[0-9]{1,15}")
#: A line of the tail's ``parameters:`` section as LightGBM writes it. LightGBM's
#: ``LGBM_BoosterGetLoadedParam`` (called by every ``lgb.Booster(model_str=...)``) reads
#: past its buffers on a line there without ``:`` (``x``, ``[]``): a segfault, found by
#: fuzzing LightGBM 4.7.
_PARAM_LINE = re.compile(r"\[[A-Za-z0-9_]+: .*\]")


def without_params(model_text: str, keys: frozenset[str] | set[str]) -> str:
    """The model text without the lines of its parameters section that set ``keys`` (the
    settings local to one party: network addresses, the path of its forced-bins file)."""
    keep = []
    inside = False
    for line in model_text.split("\n"):
        if line == "parameters:":
            inside = True
        elif line == "end of parameters":
            inside = False
        elif inside and line.startswith("[") and line[1:].split(":", 1)[0] in keys:
            continue
        keep.append(line)
    return "\n".join(keep)


def _line_bytes(raw_line: str) -> int:
    """UTF-8 length of one line of the original text plus its ``\\n``."""
    return len(raw_line.encode()) + 1


def parse_model_text(text: str) -> ParsedModel:
    """Split a LightGBM text model into header, trees (key=value fields) and tail.

    Raises :class:`ModelTextError` (and nothing else) on anything that is not laid out like
    LightGBM writes it: NUL characters or a carriage return that does not end a line
    (LightGBM's C parser ends lines and strings there, so it would read something else than
    this function), lone surrogates, a header of more than 64 lines, tree lines that are not
    ``key=value`` with a key LightGBM knows, repeated keys, trees out of order, no
    ``end of trees``, a tail whose ``parameters:`` section is not ``[key: value]`` lines.
    ``\\r\\n`` line ends are accepted (LightGBM reads them too).
    """
    if not isinstance(text, str) or not text.strip():
        raise ModelTextError("empty model text")
    if "\x00" in text:
        raise ModelTextError("NUL character in the model text")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ModelTextError("model text is not encodable as UTF-8") from None
    raw = text.split("\n")
    if "\r" in text:
        if text.count("\r") != text.count("\r\n"):
            raise ModelTextError("carriage return inside a line (line ends must be \\n or \\r\\n)")
        lines = [line.removesuffix("\r") for line in raw]
    else:
        lines = raw
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i >= len(lines) or lines[i].strip() != "tree":
        raise ModelTextError("not a LightGBM text model (first line is not 'tree')")
    i += 1
    header: dict[str, str] = {}
    while i < len(lines) and not lines[i].startswith("Tree=") and lines[i] != "end of trees":
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        if len(header) >= _MAX_HEADER_LINES:
            raise ModelTextError(f"header has more than {_MAX_HEADER_LINES} lines")
        key, sep, value = line.partition("=")
        if not sep:
            raise ModelTextError(f"header line without '=': {line[:60]!r}")
        if key in header:
            raise ModelTextError(f"header key {key[:60]!r} appears twice")
        header[key] = value
    trees: list[ParsedTree] = []
    while i < len(lines) and lines[i] != "end of trees":
        line = lines[i]
        if not line and trees:  # blank lines after a tree belong to its block
            trees[-1].size += _line_bytes(raw[i])
            i += 1
            continue
        match = _TREE_LINE.fullmatch(line)
        if match is None:
            raise ModelTextError(f"expected 'Tree=<i>' or 'end of trees', got {line[:60]!r}")
        index = int(match.group(1))
        if index != len(trees):
            raise ModelTextError(f"tree numbering: expected Tree={len(trees)}, got Tree={index}")
        size = _line_bytes(raw[i])
        i += 1
        fields: dict[str, str] = {}
        while i < len(lines) and lines[i]:
            key, sep, value = lines[i].partition("=")
            if not sep:
                raise ModelTextError(f"Tree={index}: line without '=': {lines[i][:60]!r}")
            if key not in _TREE_KEYS:
                raise ModelTextError(f"Tree={index}: unknown key {key[:60]!r}")
            if key in fields:
                raise ModelTextError(f"Tree={index}: key {key!r} appears twice")
            fields[key] = value
            size += _line_bytes(raw[i])
            i += 1
        trees.append(ParsedTree(index=index, fields=fields, size=size))
    if i >= len(lines):
        raise ModelTextError("no 'end of trees' line (truncated model?)")
    _check_parameters(lines[i + 1 :])
    tail = "\n".join(lines[i + 1 :])
    return ParsedModel(header=header, trees=trees, tail=tail)


def _check_parameters(tail: Sequence[str]) -> None:
    """At most one ``parameters:`` ... ``end of parameters`` section, of ``[key: value]``
    and blank lines only (see :data:`_PARAM_LINE`)."""
    starts = [j for j, line in enumerate(tail) if line == "parameters:"]
    ends = [j for j, line in enumerate(tail) if line == "end of parameters"]
    if not starts and not ends:
        return
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ModelTextError("malformed parameters section")
    for line in tail[starts[0] + 1 : ends[0]]:
        if line and not _PARAM_LINE.fullmatch(line):  # LightGBM writes a blank line too
            raise ModelTextError(f"malformed parameter line {line[:60]!r}")


def _tokens(
    tree: ParsedTree, key: str, count: int, pattern: re.Pattern[str], what: str
) -> list[str]:
    """``count`` tokens of field ``key``, single-space separated, each matching ``pattern``."""
    raw = tree.fields.get(key)
    if raw is None:
        raise ModelTextError(f"Tree={tree.index}: no {key}")
    tokens = raw.split(" ") if raw else []
    if len(tokens) != count:
        raise ModelTextError(f"Tree={tree.index}: {key} has {len(tokens)} values, expected {count}")
    if not all(pattern.fullmatch(t) for t in tokens):
        raise ModelTextError(f"Tree={tree.index}: {key} has a non-{what} value")
    return tokens


def _ints(tree: ParsedTree, key: str, count: int) -> list[int]:
    """``count`` integers of field ``key``, as LightGBM writes them."""
    return [int(t) for t in _tokens(tree, key, count, _INT_TOKEN, "int")]


def _floats(tree: ParsedTree, key: str, count: int) -> list[float]:
    """``count`` floats of field ``key``, as LightGBM writes them."""
    return [float(t) for t in _tokens(tree, key, count, _FLOAT_TOKEN, "float")]


def _value_problems(
    where: str, what: str, values: Sequence[float], max_abs_leaf: float | None
) -> list[str]:
    if not all(math.isfinite(v) for v in values):
        return [f"{where}: non-finite {what}"]
    if max_abs_leaf is not None and any(abs(v) > max_abs_leaf for v in values):
        return [f"{where}: leaf value beyond the bound ±{max_abs_leaf:g}"]
    return []


def _tree_problems(
    tree: ParsedTree,
    n_features: int,
    categorical_idx: set[int] | None,
    max_abs_leaf: float | None = None,
) -> list[str]:
    """Structural checks that keep LightGBM's loader and predictor safe, plus finiteness and
    the optional bound on |leaf_value| and |internal_value|. Raises nothing."""
    where = f"Tree={tree.index}"
    num_leaves_raw = tree.fields.get("num_leaves", "")
    num_cat_raw = tree.fields.get("num_cat", "0")
    if not (_INT_TOKEN.fullmatch(num_leaves_raw) and _INT_TOKEN.fullmatch(num_cat_raw)):
        return [f"{where}: num_leaves/num_cat is not an integer"]
    num_leaves, num_cat = int(num_leaves_raw), int(num_cat_raw)
    if not 1 <= num_leaves <= MAX_NUM_LEAVES or not 0 <= num_cat < max(num_leaves, 1):
        return [
            f"{where}: num_leaves={num_leaves}, num_cat={num_cat} "
            f"(num_leaves must be 1..{MAX_NUM_LEAVES}, num_cat below it)"
        ]
    if tree.fields.get("is_linear", "0") != "0":
        return [f"{where}: linear trees are not supported"]
    problems: list[str] = []
    n = num_leaves - 1
    try:
        leaves = _floats(tree, "leaf_value", num_leaves)
        problems += _value_problems(where, "leaf value", leaves, max_abs_leaf)
        if "shrinkage" in tree.fields:
            _floats(tree, "shrinkage", 1)
        for key, count, integer in (
            ("split_gain", n, False),
            ("internal_value", n, False),
            ("internal_weight", n, False),
            ("internal_count", n, True),
            ("leaf_weight", num_leaves, False),
            ("leaf_count", num_leaves, True),
        ):
            if not tree.fields.get(key, "").strip():
                continue
            if integer:
                _ints(tree, key, count)
                continue
            values = _floats(tree, key, count)
            if key == "internal_value":
                problems += _value_problems(where, "internal value", values, max_abs_leaf)
        if n == 0:
            return problems
        split_feature = _ints(tree, "split_feature", n)
        threshold = _floats(tree, "threshold", n)
        decision = _ints(tree, "decision_type", n)
        left = _ints(tree, "left_child", n)
        right = _ints(tree, "right_child", n)
        if num_cat > 0:
            bounds = _ints(tree, "cat_boundaries", num_cat + 1)
            raw_cats = tree.fields.get("cat_threshold", "")
            cat_threshold = raw_cats.split(" ") if raw_cats else []
            if (
                bounds[0] != 0
                or any(b > a for b, a in itertools.pairwise(bounds))
                or bounds[-1] != len(cat_threshold)
                or not all(_UINT32_TOKEN.fullmatch(t) and int(t) < 2**32 for t in cat_threshold)
            ):
                problems.append(f"{where}: inconsistent cat_boundaries/cat_threshold")
    except ModelTextError as exc:
        return [*problems, str(exc)]
    for node in range(n):
        feature, kind = split_feature[node], decision[node]
        if not 0 <= feature < n_features:
            problems.append(f"{where}: split on feature index {feature} (have {n_features})")
            continue
        if not 0 <= kind < 16:
            problems.append(f"{where}: decision_type {kind}")
            continue
        is_cat = bool(kind & 1)
        if is_cat:
            if not (threshold[node].is_integer() and 0 <= threshold[node] < num_cat):
                problems.append(
                    f"{where}: categorical split {node} has threshold {threshold[node]}"
                )
        elif math.isnan(threshold[node]):
            # +inf is legitimate: LightGBM splits "missing vs. present" at threshold=inf.
            problems.append(f"{where}: NaN threshold")
        if categorical_idx is not None and is_cat != (feature in categorical_idx):
            what = "categorical" if is_cat else "numerical"
            problems.append(f"{where}: {what} split on feature {feature}")
        if len(problems) > _MAX_PROBLEMS:
            return problems
    # Topology: node 0 is the root; every other node and every leaf has exactly one parent
    # (leaf j is written as ~j), and everything is reachable from the root. A cycle reachable
    # from the root gives some node a second parent; any other cycle is unreachable.
    seen_nodes: set[int] = set()
    seen_leaves: set[int] = set()
    for child in (*left, *right):
        if child >= 0:
            if not 0 < child < n or child in seen_nodes:
                return [*problems, f"{where}: bad tree structure (child {child})"]
            seen_nodes.add(child)
        else:
            leaf = ~child
            if not 0 <= leaf < num_leaves or leaf in seen_leaves:
                return [*problems, f"{where}: bad tree structure (leaf {leaf})"]
            seen_leaves.add(leaf)
    reached, stack = 0, [0]
    while stack:
        node = stack.pop()
        reached += 1
        if reached > n:
            break
        stack.extend(c for c in (left[node], right[node]) if c >= 0)
    if reached != n or len(seen_leaves) != num_leaves:
        problems.append(f"{where}: bad tree structure (not a tree rooted at node 0)")
    return problems


def _tree_sizes_match(value: str, trees: Sequence[ParsedTree]) -> bool:
    """Whether a ``tree_sizes`` header gives each tree's exact block size, in order."""
    tokens = value.split(" ") if value else []
    return len(tokens) == len(trees) and all(
        _SIZE_TOKEN.fullmatch(t) and int(t) == tree.size
        for t, tree in zip(tokens, trees, strict=True)
    )


def leaf_bound(
    objective: Objective, learning_rate: float, num_class: int, label_span: float = 0.0
) -> float:
    """A generous but finite bound on |leaf value| of a genuine update, for
    ``check_update(max_abs_leaf=...)``.

    LightGBM stores every leaf (and internal) value after shrinkage: the Newton step
    ``η · (−G / (H + λ))`` of the rows in the leaf (G, H: sums of their gradients and
    hessians, λ: ``lambda_l2``). Updates are fitted from the running scores as init score,
    so LightGBM adds no base score to them (a tree without any split is all zeros).

    * ``binary`` / ``multiclass`` (log loss): returns ``η · 100``. The gradients p − y lie
      in [−1, 1], but the hessians p(1 − p) can be tiny, so only ``min_sum_hessian_in_leaf``
      limits the step and no exact bound exists. 100 raw-score units per tree is plenty: the
      sigmoid (and the softmax of a logit gap) of ±37 already rounds to exactly 1 or 0 in
      float64, so a larger step cannot change a probability any further. A genuine leaf
      gets near the bound only when all its rows are confidently wrong (p < ~1 % for
      their label) and the hessian sum is tiny; such an update is rejected too.
    * ``regression`` (L2): the step is the mean residual y − F of the leaf's rows (shrunk
      towards 0 by λ), at most the label span when the running score F stays within the
      label range. Returns ``η · max(100, 4 · label_span)``: 4 × span covers running scores
      that overshoot, 100 is a floor for tiny spans. ``label_span`` = max(y) − min(y) over
      the training rows must come from the caller; left at 0 the bound (``100 · η``) only
      suits labels that span at most 25.

    ``learning_rate`` is the spec's rate η: in ``lr_scaled`` aggregation parties train with
    smaller rates, for which the bound stays valid. ``num_class`` is checked against the
    objective but does not change the bound. Raises :class:`ValueError` on a non-positive or
    non-finite learning rate or a negative or non-finite label span.
    """
    check_task(objective, num_class)
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be positive and finite, got {learning_rate}")
    if not (math.isfinite(label_span) and label_span >= 0):
        raise ValueError(f"label_span must be >= 0 and finite, got {label_span}")
    if objective == "regression":
        return learning_rate * max(100.0, 4.0 * label_span)
    return learning_rate * 100.0


def expected_objective_line(objective: Objective, num_class: int) -> str:
    if objective == "binary":
        return "binary sigmoid:1"
    if objective == "multiclass":
        return f"multiclass num_class:{num_class}"
    return "regression"


def check_task(objective: Objective, num_class: int) -> None:
    if objective == "multiclass" and num_class < 2:
        raise ValueError(f"multiclass needs num_class >= 2, got {num_class}")
    if objective != "multiclass" and num_class != 1:
        raise ValueError(f"{objective} has one raw-score column: num_class must be 1")


def check_update(
    model_text: str,
    *,
    feature_names: Sequence[str],
    objective: Objective,
    num_class: int,
    trees_per_round: int,
    categorical: Sequence[str] | None = None,
    max_abs_leaf: float | None = None,
) -> list[str]:
    """Problems with a party's update; an empty list means it may join the ensemble.

    Checks, in order: the number of ``Tree=`` lines is at most ``trees_per_round ×
    num_class`` (counted before anything is parsed); the text parses as a LightGBM text
    model laid out as LightGBM writes it (see :func:`parse_model_text`); header (objective
    line, ``num_class``, ``num_tree_per_iteration``, feature names in order, one
    ``feature_infos`` entry per feature, no ``average_output``); the number of trees is a
    positive multiple of ``num_class`` and at most the limit (LightGBM stops early when no
    split is possible, so fewer is legitimate); every tree is well formed (``num_leaves`` at
    most :data:`MAX_NUM_LEAVES`, array lengths, numbers as LightGBM writes them, child
    indices form a tree rooted at node 0, split features in range, categorical splits only
    on ``categorical`` features when given) with finite leaf and internal values, within
    ``±max_abs_leaf`` when given (see :func:`leaf_bound`), and non-NaN thresholds (LightGBM
    itself writes ``inf`` for a missing-vs-present split); a ``tree_sizes`` header, when
    present, gives each tree's exact block size in bytes (a wrong one aborts LightGBM's
    loader); and finally that LightGBM loads it (via :func:`load_booster`) with the same
    trees and feature names. LightGBM is called only when every other check passed.

    Never raises on any ``model_text``: problems come back as a list (at most about 20
    entries). Raises :class:`ValueError` only for inconsistent arguments (``objective`` vs.
    ``num_class``, a non-positive or non-finite ``max_abs_leaf``).
    """
    check_task(objective, num_class)
    if max_abs_leaf is not None and not (math.isfinite(max_abs_leaf) and max_abs_leaf > 0):
        raise ValueError(f"max_abs_leaf must be positive and finite, got {max_abs_leaf}")
    try:
        problems, n_trees = _text_problems(
            model_text,
            feature_names=feature_names,
            objective=objective,
            num_class=num_class,
            trees_per_round=trees_per_round,
            categorical=categorical,
            max_abs_leaf=max_abs_leaf,
        )
    except Exception:  # fail closed: an update we could not check is not accepted
        logger.exception("check_update failed on an update; treating it as rejected")
        return ["the update could not be checked (internal error); rejected"]
    if problems:
        if len(problems) > _MAX_PROBLEMS:
            rest = len(problems) - _MAX_PROBLEMS
            problems = [*problems[:_MAX_PROBLEMS], f"... and {rest} more problem(s)"]
        return problems
    try:
        booster = load_booster(model_text)
    except Exception as exc:
        return [f"LightGBM cannot load the model: {exc}".strip()]
    if booster.num_trees() != n_trees:
        problems.append(f"LightGBM sees {booster.num_trees()} trees, the text has {n_trees}")
    if booster.feature_name() != list(feature_names):
        problems.append("LightGBM reads different feature names")
    return problems


def _text_problems(
    model_text: str,
    *,
    feature_names: Sequence[str],
    objective: Objective,
    num_class: int,
    trees_per_round: int,
    categorical: Sequence[str] | None,
    max_abs_leaf: float | None,
) -> tuple[list[str], int]:
    """Everything :func:`check_update` checks before LightGBM sees the text, and the
    number of trees parsed."""
    limit = trees_per_round * num_class
    expected = f"expected a positive multiple of {num_class} up to {limit}"
    if isinstance(model_text, str):
        tree_lines = model_text.count("\nTree=")
        if tree_lines > limit:  # reject before parsing (and allocating) them all
            return [f"{tree_lines} trees; {expected}"], tree_lines
    try:
        parsed = parse_model_text(model_text)
    except ModelTextError as exc:
        return [f"not a LightGBM text model: {exc}"], 0
    header = parsed.header
    problems: list[str] = []
    want_objective = expected_objective_line(objective, num_class)
    if header.get("objective") != want_objective:
        got = header.get("objective")
        shown = got if got is None else got[:60]
        problems.append(f"objective is {shown!r}, expected {want_objective!r}")
    for key in ("num_class", "num_tree_per_iteration"):
        if header.get(key) != str(num_class):
            got = header.get(key)
            shown = got if got is None else got[:60]
            problems.append(f"{key} is {shown!r}, expected {num_class}")
    if "average_output" in header:
        problems.append("random-forest models (average_output) are not supported")
    names = header.get("feature_names", "").split()
    if names != list(feature_names):
        problems.append(_name_problem(names, list(feature_names)))
    if header.get("max_feature_idx") != str(len(feature_names) - 1):
        problems.append(f"max_feature_idx is {(header.get('max_feature_idx') or '')[:60]!r}")
    if len(header.get("feature_infos", "").split()) != len(feature_names):
        problems.append("feature_infos does not have one entry per feature")
    n_trees = len(parsed.trees)
    if n_trees == 0 or n_trees % num_class or n_trees > limit:
        problems.append(f"{n_trees} trees; {expected}")
    cat_idx = None
    if categorical is not None:
        index = {name: i for i, name in enumerate(feature_names)}
        cat_idx = {index[c] for c in categorical if c in index}
    for tree in parsed.trees:
        problems.extend(_tree_problems(tree, len(feature_names), cat_idx, max_abs_leaf))
    sizes = header.get("tree_sizes")
    if sizes is not None and not _tree_sizes_match(sizes, parsed.trees):
        problems.append("tree_sizes does not match the trees")
    return problems, n_trees


def _name_problem(got: list[str], want: list[str]) -> str:
    if sorted(got) == sorted(want):
        return "feature names are in a different order"
    missing = [n for n in want if n not in got][:5]
    extra = [n for n in got if n not in want][:5]
    return f"feature names differ (missing {missing}, unexpected {extra})"


def _strip_tree_sizes(text: str) -> str:
    return re.sub(r"^tree_sizes=.*\n", "", text, count=1, flags=re.MULTILINE)


@functools.lru_cache(maxsize=256)
def load_booster(model_text: str) -> lgb.Booster:
    """A LightGBM booster from a text model (cached; ``tree_sizes`` dropped, see module doc).

    Call only on texts that passed :func:`check_update`.
    """
    return lgb.Booster(model_str=_strip_tree_sizes(model_text))


def count_trees(model_text: str) -> int:
    return len(re.findall(r"^Tree=\d+$", model_text, flags=re.MULTILINE))


# --------------------------------------------------------------------------------------
# Merging weighted models into one native LightGBM model
# --------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return repr(float(value))


def _scaled(values: str, weight: float, offset: float) -> str:
    if not values.strip():
        return values
    return " ".join(_fmt(float(v) * weight + offset) for v in values.split())


def _merge_infos(infos: Sequence[str]) -> str:
    """Union of per-party ``feature_infos`` entries of one feature."""
    lows: list[float] = []
    highs: list[float] = []
    cats: list[str] = []
    for info in infos:
        if info == "none":
            continue
        if info.startswith("["):
            low, _, high = info[1:-1].partition(":")
            lows.append(float(low))
            highs.append(float(high))
        else:
            cats.extend(c for c in info.split(":") if c not in cats)
    if lows and not cats:
        return f"[{_fmt(min(lows))}:{_fmt(max(highs))}]"
    if cats and not lows:
        return ":".join(cats)
    return "none"


def _tree_block(index: int, fields: Mapping[str, str]) -> str:
    body = "".join(f"{k}={v}\n" for k, v in fields.items())
    return f"Tree={index}\n{body}\n\n"


def _constant_tree(value: float) -> dict[str, str]:
    empty = ("split_feature", "split_gain", "threshold", "decision_type", "left_child")
    fields = {"num_leaves": "1", "num_cat": "0"}
    fields.update(dict.fromkeys(empty, ""))
    fields.update(
        {
            "right_child": "",
            "leaf_value": _fmt(value),
            "leaf_weight": "",
            "leaf_count": "0",
            "internal_value": "",
            "internal_weight": "",
            "internal_count": "",
            "is_linear": "0",
            "shrinkage": "1",
        }
    )
    return fields


def merge_model_texts(
    members: Sequence[tuple[str, float, str]],
    *,
    base_score: Sequence[float],
    objective: Objective,
    num_class: int,
    feature_names: Sequence[str],
    categorical: Sequence[str],
) -> str:
    """One native LightGBM text model whose raw prediction is
    ``base_score + Σ weight · member(x)`` over the ``(party, weight, model text)`` members.

    All trees of all members are concatenated in the given order; each tree's
    ``leaf_value`` and ``internal_value`` are multiplied by its member weight; the base score
    of class c is added to every leaf (and internal value) of tree c, the first tree of that
    class. Each member holds whole iterations (a multiple of ``num_class`` trees, checked by
    :func:`check_update`), so LightGBM's iteration-major class interleaving (tree i belongs to
    class i % num_class) survives concatenation. ``Tree=i`` is renumbered, ``tree_sizes`` is
    recomputed, ``feature_infos`` is the union over members, and the tail gets split-count
    feature importances and a minimal parameters section. Without members the model is one
    constant tree per class.
    """
    k = num_class
    names = list(feature_names)
    infos: list[list[str]] = [[] for _ in names]
    blocks: list[str] = []
    splits = [0] * len(names)
    for party, weight, text in members:
        parsed = parse_model_text(text)
        if len(parsed.trees) % k:
            raise ModelTextError(f"update of {party}: {len(parsed.trees)} trees, K={k}")
        for j, info in enumerate(parsed.header.get("feature_infos", "").split()):
            if j < len(infos):
                infos[j].append(info)
        for tree in parsed.trees:
            i = len(blocks)
            offset = base_score[i] if i < k else 0.0
            fields = dict(tree.fields)
            fields["leaf_value"] = _scaled(fields["leaf_value"], weight, offset)
            if "internal_value" in fields:
                fields["internal_value"] = _scaled(fields["internal_value"], weight, offset)
            for f in fields.get("split_feature", "").split():
                splits[int(f)] += 1
            blocks.append(_tree_block(i, fields))
    if not blocks:  # base score only: one constant tree per class
        blocks = [_tree_block(c, _constant_tree(base_score[c])) for c in range(k)]
    header = [
        "tree",
        "version=v4",
        f"num_class={k}",
        f"num_tree_per_iteration={k}",
        "label_index=0",
        f"max_feature_idx={len(names) - 1}",
        f"objective={expected_objective_line(objective, k)}",
        f"feature_names={' '.join(names)}",
        f"feature_infos={' '.join(_merge_infos(v) for v in infos)}",
        f"tree_sizes={' '.join(str(len(b.encode())) for b in blocks)}",
    ]
    order = sorted(range(len(names)), key=lambda j: -splits[j])
    importances = "".join(f"{names[j]}={splits[j]}\n" for j in order if splits[j])
    params = [
        "[boosting: gbdt]",
        f"[objective: {LGB_OBJECTIVE[objective]}]",
        f"[num_class: {k}]",
    ]
    if categorical:
        index = {n: i for i, n in enumerate(names)}
        cats = ",".join(str(index[c]) for c in categorical if c in index)
        params.append(f"[categorical_feature: {cats}]")
    tail = (
        f"\nfeature_importances:\n{importances}\nparameters:\n"
        + "\n".join(params)
        + "\nend of parameters\n\npandas_categorical:null\n"
    )
    return "\n".join(header) + "\n\n" + "".join(blocks) + "end of trees\n" + tail
