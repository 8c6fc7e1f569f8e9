"""LightGBM model text: parse and check untrusted updates (real and corrupted texts), the
leaf bound, and reading an update back from the store verified."""

from __future__ import annotations

import functools
import itertools
import math
import random
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import lightgbm as lgb
import numpy as np
import pytest

import tasks.horizontal.ensemble as ensemble_module
import tasks.horizontal.model_text as model_text_module
from storage.store import FileRef, Store, UnverifiedError, read_verified_text
from tasks.horizontal.ensemble import (
    GlobalEnsemble,
    export_model,
    predict_raw,
)
from tasks.horizontal.model_text import check_update, count_trees, leaf_bound, parse_model_text
from tasks.horizontal.training import lgb_params, train_update
from tasks.prepare.design import FeatureSchema
from tasks.report import importance_by_party_modality
from tasks.types import Objective
from tests.test_ensemble import CATEGORICAL, NAMES, SPEC, _data

# --------------------------------------------------------------------------------------
# check_update
# --------------------------------------------------------------------------------------


def _update(objective: Objective = "binary", trees: int = 2) -> str:
    k = 3 if objective == "multiclass" else 1
    x, y = _data(objective, n=400)
    init = np.zeros((len(y), k)) if k > 1 else np.zeros(len(y))
    params = lgb_params(SPEC, objective, k, seed=0)
    return train_update(x, y, init, params, trees, CATEGORICAL, feature_names=NAMES)


def _check(text: str, objective: Objective = "binary", trees_per_round: int = 2) -> list[str]:
    return check_update(
        text,
        feature_names=NAMES,
        objective=objective,
        num_class=3 if objective == "multiclass" else 1,
        trees_per_round=trees_per_round,
        categorical=CATEGORICAL,
    )


@pytest.mark.parametrize("objective", ["binary", "multiclass", "regression"])
def test_check_update_accepts_a_genuine_update(objective: Objective) -> None:
    assert _check(_update(objective), objective) == []


def _first(pattern: str, repl: str, text: str) -> str:
    out, n = re.subn(pattern, repl, text, count=1, flags=re.MULTILINE)
    assert n == 1
    return out


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: "garbage", "not a LightGBM text model"),
        (lambda t: "", "empty model text"),
        (lambda t: t[: len(t) // 3], "truncated"),
        (lambda t: t.replace("num_a num_b", "num_b num_a", 1), "different order"),
        (lambda t: t.replace("num_a", "other", 1), "feature names differ"),
        (lambda t: _first(r"^(leaf_value=)\S+", r"\g<1>nan", t), "non-finite leaf value"),
        (lambda t: _first(r"^(leaf_value=)\S+", r"\g<1>inf", t), "non-finite leaf value"),
        (lambda t: _first(r"^(leaf_value=)\S+", r"\g<1>-inf", t), "non-finite leaf value"),
        (lambda t: _first(r"^(leaf_value=)", r"\g<1>0.5 ", t), "leaf_value has"),
        (lambda t: _first(r"^(left_child=)\S+", r"\g<1>0", t), "bad tree structure"),
        (lambda t: _first(r"^(split_feature=)\S+", r"\g<1>17", t), "split on feature index 17"),
        (lambda t: _first(r"^(is_linear=)0", r"\g<1>1", t), "linear trees"),
    ],
)
def test_check_update_catches(edit: object, expected: str) -> None:
    text = _update()
    assert callable(edit)
    problems = _check(edit(text))
    assert problems, "the edited model was accepted"
    assert any(expected in p for p in problems), problems


def test_check_update_catches_wrong_objective_and_class_count() -> None:
    regression = _update("regression")
    assert any("objective is 'regression'" in p for p in _check(regression, "binary"))
    multi = _update("multiclass")
    problems = check_update(
        multi, feature_names=NAMES, objective="multiclass", num_class=4, trees_per_round=2
    )
    assert any("num_class" in p for p in problems)
    with pytest.raises(ValueError, match="num_class must be 1"):
        check_update(multi, feature_names=NAMES, objective="binary", num_class=3, trees_per_round=2)


def test_check_update_tree_count() -> None:
    text = _update(trees=3)
    assert any("3 trees" in p for p in _check(text, trees_per_round=2))
    assert _check(text, trees_per_round=3) == []
    assert _check(_update(trees=1), trees_per_round=2) == []  # LightGBM may stop early
    no_trees = re.sub(r"^Tree=\d+\n(?:.+\n)*\n*", "", text, flags=re.MULTILINE)
    assert count_trees(no_trees) == 0
    assert any("0 trees" in p for p in _check(no_trees))


def test_check_update_accepts_inf_threshold_but_not_nan() -> None:
    """LightGBM splits "present vs. missing" at threshold=inf: a genuine update has it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (rng.random(400) < 0.5).astype(np.float64)
    x[y == 1, 0] = np.nan  # missingness is the signal
    params = lgb_params(SPEC, "binary", 1, seed=0)
    text = train_update(x, y, np.zeros(400), params, 1, [], feature_names=["a", "b"])
    assert re.search(r"^threshold=inf$", text, flags=re.MULTILINE)
    kw = {"feature_names": ["a", "b"], "objective": "binary", "num_class": 1, "trees_per_round": 1}
    assert check_update(text, **kw) == []  # type: ignore[arg-type]
    nan = text.replace("threshold=inf", "threshold=nan")
    assert any("NaN threshold" in p for p in check_update(nan, **kw))  # type: ignore[arg-type]


def test_check_update_rejects_categorical_split_on_numeric_feature() -> None:
    text = _update()
    renamed = text.replace("cat_x", "zzz").replace("num_a", "cat_x").replace("zzz", "num_a")
    names = ["cat_x", "num_b", "num_c", "num_d", "num_a", "cat_y"]
    problems = check_update(
        renamed,
        feature_names=names,
        objective="binary",
        num_class=1,
        trees_per_round=2,
        categorical=["cat_x", "cat_y"],
    )
    assert any("split on feature" in p for p in problems)


# --------------------------------------------------------------------------------------
# Corrupt updates: every kind is built from a real lgb.train model text
# --------------------------------------------------------------------------------------


@functools.cache
def _real(objective: Objective = "binary", trees: int = 2) -> str:
    """A real model text from lgb.train (cached: the corrupt cases only edit copies)."""
    return _update(objective, trees)


def _header_sizes(text: str) -> list[int]:
    match = re.search(r"^tree_sizes=(.*)$", text, flags=re.MULTILINE)
    assert match is not None
    return [int(s) for s in match.group(1).split()]


def _lightgbm_block_sizes(text: str) -> list[int]:
    """Byte lengths of the tree blocks, found independently of tasks.horizontal.model_text: from each
    'Tree=' line to the next one or to 'end of trees'."""
    data = text.encode()
    starts = [m.start() for m in re.finditer(rb"^Tree=\d+\r?$", data, flags=re.MULTILINE)]
    starts.append(data.index(b"end of trees"))
    return [b - a for a, b in itertools.pairwise(starts)]


def _without_sizes(text: str) -> str:
    """Drop the tree_sizes header (optional for LightGBM), to isolate another corruption."""
    return _first(r"^tree_sizes=.*\n", "", text)


def _with_sizes(text: str, sizes: list[int]) -> str:
    line = "tree_sizes=" + " ".join(map(str, sizes))
    return _first(r"^tree_sizes=[^\r\n]*", line, text)


def _forbid_lightgbm(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on any LightGBM booster (cached or new) raises and is recorded (check_update
    turns exceptions into problems, so the record is what the tests look at)."""
    calls: list[str] = []

    def forbidden(*args: object, **kwargs: object) -> NoReturn:
        calls.append("LightGBM called")
        raise AssertionError("LightGBM was called on a rejected update")

    monkeypatch.setattr(lgb, "Booster", forbidden)
    monkeypatch.setattr(model_text_module, "load_booster", forbidden)
    monkeypatch.setattr(ensemble_module, "load_booster", forbidden)
    return calls


def _rejected(
    text: str, monkeypatch: pytest.MonkeyPatch, objective: Objective = "binary", **kw: Any
) -> list[str]:
    """check_update's problems, with LightGBM forbidden: a rejected text never reaches it."""
    calls = _forbid_lightgbm(monkeypatch)
    problems = check_update(
        text,
        feature_names=NAMES,
        objective=objective,
        num_class=3 if objective == "multiclass" else 1,
        trees_per_round=2,
        categorical=CATEGORICAL,
        **kw,
    )
    assert calls == [], f"LightGBM saw a rejected update: {problems}"
    assert isinstance(problems, list)
    assert problems, "the corrupt update was accepted"
    assert all(isinstance(p, str) and "\n" not in p for p in problems)
    assert not any("internal error" in p for p in problems), problems
    return problems


@pytest.mark.parametrize("objective", ["binary", "multiclass", "regression"])
@pytest.mark.parametrize("trees", [1, 2])
def test_real_tree_sizes_pass_unchanged(objective: Objective, trees: int) -> None:
    """The tree_sizes LightGBM writes are exactly the block sizes check_update computes."""
    text = _real(objective, trees)
    sizes = _header_sizes(text)
    assert len(sizes) == trees * (3 if objective == "multiclass" else 1)
    assert [t.size for t in parse_model_text(text).trees] == sizes == _lightgbm_block_sizes(text)
    assert _check(text, objective) == []
    # and export_model's own tree_sizes (len(block.encode()) per tree) agree as well
    ensemble = GlobalEnsemble(
        objective=objective,
        num_class=3 if objective == "multiclass" else 1,
        base_score=[0.0] * (3 if objective == "multiclass" else 1),
        feature_names=NAMES,
        categorical=CATEGORICAL,
        rounds=[[("a", 0.5, text)]],
    )
    exported = export_model(ensemble)
    assert [t.size for t in parse_model_text(exported).trees] == _header_sizes(exported)


def test_crlf_tree_sizes_count_the_carriage_returns() -> None:
    """LightGBM reads \\r\\n text, and its tree_sizes then count the \\r bytes too."""
    crlf = _real().replace("\n", "\r\n")
    assert _check(_real().replace("\n", "\r\n", 3)) == []  # header only: sizes unchanged
    assert any("tree_sizes does not match" in p for p in _check(crlf))  # LF sizes: rejected
    fixed = _with_sizes(crlf, _lightgbm_block_sizes(crlf))
    assert _check(fixed) == []
    booster = lgb.Booster(model_str=fixed)  # tree_sizes used: aborts the process if wrong
    assert booster.num_trees() == 2


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda t: _first(r"^(leaf_value=)(\S+)", r"\g<1>\g<2>000", t), id="longer"),
        pytest.param(lambda t: _with_sizes(t, [s + 1 for s in _header_sizes(t)]), id="plus-one"),
        pytest.param(lambda t: _with_sizes(t, _header_sizes(t)[:1]), id="missing"),
        pytest.param(lambda t: _with_sizes(t, [*_header_sizes(t), 99]), id="extra"),
        pytest.param(lambda t: _with_sizes(t, _header_sizes(t)[::-1]), id="swapped"),
        pytest.param(lambda t: _first(r"^tree_sizes=\d+", "tree_sizes=x", t), id="not-a-number"),
        pytest.param(lambda t: _first(r"^tree_sizes=\d+", "tree_sizes=", t), id="empty-token"),
    ],
)
def test_wrong_tree_sizes_are_rejected_before_lightgbm(
    corrupt: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = corrupt(_real())
    assert text != _real()
    assert "tree_sizes does not match the trees" in _rejected(text, monkeypatch)


def test_wrong_tree_sizes_abort_lightgbm_but_not_us() -> None:
    """Why the check exists: LightGBM ends the whole process on such a text (SIGABRT, exit
    134, seen with 4.7). Run in a child process; load_booster and the report's importance
    (which loads through it) strip the header and survive it."""
    wrong = _first(r"^(leaf_value=)(\S+)", r"\g<1>\g<2>000", _real())
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lightgbm; lightgbm.Booster(model_str=sys.stdin.read())",
        ],
        input=wrong,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode != 0
    ensemble = GlobalEnsemble(
        objective="binary",
        num_class=1,
        base_score=[0.0],
        feature_names=NAMES,
        categorical=CATEGORICAL,
        rounds=[[("a", 1.0, wrong)]],  # built by hand: check_update would reject it
    )
    assert np.isfinite(predict_raw(ensemble, _data("binary", n=20)[0])).all()
    schema = FeatureSchema(
        names=NAMES,
        categorical=CATEGORICAL,
        modality=dict.fromkeys(NAMES, "table"),
        parties={"a": NAMES},
    )
    importance = importance_by_party_modality(ensemble, schema)
    assert importance["a"]["table"] == pytest.approx(1.0)


def test_report_never_hands_lightgbm_a_tree_sizes_header(monkeypatch: pytest.MonkeyPatch) -> None:
    real_booster = lgb.Booster
    texts: list[str] = []

    def spy(*args: Any, **kwargs: Any) -> lgb.Booster:
        texts.append(str(kwargs.get("model_str")))
        return real_booster(*args, **kwargs)

    text = _real() + "\n"  # a text load_booster's cache has not seen
    ensemble = GlobalEnsemble(
        objective="binary",
        num_class=1,
        base_score=[0.0],
        feature_names=NAMES,
        categorical=CATEGORICAL,
        rounds=[[("a", 1.0, text)]],
    )
    schema = FeatureSchema(names=NAMES, categorical=CATEGORICAL, modality={}, parties={"a": NAMES})
    monkeypatch.setattr(lgb, "Booster", spy)
    importance_by_party_modality(ensemble, schema)
    assert texts
    assert not any("tree_sizes=" in t for t in texts)


def _tree0_children(text: str) -> tuple[list[int], list[int]]:
    tree0 = parse_model_text(text).trees[0].fields
    return [int(v) for v in tree0["left_child"].split()], [
        int(v) for v in tree0["right_child"].split()
    ]


def _set_tree0_children(text: str, left: list[int], right: list[int]) -> str:
    text = _first(r"^left_child=.*$", "left_child=" + " ".join(map(str, left)), text)
    return _first(r"^right_child=.*$", "right_child=" + " ".join(map(str, right)), text)


def _cycle(text: str) -> str:
    """Point a node's leaf slot back at its parent: prediction would loop forever there."""
    left, right = _tree0_children(text)
    node = next(k for k in range(1, len(left)) if left[k] < 0)
    parent = next(p for p in range(len(left)) if node in (left[p], right[p]))
    left[node] = parent
    return _set_tree0_children(text, left, right)


def _self_loop(text: str) -> str:
    """Detach a node into a loop on itself; its parent takes one of its leaves. Every node
    and leaf keeps exactly one parent, so only the reachability check sees it."""
    left, right = _tree0_children(text)
    node = next(k for k in range(1, len(left)) if left[k] < 0)
    parent = next(p for p in range(len(left)) if node in (left[p], right[p]))
    slots = left if left[parent] == node else right
    slots[parent] = left[node]
    left[node] = node
    return _set_tree0_children(text, left, right)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (_cycle, "bad tree structure (child"),
        (_self_loop, "not a tree rooted at node 0"),
    ],
)
def test_cycle_in_child_indices_is_rejected_without_lightgbm(
    corrupt: Callable[[str], str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cycle makes LightGBM's prediction loop forever (seen with 4.7 for _cycle); the
    check returns, and LightGBM is never called on it."""
    text = _without_sizes(corrupt(_real()))
    assert any(expected in p for p in _rejected(text, monkeypatch))
    with_sizes = corrupt(_real())  # the edited header-sized text is rejected as well
    assert _rejected(with_sizes, monkeypatch)


@pytest.mark.parametrize("value", ["nan", "-nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["leaf_value", "internal_value"])
def test_non_finite_leaf_is_rejected(key: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _first(rf"^({key}=)\S+", rf"\g<1>{value}", _without_sizes(_real()))
    what = key.replace("_", " ")
    assert any(f"Tree=0: non-finite {what}" in p for p in _rejected(text, monkeypatch))


@pytest.mark.parametrize("key", ["leaf_value", "internal_value"])
def test_huge_leaf_is_rejected_with_a_bound(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _first(rf"^({key}=)\S+", r"\g<1>1e300", _without_sizes(_real()))
    assert _check(text) == []  # finite: only a bound catches it
    bound = leaf_bound("binary", SPEC.learning_rate, 1)
    problems = _rejected(text, monkeypatch, max_abs_leaf=bound)
    assert f"Tree=0: leaf value beyond the bound ±{bound:g}" in problems


@pytest.mark.parametrize("objective", ["binary", "multiclass", "regression"])
def test_genuine_updates_stay_within_leaf_bound(objective: Objective) -> None:
    k = 3 if objective == "multiclass" else 1
    _, y = _data(objective, n=400)
    span = float(y.max() - y.min()) if objective == "regression" else 0.0
    bound = leaf_bound(objective, SPEC.learning_rate, k, span)
    for trees in (1, 2):
        text = _real(objective, trees)
        problems = check_update(
            text,
            feature_names=NAMES,
            objective=objective,
            num_class=k,
            trees_per_round=2,
            categorical=CATEGORICAL,
            max_abs_leaf=bound,
        )
        assert problems == []
        leaves = [
            abs(float(v))
            for t in parse_model_text(text).trees
            for v in t.fields["leaf_value"].split()
        ]
        assert max(leaves) < bound / 4  # generous: far from the bound


def test_leaf_bound_values_and_arguments() -> None:
    assert leaf_bound("binary", 0.1, 1) == pytest.approx(10.0)
    assert leaf_bound("multiclass", 0.05, 3) == pytest.approx(5.0)
    assert leaf_bound("regression", 0.1, 1) == pytest.approx(10.0)  # floor of 100
    assert leaf_bound("regression", 0.1, 1, label_span=1000.0) == pytest.approx(400.0)
    assert math.isfinite(leaf_bound("regression", 1.0, 1, label_span=1e300))
    for bad in (0.0, -0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="learning_rate"):
            leaf_bound("binary", bad, 1)
    for span in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="label_span"):
            leaf_bound("regression", 0.1, 1, label_span=span)
    with pytest.raises(ValueError, match="num_class"):
        leaf_bound("multiclass", 0.1, 1)
    with pytest.raises(ValueError, match="max_abs_leaf"):
        _check_with(_real(), max_abs_leaf=math.nan)


def _check_with(text: str, **kw: Any) -> list[str]:
    return check_update(
        text, feature_names=NAMES, objective="binary", num_class=1, trees_per_round=2, **kw
    )


@pytest.mark.parametrize("num_leaves", ["99999999999", "131073", "9" * 5000, "0", "-7"])
def test_huge_num_leaves_is_rejected_before_allocating(
    num_leaves: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _first(r"^num_leaves=\d+", f"num_leaves={num_leaves}", _without_sizes(_real()))
    tracemalloc.start()
    try:
        problems = _rejected(text, monkeypatch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert any(p.startswith("Tree=0: num_leaves") for p in problems), problems
    assert peak < 4 * 2**20  # a few copies of the ~5 kB text, nothing sized by num_leaves


def _tree_line(text: str, key: str, edit: Callable[[list[str]], list[str]]) -> str:
    """Edit the first tree's ``key=`` tokens."""
    match = re.search(rf"^{key}=(.*)$", text, flags=re.MULTILINE)
    assert match is not None
    tokens = edit(match.group(1).split(" "))
    return text[: match.start(1)] + " ".join(tokens) + text[match.end(1) :]


def _many_trees(text: str, n: int) -> str:
    trees = "".join(f"Tree={i}\nnum_leaves=1\nleaf_value=0\n\n" for i in range(n))
    return text[: text.index("Tree=0")] + trees + "end of trees\n"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        pytest.param(lambda t: t.replace("num_cat=2", "num_cat=2\x00", 1), "NUL", id="nul"),
        pytest.param(lambda t: t + "\x00" * 10, "NUL", id="nul-tail"),
        pytest.param(
            lambda t: t.replace("shrinkage=0.1\n", "shrinkage=0.1\rleft_child=0 0 0 0 0 0\n", 1),
            "carriage return",
            id="lone-cr-hides-a-key",
        ),
        pytest.param(
            lambda t: t.replace("num_cat=2\n", "num_cat=2\r\n", 1), "tree_sizes", id="crlf-in-tree"
        ),
        pytest.param(lambda t: t[:-1] + "\ud800", "not encodable", id="lone-surrogate"),
        pytest.param(
            lambda t: _tree_line(t, "left_child", lambda v: ["١", *v[1:]]),
            "non-int",
            id="arabic-digit",
        ),
        pytest.param(
            lambda t: _tree_line(t, "split_feature", lambda v: ["1_0", *v[1:]]),
            "non-int",
            id="underscore",
        ),
        pytest.param(
            lambda t: _tree_line(t, "threshold", lambda v: ["infinity", *v[1:]]),
            "non-float",
            id="infinity",
        ),
        pytest.param(
            lambda t: _tree_line(t, "leaf_value", lambda v: ["abc", *v[1:]]), "non-float", id="word"
        ),
        pytest.param(
            lambda t: _tree_line(t, "leaf_value", lambda v: [" 0.5", *v[1:]]),
            "values",
            id="double-space",
        ),
        pytest.param(
            lambda t: _tree_line(t, "right_child", lambda v: ["9" * 40, *v[1:]]),
            "non-int",
            id="huge-int",
        ),
        pytest.param(
            lambda t: _tree_line(t, "split_feature", lambda v: ["4294967296", *v[1:]]),
            "feature index",
            id="int-overflow",
        ),
        pytest.param(
            lambda t: _tree_line(t, "left_child", lambda v: [v[0], v[1], "-100", *v[3:]]),
            "bad tree structure (leaf 99)",
            id="leaf-out-of-range",
        ),
        pytest.param(
            lambda t: _tree_line(t, "right_child", lambda v: ["-1", *v[1:]]),
            "bad tree structure (leaf 0)",
            id="duplicated-leaf",
        ),
        pytest.param(
            lambda t: _tree_line(t, "threshold", lambda v: [v[0], v[1], "nan", *v[3:]]),
            "NaN threshold",
            id="nan-threshold",
        ),
        pytest.param(
            lambda t: _tree_line(t, "cat_threshold", lambda v: ["²", *v[1:]]),
            "cat_boundaries/cat_threshold",
            id="superscript-digit",
        ),
        pytest.param(
            lambda t: _tree_line(t, "shrinkage", lambda v: ["abc"]), "shrinkage", id="shrinkage"
        ),
        pytest.param(
            lambda t: t.replace("is_linear=0\n", "is_linear=0\nleft_child=0 0 0 0 0 0\n", 1),
            "appears twice",
            id="repeated-key",
        ),
        pytest.param(
            lambda t: t.replace("is_linear=0\n", "is_linear=0\nfoo=1\n", 1),
            "unknown key",
            id="unknown-key",
        ),
        pytest.param(
            lambda t: t.replace("is_linear=0\n", "is_linear=0\n  \n", 1),
            "without '='",
            id="blank-ish",
        ),
        pytest.param(
            lambda t: t.replace("[extra_trees: 0]\n", "[extra_trees: 0]\nx\n"),
            "malformed parameter line",
            id="parameter-line",
        ),
        pytest.param(lambda t: _many_trees(t, 10**6), "1000000 trees", id="a-million-trees"),
        pytest.param(
            lambda t: _with_sizes(t, [1] * 10**6), "tree_sizes does not match", id="a-million-sizes"
        ),
        pytest.param(
            lambda t: t.replace("version=v4\n", "".join(f"k{i}=0\n" for i in range(10**5))),
            "more than 64 lines",
            id="huge-header",
        ),
        pytest.param(
            lambda t: t.replace("Tree=1", "Tree=" + "1" * 20, 1),
            "expected 'Tree=",
            id="big-tree-no",
        ),
        pytest.param(lambda t: t.encode().hex(), "first line", id="hex-junk"),
        pytest.param(lambda t: "\n\n\n", "empty", id="blank"),
    ],
)
def test_corrupt_text_returns_problems_and_never_raises(
    corrupt: Callable[[str], str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = corrupt(_real())
    problems = _rejected(text, monkeypatch)
    assert any(expected in p for p in problems), problems
    assert len(problems) <= 21


def test_random_corruptions_never_raise() -> None:
    """Seeded line and token mutations of real texts: check_update always returns a list
    (LightGBM loads whatever it accepts, tree_sizes included: fuzzed much longer by hand)."""
    rng = random.Random(20240601)
    tokens = ["0", "-1", "7", "nan", "inf", "1e300", "", " ", "\r", "=", "Tree=0", "[", "١", "-0"]
    texts = [_real(o) for o in ("binary", "multiclass", "regression")]
    accepted = 0
    for _ in range(300):
        lines = rng.choice(texts).split("\n")
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines))
            kind = rng.randrange(4)
            if kind == 0:
                del lines[i]
            elif kind == 1:
                lines.insert(i, lines[rng.randrange(len(lines))])
            else:
                key, sep, value = lines[i].partition("=")
                values = value.split(" ")
                values[rng.randrange(len(values))] = rng.choice(tokens)
                lines[i] = key + sep + " ".join(values)
        text = "\n".join(lines)
        objective = rng.choice(["binary", "multiclass", "regression"])
        problems = _check(text, objective)  # type: ignore[arg-type]
        assert isinstance(problems, list)
        assert not any("internal error" in p for p in problems)
        accepted += not problems
    assert accepted < 300


# --------------------------------------------------------------------------------------
# Reading an update from the store: read_verified_text
# --------------------------------------------------------------------------------------


def _stored(tmp_path: Path, data: bytes) -> tuple[Store, FileRef]:
    store = Store(str(tmp_path / "coordinator"))
    return store, store.write_bytes("models", "update.txt", data)


def test_verified_text_round_trips_a_real_update(tmp_path: Path) -> None:
    text = _real()
    store = Store(str(tmp_path / "coordinator"))
    ref = store.write_text("models", "update.txt", text)
    got = read_verified_text(ref, max_bytes=len(text.encode()))
    assert got == text
    assert _check(got) == []


def test_binary_payload_is_not_utf8(tmp_path: Path) -> None:
    payload = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + _real().encode()
    _, ref = _stored(tmp_path, payload)  # the ref's sha256 matches the binary bytes
    with pytest.raises(UnverifiedError, match=r"^not UTF-8 text$"):
        read_verified_text(ref, max_bytes=1 << 20)


def test_missing_update_file(tmp_path: Path) -> None:
    _, ref = _stored(tmp_path, _real().encode())
    Path(ref.uri).unlink()
    with pytest.raises(UnverifiedError, match=r"^update file not found$"):
        read_verified_text(ref, max_bytes=1 << 20)
    folder = ref.model_copy(update={"uri": str(tmp_path / "coordinator" / "models")})
    with pytest.raises(UnverifiedError, match=r"^update file not found$"):
        read_verified_text(folder, max_bytes=1 << 20)


def test_oversized_update(tmp_path: Path) -> None:
    text = _real() * 50
    _, ref = _stored(tmp_path, text.encode())
    size = len(text.encode())
    with pytest.raises(UnverifiedError, match=rf"^update is {size} bytes, limit 1000$"):
        read_verified_text(ref, max_bytes=1000)
    assert read_verified_text(ref, max_bytes=size) == text  # exactly at the limit is fine


def test_sha_mismatch(tmp_path: Path) -> None:
    text = _real()
    _, ref = _stored(tmp_path, text.encode())
    Path(ref.uri).write_text(text.replace("leaf_value=", "leaf_value=1", 1))  # edited in place
    with pytest.raises(UnverifiedError) as info:
        read_verified_text(ref, max_bytes=1 << 20)
    assert str(info.value) == "content does not match its sha256"
    assert isinstance(info.value, ValueError)
