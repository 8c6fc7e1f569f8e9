"""Run artefact names and the party-step codec: exact paths and file contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.runs import (
    LatestRun,
    RunChoiceError,
    checkpoint_name,
    choose_run,
    exchange_name,
    manifest_name,
    model_name,
    one_shot_model_name,
    one_shot_scores_name,
    plot_name,
    read_latest,
    read_runs,
    report_name,
    round_checkpoint_name,
    running_scores_name,
    update_name,
    vertical_checkpoint_name,
    vertical_delta_name,
    vertical_gradients_name,
    vertical_labels_name,
    vertical_manifest_name,
    vertical_party_model_name,
    vertical_predictions_name,
    vertical_round_document_name,
    vertical_round_name,
    vertical_scores_name,
    vertical_test_scores_name,
    vertical_text_model_name,
    write_latest,
)
from storage.store import Store


def test_latest_pointer_keeps_its_file_format(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert read_latest(store) is None
    write_latest(store, LatestRun(run_key="k", manifest="m.json", model="k-model.txt"))
    path = tmp_path / "models" / "latest.json"
    assert json.loads(path.read_text()) == {
        "run_key": "k",
        "manifest": "m.json",
        "model": "k-model.txt",
    }
    write_latest(store, LatestRun(run_key="v", layout="vertical", manifest="v.json"))
    assert json.loads(path.read_text()) == {
        "run_key": "v",
        "layout": "vertical",
        "manifest": "v.json",
    }
    latest = read_latest(store)
    assert latest is not None and latest.is_vertical and latest.manifest == "v.json"


def test_runs_are_chosen_per_spec_and_old_single_pointer_stores_stay_readable(
    tmp_path: Path,
) -> None:
    old = tmp_path / "models"
    old.mkdir()
    (old / "latest.json").write_text('{"run_key": "k0", "manifest": "k0.json"}')
    store = Store(str(tmp_path))
    assert choose_run(store, "any-spec") == LatestRun(run_key="k0", manifest="k0.json")

    write_latest(store, LatestRun(run_key="k1", manifest="k1.json", spec="one-aaa"))
    write_latest(store, LatestRun(run_key="k2", manifest="k2.json", spec="two-bbb"))
    assert [r.run_key for r in read_runs(store)] == ["k0", "k1", "k2"]
    assert json.loads((old / "latest-one-aaa.json").read_text())["run_key"] == "k1"
    assert (run := choose_run(store, "one-aaa")) is not None and run.run_key == "k1"
    assert (run := choose_run(store, "two-bbb")) is not None and run.run_key == "k2"
    assert (run := choose_run(store, "two-bbb", "k0")) is not None and run.manifest == "k0.json"
    with pytest.raises(RunChoiceError, match=r"no run of this spec \(three-ccc\).*k1 .*k2 "):
        choose_run(store, "three-ccc")
    with pytest.raises(RunChoiceError, match="no run nope"):
        choose_run(store, "one-aaa", "nope")
    assert choose_run(Store(str(tmp_path / "empty")), "one-aaa") is None


def test_checkpoint_names() -> None:
    assert checkpoint_name("abc") == "abc-latest.json"
    assert round_checkpoint_name("abc", 3) == "abc-r0003.json"
    assert vertical_checkpoint_name("abc") == "abc-vertical-latest.json"
    assert vertical_round_name("abc", 3) == "abc-vertical-r0003"
    assert vertical_round_document_name("abc", 3) == "abc-vertical-r0003.json"


def test_run_artefact_names() -> None:
    """The exact names on disk: a rename would orphan the files of earlier runs."""
    assert running_scores_name("abc", 0) == "abc-scores-r0000"
    assert running_scores_name("abc", 12) == "abc-scores-r0012"
    assert update_name("abc", 2, "p1") == "abc-r0002-p1.txt"
    assert vertical_gradients_name("abc", 4) == "abc-gradients-r0004"
    assert vertical_party_model_name("abc", "p1", 4) == "abc-vertical-p1-r0004.json"
    assert vertical_delta_name("abc", "p1", 4) == "abc-delta-p1-r0004"
    assert vertical_test_scores_name("abc", "p1", 4) == "abc-test-p1-r0004"
    assert vertical_labels_name("abc") == "abc-labels"
    assert one_shot_model_name("abc", "p1") == "abc-oneshot-p1.json"
    assert one_shot_scores_name("abc", "p1") == "abc-oneshot-scores-p1"
    assert vertical_scores_name("abc", "p1") == "abc-scores-p1"
    assert vertical_predictions_name("abc") == "abc-predictions"
    assert manifest_name("abc") == "abc-manifest.json"
    assert vertical_manifest_name("abc") == "abc-vertical-manifest.json"
    assert vertical_text_model_name("abc", "p1") == "abc-vertical-text-p1.json"
    assert model_name("abc") == "abc-model.txt"
    assert report_name("abc") == "abc-report.md"
    assert plot_name("abc", "rounds") == "abc-rounds.png"
    assert plot_name("abc", "importance") == "abc-importance.png"
    assert exchange_name("run-1") == "run-1.json"


def test_one_registry_holds_both_layouts_steps() -> None:
    from flows.transport import CALL_FLOW, STEP_FLOW, steps

    table = steps()
    assert {op for op, s in table.items() if s.flow == STEP_FLOW} == {
        "stats",
        "sketch",
        "start",
        "train",
        "leaf_sums",
        "evaluate",
        "lossless",
    }
    assert table["leaf_sums"].cached  # content-keyed: a retry reuses a round's sums
    assert not table["lossless"].cached  # a session with the other parties: never cached
    assert table["vertical-party-round"].flow == CALL_FLOW
    assert not table["vertical-latest-state"].cached
    assert table["psi-label-blind"].cached


def test_step_call_carries_json_and_types_the_result() -> None:
    from flows.transport import StepCall, decode_result, encode_result
    from storage.store import TableRef

    ref = TableRef(uri="memory://t.parquet", sha256="0" * 64, rows=3, columns={"a": "Int64"})
    call = StepCall.of(
        "psi-party-receive", [None, ref], coordinator="c", results="r", refresh=False
    )
    assert call.args[1] == ref.model_dump(mode="json")
    assert call.flow_parameters() == {
        "op": "psi-party-receive",
        "args": call.args,
        "coordinator": "c",
        "results": "r",
        "refresh": False,
    }
    body = json.loads(json.dumps(encode_result("psi-party-receive", ref)))
    assert decode_result("psi-party-receive", body) == ref
