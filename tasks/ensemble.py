"""The global federated ensemble: update checks, aggregation weights, prediction and export.

Horizontal federated training grows one *global raw score*::

    F_0(x) = base score                      (one value per class)
    F_t(x) = F_{t-1}(x) + Σ_k w_k · f_k(x)   (f_k: the trees party k fitted in round t)

:class:`GlobalEnsemble` holds exactly that: the base score and, per round, the accepted
``(party, weight, model_text)`` members. Model texts are LightGBM's own text format
(``Booster.model_to_string()``), never pickles. Everything here is pure: no files, no clock.

Aggregation modes (:func:`aggregation_weights`):

* ``samples``   -- every party trains with the spec's learning rate η; w_k = n_k / Σ n.
* ``uniform``   -- every party trains with η; w_k = 1 / K (K = accepted updates this round).
* ``lr_scaled`` -- the NVFlare-bagging variant: party k trains with learning rate
  η · n_k / Σ n (shares over all parties given learning rates, see
  :func:`tasks.training.party_learning_rates`) and the updates are **summed**, w_k = 1.
  With one tree per round this equals ``samples`` (leaf values are linear in the learning
  rate); with several trees per round each party takes smaller local steps. A rejected
  party's update is simply missing from the sum (no renormalisation).

Untrusted model texts can crash or hang LightGBM's C++ loader (a wrong ``tree_sizes`` header
aborts the process; a child index pointing back up the tree makes prediction loop forever),
so :func:`check_update` validates the text structurally in Python *before* LightGBM sees it,
and :func:`load_booster` always drops ``tree_sizes`` so any remaining parse error is raised
as an exception instead of aborting in a parallel section.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import lightgbm as lgb
import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.types import Aggregation, Objective

logger = logging.getLogger(__name__)

#: One accepted update of a round: (party, weight, LightGBM model text).
MemberTuple = tuple[str, float, str]

#: LightGBM objective names by task.
LGB_OBJECTIVE: dict[str, str] = {
    "binary": "binary",
    "multiclass": "multiclass",
    "regression": "regression",
}


class ModelTextError(ValueError):
    """A text is not a LightGBM text model we can safely load."""


class RoundUpdate(BaseModel):
    """What a party sends to the coordinator after local training in one round."""

    model_config = ConfigDict(frozen=True)

    party: str
    round: int = Field(ge=1)
    model_text: str
    n_train: int = Field(ge=0)
    learning_rate: float = Field(gt=0)
    seed: int = 0

    @property
    def sha256(self) -> str:
        return text_sha256(self.model_text)


class GlobalEnsemble(BaseModel):
    """Base score plus, per round, the accepted weighted party updates.

    ``num_class`` is the number of raw-score columns: 1 for binary and regression, K for
    multiclass. ``rounds[t-1]`` is round ``t``; ``metrics[t-1]`` its aggregated validation
    metrics. ``best_round`` (0 = base score only) is what :func:`predict_raw` and
    :func:`export_model` use when no round limit is given; ``None`` means "all rounds".
    """

    model_config = ConfigDict(frozen=True)

    objective: Objective
    num_class: int = Field(ge=1)
    base_score: list[float]
    feature_names: list[str]
    categorical: list[str] = Field(default_factory=list)
    rounds: list[list[MemberTuple]] = Field(default_factory=list)
    metrics: list[dict[str, float]] = Field(default_factory=list)
    best_round: int | None = None
    aggregation: Aggregation = "samples"
    trees_per_round: int = Field(
        default=1, ge=1, description="Update size limit that aggregate/check_update enforce"
    )

    @model_validator(mode="after")
    def _consistent(self) -> GlobalEnsemble:
        check_task(self.objective, self.num_class)
        if len(self.base_score) != self.num_class:
            raise ValueError(
                f"base_score has {len(self.base_score)} values, num_class={self.num_class}"
            )
        unknown = [c for c in self.categorical if c not in self.feature_names]
        if unknown:
            raise ValueError(f"categorical features {unknown} are not in feature_names")
        if not all(math.isfinite(w) for row in self.rounds for _, w, _ in row):
            raise ValueError("non-finite member weight")
        return self

    def with_round(
        self, members: Sequence[MemberTuple], metrics: Mapping[str, float] | None = None
    ) -> GlobalEnsemble:
        """A new ensemble with one more round appended (this one is unchanged)."""
        return self.model_copy(
            update={
                "rounds": [*self.rounds, list(members)],
                "metrics": [*self.metrics, dict(metrics or {})],
            }
        )

    def with_metrics(self, round_: int, metrics: Mapping[str, float]) -> GlobalEnsemble:
        """Set the aggregated metrics of round ``round_`` (1-based)."""
        if not 1 <= round_ <= len(self.rounds):
            raise IndexError(f"no round {round_}; the ensemble has {len(self.rounds)}")
        out = [*self.metrics] + [{} for _ in range(len(self.rounds) - len(self.metrics))]
        out[round_ - 1] = dict(metrics)
        return self.model_copy(update={"metrics": out})

    def resolve_round(self, upto_round: int | None = None) -> int:
        """The number of rounds to use: ``upto_round``, else ``best_round``, else all."""
        if upto_round is None:
            upto_round = len(self.rounds) if self.best_round is None else self.best_round
        if not 0 <= upto_round <= len(self.rounds):
            raise ValueError(f"upto_round={upto_round}; the ensemble has {len(self.rounds)} rounds")
        return upto_round

    def truncated(self, upto_round: int | None = None) -> GlobalEnsemble:
        """Only the first rounds (default: up to the best round)."""
        r = self.resolve_round(upto_round)
        return self.model_copy(
            update={
                "rounds": self.rounds[:r],
                "metrics": self.metrics[:r],
                "best_round": None if self.best_round is None else min(self.best_round, r),
            }
        )


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ensemble_manifest(ensemble: GlobalEnsemble) -> tuple[dict[str, Any], dict[str, str]]:
    """Split an ensemble into a JSON manifest (texts replaced by sha256) and the texts.

    The storage layer writes each text once under its hash; :func:`ensemble_from_manifest`
    reverses this and verifies every hash.
    """
    body = ensemble.model_dump(mode="json")
    texts: dict[str, str] = {}
    rounds: list[list[list[Any]]] = []
    for members in ensemble.rounds:
        row: list[list[Any]] = []
        for party, weight, text in members:
            digest = text_sha256(text)
            texts[digest] = text
            row.append([party, weight, digest])
        rounds.append(row)
    body["rounds"] = rounds
    body["model_texts"] = "sha256"
    return body, texts


def ensemble_from_manifest(manifest: Mapping[str, Any], texts: Mapping[str, str]) -> GlobalEnsemble:
    body = {k: v for k, v in manifest.items() if k != "model_texts"}
    rounds: list[list[MemberTuple]] = []
    for members in manifest["rounds"]:
        row: list[MemberTuple] = []
        for party, weight, digest in members:
            text = texts[digest]
            if text_sha256(text) != digest:
                raise ValueError(f"model text of party {party!r} does not match its hash {digest}")
            row.append((party, float(weight), text))
        rounds.append(row)
    body["rounds"] = rounds
    return GlobalEnsemble.model_validate(body)


# --------------------------------------------------------------------------------------
# Aggregation weights
# --------------------------------------------------------------------------------------


def aggregation_weights(n_train: Mapping[str, int], mode: Aggregation) -> dict[str, float]:
    """Weights w_k of the accepted updates of one round (see the module docstring)."""
    if not n_train:
        raise ValueError("no updates to weight")
    if any(n < 0 for n in n_train.values()):
        raise ValueError(f"negative sample counts: {dict(n_train)}")
    if mode == "samples":
        total = sum(n_train.values())
        if total <= 0:
            raise ValueError("sample-weighted aggregation needs at least one training row")
        return {p: n / total for p, n in n_train.items()}
    if mode == "uniform":
        return {p: 1.0 / len(n_train) for p in n_train}
    if mode == "lr_scaled":
        return dict.fromkeys(n_train, 1.0)
    raise ValueError(f"unknown aggregation mode {mode!r}")


# --------------------------------------------------------------------------------------
# LightGBM model text: parsing and checks
# --------------------------------------------------------------------------------------


@dataclass
class ParsedTree:
    index: int
    fields: dict[str, str]


@dataclass
class ParsedModel:
    header: dict[str, str]
    trees: list[ParsedTree] = field(default_factory=list)
    tail: str = ""


_TREE_LINE = re.compile(r"^Tree=(\d+)$")


def parse_model_text(text: str) -> ParsedModel:
    """Split a LightGBM text model into header, trees (key=value fields) and tail.

    Raises :class:`ModelTextError` on anything that is not laid out like LightGBM writes it.
    """
    if not isinstance(text, str) or not text.strip():
        raise ModelTextError("empty model text")
    lines = text.replace("\r\n", "\n").split("\n")
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
        key, sep, value = line.partition("=")
        if not sep:
            raise ModelTextError(f"header line without '=': {line[:60]!r}")
        if key in header:
            raise ModelTextError(f"header key {key!r} appears twice")
        header[key] = value
    trees: list[ParsedTree] = []
    while i < len(lines) and lines[i] != "end of trees":
        line = lines[i]
        match = _TREE_LINE.match(line)
        if match is None:
            if not line.strip():
                i += 1
                continue
            raise ModelTextError(f"expected 'Tree=<i>' or 'end of trees', got {line[:60]!r}")
        index = int(match.group(1))
        if index != len(trees):
            raise ModelTextError(f"tree numbering: expected Tree={len(trees)}, got Tree={index}")
        i += 1
        fields: dict[str, str] = {}
        while i < len(lines) and lines[i].strip():
            key, sep, value = lines[i].partition("=")
            if not sep:
                raise ModelTextError(f"Tree={index}: line without '=': {lines[i][:60]!r}")
            if key in fields:
                raise ModelTextError(f"Tree={index}: key {key!r} appears twice")
            fields[key] = value
            i += 1
        trees.append(ParsedTree(index=index, fields=fields))
    if i >= len(lines):
        raise ModelTextError("no 'end of trees' line (truncated model?)")
    tail = "\n".join(lines[i + 1 :])
    return ParsedModel(header=header, trees=trees, tail=tail)


def _numbers(tree: ParsedTree, key: str, count: int, kind: type[float] | type[int]) -> list[Any]:
    raw = tree.fields.get(key)
    if raw is None:
        raise ModelTextError(f"Tree={tree.index}: no {key}")
    tokens = raw.split()
    if len(tokens) != count:
        raise ModelTextError(f"Tree={tree.index}: {key} has {len(tokens)} values, expected {count}")
    try:
        return [kind(t) for t in tokens]
    except ValueError:
        raise ModelTextError(f"Tree={tree.index}: {key} has a non-{kind.__name__} value") from None


def _tree_problems(
    tree: ParsedTree, n_features: int, categorical_idx: set[int] | None
) -> list[str]:
    """Structural checks that keep LightGBM's loader and predictor safe, plus finiteness."""
    where = f"Tree={tree.index}"
    try:
        num_leaves = int(tree.fields.get("num_leaves", ""))
        num_cat = int(tree.fields.get("num_cat", "0"))
    except ValueError:
        return [f"{where}: num_leaves/num_cat is not an integer"]
    if num_leaves < 1 or num_cat < 0:
        return [f"{where}: num_leaves={num_leaves}, num_cat={num_cat}"]
    if tree.fields.get("is_linear", "0") != "0":
        return [f"{where}: linear trees are not supported"]
    problems: list[str] = []
    try:
        leaves = _numbers(tree, "leaf_value", num_leaves, float)
        if not all(math.isfinite(v) for v in leaves):
            problems.append(f"{where}: non-finite leaf value")
        float(tree.fields.get("shrinkage", "1"))
        if num_leaves == 1:
            return problems
        n = num_leaves - 1
        split_feature = _numbers(tree, "split_feature", n, int)
        threshold = _numbers(tree, "threshold", n, float)
        decision = _numbers(tree, "decision_type", n, int)
        left = _numbers(tree, "left_child", n, int)
        right = _numbers(tree, "right_child", n, int)
        for key, count, kind in (
            ("split_gain", n, float),
            ("internal_value", n, float),
            ("internal_weight", n, float),
            ("internal_count", n, int),
            ("leaf_weight", num_leaves, float),
            ("leaf_count", num_leaves, int),
        ):
            if tree.fields.get(key, "").strip():
                _numbers(tree, key, count, kind)
        if num_cat > 0:
            bounds = _numbers(tree, "cat_boundaries", num_cat + 1, int)
            cat_threshold = tree.fields.get("cat_threshold", "").split()
            if (
                bounds[0] != 0
                or any(b > a for b, a in itertools.pairwise(bounds))
                or bounds[-1] != len(cat_threshold)
                or not all(t.isdigit() and int(t) < 2**32 for t in cat_threshold)
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
    # Topology: node 0 is the root; every other node and every leaf has exactly one parent
    # (leaf j is written as ~j), and everything is reachable from the root (no cycles).
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
) -> list[str]:
    """Problems with a party's update; an empty list means it may join the ensemble.

    Checks, in order: the text parses as a LightGBM text model laid out as LightGBM writes it;
    header (objective line, ``num_class``, ``num_tree_per_iteration``, feature names in order,
    one ``feature_infos`` entry per feature, no ``average_output``); the number of trees is a
    positive multiple of ``num_class`` and at most ``trees_per_round × num_class`` (LightGBM
    stops early when no split is possible, so fewer is legitimate); every tree is well formed
    (array lengths, child indices form a tree, split features in range, categorical splits
    only on ``categorical`` features when given) with finite leaf values and non-NaN
    thresholds (LightGBM itself writes ``inf`` for a missing-vs-present split); and finally
    that LightGBM loads it with the same trees and feature names.
    """
    check_task(objective, num_class)
    try:
        parsed = parse_model_text(model_text)
    except ModelTextError as exc:
        return [f"not a LightGBM text model: {exc}"]
    header = parsed.header
    problems: list[str] = []
    want_objective = expected_objective_line(objective, num_class)
    if header.get("objective") != want_objective:
        problems.append(f"objective is {header.get('objective')!r}, expected {want_objective!r}")
    for key in ("num_class", "num_tree_per_iteration"):
        if header.get(key) != str(num_class):
            problems.append(f"{key} is {header.get(key)!r}, expected {num_class}")
    if "average_output" in header:
        problems.append("random-forest models (average_output) are not supported")
    names = header.get("feature_names", "").split()
    if names != list(feature_names):
        problems.append(_name_problem(names, list(feature_names)))
    if header.get("max_feature_idx") != str(len(feature_names) - 1):
        problems.append(f"max_feature_idx is {header.get('max_feature_idx')!r}")
    if len(header.get("feature_infos", "").split()) != len(feature_names):
        problems.append("feature_infos does not have one entry per feature")
    n_trees = len(parsed.trees)
    limit = trees_per_round * num_class
    if n_trees == 0 or n_trees % num_class or n_trees > limit:
        problems.append(
            f"{n_trees} trees; expected a positive multiple of {num_class} up to {limit}"
        )
    cat_idx = None
    if categorical is not None:
        index = {name: i for i, name in enumerate(feature_names)}
        cat_idx = {index[c] for c in categorical if c in index}
    for tree in parsed.trees:
        problems.extend(_tree_problems(tree, len(feature_names), cat_idx))
    if problems:
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


# --------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------


def feature_matrix(X: pl.DataFrame | np.ndarray, feature_names: Sequence[str]) -> np.ndarray:
    """Float64 matrix in the ensemble's feature order; nulls become NaN (missing)."""
    if isinstance(X, pl.DataFrame):
        missing = [c for c in feature_names if c not in X.columns]
        if missing:
            raise ValueError(f"frame lacks feature columns {missing[:5]}")
        return X.select(pl.col(c).cast(pl.Float64) for c in feature_names).to_numpy()
    matrix = np.asarray(X, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(feature_names):
        raise ValueError(f"expected a (n, {len(feature_names)}) matrix, got {matrix.shape}")
    return matrix


def _shape(raw: np.ndarray, n: int, num_class: int) -> np.ndarray:
    return raw.reshape(n) if num_class == 1 else raw.reshape(n, num_class)


def member_raw(model_text: str, X: np.ndarray, num_class: int) -> np.ndarray:
    """Raw score of one update's trees alone (no base score).

    Single-threaded, like the local fits: a round predicts many small updates, and OpenMP
    threads per call made that 1.5-2x slower on a busy 2-core machine (bench_federated).
    """
    booster = load_booster(model_text)
    raw = np.asarray(booster.predict(X, raw_score=True, num_threads=1), dtype=np.float64)
    return _shape(raw, X.shape[0], num_class)


def round_increment(members: Sequence[MemberTuple], X: np.ndarray, num_class: int) -> np.ndarray:
    """Σ_k w_k f_k(X): what one round adds to every raw score."""
    total = np.zeros((X.shape[0], num_class) if num_class > 1 else X.shape[0])
    for _party, weight, text in members:
        total += weight * member_raw(text, X, num_class)
    return total


def predict_raw(
    ensemble: GlobalEnsemble, X: pl.DataFrame | np.ndarray, *, upto_round: int | None = None
) -> np.ndarray:
    """Raw scores F_r(X): shape (n,) for binary/regression, (n, K) for multiclass.

    ``upto_round`` defaults to the ensemble's best round, else all rounds.
    """
    matrix = feature_matrix(X, ensemble.feature_names)
    r = ensemble.resolve_round(upto_round)
    base = np.asarray(ensemble.base_score, dtype=np.float64)
    out = np.tile(base, (matrix.shape[0], 1))
    out = _shape(out, matrix.shape[0], ensemble.num_class)
    for members in ensemble.rounds[:r]:
        out = out + round_increment(members, matrix, ensemble.num_class)
    return out


class EnsembleSize(NamedTuple):
    trees: int
    bytes: int


def count_trees(model_text: str) -> int:
    return len(re.findall(r"^Tree=\d+$", model_text, flags=re.MULTILINE))


def ensemble_size(ensemble: GlobalEnsemble, *, upto_round: int | None = None) -> EnsembleSize:
    """LightGBM trees (all classes) and model-text bytes in the first rounds (default: all)."""
    r = len(ensemble.rounds) if upto_round is None else ensemble.resolve_round(upto_round)
    members = [m for row in ensemble.rounds[:r] for m in row]
    return EnsembleSize(
        trees=sum(count_trees(text) for _, _, text in members),
        bytes=sum(len(text.encode()) for _, _, text in members),
    )


# --------------------------------------------------------------------------------------
# Export as one native LightGBM model
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


def export_model(ensemble: GlobalEnsemble, *, upto_round: int | None = None) -> str:
    """One native LightGBM text model whose raw predictions equal :func:`predict_raw`.

    All trees of all rounds and parties are concatenated in round/party order; each tree's
    ``leaf_value`` and ``internal_value`` are multiplied by its member weight; the base score
    of class c is added to every leaf (and internal value) of tree c, the first tree of that
    class. Each update holds whole iterations (a multiple of ``num_class`` trees, checked by
    :func:`check_update`), so LightGBM's iteration-major class interleaving (tree i belongs to
    class i % num_class) survives concatenation. ``Tree=i`` is renumbered, ``tree_sizes`` is
    recomputed, ``feature_infos`` is the union over parties, and the tail gets split-count
    feature importances and a minimal parameters section.
    """
    r = ensemble.resolve_round(upto_round)
    k = ensemble.num_class
    names = ensemble.feature_names
    infos: list[list[str]] = [[] for _ in names]
    blocks: list[str] = []
    splits = [0] * len(names)
    for members in ensemble.rounds[:r]:
        for party, weight, text in members:
            parsed = parse_model_text(text)
            if len(parsed.trees) % k:
                raise ModelTextError(f"update of {party}: {len(parsed.trees)} trees, K={k}")
            for j, info in enumerate(parsed.header.get("feature_infos", "").split()):
                if j < len(infos):
                    infos[j].append(info)
            for tree in parsed.trees:
                i = len(blocks)
                offset = ensemble.base_score[i] if i < k else 0.0
                fields = dict(tree.fields)
                fields["leaf_value"] = _scaled(fields["leaf_value"], weight, offset)
                if "internal_value" in fields:
                    fields["internal_value"] = _scaled(fields["internal_value"], weight, offset)
                for f in fields.get("split_feature", "").split():
                    splits[int(f)] += 1
                blocks.append(_tree_block(i, fields))
    if not blocks:  # base score only: one constant tree per class
        blocks = [_tree_block(c, _constant_tree(ensemble.base_score[c])) for c in range(k)]
    header = [
        "tree",
        "version=v4",
        f"num_class={k}",
        f"num_tree_per_iteration={k}",
        "label_index=0",
        f"max_feature_idx={len(names) - 1}",
        f"objective={expected_objective_line(ensemble.objective, k)}",
        f"feature_names={' '.join(names)}",
        f"feature_infos={' '.join(_merge_infos(v) for v in infos)}",
        f"tree_sizes={' '.join(str(len(b.encode())) for b in blocks)}",
    ]
    order = sorted(range(len(names)), key=lambda j: -splits[j])
    importances = "".join(f"{names[j]}={splits[j]}\n" for j in order if splits[j])
    params = [
        "[boosting: gbdt]",
        f"[objective: {LGB_OBJECTIVE[ensemble.objective]}]",
        f"[num_class: {k}]",
    ]
    if ensemble.categorical:
        index = {n: i for i, n in enumerate(names)}
        cats = ",".join(str(index[c]) for c in ensemble.categorical if c in index)
        params.append(f"[categorical_feature: {cats}]")
    tail = (
        f"\nfeature_importances:\n{importances}\nparameters:\n"
        + "\n".join(params)
        + "\nend of parameters\n\npandas_categorical:null\n"
    )
    return "\n".join(header) + "\n\n" + "".join(blocks) + "end of trees\n" + tail
