"""The aligned data vertical training computes on: the label party's labels and one
party's feature block, split into train / valid / test in the label party's entity order.

Alignment (private set intersection) is done elsewhere: every party's rows here follow the
label party's entity order per split, so arrays exchanged in a round are position-aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelData:
    """The label party's labels, in the aligned entity order of each split."""

    y_train: np.ndarray
    y_valid: np.ndarray
    y_test: np.ndarray | None = None


@dataclass(frozen=True)
class PartyBlock:
    """One party's aligned feature block (rows follow the label party's order per split)."""

    party: str
    feature_names: tuple[str, ...]
    X_train: np.ndarray
    X_valid: np.ndarray
    X_test: np.ndarray | None = None
    categorical: tuple[str, ...] = ()


def raw_shape(raw: np.ndarray, n: int, num_class: int) -> np.ndarray:
    """Raw scores as (n,) for one output, (n, K) for K classes."""
    return raw.reshape(n) if num_class == 1 else raw.reshape(n, num_class)


def tile_base(base: Sequence[float], n: int, num_class: int) -> np.ndarray:
    """The prior ``base`` repeated for ``n`` entities, shaped as raw scores."""
    return raw_shape(np.tile(np.asarray(base, dtype=np.float64), (n, 1)), n, num_class)


def check_block(block: PartyBlock, labels: LabelData) -> None:
    """Rows of the block must match the label party's splits one to one."""
    pairs = [("train", block.X_train, labels.y_train), ("valid", block.X_valid, labels.y_valid)]
    if block.X_test is not None and labels.y_test is not None:
        pairs.append(("test", block.X_test, labels.y_test))
    for split, X, y in pairs:
        if X.ndim != 2 or X.shape[1] != len(block.feature_names):
            raise ValueError(
                f"party {block.party!r}: {split} block has shape {X.shape}, "
                f"expected (n, {len(block.feature_names)})"
            )
        if X.shape[0] != len(y):
            raise ValueError(
                f"party {block.party!r}: {split} block has {X.shape[0]} rows, the label party "
                f"{len(y)} (blocks must be aligned to the label party's entities)"
            )
    unknown = [c for c in block.categorical if c not in block.feature_names]
    if unknown:
        raise ValueError(f"party {block.party!r}: categorical {unknown} are not features")
