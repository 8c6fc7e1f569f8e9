"""Prediction columns: the label values each class shows as, from the spec's label mapping."""

from __future__ import annotations

import numpy as np

from tasks.scoring import label_values, score_columns
from tasks.spec.models import ColumnSpec


def _column(dtype: str, values: dict[str, str] | None = None) -> ColumnSpec:
    return ColumnSpec.model_validate({"from": "label", "dtype": dtype, "values": values or {}})


def test_label_values_follow_the_label_mapping() -> None:
    yes_no = _column("bool", {"yes": "true", "no": "false"})
    assert label_values(yes_no, task="binary", classes=1) == ["no", "yes"]
    assert label_values(_column("bool"), task="binary", classes=1) == ["false", "true"]
    assert label_values(_column("float"), task="binary", classes=1) == ["0", "1"]
    tiers = _column("float", {"bronze": "0", "gold": "2"})
    assert label_values(tiers, task="multiclass", classes=3) == ["bronze", "1", "gold"]
    text = _column("category", {"B": "basic"})
    vocabulary = ["basic", "plus", "pro"]
    assert label_values(text, task="multiclass", classes=3, vocabulary=vocabulary) == vocabulary
    assert label_values(None, task="regression", classes=1) == []


def test_score_columns_name_classes_by_label_value() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    multi = score_columns(
        np.log(probs), probs, objective="multiclass", labels=["bronze", "silver", "gold"]
    )
    assert [s.name for s in multi] == [
        "probability_bronze",
        "probability_silver",
        "probability_gold",
        "prediction",
    ]
    assert multi[-1].to_list() == ["bronze", "gold"]
    binary = score_columns(
        np.array([-1.0, 2.0]), np.array([0.27, 0.88]), objective="binary", labels=["no", "yes"]
    )
    assert [s.name for s in binary] == ["raw_score", "probability", "prediction"]
    assert binary[-1].to_list() == ["no", "yes"]
