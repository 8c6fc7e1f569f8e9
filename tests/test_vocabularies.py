"""Category vocabularies: listed or learned from the parties' thresholded entity counts, an
other bucket and a maximum size; validated at their key path, learned once at ``prepare``
and used by training and every later prediction of the spec."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from storage.runs import learned_vocabularies_name
from tasks.prepare.preprocess import coerce_frame
from tasks.prepare.vocabulary import (
    VocabularyError,
    learned_from_counts,
    other_columns,
    resolve_vocabularies,
)
from tasks.spec.load import parse_spec, summary
from tasks.spec.models import ColumnSpec, FedSpec, SpecError, VocabularySpec

# -- spec validation --------------------------------------------------------------------------


def _data(spec_path: Path) -> dict[str, Any]:
    return tomllib.loads(spec_path.read_text())


def _parse(data: dict[str, Any]) -> FedSpec:
    return parse_spec(data, source="spec.toml", base="/base")


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        _parse(data)
    return [str(p) for p in info.value.problems]


def test_a_plain_list_means_values_and_other_in_it_is_the_bucket(tiny_table_spec: Path) -> None:
    spec = _parse(_data(tiny_table_spec))
    assert spec.vocabularies["plan"] == VocabularySpec(values=["basic", "plus"])
    assert spec.vocabularies["category"].has_other
    resolved = resolve_vocabularies(spec.vocabularies, {})
    assert resolved == {"category": ["grocery", "electronics", "other"], "plan": ["basic", "plus"]}
    assert other_columns(spec.vocabularies) == ["category"]


def test_a_table_with_other_appends_the_bucket_once(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["vocabularies"]["plan"] = {"values": ["basic", "plus"], "other": True, "max_size": 2}
    data["vocabularies"]["category"] = {"values": ["grocery", "other"], "other": True}
    spec = _parse(data)
    resolved = resolve_vocabularies(spec.vocabularies, {})
    assert resolved["plan"] == ["basic", "plus", "other"]
    assert resolved["category"] == ["grocery", "other"]
    assert "vocabularies: category (1 values, other), plan (2 values, other)" in summary(spec)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"other": True}, "vocabularies.plan: Value error, give exactly one of 'values'"),
        (
            {"values": ["basic"], "learn": True},
            "vocabularies.plan: Value error, give either 'values' or learn = true, not both",
        ),
        (["basic", "plus", "basic"], "duplicate value 'basic' (positions 1 and 3)"),
        ([], "vocabularies.plan.values: Value error, an empty vocabulary"),
        (["basic", " plus"], "value 2 is empty or has surrounding spaces"),
        (["basic", ""], "value 2 is empty"),
        (["a" * 65], "value 1 is longer than 64 characters"),
        (["a,b"], "value 1 holds a control character or one of"),
        (["a\x00b"], "value 1 holds a control character"),
        (["basic", 2], "vocabularies.plan.values[1]: Input should be a valid string"),
        (
            {"values": ["basic", "plus", "pro"], "max_size": 2},
            "vocabularies.plan: Value error, lists 3 values, more than max_size = 2",
        ),
        ({"learn": True, "max_size": 0}, "vocabularies.plan.max_size: Input should be greater"),
        ({"learn": True, "max_size": 100_001}, "vocabularies.plan.max_size: Input should be less"),
        ({"learn": True, "min_entities": 0}, "vocabularies.plan.min_entities: Input should be"),
        (
            {"values": ["basic"], "min_entities": 5},
            "vocabularies.plan: Value error, min_entities applies to learn = true only",
        ),
        ({"learn": True, "minimum": 3}, "vocabularies.plan.minimum: Extra inputs"),
        ("basic", "vocabularies.plan: Input should be a valid dictionary"),
    ],
)
def test_a_bad_vocabulary_is_refused_at_its_key_path(
    tiny_table_spec: Path, entry: object, message: str
) -> None:
    data = _data(tiny_table_spec)
    data["vocabularies"]["plan"] = entry
    problems = _problems(data)
    assert len(problems) == 1, problems
    assert message in problems[0]


def test_the_other_bucket_does_not_count_against_max_size(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["vocabularies"]["category"] = {"values": ["grocery", "other"], "max_size": 1}
    assert resolve_vocabularies(_parse(data).vocabularies, {})["category"] == ["grocery", "other"]


def test_learning_a_column_no_source_maps_as_a_category_is_refused(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["vocabularies"]["merchant"] = {"learn": True}
    assert _problems(data) == [
        "vocabularies.merchant: learn = true, but no source maps 'merchant' as a category column"
    ]


@pytest.mark.parametrize(
    "entry", [{"learn": True}, {"values": ["walking", "sitting", "standing"], "other": True}]
)
def test_a_multiclass_label_vocabulary_stays_an_explicit_list(
    tiny_table_spec: Path, entry: dict[str, object]
) -> None:
    data = _data(tiny_table_spec)
    data["consortium"]["task"] = "multiclass"
    data["consortium"]["label"] = {"column": "churned", "num_classes": 3}
    for party in data["parties"]:
        party["sources"][0]["columns"]["churned"] = {"from": "Churn", "dtype": "category"}
    data["vocabularies"]["churned"] = entry
    problems = _problems(data)
    assert len(problems) == 1, problems
    assert problems[0].startswith("vocabularies.churned: the classes of the multiclass label")
    assert "class index" in problems[0]
    data["vocabularies"]["churned"] = ["walking", "sitting", "other"]  # a class named other
    assert _parse(data).vocabularies["churned"].values == ["walking", "sitting", "other"]


def test_a_learned_vocabulary_needs_to_be_learned_before_use(tiny_table_spec: Path) -> None:
    data = _data(tiny_table_spec)
    data["vocabularies"]["plan"] = {"learn": True, "min_entities": 3}
    spec = _parse(data)
    with pytest.raises(VocabularyError, match=r"^vocabularies\.plan: learn = true, but no vocab"):
        resolve_vocabularies(spec.vocabularies, {})
    assert resolve_vocabularies(spec.vocabularies, {"plan": ["basic"]})["plan"] == ["basic"]
    assert "plan (learned: k=3)" in summary(spec)


def test_the_vocabulary_fingerprint_follows_what_decides_a_learned_vocabulary(
    tiny_table_spec: Path,
) -> None:
    data = _data(tiny_table_spec)
    data["vocabularies"]["plan"] = {"learn": True, "min_entities": 3}
    base = _parse(data).vocabulary_fingerprint()
    data["training"] = {"rounds": 7}
    data["parties"][0]["work_pool"] = "pool-a"
    data["consortium"]["as_of"] = "2026-06-30"
    assert _parse(data).vocabulary_fingerprint() == base
    data["vocabularies"]["plan"]["min_entities"] = 4
    assert _parse(data).vocabulary_fingerprint() != base


# -- merging and the other bucket (pure) ------------------------------------------------------


def test_learned_values_rank_by_total_entities_and_stop_at_max_size() -> None:
    vocab = {"m": VocabularySpec(learn=True, min_entities=3, max_size=2, other=True)}
    counts = [{"m": {"x": 5, "y": 3}}, {"m": {"y": 4, "z": 6}}, {}]
    learned = learned_from_counts(vocab, counts, spec="f")
    assert learned.columns == {"m": ["y", "z"]}  # y: 7, z: 6, x: 5 cut by max_size
    assert resolve_vocabularies(vocab, learned.columns) == {"m": ["y", "z", "other"]}


def test_an_empty_learned_vocabulary_names_the_column_and_k() -> None:
    vocab = {"merchant": VocabularySpec(learn=True, min_entities=25)}
    with pytest.raises(VocabularyError) as info:
        learned_from_counts(vocab, [{"merchant": {}}, {}], spec="f")
    message = str(info.value)
    assert message.startswith("vocabularies.merchant: learned an empty vocabulary")
    assert "at least 25 entities (min_entities)" in message and "\n" not in message


def test_values_outside_go_to_other_and_are_counted_not_shown() -> None:
    raw = pl.DataFrame({"__row": [1, 2, 3, 4], "c": ["a", "zz", None, "secret-value"]})
    columns = {"c": ColumnSpec.model_validate({"dtype": "category"})}
    frame, unknown = coerce_frame(
        raw,
        columns,
        file="f.csv",
        key=None,
        normalisation="strip",
        vocabularies={"c": ["a", "other"]},
    )
    assert frame["c"].to_list() == ["a", "other", None, "other"]
    assert unknown == {"c": 2}
    frame, unknown = coerce_frame(
        raw, columns, file="f.csv", key=None, normalisation="strip", vocabularies={"c": ["a"]}
    )
    assert frame["c"].to_list() == ["a", None, None, None] and unknown == {"c": 2}


def test_a_learned_other_value_without_the_bucket_is_an_ordinary_value() -> None:
    vocab = {"c": VocabularySpec(learn=True, min_entities=1)}
    resolved = resolve_vocabularies(vocab, {"c": ["a", "other"]})
    assert resolved == {"c": ["a", "other"]} and other_columns(vocab) == []
    raw = pl.DataFrame({"__row": [1, 2, 3], "c": ["a", "other", "zz"]})
    columns = {"c": ColumnSpec.model_validate({"dtype": "category"})}
    frame, unknown = coerce_frame(
        raw,
        columns,
        file="f.csv",
        key=None,
        normalisation="strip",
        vocabularies=resolved,
        other=other_columns(vocab),
    )
    assert frame["c"].to_list() == ["a", "other", None] and unknown == {"c": 1}


def test_a_party_counts_distinct_entities_of_good_rows_after_its_value_map(
    tiny_table_spec: Path, secret: str
) -> None:
    """The party's count over its real export: value maps applied, a quarantined row and a
    value that cannot name a feature not counted, entities counted once, no key returned."""
    from tasks.prepare.steps import PartyContext, run_count_values
    from tasks.spec.load import load_spec

    text = tiny_table_spec.read_text()
    tiny_table_spec.write_text(
        text.replace(
            'category = ["grocery", "electronics", "other"]',
            "category = { learn = true, min_entities = 1 }",
        )
    )
    (tiny_table_spec.parent / "raw" / "a" / "transactions.csv").write_text(
        "cust,when,amt_cents,cat\n"
        "C1,01/05/2026 10:00,1250,groc\n"
        "C1,03/01/2026 09:30,800,groc\n"
        "C2,03/20/2026 18:00,4599,elec\n"
        "C3,02/14/2026 12:00,300,groc\n"
        'C3,02/15/2026 12:00,300,"a,b"\n'
        "C4,not a time,10000,elec\n"
    )
    spec = load_spec(str(tiny_table_spec))
    ctx = PartyContext.from_spec(spec, "a", vocabularies={"plan": ["basic", "plus"]})
    counts = run_count_values(ctx, spec.party("a").sources, {"category": 1})
    assert counts == {"category": {"grocery": 2, "electronics": 1}}
    ctx_b = PartyContext.from_spec(spec, "b", vocabularies={"plan": ["basic", "plus"]})
    assert run_count_values(ctx_b, spec.party("b").sources, {"category": 1}) == {"category": {}}


# -- learned at prepare, used by training and prediction --------------------------------------

SPEC = """
[consortium]
name = "learned"
layout = "horizontal"
entity = "customer_id"
secret = {{ env = "FEDFUSE_TEST_SECRET" }}
task = "binary"
as_of = 2026-03-31
label = {{ column = "churned" }}

[coordinator]
store = "stores/coordinator"

[vocabularies]
category = {{ learn = true, min_entities = 3, max_size = 4, other = true }}
{parties}
[training]
rounds = 3
trees_per_round = 2
patience = 2
min_data_in_leaf = 5
num_leaves = 7
"""

PARTY = """
[[parties]]
id = "{pid}"
store = "stores/{pid}"
imports = ["raw/{pid}"]

[[parties.sources]]
id = "customers"
kind = "table"
grain = "entity"
path = "raw/{pid}/customers.csv"
[parties.sources.columns]
customer_id = {{ from = "id", dtype = "str" }}
churned = {{ from = "churn", dtype = "bool" }}
age = {{ from = "age", dtype = "float" }}

[[parties.sources]]
id = "transactions"
kind = "table"
path = "raw/{pid}/transactions.csv"
[parties.sources.columns]
customer_id = {{ from = "id", dtype = "str", required = true }}
timestamp = {{ from = "ts", dtype = "datetime", required = true }}
amount = {{ from = "amt", dtype = "float", required = true }}
category = {{ from = "cat", dtype = "category"{values} }}
"""

#: Entities per raw value at each party. Totals: alpha 70, beta 25, gamma 20, delta 7,
#: epsilon 3 (passes k = 3 at p1, cut by max_size = 4), rare 2 + 2 = 4 (held by fewer than
#: k = 3 entities at either party: never leaves one, although 4 in all would pass).
HELD = {
    "p0": {"ALPHA": 40, "beta": 25, "delta": 4, "rare": 2},
    "p1": {"alpha": 30, "gamma": 20, "delta": 3, "epsilon": 3, "rare": 2},
}
LEARNED = ["alpha", "beta", "gamma", "delta"]


def _write_party(folder: Path, pid: str, held: dict[str, int], *, customers: int) -> None:
    """``customers`` entities (a label with signal in age); the first entities hold the
    values of ``held`` in turn, one transaction each, and ``rare`` holders have five
    transactions of it (entities are counted, not rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"{pid}-{i}" for i in range(customers)]
    ages = [20 + (i * 7) % 50 for i in range(customers)]
    churn = ["true" if (a > 45) != (i % 9 == 0) else "false" for i, a in enumerate(ages)]
    lines = ["id,churn,age"] + [f"{c},{y},{a}" for c, y, a in zip(ids, churn, ages, strict=True)]
    (folder / "customers.csv").write_text("\n".join(lines) + "\n")
    rows = ["id,ts,amt,cat"]
    owner = 0
    for value, n in held.items():
        for _ in range(n):
            times = 5 if value == "rare" else 1
            for k in range(times):
                rows.append(f"{ids[owner]},2026-03-{1 + k:02d}T10:00,{10 + owner % 13}.5,{value}")
            owner += 1
    for i in range(customers):  # everyone buys something uncategorised too
        rows.append(f"{ids[i]},2026-02-{1 + i % 27:02d}T09:00,{5 + ages[i] % 11}.25,")
    (folder / "transactions.csv").write_text("\n".join(rows) + "\n")


def _learned_consortium(root: Path) -> Path:
    parties = ""
    for pid, held in HELD.items():
        _write_party(root / "raw" / pid, pid, held, customers=90)
        values = ', values = { ALPHA = "alpha" }' if pid == "p0" else ""
        parties += PARTY.format(pid=pid, values=values)
    spec = root / "spec.toml"
    spec.write_text(SPEC.format(parties=parties))
    return spec


def _learned_files(root: Path) -> list[Path]:
    return sorted((root / "stores" / "coordinator" / "models").glob("vocabularies-*.json"))


@pytest.mark.prefect
def test_learned_vocabulary_is_thresholded_per_party_stored_and_used_for_prediction(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.horizontal import federated_training
    from flows.prepare import prepare
    from flows.score import score
    from tasks.spec.load import load_spec

    spec_path = _learned_consortium(tmp_path)
    spec = load_spec(str(spec_path))
    outputs = prepare(str(spec_path))

    # the learned file, in the coordinator store, named by the spec's vocabulary fingerprint
    [stored] = _learned_files(tmp_path)
    assert stored.name == learned_vocabularies_name(spec.vocabulary_fingerprint())
    body = json.loads(stored.read_text())
    assert body == {"spec": spec.vocabulary_fingerprint(), "columns": {"category": LEARNED}}
    # 'rare' (2 entities at each party, 4 in all) was thresholded at each party before the
    # merge, and the raw 'ALPHA' of p0 was counted after its value map
    assert "rare" not in stored.read_text() and "ALPHA" not in stored.read_text()

    # every party's features use the learned vocabulary and its other bucket
    for party in HELD:
        names = {f.name for f in outputs[party].features}
        shares = sorted(n.split("share_", 1)[1] for n in names if "share_" in n)
        assert shares == sorted([*LEARNED, "other"])
        quality = {q.source: q for q in outputs[party].quality}["transactions"]
        # rows outside the vocabulary are counted per column (epsilon and rare), never named
        outside = {"p0": 2 * 5, "p1": 3 + 2 * 5}[party]
        assert quality.unknown_categories == {"category": outside}
    fused = pl.read_parquet(outputs["p1"].table.uri)
    other_share = next(c for c in fused.columns if c.endswith("share_other"))
    assert fused[other_share].fill_null(0).gt(0).sum() == 3 + 2  # epsilon and rare holders

    result = federated_training(str(spec_path))
    assert result.best_round >= 1
    assert len(_learned_files(tmp_path)) == 1  # training reused the stored vocabulary
    assert json.loads(stored.read_text()) == body

    # new data at p0 where 'zeta' is everywhere: prediction uses the stored vocabulary
    # (zeta goes to the other bucket), it never learns again
    new = tmp_path / "raw" / "p0" / "new"
    _write_party(new, "n", {"zeta": 30, "beta": 5}, customers=40)
    scored = score(str(spec_path), "p0", data=str(new))
    assert scored.rows == 40
    assert _learned_files(tmp_path) == [stored] and json.loads(stored.read_text()) == body
    report = tmp_path / "stores" / "p0" / "scoring" / "reports" / "quality-transactions.json"
    assert json.loads(report.read_text())["unknown_categories"] == {"category": 30}
    assert "zeta" not in report.read_text()

    # a refreshed prepare on changed data keeps the vocabulary the model was trained on
    _write_party(tmp_path / "raw" / "p1", "p1", {"zeta": 60}, customers=90)
    refreshed = prepare(str(spec_path), refresh=True)
    assert json.loads(stored.read_text()) == body
    assert {q.source: q for q in refreshed["p1"].quality}["transactions"].unknown_categories == {
        "category": 60
    }

    # without the stored vocabulary a prediction stops with one line; it does not relearn
    stored.unlink()
    with pytest.raises(VocabularyError) as info:
        score(str(spec_path), "p0", data=str(new))
    assert str(info.value).startswith("vocabularies.category: learn = true, but no vocabulary")
    assert _learned_files(tmp_path) == []


@pytest.mark.prefect
def test_an_empty_learned_vocabulary_stops_prepare_naming_column_and_k(
    prefect_api: str, tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from flows.cli.app import app

    for name in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DO_NOT_TRACK"):
        monkeypatch.setenv(name, "WARNING" if "LEVEL" in name else "1")
    spec_path = _learned_consortium(tmp_path)
    spec_path.write_text(spec_path.read_text().replace("min_entities = 3", "min_entities = 500"))
    result = CliRunner().invoke(app, ["prepare", str(spec_path)])
    assert result.exit_code == 1
    assert (
        "vocabularies.category: learned an empty vocabulary: no value of 'category' is held "
        "by at least 500 entities (min_entities) at any party"
    ) in result.output
    assert "Traceback" not in result.output
    assert _learned_files(tmp_path) == []


# -- through the parties' own work pools -------------------------------------------------------


def _pooled(root: Path, tag: str) -> tuple[Path, dict[str, str]]:
    spec = _learned_consortium(root)
    pools = {pid: f"vocab-{pid}-{tag}" for pid in HELD}
    text = spec.read_text()
    for pid, pool in pools.items():
        text = text.replace(
            f'store = "stores/{pid}"\n', f'store = "stores/{pid}"\nwork_pool = "{pool}"\n'
        )
    spec.write_text(text)
    return spec, pools


def test_a_pooled_party_of_a_learning_spec_gets_a_party_call_deployment(tmp_path: Path) -> None:
    from flows.ops import plan_deployments

    spec, pools = _pooled(tmp_path, "plan")
    planned = plan_deployments(spec, name="v", work_pool="coord")
    assert [(p.entry.name, p.name, p.work_pool) for p in planned][3:] == [
        (flow, f"v-{pid}", pools[pid])
        for pid in HELD
        for flow in ("party-pipeline", "party-step", "score", "party-call")
    ]


@pytest.mark.prefect
def test_vocabulary_counts_run_on_each_partys_own_pool(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    """``prepare`` with ``dispatch``: each party counts its values in a ``party-call`` run on
    its own pool; only the counts come back (the exchange holds no key and no rare value)."""
    from uuid import uuid4

    from flows.ops import deploy
    from flows.prepare import prepare
    from tests.workers import running_worker

    tag = uuid4().hex[:6]
    spec, pools = _pooled(tmp_path / "consortium", tag)
    deploy(spec, pool=f"vocab-coord-{tag}", name=f"v{tag}")
    with (
        running_worker(pools["p0"], tmp_path / "w0", secret, prefect_api) as log_p0,
        running_worker(pools["p1"], tmp_path / "w1", secret, prefect_api) as log_p1,
    ):
        outputs = prepare(str(spec), dispatch=f"v{tag}")
        logs = {"p0": log_p0.read_text(), "p1": log_p1.read_text()}
    [stored] = _learned_files(spec.parent)
    assert json.loads(stored.read_text())["columns"] == {"category": LEARNED}
    exchange = spec.parent / "stores" / "coordinator" / "exchange"
    bodies = {p.stem: p.read_text() for p in exchange.glob("*.json")}
    # a dispatched run hands its result back through the exchange (an in-process step does
    # not): one counts document per party, each from a run its own pool's worker ran
    counts = {k: json.loads(b) for k, b in bodies.items() if set(json.loads(b)) == {"category"}}
    assert len(counts) == 2
    assert sorted(c["category"]["alpha"] for c in counts.values()) == [30, 40]
    for run, c in counts.items():
        party = "p0" if c["category"]["alpha"] == 40 else "p1"
        assert run in logs[party] and run not in logs["p1" if party == "p0" else "p0"]
    for party in HELD:
        names = {f.name for f in outputs[party].features}
        assert sorted(n.split("share_", 1)[1] for n in names if "share_" in n) == sorted(
            [*LEARNED, "other"]
        )
    for blob in bodies.values():  # no rare value and no key in anything that came back
        assert '"rare"' not in blob and not re.search(r"\bp[01]-\d+\b", blob)
