"""Consortium-wide bin boundaries from mergeable quantile sketches.

LightGBM bins every numerical feature before it grows a tree: a split can only fall on a bin
boundary. Left alone, each party's LightGBM finds the boundaries from its own rows (in
lossless mode one party per block of features), so under skew the boundaries follow one
party's distribution, not the consortium's. Here every party summarises each numerical
feature of its training rows in a KLL quantile sketch (Apache DataSketches,
``kll_doubles_sketch``; :func:`sketch_features`); only the serialized sketches leave it. The
coordinator merges the sketches of each feature (:func:`merge_sketches`) and reads one set
of boundaries off the merged sketch: about ``max_bin`` equal-frequency quantiles of the
pooled training rows (:func:`consortium_bins`). Every party's LightGBM then bins with those
boundaries (``forcedbins_filename``, with ``max_bin_by_feature`` sized so that LightGBM adds
no boundary of its own; :func:`forced_bins`), in averaging and lossless mode alike.

Error bound: a KLL sketch of size ``k`` answers rank queries within a normalized rank error
ε (:func:`rank_error`; ε = 1.33 % for ``k`` = 200 with 99 % confidence, the same for a merge
of any number of sketches): a boundary read at rank r lies between the pooled rows' true
quantiles at r − ε and r + ε.

Categorical features are not sketched: their values are already the consortium
vocabulary's codes, the same at every party.

Nothing here reads files or the clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from datasketches import kll_doubles_sketch
from pydantic import BaseModel, Field

from tasks.horizontal.training import LgbParamValue

#: KLL's size parameter: 200 gives a normalized rank error of 1.33 % (99 % confidence).
SKETCH_K = 200
#: Format version of the stored consortium bins.
BINS_VERSION = 1
#: LightGBM's own default ``max_bin``.
DEFAULT_MAX_BIN = 255
#: LightGBM's bins beside the forced ones: the zero bins (−0, +0), +inf and the NaN bin.
RESERVED_BINS = 4
#: Values within this of zero are LightGBM's zero bin (its ``kZeroThreshold``).
ZERO_THRESHOLD = 1e-35
#: A serialized sketch larger than this is refused (a k=200 sketch of 10^9 rows is ~10 KB).
MAX_SKETCH_BYTES = 1 << 20


class BinsError(ValueError):
    """A party's sketches cannot be merged (one line, naming the party and feature)."""


def rank_error(k: int = SKETCH_K) -> float:
    """KLL's normalized rank error of a quantile query (99 % confidence)."""
    return float(kll_doubles_sketch.get_normalized_rank_error(k, False))


class PartySketches(BaseModel):
    """What a party sends: per numerical feature, its KLL sketch (base64), or why none."""

    party: str
    n_rows: int = Field(ge=0, description="Training rows the sketches summarise")
    sketches: dict[str, str] = Field(
        default_factory=dict, description="Feature -> serialized KLL sketch, base64"
    )
    missing: dict[str, int] = Field(
        default_factory=dict, description="Feature -> rows with no finite value"
    )
    refused: str | None = Field(
        default=None, description="Why the party sends no sketch (too few rows)"
    )


class ConsortiumBins(BaseModel):
    """The consortium's bin boundaries, as stored in the coordinator store."""

    version: int = BINS_VERSION
    max_bin: int
    k: int = SKETCH_K
    rank_error: float = Field(description="Normalized rank error of every boundary")
    bounds: dict[str, list[float]] = Field(
        description="Numerical feature -> sorted upper bounds of its bins"
    )
    parties: list[str] = Field(description="Parties whose sketches were merged")
    refused: dict[str, str] = Field(
        default_factory=dict, description="Parties that sent no sketch, with the reason"
    )
    rows: int = Field(default=0, description="Training rows the merged sketches summarise")


def sketch_features(
    party: str,
    X: np.ndarray,
    feature_names: Sequence[str],
    categorical: Sequence[str],
    *,
    min_rows: int,
    k: int = SKETCH_K,
) -> PartySketches:
    """One KLL sketch per numerical column of ``X`` (a party's training rows). NaN and
    infinite values are not sketched (counted in ``missing``). A party with fewer than
    ``min_rows`` rows sends no sketch at all: below ``k`` rows a sketch holds every value."""
    n = int(X.shape[0])
    if n < min_rows:
        return PartySketches(
            party=party,
            n_rows=n,
            refused=f"{n} training row(s), fewer than min_sketch_rows={min_rows}",
        )
    cats = set(categorical)
    sketches: dict[str, str] = {}
    missing: dict[str, int] = {}
    for j, name in enumerate(feature_names):
        if name in cats:
            continue
        column = np.asarray(X[:, j], dtype=np.float64)
        finite = column[np.isfinite(column)]
        sketch = kll_doubles_sketch(k)
        if len(finite):
            sketch.update(finite)
        sketches[name] = base64.b64encode(sketch.serialize()).decode("ascii")
        missing[name] = n - len(finite)
    return PartySketches(party=party, n_rows=n, sketches=sketches, missing=missing)


def _decode(party: str, feature: str, text: str) -> kll_doubles_sketch:
    where = f"party {party}, feature '{feature}'"
    if len(text) > MAX_SKETCH_BYTES * 4 // 3 + 4:
        raise BinsError(f"{where}: sketch larger than {MAX_SKETCH_BYTES} bytes")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
        sketch = kll_doubles_sketch.deserialize(data)
    except (binascii.Error, UnicodeEncodeError, ValueError, RuntimeError, IndexError):
        raise BinsError(f"{where}: not a serialized KLL sketch") from None
    if not sketch.is_empty() and not (
        math.isfinite(sketch.get_min_value()) and math.isfinite(sketch.get_max_value())
    ):
        raise BinsError(f"{where}: sketch holds non-finite values")
    return sketch


def merge_sketches(
    parts: Sequence[PartySketches], feature_names: Sequence[str], categorical: Sequence[str]
) -> dict[str, kll_doubles_sketch]:
    """Every numerical feature's sketches merged over the parties that sent them. A party
    that sent sketches must send one for every numerical feature, and no other."""
    cats = set(categorical)
    numeric = [f for f in feature_names if f not in cats]
    merged = {f: kll_doubles_sketch(SKETCH_K) for f in numeric}
    for part in parts:
        if part.refused is not None:
            continue
        extra = sorted(set(part.sketches) - set(numeric))
        if extra:
            raise BinsError(f"party {part.party}: sketch of {len(extra)} unknown feature(s)")
        for f in numeric:
            if f not in part.sketches:
                raise BinsError(f"party {part.party}, feature '{f}': no sketch")
            sketch = _decode(part.party, f, part.sketches[f])
            if sketch.n > part.n_rows:
                raise BinsError(
                    f"party {part.party}, feature '{f}': sketch of more values than its rows"
                )
            merged[f].merge(sketch)
    return merged


def boundaries(sketch: kll_doubles_sketch, max_bounds: int) -> list[float]:
    """At most ``max_bounds`` sorted, distinct, non-zero bin upper bounds from a sketch.

    Candidates are the sketch's quantiles on a grid four times finer than the bins; when
    there are more distinct candidates than bins, evenly spaced ones are kept. A value
    held by many rows is then one candidate, and the bins it would have used go to the
    rest of the distribution (as LightGBM's own binning does).
    """
    if sketch.is_empty() or max_bounds < 1:
        return []
    grid = np.arange(1, 4 * max_bounds + 1) / (4 * max_bounds + 1)
    candidates = np.unique(np.asarray(sketch.get_quantiles(grid.tolist()), dtype=np.float64))
    candidates = candidates[np.isfinite(candidates) & (np.abs(candidates) > ZERO_THRESHOLD)]
    if sketch.get_max_value() in candidates:  # an upper bound at the top adds no bin
        candidates = candidates[candidates < sketch.get_max_value()]
    if len(candidates) > max_bounds:
        keep = np.unique(np.round(np.linspace(0, len(candidates) - 1, max_bounds)).astype(int))
        candidates = candidates[keep]
    return [float(v) for v in candidates]


def max_bin_of(params: Mapping[str, object]) -> int:
    """The ``max_bin`` of the training params (LightGBM's default without one)."""
    value = params.get("max_bin", DEFAULT_MAX_BIN)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BinsError("training.params.max_bin: not a number")
    try:
        number = int(value)
    except ValueError:
        raise BinsError("training.params.max_bin: not a whole number") from None
    if number < 2:
        raise BinsError("training.params.max_bin: must be at least 2")
    return number


def consortium_bins(
    parts: Sequence[PartySketches],
    feature_names: Sequence[str],
    categorical: Sequence[str],
    *,
    max_bin: int,
) -> ConsortiumBins:
    """The consortium's boundaries: every feature's merged sketch read at up to
    ``max_bin - 4`` ranks (LightGBM keeps four bins for zero, +inf and NaN)."""
    merged = merge_sketches(parts, feature_names, categorical)
    limit = max(max_bin - RESERVED_BINS, 0)
    used = [p for p in parts if p.refused is None]
    return ConsortiumBins(
        max_bin=max_bin,
        rank_error=rank_error(),
        bounds={f: boundaries(s, limit) for f, s in merged.items()},
        parties=[p.party for p in used],
        refused={p.party: p.refused for p in parts if p.refused is not None},
        rows=sum(p.n_rows for p in used),
    )


def feature_block(n_features: int, machines: int, rank: int) -> range:
    """The features whose bins LightGBM's machine ``rank`` of ``machines`` finds in
    data-parallel training (then shared with all): contiguous blocks of ceil(F / M)."""
    step = max(-(-n_features // machines), 1)
    start = min(rank * step, n_features)
    return range(start, min(start + step, n_features))


def unforced_features(
    feature_names: Sequence[str], categorical: Sequence[str], machines: int
) -> list[str]:
    """Numerical features that data-parallel LightGBM cannot bin with forced bounds.

    LightGBM 4.7's data-parallel loader reads the forced bounds of block feature
    ``start + i`` at index ``i`` of the file (rank 0 alone is unaffected), so a party's file
    puts them there (:func:`forced_bins` with ``rank``); its reader skips a categorical
    index, so a numerical feature whose shifted index is categorical keeps the bins its
    owner finds from its own rows.
    """
    cats = {i for i, n in enumerate(feature_names) if n in set(categorical)}
    out = []
    for rank in range(1, machines):
        block = feature_block(len(feature_names), machines, rank)
        out += [feature_names[j] for j in block if j not in cats and (j - block.start) in cats]
    return out


def forced_bins(
    bins: ConsortiumBins,
    X: np.ndarray,
    feature_names: Sequence[str],
    *,
    categorical: Sequence[str] = (),
    rank: int = 0,
    machines: int = 1,
) -> tuple[str, list[int]]:
    """A party's LightGBM inputs for the consortium's boundaries: the text of the
    ``forcedbins_filename`` file and ``max_bin_by_feature``.

    LightGBM adds the zero bins (when the party's own rows hold negative or positive
    values), +inf and, with missing values, a NaN bin to the forced bounds, and fills any
    bin left over from the party's own rows. Each feature's bin count is the forced bounds
    plus exactly those, so no boundary of the party's own is added; a feature without
    forced bounds keeps ``max_bin``. ``rank`` of ``machines`` > 1 (lossless mode): the file
    lays out the bounds of the party's block of features as LightGBM's data-parallel loader
    reads them (:func:`unforced_features`).
    """
    forced: list[dict[str, object]] = []
    per_feature: list[int] = []
    block = feature_block(len(feature_names), machines, rank) if rank else None
    skipped = set(unforced_features(feature_names, categorical, machines)) if block else set()
    for j, name in enumerate(feature_names):
        bounds = bins.bounds.get(name, [])
        if not bounds or name in skipped or (block is not None and j not in block):
            per_feature.append(bins.max_bin)
            continue
        column = np.asarray(X[:, j], dtype=np.float64)
        extra = 1 + int(bool((column <= -ZERO_THRESHOLD).any()))
        extra += int(bool((column > ZERO_THRESHOLD).any())) + int(bool(np.isnan(column).any()))
        index = j - block.start if block is not None else j
        forced.append({"feature": index, "bin_upper_bound": bounds})
        per_feature.append(max(len(bounds) + extra, 3))  # 2 bins: LightGBM forces none
    return json.dumps(forced), per_feature


#: The params :func:`forced_bin_params` sets: local to one party (a path of its machine, its
#: own rows' bin counts), removed from every model text that leaves it.
BIN_PARAMS = frozenset({"forcedbins_filename", "max_bin_by_feature"})


def forced_bin_params(path: str, per_feature: Sequence[int]) -> dict[str, LgbParamValue]:
    """The LightGBM params that make a party bin with the forced file at ``path``."""
    return {"forcedbins_filename": path, "max_bin_by_feature": ",".join(map(str, per_feature))}
