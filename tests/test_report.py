"""The report's pure parts: plots inline for the UI, store-relative artefacts, the per-party
metrics table, the progress line and the quality table (the UI itself: test_ui_browser.py)."""

from __future__ import annotations

import base64
import math
import struct

from tasks.horizontal.session import Checkpoint, RoundOutput
from tasks.horizontal.steps import PartyEval, RoundAggregate
from tasks.prepare.preprocess import QualityReport
from tasks.report import (
    NO_FIGURE,
    Comparison,
    markdown_report,
    plot_rounds,
    png_data_uri,
    progress_text,
    quality_rows,
    round_metric_rows,
    significant,
)

VALID = [
    {"logloss": 0.612345678, "auc": 0.70123456789, "mse": 0.2},
    {"logloss": 0.5987654321, "auc": 0.7234567891, "mse": 0.19},
]
PARTIES = [
    {"site-b": {"logloss": 0.6, "auc": 0.75}, "site-a": {"logloss": 0.62, "auc": 0.68}},
    {"site-a": {"logloss": 0.61, "auc": math.nan}},
]


def _report(plots: dict[str, str]) -> str:
    return markdown_report(
        consortium="demo",
        objective="binary",
        comparison=Comparison(federated={"auc": 0.7, "logloss": 0.6}),
        valid=VALID,
        best_round=2,
        trees=8,
        model_bytes=4096,
        importance={"site-a": {"table": 1.0}},
        artefacts={"manifest": "models/k-manifest.json"},
        dropped={},
        plots=plots,
    )


def test_the_ui_copy_of_the_report_carries_its_plot_inline() -> None:
    png = plot_rounds(VALID, objective="binary", best_round=2)
    uri = png_data_uri(png)
    assert uri.startswith("data:image/png;base64,")
    decoded = base64.b64decode(uri.split(",", 1)[1])
    assert decoded == png and decoded[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", decoded[16:24])
    assert width > 100 and height > 100
    text = _report({"rounds": uri, "importance": "k-importance.png"})
    assert f"![validation per round]({uri})" in text
    assert "![importance](k-importance.png)" in text
    # artefacts relative to the coordinator store; the rounds named and the best marked
    assert "- manifest: `models/k-manifest.json`" in text
    assert "| round 1 |" in text and "| round 2 (best) |" in text


def test_a_plot_that_failed_leaves_no_broken_image() -> None:
    text = _report({"importance": "k-importance.png"})
    assert "![validation per round]" not in text and "![importance](k-importance.png)" in text
    assert "![" not in _report({})


def test_metrics_table_has_a_row_per_party_and_round_best_marked() -> None:
    rows = round_metric_rows(VALID, PARTIES, best_round=2)
    assert [(r["round"], r["party"]) for r in rows] == [
        ("round 1", "all parties"),
        ("round 1", "site-a"),
        ("round 1", "site-b"),
        ("round 2", "all parties"),
        ("round 2", "site-a"),
    ]
    assert rows[0] == {
        "round": "round 1",
        "party": "all parties",
        "auc": "0.7012",
        "logloss": "0.6123",
        "best": "",
    }  # 4 significant digits; MSE left out beside its root
    assert rows[3]["best"] == rows[4]["best"] == "best" and rows[3]["auc"] == "0.7235"
    assert rows[4]["auc"] == "NaN"


def test_metrics_table_without_party_figures_keeps_the_aggregate_rows() -> None:
    """Lossless mode and the vertical layout keep aggregate figures only; a resumed run
    from a checkpoint without party figures has some rounds without them."""
    rows = round_metric_rows(VALID, [], best_round=1)
    assert [r["party"] for r in rows] == ["all parties", "all parties"]
    assert rows[0]["best"] == "best" and rows[1]["best"] == ""
    mixed = round_metric_rows(VALID, [{}, {"site-a": {"logloss": 0.5}}], best_round=1)
    assert mixed[-1] == {
        "round": "round 2",
        "party": "site-a",
        "auc": NO_FIGURE,
        "logloss": "0.5",
        "best": "",
    }


def test_significant_digits() -> None:
    assert significant(0.000721512) == "0.0007215"
    assert significant(1234567.0) == "1.235e+06"
    assert significant(0.0) == "0"
    assert significant(math.nan) == "NaN"


def test_progress_line_names_round_parties_and_stop() -> None:
    assert progress_text(2, 5, parties=["site-a", "site-b"], left_out={}, running=True) == (
        "round 2 of at most 5 running; at: site-a, site-b"
    )
    assert progress_text(
        3,
        5,
        parties=["site-a"],
        left_out={"site-c": "one class only", "site-b": "tree_sizes does not match the trees"},
        stopped="early stopping",
        best_round=2,
    ) == (
        "round 3 of at most 5 done; evaluated at: site-a; left out: site-b (tree_sizes does "
        "not match the trees); site-c (one class only); stopped: early stopping; best round 2"
    )


def _round(t: int, parties: dict[str, float]) -> RoundOutput:
    ref = {"uri": "x", "sha256": "0" * 64, "rows": 1, "columns": {}}
    return RoundOutput(
        aggregate=RoundAggregate(round=t, members=[]),
        evals={
            p: PartyEval(
                party=p, round=t, n_valid=1, n_test=1, valid={"logloss": v}, test={}, scores=ref
            )
            for p, v in parties.items()
        },
        valid={"logloss": 0.5},
        test={},
        scores={},
        scores_round={},
    )


def test_checkpoint_keeps_each_rounds_party_metrics_in_round_order() -> None:
    from tasks.horizontal.training import EarlyStopping

    stopper = EarlyStopping(patience=3)
    old = Checkpoint.fresh("k", [0.0], {}, {}).model_copy(
        update={"round": 1, "valid": [{"logloss": 0.6}], "test": [{}]}
    )  # written before party figures were kept
    after = old.after(_round(2, {"b": 0.4, "a": 0.3}), stopper, False)
    assert after.party_valid == [{}, {"a": {"logloss": 0.3}, "b": {"logloss": 0.4}}]
    again = Checkpoint.model_validate_json(after.model_dump_json())
    assert again.party_valid == after.party_valid


def test_quality_table_reads_as_sentences_most_rows_first() -> None:
    report = QualityReport(
        party="site-a",
        source="transactions",
        file="transactions.csv",
        rows_in=10,
        rows_out=6,
        rows_rejected=4,
        rejected_by_reason={
            "exact duplicate": 1,
            "column 'txn_time' (timestamp): cannot parse": 3,
        },
        duplicates_removed=1,
        null_rates={"amount": 0.125, "merchant": 0.0},
        unknown_categories={"merchant": 2, "channel": 1},
    )
    clean = QualityReport(
        party="site-b", source="iot", file="iot.parquet", rows_in=3, rows_out=3, rows_rejected=0
    )
    rows = quality_rows([report, clean])
    assert rows[0] == {
        "party": "site-a",
        "source": "transactions",
        "rows_in": "10",
        "rows_out": "6",
        "rejected": "4",
        "duplicates": "1",
        "reasons": "3 rows: column 'txn_time' (timestamp): cannot parse; 1 row: exact duplicate",
        "most_missing": "amount: 12.5% missing",
        "outside_vocabulary": "channel: 1 row; merchant: 2 rows",
    }
    empty = (rows[1]["reasons"], rows[1]["most_missing"], rows[1]["outside_vocabulary"])
    assert empty == (NO_FIGURE,) * 3
