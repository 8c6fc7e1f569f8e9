"""Global leaf values for a round's updates: each accepted tree keeps the structure its
party grew, and its leaves get the Newton step of the whole consortium's rows.

A party's tree is fitted to the gradients of its own rows. Under label skew those are not
the consortium's: a site with 97 % positives pushes every leaf up. Averaging such trees
weights each party by its row count everywhere, where the consortium's step in a region
would weight each party by its rows *in that region*. Refitting fixes exactly that:

    leaf value = −η · Σ_k G_k(leaf) / (Σ_k H_k(leaf) + λ)

where ``G_k`` and ``H_k`` are the sums of party ``k``'s gradients and hessians over its
training rows that fall in the leaf, at the global raw score before the round
(:func:`leaf_sums`, at each party), and λ is LightGBM's ``lambda_l2``. This is LightGBM's
own leaf value, computed on the pooled rows of the leaf: the proposer chose the partition,
the consortium sets the values (:func:`refit_leaves`, at the coordinator).

What a party reveals: per leaf of each proposed tree, its row count and the sums of its
gradients and hessians there. A leaf holding fewer than ``min_rows`` of the party's rows
is reported as empty (its rows do not count), so no sum is over fewer than ``min_rows``
rows: one row's sums would give its label away. Everything here is pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.horizontal.model_text import load_booster, parse_model_text
from tasks.types import Objective

#: No party's sum is larger: the sums of up to 10^8 parties then add up without overflowing.
MAX_SUM = 1e300 / 1000


class TreeSums(BaseModel):
    """One tree's per-leaf sums at one party (leaf ``i`` at position ``i``)."""

    model_config = ConfigDict(frozen=True)

    count: list[int]
    grad: list[float]
    hess: list[float]


class LeafSums(BaseModel):
    """A party's per-leaf sums of every tree of one update (in tree order)."""

    model_config = ConfigDict(frozen=True)

    trees: list[TreeSums]
    min_rows: int = Field(ge=1)


def gradients(
    objective: Objective, y: np.ndarray, raw: np.ndarray, num_class: int
) -> tuple[np.ndarray, np.ndarray]:
    """LightGBM's first and second derivatives of the loss at raw scores ``raw``: shape
    (n,) for binary and regression, (n, K) for multiclass."""
    if objective == "regression":
        return raw - y, np.ones_like(raw)
    if objective == "binary":
        p = 1.0 / (1.0 + np.exp(-raw))
        return p - y, p * (1.0 - p)
    shifted = raw - raw.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y.astype(np.int64)] = 1.0
    factor = num_class / (num_class - 1.0)  # as LightGBM's multiclass objective
    return p - onehot, factor * p * (1.0 - p)


def leaf_sums(
    model_text: str,
    X: np.ndarray,
    y: np.ndarray,
    raw: np.ndarray,
    *,
    objective: Objective,
    num_class: int,
    min_rows: int,
    max_abs_leaf: float | None = None,
) -> LeafSums:
    """Party side: the sums of its gradients and hessians in every leaf of every tree of
    one update, at its running raw scores ``raw`` (the global model before the round) plus
    the update's earlier trees as their proposer fitted them (their values clipped to
    ``max_abs_leaf``: a nearly one-class proposer's values are huge). Leaves with fewer
    than ``min_rows`` of its rows are reported empty."""
    sizes = tree_leaves(model_text)
    if len(X) == 0:  # no rows: every leaf empty
        empty = [TreeSums(count=[0] * n, grad=[0.0] * n, hess=[0.0] * n) for n in sizes]
        return LeafSums(trees=empty, min_rows=min_rows)
    booster = load_booster(model_text)
    n_trees = booster.num_trees()
    leaves = np.asarray(booster.predict(X, pred_leaf=True, num_threads=1)).reshape(len(X), -1)
    per_tree = np.asarray(
        [
            booster.predict(X, raw_score=True, start_iteration=i, num_iteration=1, num_threads=1)
            for i in range(n_trees // num_class)
        ]
    )
    score = np.array(raw, dtype=np.float64, copy=True)
    out: list[TreeSums] = []
    for i in range(n_trees // num_class):
        g, h = gradients(objective, y, score, num_class)
        for k in range(num_class):
            t = i * num_class + k
            leaf = leaves[:, t]
            gk = g if num_class == 1 else g[:, k]
            hk = h if num_class == 1 else h[:, k]
            count = np.bincount(leaf, minlength=sizes[t])
            grad = np.bincount(leaf, weights=gk, minlength=sizes[t])
            hess = np.bincount(leaf, weights=hk, minlength=sizes[t])
            few = count < min_rows
            count[few], grad[few], hess[few] = 0, 0.0, 0.0
            out.append(TreeSums(count=count.tolist(), grad=grad.tolist(), hess=hess.tolist()))
        step = per_tree[i] if num_class == 1 else per_tree[i].reshape(len(X), num_class)
        if max_abs_leaf is not None:
            step = np.clip(step, -max_abs_leaf, max_abs_leaf)
        score = score + step
    return LeafSums(trees=out, min_rows=min_rows)


def tree_leaves(model_text: str) -> list[int]:
    """Each tree's number of leaves (of a text that passed the round's checks)."""
    return [int(t.fields["num_leaves"]) for t in parse_model_text(model_text).trees]


def sums_problem(model_text: str, sums: LeafSums, *, min_rows: int = 1) -> str | None:
    """Why one party's sums cannot count for an update (None: they can): one entry per
    leaf of every tree, finite, counts and hessians not negative, no leaf below the
    party's ``min_rows``, an empty leaf with zero sums."""
    if sums.min_rows < min_rows:
        return f"sums over leaves of {sums.min_rows} rows; the consortium's minimum is {min_rows}"
    leaves = tree_leaves(model_text)
    if len(sums.trees) != len(leaves):
        return f"{len(sums.trees)} trees of sums for an update of {len(leaves)}"
    for t, (tree, size) in enumerate(zip(sums.trees, leaves, strict=True)):
        if not len(tree.count) == len(tree.grad) == len(tree.hess) == size:
            return f"tree {t}: sums of {len(tree.grad)} leaves for a tree of {size}"
        count = np.asarray(tree.count, dtype=np.int64)
        grad = np.asarray(tree.grad, dtype=np.float64)
        hess = np.asarray(tree.hess, dtype=np.float64)
        if not (np.isfinite(grad).all() and np.isfinite(hess).all()):
            return f"tree {t}: non-finite sums"
        if (np.abs(grad) > MAX_SUM).any() or (hess > MAX_SUM).any():
            return f"tree {t}: sums beyond {MAX_SUM:g}"
        if (count < 0).any() or (hess < 0).any():
            return f"tree {t}: negative counts or hessians"
        if ((count > 0) & (count < sums.min_rows)).any():
            return f"tree {t}: a leaf of fewer than {sums.min_rows} rows"
        if ((count == 0) & ((grad != 0) | (hess != 0))).any():
            return f"tree {t}: sums over a leaf of no rows"
    return None


def refit_values(
    sums: Sequence[LeafSums],
    *,
    learning_rate: float,
    lambda_l2: float = 0.0,
    max_abs_leaf: float | None = None,
) -> list[list[float] | None]:
    """Coordinator side: each tree's new leaf values from every party's sums (``None`` for
    a tree no party reported a row of; a leaf without rows keeps value 0)."""
    if not sums:
        raise ValueError("no leaf sums to refit from")
    n_trees = len(sums[0].trees)
    if any(len(s.trees) != n_trees for s in sums):
        raise ValueError("parties sent leaf sums of different numbers of trees")
    values: list[list[float] | None] = []
    for t in range(n_trees):
        sizes = {len(s.trees[t].grad) for s in sums}
        if len(sizes) != 1:
            raise ValueError(f"tree {t}: parties sent sums of different numbers of leaves")
        grad = np.sum([s.trees[t].grad for s in sums], axis=0)
        hess = np.sum([s.trees[t].hess for s in sums], axis=0)
        count = np.sum([s.trees[t].count for s in sums], axis=0)
        if not np.isfinite(grad).all() or not np.isfinite(hess).all() or (hess < 0).any():
            raise ValueError(f"tree {t}: non-finite or negative leaf sums")
        if count.sum() == 0:
            values.append(None)
            continue
        value = np.zeros_like(grad)
        some = (count > 0) & (hess + lambda_l2 > 0)
        value[some] = -learning_rate * grad[some] / (hess[some] + lambda_l2)
        if max_abs_leaf is not None:
            value = np.clip(value, -max_abs_leaf, max_abs_leaf)
        values.append(value.tolist())
    return values


def refit_leaves(model_text: str, values: Sequence[Sequence[float] | None]) -> str:
    """The update with its leaves set to ``values`` (a ``None`` tree keeps its own)."""
    booster = load_booster(model_text)
    if len(values) != booster.num_trees():
        raise ValueError(f"{len(values)} trees of values for a model of {booster.num_trees()}")
    for t, tree in enumerate(values):
        if tree is None:
            continue
        for leaf, value in enumerate(tree):
            booster.set_leaf_output(t, leaf, float(value))
    return str(booster.model_to_string())
