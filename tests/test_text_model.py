"""The consortium TF-IDF vocabulary (thresholded per party, merged over parties) and the
federated linear text model (FedAvg by sample counts, out-of-fold scores) that feeds its
score to the GBDT."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from scipy import sparse
from sklearn.metrics import roc_auc_score

from storage.runs import text_model_name
from tasks.prepare.modalities.text import segment_text, text_tokens
from tasks.prepare.text_model import (
    DocumentCounts,
    LinearWeights,
    TextModelError,
    TextModelSettings,
    TextVocabulary,
    average_round,
    cross_fit_scores,
    decision,
    document_frequencies,
    fed_average,
    fold_of,
    merge_document_frequencies,
    ngram_terms,
    party_updates,
    review_counts,
    start_models,
    strip_html,
    tfidf_matrix,
    train_federated_text,
)
from tasks.spec.load import parse_spec
from tasks.spec.models import SpecError

BINARY = TextModelSettings(task="binary", alpha=1e-5, learning_rate=0.5, epochs=2)

# -- tokens and vocabulary ----------------------------------------------------------------


def test_markup_is_stripped_before_tokenising() -> None:
    assert strip_html("Great<br /><br />taste &amp; smell") == "Great  taste & smell"
    assert text_tokens("Great<br />taste") == ["great", "taste"]
    runs, _, rest = segment_text("<p>很好</p> ok")
    assert runs and "p" not in rest


def test_terms_are_one_and_two_grams() -> None:
    assert ngram_terms(["not", "good", "at"], 2) == ["not", "good", "at", "not good", "good at"]
    assert ngram_terms(["x"], 2) == ["x"]


def test_a_party_reports_only_terms_in_at_least_k_documents() -> None:
    docs = [["a", "b", "a"], ["a"], ["b", "c"], []]
    counts = document_frequencies(docs, min_documents=2)
    # 'a' twice in one document counts once; 'c' (one document) stays at the party
    assert counts == DocumentCounts(documents=4, frequencies={"a": 2, "b": 2})
    with pytest.raises(TextModelError, match=r"text\.min_documents"):
        document_frequencies(docs, min_documents=0)


def test_the_vocabulary_keeps_terms_of_at_least_m_parties_with_merged_idf() -> None:
    p1 = DocumentCounts(documents=10, frequencies={"good": 6, "bad": 3, "only1": 9})
    p2 = DocumentCounts(documents=30, frequencies={"good": 10, "bad": 5})
    vocab = merge_document_frequencies([p1, p2], min_parties=2, max_terms=10, ngram_max=2)
    assert vocab.terms == ["good", "bad"]  # by summed df; 'only1' is at one party
    n = 40
    assert vocab.idf == pytest.approx(
        [np.log((1 + n) / (1 + 16)) + 1, np.log((1 + n) / (1 + 8)) + 1]
    )
    one = merge_document_frequencies([p1, p2], min_parties=1, max_terms=1, ngram_max=2)
    assert one.terms == ["good"]  # only1 (9) ranks below good (16): max_terms cuts
    with pytest.raises(TextModelError, match="empty vocabulary"):
        merge_document_frequencies([p1], min_parties=2, max_terms=10, ngram_max=2)


def test_tfidf_columns_mean_the_same_term_at_every_party() -> None:
    vocab = TextVocabulary(terms=["b", "a"], idf=[2.0, 1.0], ngram_max=1)
    X = tfidf_matrix([["a", "a", "b"], ["zz"]], vocab).toarray()
    expected = np.array([2.0, 2.0]) / np.sqrt(8.0)  # b: 1*2, a: 2*1, l2-normalised
    assert X[0] == pytest.approx(expected)
    assert X[1].tolist() == [0.0, 0.0]  # no vocabulary term: a zero row


# -- federated averaging and cross-fitting ------------------------------------------------


def test_fedavg_weighs_updates_by_sample_counts() -> None:
    a = LinearWeights(coef=[[1.0, 0.0]], intercept=[1.0])
    b = LinearWeights(coef=[[0.0, 4.0]], intercept=[-1.0])
    avg = fed_average([(a, 3), (b, 1), (LinearWeights(coef=[[9.0, 9.0]], intercept=[9.0]), 0)])
    assert avg.coef == [[0.75, 1.0]] and avg.intercept == [0.5]
    with pytest.raises(TextModelError, match="no party has training rows"):
        fed_average([(a, 0)])


def test_folds_come_from_the_key_alone() -> None:
    keys = pl.Series([f"c{i}" for i in range(3000)])
    fold = fold_of(keys, 5)
    assert fold.tolist() == fold_of(keys.reverse(), 5)[::-1].tolist()  # not row order
    assert set(fold.tolist()) == {0, 1, 2, 3, 4}
    assert np.bincount(fold).min() > 500
    assert fold_of(pl.Series(["c7"]), 5)[0] == fold[7]
    with pytest.raises(TextModelError, match=r"text\.folds"):
        fold_of(keys, 1)


def _toy(n: int, seed: int) -> tuple[Any, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = sparse.random(n, 40, density=0.15, random_state=seed, format="csr")
    y = np.asarray(X[:, :4].sum(axis=1)).ravel() + 0.05 * rng.normal(size=n) > 0.12
    return X, y.astype(np.int64)


def test_out_of_fold_scores_never_come_from_a_model_fitted_on_the_row() -> None:
    X, y = _toy(400, 0)
    fold = fold_of(pl.Series([f"e{i}" for i in range(400)]), 4)
    train = np.ones(400, dtype=bool)
    parties = {"a": (X[:200], y[:200], fold[:200], train[:200])}
    parties["b"] = (X[200:], y[200:], fold[200:], train[200:])
    models = train_federated_text(parties, terms=40, folds=4, rounds=4, settings=BINARY)
    scores = cross_fit_scores(X, fold, train, models)[:, 0]
    for j in range(4):  # a training row of fold j is scored by fold j's model
        rows = fold == j
        assert scores[rows] == pytest.approx(decision(X[rows], models.folds[j])[:, 0])
    # other rows (validation, test, new data) get the full model
    held = cross_fit_scores(X, fold, np.zeros(400, dtype=bool), models)[:, 0]
    assert held == pytest.approx(decision(X, models.full)[:, 0])
    assert roc_auc_score(y, scores) > 0.8


def test_a_party_without_one_class_still_takes_part() -> None:
    X, y = _toy(200, 1)
    fold = fold_of(pl.Series([f"e{i}" for i in range(200)]), 2)
    train = np.ones(200, dtype=bool)
    ones = y == 1
    parties = {
        "only-1": (X[ones], y[ones], fold[ones], train[ones]),
        "only-0": (X[~ones], y[~ones], fold[~ones], train[~ones]),
    }
    models = train_federated_text(parties, terms=40, folds=2, rounds=3, settings=BINARY)
    assert roc_auc_score(y, decision(X, models.full)[:, 0]) > 0.8
    assert len(start_models(40, 2, BINARY).folds) == 2


def _round(parties: dict[str, Any], min_parties: int = 1) -> Any:
    return average_round(parties, round_=2, min_parties=min_parties, folds=2, terms=40, outputs=1)


def test_a_malformed_text_update_is_left_out_with_its_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    X, y = _toy(200, 2)
    fold = fold_of(pl.Series([f"e{i}" for i in range(200)]), 2)
    train = np.ones(200, dtype=bool)
    good = party_updates(X, y, fold, train, start_models(40, 2, BINARY), BINARY)
    alone = _round({"a": good})
    nan = LinearWeights(coef=[[float("nan")] * 40], intercept=[0.0])
    wide = LinearWeights(coef=[[0.0] * 41], intercept=[0.0])
    huge = LinearWeights(coef=[[1e300] * 40], intercept=[0.0])
    ragged = LinearWeights(coef=[[0.0] * 40, [0.0]], intercept=[0.0])
    bad = {
        "nan": [good[0], (nan, good[1][1]), good[2]],
        "wide": [(wide, good[0][1]), good[1], good[2]],
        "huge": [good[0], good[1], (huge, good[2][1])],
        "ragged": [(ragged, good[0][1]), good[1], good[2]],
        "short": good[:2],
        "inflated": [good[0], good[1], (good[2][0], 10**9)],
        "negative": [(good[0][0], -5), good[1], good[2]],
    }
    with caplog.at_level("WARNING"):
        models = _round({"a": good, **bad})
    assert models == alone  # every bad party is left out, the good one is averaged alone
    text = caplog.text
    for reason in (
        "nan left out: fold model 1: non-finite weights",
        "wide left out: fold model 0: weights of shape (1, 41)",
        "huge left out: the full model: a weight beyond",
        "ragged left out: fold model 0: weights are not a matrix",
        "short left out: 2 models, not 3",
        "inflated left out: the fold models' row counts do not add up",
        "negative left out: fold model 0: negative row count",
    ):
        assert reason in text
    with pytest.raises(
        TextModelError, match=r"round 2: 1 valid part\(s\), text.min_parties is 2; left out: huge: "
    ):
        _round({"a": good, "huge": bad["huge"]}, min_parties=2)


def test_counts_that_break_the_threshold_are_left_out() -> None:
    fine = DocumentCounts(documents=10, frequencies={"good": 4, "bad taste": 3})
    rare = DocumentCounts(documents=10, frequencies={"secret-term": 1})
    above = DocumentCounts(documents=3, frequencies={"good": 4})
    blob = DocumentCounts(documents=10, frequencies={"x" * 5000: 4, "": 3})
    counts = {"a": fine, "rare": rare, "above": above, "blob": blob}
    assert review_counts(counts, min_documents=2, min_parties=1) == [fine]
    with pytest.raises(TextModelError) as caught:
        review_counts(counts, min_documents=2, min_parties=2)
    message = str(caught.value)
    assert "below text.min_documents (2)" in message and "exceeds the party's" in message
    assert "secret-term" not in message and "xxxx" not in message  # no term in the error


# -- spec ------------------------------------------------------------------------------------


def _demo_data(tmp_path: Path, layout: str = "horizontal") -> dict[str, Any]:
    from tasks.demo_data import write_demo_consortium

    spec = write_demo_consortium(str(tmp_path), layout=layout, customers=40)  # type: ignore[arg-type]
    data: dict[str, Any] = tomllib.loads(Path(spec).read_text())
    return data


def test_text_settings_are_validated_at_their_key(tmp_path: Path) -> None:
    data = _demo_data(tmp_path)
    assert data["text"]["model"] is True
    spec = parse_spec(data, source="spec.toml", base=str(tmp_path))
    assert spec.text.min_documents == 5 and spec.text.folds == 5
    for key, value, needle in [
        ("min_parties", 4, "text.min_parties: 4 > number of parties with a text source (3)"),
        ("min_documents", 0, "text.min_documents"),
        ("folds", 1, "text.folds"),
    ]:
        bad = {**data, "text": {**data["text"], key: value}}
        with pytest.raises(SpecError) as info:
            parse_spec(bad, source="spec.toml", base=str(tmp_path))
        assert needle in str(info.value)


def test_the_vertical_text_block_needs_a_training_mode(tmp_path: Path) -> None:
    data = _demo_data(tmp_path, "vertical")
    assert data["text"] == {"model": True}  # party B's text block in the demo
    parse_spec(data, source="spec.toml", base=str(tmp_path))
    no_mode = {**data, "fusion": {k: v for k, v in data["fusion"].items() if k != "mode"}}
    with pytest.raises(SpecError, match=r"text\.model: in the vertical layout the text party"):
        parse_spec(no_mode, source="spec.toml", base=str(tmp_path))
    # the opt-in of the mode stays required (the block is fitted on what it shares)
    no_opt_in = {**data, "fusion": {**data["fusion"], "share_gradients": False}}
    with pytest.raises(SpecError, match=r"fusion\.share_gradients"):
        parse_spec(no_opt_in, source="spec.toml", base=str(tmp_path))


# -- through the flow ------------------------------------------------------------------------


@pytest.mark.prefect
def test_prepare_learns_the_text_model_and_feeds_its_score_to_every_party(
    prefect_api: str, tmp_path: Path, secret: str
) -> None:
    from flows.prepare import party_pipeline, prepare
    from tasks.demo_data import write_demo_consortium
    from tasks.spec.load import load_spec

    spec_path = Path(write_demo_consortium(str(tmp_path), customers=300, parties=3, seed=3))
    text = spec_path.read_text().replace("FEDFUSE_SECRET", "FEDFUSE_TEST_SECRET")
    spec_path.write_text(text.replace("[text]\n", "[text]\nrounds = 2\nfolds = 3\n"))
    spec = load_spec(str(spec_path))
    assert (spec.text.rounds, spec.text.folds) == (2, 3)
    outputs = prepare(str(spec_path))

    [stored] = (tmp_path / "stores" / "coordinator" / "models").glob("text-model-*.json")
    assert stored.name == text_model_name(spec.text_fingerprint())
    body = json.loads(stored.read_text())
    assert len(body["models"]["folds"]) == 3 and body["rounds"] == 2
    assert "c000" not in stored.read_text()  # no entity key leaves a party
    prepared: dict[str, pl.DataFrame] = {}
    for party, out in outputs.items():
        fused = pl.read_parquet(out.table.uri)
        [column] = [c for c in fused.columns if c.endswith("model_score")]
        assert column == "text__model_score", party
        assert fused[column].drop_nulls().len() > 0, party
        prepared[party] = fused.select("entity_hash", column)

    # new rows to score use the stored model's full model; nothing is trained again
    mtime = stored.stat().st_mtime_ns
    scoring = party_pipeline(str(spec_path), "site-a", scoring=True)
    fresh = pl.read_parquet(scoring.table.uri).select("entity_hash", "text__model_score")
    both = prepared["site-a"].join(fresh, on="entity_hash", suffix="_new").drop_nulls()
    assert both.height > 0
    # the same entity: its fold's model at prepare, the full model when scoring
    assert (both["text__model_score"] != both["text__model_score_new"]).any()
    assert stored.stat().st_mtime_ns == mtime
    assert len(list(stored.parent.glob("text-model-*.json"))) == 1


def test_a_partys_rows_train_only_with_a_label_and_a_text(tiny_spec: Path, secret: str) -> None:
    """Through the party steps on real files: an entity with a text but no label, and one
    whose only text is empty, never train; only thresholded counts come out."""
    from tasks.prepare.steps import PartyContext, run_count_text_terms, text_training_data
    from tasks.spec.load import load_spec
    from tasks.spec.models import TextSpec

    feedback = tiny_spec.parent / "raw" / "a" / "feedback.jsonl"
    extra = {"user": "C9", "comment": "Terrible<br />service", "stars": 1, "at": "2026-03-05"}
    feedback.write_text(feedback.read_text() + json.dumps(extra) + "\n")
    spec = load_spec(str(tiny_spec))
    party = next(p for p in spec.parties if any(s.kind == "text" for s in p.sources))
    ctx = PartyContext.from_spec(spec, party.id)
    counts = run_count_text_terms(ctx, party.sources, TextSpec(min_documents=2))
    # C3's empty text is no document; 'terrible' and 'service' are in C1's and C9's texts
    assert counts.documents == 4
    assert counts.frequencies == {"terrible": 2, "service": 2, "terrible service": 2}
    vocab = merge_document_frequencies([counts], min_parties=1, max_terms=10, ngram_max=2)
    X, y, fold, train = text_training_data(ctx, party.sources, vocab, 3)
    assert X.shape == (5, 3) and len(y) == len(fold) == len(train) == 5  # C1..C4, C9
    assert not train[2] and not train[4]  # C3: empty text; C9: no label
    assert set(np.flatnonzero(train).tolist()) <= {0, 1, 3}
