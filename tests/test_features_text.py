from __future__ import annotations

import datetime as dt
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from tasks.prepare.modalities.text import (
    FIXED_FEATURES,
    TextOptions,
    analyse_text,
    chinese_lexicon,
    text_feature_names,
    text_features,
)

AS_OF = dt.date(2024, 6, 30)
OPTIONS = TextOptions(text_width=8)
TOKS = [f"tok_{i}" for i in range(8)]


def ts(day: int, month: int = 6) -> dt.datetime:
    return dt.datetime(2024, month, day, 12, tzinfo=dt.UTC)


def frame(rows: list[dict[str, Any]], *, rating: bool = True, time: bool = True) -> pl.DataFrame:
    schema: dict[str, pl.DataType] = {"cid": pl.String(), "text": pl.String()}
    if rating:
        schema["rating"] = pl.Float64()
    if time:
        schema["timestamp"] = pl.Datetime("us", "UTC")
    return pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema, orient="row")


def features(clean: pl.DataFrame, options: TextOptions = OPTIONS) -> pl.DataFrame:
    return text_features(clean, entity="cid", as_of=AS_OF, options=options)


def row(out: pl.DataFrame, key: str) -> dict[str, Any]:
    return out.filter(pl.col("cid") == key).row(0, named=True)


def sentiment(text: str) -> float:
    return analyse_text(text)[0]


def test_english_sentiment_sign() -> None:
    assert sentiment("Great product, I love it, fast delivery!") > 0.5
    assert sentiment("Terrible service, broken on arrival. I want a refund.") < -0.3


@pytest.mark.parametrize(
    ("text", "sign"),
    [
        ("服务很好，非常满意", 1),
        ("质量不错，推荐购买", 1),
        ("太棒了", 1),
        ("太差了，很失望，要退款", -1),
        ("质量很差，不满意", -1),  # negation: cnsenti's sentiment_count scores this positive
        ("不推荐，很烂", -1),
        ("客服态度恶劣", -1),  # jieba keeps the phrase whole
    ],
)
def test_chinese_sentiment_sign(text: str, sign: int) -> None:
    assert sentiment(text) * sign > 0.3


def test_lexicon_is_cleaned() -> None:
    lexicon = chinese_lexicon()
    assert {"好", "不错", "满意"} <= lexicon.positive  # "好 " and "不错 " in the raw lists
    assert {"差", "失望", "糟糕"} <= lexicon.negative
    assert not lexicon.positive & lexicon.negative
    assert lexicon.polarity("要") == 0  # a one-character verb, not an adjective
    assert lexicon.polarity("非常") == 0  # a degree adverb, not 非 + 常


def test_mixed_text_combines_both_analysers() -> None:
    mixed = sentiment("The food was great 服务很好")
    assert mixed > 0
    assert sentiment("The food was awful 服务很差") < 0
    assert analyse_text("The food was great 服务很好")[1] == [
        "服务",
        "很",
        "好",
        "the",
        "food",
        "was",
        "great",
    ]


def test_shape_dtypes_and_fixed_width() -> None:
    clean = frame([{"cid": "b", "text": "ok", "rating": 3.0, "timestamp": ts(1)}])
    out = features(clean)
    assert out.columns == ["cid", *text_feature_names(8)]
    assert out.width == 1 + len(FIXED_FEATURES) + OPTIONS.text_width
    assert dict(out.schema) == {
        "cid": pl.String(),
        **dict(FIXED_FEATURES),
        **dict.fromkeys(TOKS, pl.Float64()),
    }
    wide = features(clean, TextOptions(text_width=32))
    assert wide.width == 1 + len(FIXED_FEATURES) + 32
    # no rating column: the same schema, rating features null
    no_rating = features(clean.drop("rating"))
    assert no_rating.schema == out.schema
    assert no_rating["rating_mean"].to_list() == [None]


def test_counts_window_and_recency() -> None:
    clean = frame(
        [
            {"cid": "a", "text": "awful, broken", "rating": 1.0, "timestamp": ts(29)},
            {"cid": "a", "text": "great", "rating": 5.0, "timestamp": ts(1)},
            {"cid": "a", "text": "after as_of", "rating": 3.0, "timestamp": ts(1, month=7)},
            {"cid": "late", "text": "only late", "rating": 4.0, "timestamp": ts(2, month=7)},
            {"cid": "b", "text": None, "rating": None, "timestamp": ts(10)},
            {"cid": "b", "text": "   ", "rating": 2.0, "timestamp": ts(11)},
            {"cid": "b", "text": "", "rating": None, "timestamp": None},
            {"cid": None, "text": "no key", "rating": 1.0, "timestamp": ts(3)},
        ]
    )
    out = features(clean)
    assert out["cid"].to_list() == ["a", "b", "late"]
    a, b, late = row(out, "a"), row(out, "b"), row(out, "late")

    assert (a["n_texts"], a["n_empty"], a["chars_max"]) == (2, 0, 13)
    assert a["chars_mean"] == 9.0
    assert a["rating_mean"] == 3.0
    assert (a["rating_min"], a["rating_last"]) == (1.0, 1.0)
    assert a["sentiment_last"] == a["sentiment_min"] < 0  # last by time, not by input order
    assert a["share_negative"] == 0.5
    assert a["days_since_last"] == 1.5  # noon on the 29th to the end of the 30th

    # null, blank and empty texts: rows without errors, counted, not scored
    assert (b["n_texts"], b["n_empty"], b["chars_max"]) == (3, 3, 3)
    assert b["sentiment_mean"] is None and b["tok_0"] is None
    assert (b["rating_mean"], b["rating_last"]) == (2.0, 2.0)
    assert b["days_since_last"] == 19.5

    # texts only after as_of: the entity stays, with nothing in its window
    assert (late["n_texts"], late["n_empty"]) == (0, 0)
    assert all(v is None for k, v in late.items() if k not in ("cid", "n_texts", "n_empty"))


def test_emoji_only_and_cjk_shares() -> None:
    clean = frame(
        [
            {"cid": "e", "text": "😀😀🎉", "timestamp": ts(1)},
            {"cid": "z", "text": "服务很好ok", "timestamp": ts(1)},
        ]
    )
    e, z = row(features(clean), "e"), row(features(clean), "z")
    assert (e["n_texts"], e["n_empty"]) == (1, 0)
    assert e["share_emoji"] == 1.0 and e["share_cjk"] == 0.0
    assert e["sentiment_mean"] > 0  # VADER knows these emoji
    assert any(e[t] != 0 for t in TOKS)
    assert z["share_cjk"] == pytest.approx(4 / 6)
    assert z["share_emoji"] == 0.0


def test_long_text_truncated_for_scoring_but_counted_in_chars() -> None:
    text = "great, wonderful. " + "terrible awful horrible. " * 400
    clean = frame([{"cid": "a", "text": text, "timestamp": ts(1)}])
    short = row(features(clean, TextOptions(text_width=8, text_max_chars=18)), "a")
    full = row(features(clean, TextOptions(text_width=8, text_max_chars=100_000)), "a")
    assert short["chars_max"] == full["chars_max"] == len(text)
    assert short["sentiment_mean"] > 0 > full["sentiment_mean"]
    assert short["tokens_mean"] == 2.0


def test_chinese_tokens_nonzero_and_deterministic() -> None:
    clean = frame(
        [
            {"cid": "a", "text": "服务很好，非常满意", "timestamp": ts(1)},
            {"cid": "b", "text": "太差了，很失望，要退款", "timestamp": ts(2)},
        ]
    )
    first = features(clean)
    for key in ("a", "b"):
        values = [row(first, key)[t] for t in TOKS]
        assert any(v != 0 for v in values)
        assert sum(v * v for v in values) == pytest.approx(1.0)  # one text: its l2-unit vector
    assert analyse_text("服务很好，非常满意")[1] == ["服务", "很", "好", "非常", "满意"]
    assert_frame_equal(features(clean), first)
    assert_frame_equal(features(clean.reverse()), first)  # input order does not matter


def test_same_feature_space_across_parties() -> None:
    shared = "物流很快 fast shipping 👍"
    party_a = frame(
        [
            {"cid": "x", "text": shared, "timestamp": ts(1)},
            {"cid": "y", "text": "something else entirely", "timestamp": ts(2)},
        ]
    )
    party_b = frame(
        [
            {"cid": "k", "text": "质量很差", "timestamp": ts(5)},
            {"cid": "q", "text": shared, "timestamp": ts(3)},
            {"cid": "r", "text": "again other words 其他", "timestamp": ts(4)},
        ],
        rating=False,
    )
    cols = ["tokens_mean", "sentiment_mean", *TOKS]
    a = features(party_a).filter(pl.col("cid") == "x").select(cols)
    b = features(party_b).filter(pl.col("cid") == "q").select(cols)
    assert_frame_equal(a, b)


def test_no_timestamp_column() -> None:
    clean = frame(
        [
            {"cid": "a", "text": "good", "rating": 4.0},
            {"cid": "a", "text": "bad", "rating": 2.0},
        ],
        time=False,
    )
    a = row(features(clean), "a")
    assert (a["n_texts"], a["rating_mean"]) == (2, 3.0)
    assert a["sentiment_last"] is None and a["rating_last"] is None
    assert a["days_since_last"] is None


def test_empty_input() -> None:
    out = features(frame([]))
    assert out.height == 0
    assert out.columns == ["cid", *text_feature_names(8)]
