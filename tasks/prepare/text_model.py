"""A consortium TF-IDF vocabulary and a federated linear text model (pure functions).

Vocabulary. Each party counts, per term (word 1- to ``ngram_max``-grams of the text
modality's tokens, jieba for Han runs), the documents (texts) holding it, and only terms held
by at least ``min_documents`` of its documents leave it (:func:`document_frequencies`), with
its document count. The coordinator keeps the terms that at least ``min_parties`` parties
reported, ranks them by their summed document frequency and keeps the ``max_terms`` first,
with smoothed IDF weights ln((1 + N) / (1 + df)) + 1 over the summed counts
(:func:`merge_document_frequencies`; a party's df of a term it held fewer than k times is
counted 0, so df is a lower bound). Every party then computes TF-IDF over the same columns
(:func:`tfidf_matrix`), so a column means the same term everywhere.

Federated model. A linear model on the entities' TF-IDF vectors (l2-normalised mean of their
texts' vectors): logistic regression for a binary label, one-vs-rest logistic regression for
a multiclass one, ridge for regression, fitted by scikit-learn's SGD (:func:`fit_local`: a
few epochs from the global weights, constant step), and averaged by sample counts
(:func:`fed_average`): wᵗ⁺¹ = Σ_k n_k wₖᵗ⁺¹ / Σ_k n_k, the FedAvg update.

Cross-fitting. Entities fall in ``folds`` folds by a hash of their key (:func:`fold_of`);
fold model j is trained on the training rows outside fold j, the full model on all training
rows. A training row's score comes from its own fold's model, so a GBDT fed the score never
sees a score fitted on its own label (:func:`cross_fit_scores`); every other row (validation,
test, new rows to score) gets the full model's score. Nothing here reads files or the clock.
"""

from __future__ import annotations

import hashlib
import html
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from pydantic import BaseModel, Field

from tasks.types import Objective

logger = logging.getLogger(__name__)

#: Markup removed before tokenising (``<br />``, ``<p>``, ...).
HTML_TAG = re.compile(r"<[^<>]{0,200}>")
#: Separator of the words of an n-gram term.
GRAM_SEPARATOR = " "


class TextModelError(ValueError):
    """The text vocabulary or model cannot be built; the message names the setting."""


def strip_html(text: str) -> str:
    """``text`` without markup tags and with character references decoded."""
    return html.unescape(HTML_TAG.sub(" ", text))


def ngram_terms(tokens: Sequence[str], ngram_max: int) -> list[str]:
    """The 1- to ``ngram_max``-grams of ``tokens``, in order (words joined by a space)."""
    terms = list(tokens)
    for n in range(2, ngram_max + 1):
        terms += [GRAM_SEPARATOR.join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return terms


class DocumentCounts(BaseModel):
    """One party's thresholded document frequencies: what leaves it."""

    documents: int = Field(ge=0, description="Non-empty texts counted")
    frequencies: dict[str, int] = Field(
        description="Term -> documents holding it (only terms held by at least k documents)"
    )


def document_frequencies(
    documents: Iterable[Sequence[str]], *, min_documents: int
) -> DocumentCounts:
    """Documents per term over ``documents`` (each a list of terms); terms held by fewer
    than ``min_documents`` documents are left out."""
    if min_documents < 1:
        raise TextModelError(f"text.min_documents must be at least 1, not {min_documents}")
    counts: dict[str, int] = {}
    n = 0
    for terms in documents:
        n += 1
        for term in set(terms):
            counts[term] = counts.get(term, 0) + 1
    kept = {t: c for t, c in counts.items() if c >= min_documents}
    return DocumentCounts(documents=n, frequencies=kept)


class TextVocabulary(BaseModel):
    """The consortium's TF-IDF columns, as the coordinator stores them."""

    terms: list[str] = Field(description="Terms, one per TF-IDF column")
    idf: list[float] = Field(description="IDF weight of each term")
    ngram_max: int = Field(ge=1, description="Longest n-gram of the terms")


#: Longest term (characters) a party's counts may hold: longer ones are not tokens.
MAX_TERM_CHARS = 2000


def counts_problems(counts: DocumentCounts, *, min_documents: int) -> list[str]:
    """What is wrong with one party's counts, as the coordinator checks them (the messages
    name no term): every frequency between ``min_documents`` (the party must have left out
    rarer terms) and the party's document count, every term a non-empty token."""
    problems: list[str] = []
    freqs = counts.frequencies.values()
    if any(n < min_documents for n in freqs):
        problems.append(
            f"a term's document frequency is below text.min_documents ({min_documents})"
        )
    if any(n > counts.documents for n in freqs):
        problems.append("a term's document frequency exceeds the party's document count")
    if any(not t.strip() or len(t) > MAX_TERM_CHARS for t in counts.frequencies):
        problems.append(f"a term is empty or longer than {MAX_TERM_CHARS} characters")
    return problems


def review_counts(
    counts: Mapping[str, DocumentCounts], *, min_documents: int, min_parties: int
) -> list[DocumentCounts]:
    """The parties' counts that pass :func:`counts_problems` (the others are left out with
    their reasons logged); fewer than ``min_parties`` passing is an error naming each."""
    accepted: list[DocumentCounts] = []
    rejected: dict[str, str] = {}
    for party, party_counts in counts.items():
        problems = counts_problems(party_counts, min_documents=min_documents)
        if problems:
            rejected[party] = "; ".join(problems)
            logger.warning("text vocabulary: counts of %s left out: %s", party, rejected[party])
        else:
            accepted.append(party_counts)
    if len(accepted) < min_parties:
        raise TextModelError(
            _quorum_message("text vocabulary", len(accepted), min_parties, rejected)
        )
    return accepted


def _quorum_message(what: str, valid: int, min_parties: int, rejected: Mapping[str, str]) -> str:
    left_out = "; ".join(f"{p}: {r}" for p, r in sorted(rejected.items()))
    return (
        f"{what}: {valid} valid part(s), text.min_parties is {min_parties}; "
        f"left out: {left_out or 'none'}"
    )


def merge_document_frequencies(
    counts: Sequence[DocumentCounts], *, min_parties: int, max_terms: int, ngram_max: int
) -> TextVocabulary:
    """The consortium vocabulary from the parties' thresholded counts: terms reported by at
    least ``min_parties`` parties, the ``max_terms`` most frequent (ties by term), with
    smoothed IDF weights over the summed counts."""
    if min_parties < 1:
        raise TextModelError(f"text.min_parties must be at least 1, not {min_parties}")
    total: dict[str, int] = {}
    parties: dict[str, int] = {}
    for party in counts:
        for term, n in party.frequencies.items():
            total[term] = total.get(term, 0) + n
            parties[term] = parties.get(term, 0) + 1
    kept = [t for t in total if parties[t] >= min_parties]
    ranked = sorted(kept, key=lambda t: (-total[t], t))[:max_terms]
    if not ranked:
        raise TextModelError(
            f"text: learned an empty vocabulary: no term is held by at least the "
            f"min_documents texts at {min_parties} (min_parties) or more parties; lower "
            "text.min_documents or text.min_parties"
        )
    documents = sum(c.documents for c in counts)
    idf = [math.log((1 + documents) / (1 + total[t])) + 1.0 for t in ranked]
    return TextVocabulary(terms=ranked, idf=idf, ngram_max=ngram_max)


def _analyzer(terms: list[str]) -> list[str]:
    return terms


def tfidf_matrix(documents: Sequence[list[str]], vocabulary: TextVocabulary) -> Any:
    """Sparse rows × terms TF-IDF (raw term counts × IDF, l2 norm per row; a row without a
    vocabulary term stays zero)."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.preprocessing import normalize

    counter = CountVectorizer(
        analyzer=_analyzer,
        vocabulary={t: i for i, t in enumerate(vocabulary.terms)},
        dtype=np.float64,
    )
    counts = counter.transform(documents)
    return normalize(counts.multiply(np.asarray(vocabulary.idf)).tocsr(), norm="l2")


def entity_matrix(rows: Any, owners: np.ndarray, n_entities: int) -> Any:
    """Per entity: the l2-normalised sum of its rows (``owners[i]`` is row i's entity)."""
    from scipy import sparse
    from sklearn.preprocessing import normalize

    n = rows.shape[0]
    pick = sparse.csr_matrix(
        (np.ones(n), (owners, np.arange(n))), shape=(n_entities, n), dtype=np.float64
    )
    return normalize(pick @ rows, norm="l2")


def fold_of(entities: pl.Series, folds: int) -> np.ndarray:
    """Fold 0..folds-1 of every entity, from a fixed hash (BLAKE2b) of its key: the same in
    every run and on every platform (no RNG, no clock)."""
    if folds < 2:
        raise TextModelError(f"text.folds must be at least 2, not {folds}")
    keys = entities.cast(pl.String).fill_null("").to_list()
    digests = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest()) for k in keys]
    return (np.asarray(digests, dtype=np.uint64) % np.uint64(folds)).astype(np.int64)


class LinearWeights(BaseModel):
    """A linear model's weights: one row per output (1 for binary and regression)."""

    coef: list[list[float]] = Field(description="Outputs × terms")
    intercept: list[float] = Field(description="One per output")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.coef, dtype=np.float64), np.asarray(self.intercept, np.float64)

    @classmethod
    def of(cls, coef: np.ndarray, intercept: np.ndarray) -> LinearWeights:
        return cls(coef=np.asarray(coef).tolist(), intercept=np.asarray(intercept).tolist())


class TextModelSettings(BaseModel):
    """How the linear model is fitted at every party."""

    task: Objective
    num_classes: int | None = None
    alpha: float = Field(gt=0, description="L2 penalty of SGD")
    learning_rate: float = Field(gt=0, description="Constant SGD step")
    epochs: int = Field(ge=1, description="Local epochs per round")
    seed: int = 0

    @property
    def outputs(self) -> int:
        return self.num_classes if self.task == "multiclass" and self.num_classes else 1


def zero_weights(terms: int, settings: TextModelSettings) -> LinearWeights:
    outputs = settings.outputs
    return LinearWeights.of(np.zeros((outputs, terms)), np.zeros(outputs))


def _classes(settings: TextModelSettings) -> np.ndarray:
    return np.arange(settings.outputs if settings.task == "multiclass" else 2)


def fit_local(
    X: Any, y: np.ndarray, start: LinearWeights, settings: TextModelSettings
) -> LinearWeights:
    """``settings.epochs`` SGD epochs over (X, y) from ``start``: one party's update."""
    from sklearn.linear_model import SGDClassifier, SGDRegressor

    coef, intercept = start.arrays()
    if X.shape[0] == 0:
        return start
    common: dict[str, Any] = {
        "penalty": "l2",
        "alpha": settings.alpha,
        "learning_rate": "constant",
        "eta0": settings.learning_rate,
        "random_state": settings.seed,
        "shuffle": True,
    }
    if settings.task == "regression":
        reg = SGDRegressor(loss="squared_error", **common)
        reg.coef_, reg.intercept_ = coef[0].copy(), intercept.copy()
        for _ in range(settings.epochs):
            reg.partial_fit(X, y.astype(np.float64))
        return LinearWeights.of(reg.coef_[None, :], reg.intercept_)
    clf = SGDClassifier(loss="log_loss", **common)
    classes = _classes(settings)
    clf.coef_, clf.intercept_ = coef.copy(), intercept.copy()
    for _ in range(settings.epochs):
        clf.partial_fit(X, y.astype(np.int64), classes=classes)
    return LinearWeights.of(clf.coef_, clf.intercept_)


def fed_average(updates: Sequence[tuple[LinearWeights, int]]) -> LinearWeights:
    """FedAvg: the updates' weights averaged by their sample counts (parties without
    samples count for nothing)."""
    used = [(w, n) for w, n in updates if n > 0]
    if not used:
        raise TextModelError("text model: no party has training rows for this model")
    total = float(sum(n for _, n in used))
    coef = sum(w.arrays()[0] * (n / total) for w, n in used)
    intercept = sum(w.arrays()[1] * (n / total) for w, n in used)
    return LinearWeights.of(np.asarray(coef), np.asarray(intercept))


def decision(X: Any, weights: LinearWeights) -> np.ndarray:
    """Raw scores (rows × outputs): logits for classification, the value for regression."""
    coef, intercept = weights.arrays()
    out: np.ndarray = np.asarray(X @ coef.T) + intercept
    return out


class CrossFitModels(BaseModel):
    """The fold models (fold j's is trained outside fold j) and the full model."""

    folds: list[LinearWeights] = Field(description="One model per fold")
    full: LinearWeights = Field(description="Trained on every training row")


class TextModel(BaseModel):
    """The consortium text model, as the coordinator stores it."""

    spec: str = Field(description="Text fingerprint of the spec it was trained for")
    vocabulary: TextVocabulary
    models: CrossFitModels
    rounds: int = Field(ge=0, description="FedAvg rounds run")


def party_updates(
    X: Any,
    y: np.ndarray,
    fold: np.ndarray,
    train: np.ndarray,
    models: CrossFitModels,
    settings: TextModelSettings,
) -> list[tuple[LinearWeights, int]]:
    """One party's round: every fold model and the full model fitted from the global ones
    on the party's training rows (outside the fold for fold models), with their counts."""
    out: list[tuple[LinearWeights, int]] = []
    for j, start in enumerate([*models.folds, models.full]):
        rows = train & (fold != j) if j < len(models.folds) else train
        idx = np.flatnonzero(rows)
        out.append((fit_local(X[idx], y[idx], start, settings), len(idx)))
    return out


#: Largest absolute weight or intercept the coordinator accepts in an update (TF-IDF columns
#: are at most 1; an SGD fit of a few epochs stays many orders of magnitude below).
MAX_ABS_WEIGHT = 1e6

#: One party's round: its fold models, then its full model, each with its training rows.
Updates = Sequence[tuple[LinearWeights, int]]


def update_problems(updates: Updates, *, folds: int, terms: int, outputs: int) -> list[str]:
    """What is wrong with one party's round, as the coordinator checks it: ``folds`` + 1
    models of ``outputs`` × ``terms`` finite weights within :data:`MAX_ABS_WEIGHT`, and
    counts that add up (a training row is outside exactly ``folds`` − 1 folds, so the fold
    models' rows sum to ``folds`` − 1 times the full model's)."""
    if len(updates) != folds + 1:
        return [f"{len(updates)} models, not {folds + 1} ({folds} folds and the full model)"]
    problems: list[str] = []
    for j, (weights, count) in enumerate(updates):
        name = "the full model" if j == folds else f"fold model {j}"
        try:
            coef, intercept = weights.arrays()
        except ValueError:
            problems.append(f"{name}: weights are not a matrix")
            continue
        if coef.shape != (outputs, terms) or intercept.shape != (outputs,):
            problems.append(
                f"{name}: weights of shape {coef.shape} and {intercept.shape}, "
                f"not ({outputs}, {terms}) and ({outputs},)"
            )
        elif not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
            problems.append(f"{name}: non-finite weights")
        elif (
            max(np.abs(coef).max(initial=0.0), np.abs(intercept).max(initial=0.0)) > MAX_ABS_WEIGHT
        ):
            problems.append(f"{name}: a weight beyond ±{MAX_ABS_WEIGHT:g}")
        if count < 0:
            problems.append(f"{name}: negative row count")
    counts = [n for _, n in updates]
    if not problems and sum(counts[:-1]) != (folds - 1) * counts[-1]:
        problems.append("the fold models' row counts do not add up to the full model's")
    return problems


def average_round(
    parties: Mapping[str, Updates],
    *,
    round_: int,
    min_parties: int,
    folds: int,
    terms: int,
    outputs: int,
) -> CrossFitModels:
    """The coordinator's side of a round: each party's updates checked
    (:func:`update_problems`; a failing party is left out of this round with its reason
    logged, fewer than ``min_parties`` passing is an error naming each), then FedAvg of each
    model over the accepted parties."""
    accepted: list[Updates] = []
    rejected: dict[str, str] = {}
    for party, updates in parties.items():
        problems = update_problems(updates, folds=folds, terms=terms, outputs=outputs)
        if problems:
            rejected[party] = "; ".join(problems)
            logger.warning("text model round %d: %s left out: %s", round_, party, rejected[party])
        else:
            accepted.append(updates)
    if len(accepted) < min_parties:
        raise TextModelError(
            _quorum_message(f"text model round {round_}", len(accepted), min_parties, rejected)
        )
    per_model = list(zip(*accepted, strict=True))
    averaged = [fed_average(list(m)) for m in per_model]
    return CrossFitModels(folds=averaged[:-1], full=averaged[-1])


def start_models(terms: int, folds: int, settings: TextModelSettings) -> CrossFitModels:
    zero = zero_weights(terms, settings)
    return CrossFitModels(folds=[zero] * folds, full=zero)


def cross_fit_scores(
    X: Any, fold: np.ndarray, train: np.ndarray, models: CrossFitModels
) -> np.ndarray:
    """Scores (rows × outputs): a training row's from its fold's model (out of fold), every
    other row's from the full model."""
    out = decision(X, models.full)
    for j, weights in enumerate(models.folds):
        idx = np.flatnonzero(train & (fold == j))
        if len(idx):
            out[idx] = decision(X[idx], weights)
    return out


def score_columns(outputs: int) -> list[str]:
    """Feature columns of the text model's score."""
    return ["model_score"] if outputs == 1 else [f"model_score_{c}" for c in range(outputs)]


#: One round at every party: the global models and the round number in, each party's
#: updates (fold models, then the full model, with their counts) out, by party.
FitRound = Callable[[CrossFitModels, int], Mapping[str, Updates]]


def federated_rounds(
    start: CrossFitModels,
    rounds: int,
    fit_round: FitRound,
    *,
    min_parties: int,
    settings: TextModelSettings,
) -> CrossFitModels:
    """The FedAvg loop of the text model: ``rounds`` times, every party fits the global
    models (``fit_round``: dispatched party steps in the flow, in memory elsewhere) and the
    coordinator checks and averages them by sample counts (:func:`average_round`)."""
    models = start
    folds, terms = len(start.folds), len(start.full.coef[0])  # outputs × terms, outputs ≥ 1
    for round_ in range(1, rounds + 1):
        models = average_round(
            fit_round(models, round_),
            round_=round_,
            min_parties=min_parties,
            folds=folds,
            terms=terms,
            outputs=settings.outputs,
        )
    return models


def learn_text_model(
    count: Callable[[], Mapping[str, DocumentCounts]],
    fit_round: Callable[[TextVocabulary, CrossFitModels, int], Mapping[str, Updates]],
    *,
    min_documents: int,
    min_parties: int,
    max_terms: int,
    ngram_max: int,
    folds: int,
    rounds: int,
    settings: TextModelSettings,
    spec: str,
) -> TextModel:
    """The coordinator's side of ``[text] model``: the parties' thresholded counts
    (``count``, by party) checked (:func:`review_counts`) and merged into the vocabulary,
    then :func:`federated_rounds` of the fold and full models (``fit_round``: every party's
    updates for the vocabulary, models, round)."""
    vocabulary = merge_document_frequencies(
        review_counts(count(), min_documents=min_documents, min_parties=min_parties),
        min_parties=min_parties,
        max_terms=max_terms,
        ngram_max=ngram_max,
    )
    start = start_models(len(vocabulary.terms), folds, settings)
    models = federated_rounds(
        start,
        rounds,
        lambda models, round_: fit_round(vocabulary, models, round_),
        min_parties=min_parties,
        settings=settings,
    )
    return TextModel(spec=spec, vocabulary=vocabulary, models=models, rounds=rounds)


def train_federated_text(
    parties: Mapping[str, tuple[Any, np.ndarray, np.ndarray, np.ndarray]],
    *,
    terms: int,
    folds: int,
    rounds: int,
    settings: TextModelSettings,
) -> CrossFitModels:
    """:func:`federated_rounds` in memory (benchmarks, references): ``parties`` maps a party
    to its (X, y, fold, train) arrays."""

    def fit_round(models: CrossFitModels, round_: int) -> dict[str, Updates]:
        return {p: party_updates(*data, models, settings) for p, data in parties.items()}

    return federated_rounds(
        start_models(terms, folds, settings), rounds, fit_round, min_parties=1, settings=settings
    )
