"""Position-aligned arrays as tables: how the numbers of a vertical step (gradients,
deltas, scores, labels) travel through stores, as float64 columns ``name_k`` and, for arrays
of different lengths (train / valid / test), one long table with a ``part`` column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl


def arrays_frame(arrays: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """Equal-length arrays (1-D or 2-D) as float64 columns ``name_k``."""
    cols: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        matrix = np.asarray(array, dtype=np.float64).reshape(len(array), -1)
        for k in range(matrix.shape[1]):
            cols[f"{name}_{k}"] = matrix[:, k]
    return pl.DataFrame(cols)


def frame_arrays(
    frame: pl.DataFrame, names: Sequence[str], num_class: int
) -> dict[str, np.ndarray]:
    """The arrays ``names`` back from an :func:`arrays_frame` table: (n,) or (n, K)."""
    out = {}
    for name in names:
        matrix = frame.select([f"{name}_{k}" for k in range(num_class)]).to_numpy()
        out[name] = matrix[:, 0].copy() if num_class == 1 else matrix.copy()
    return out


def split_frame(parts: Mapping[str, np.ndarray]) -> pl.DataFrame:
    """Arrays of different lengths (train / valid / test) in one long table."""
    frames = [
        arrays_frame({"v": a}).with_columns(pl.lit(name).alias("part")) for name, a in parts.items()
    ]
    return pl.concat(frames, how="vertical")


def unsplit_frame(frame: pl.DataFrame, num_class: int) -> dict[str, np.ndarray]:
    """The arrays of a :func:`split_frame` table by part."""
    out = {}
    for name in frame["part"].unique(maintain_order=True).to_list():
        sub = frame.filter(pl.col("part") == name)
        out[str(name)] = frame_arrays(sub, ["v"], num_class)["v"]
    return out
