"""Evaluation building blocks: answer metrics, classification metrics, count baselines, report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmcore import scoring as ev
from lmcore.baselines import BigramLM, UnigramLM, fit_and_score


def test_exact_match_and_token_f1_use_squad_normalisation():
    assert ev.exact_match("The Answer!", "answer") == 1.0
    assert ev.exact_match("an answer", "answers") == 0.0
    assert ev.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (2 / 2 + 2 / 3))
    assert ev.token_f1("dog", "cat") == 0.0
    assert ev.token_f1("", "") == 1.0
    assert ev.answer_metrics(["yes", "no"], ["yes", "maybe"]) == {"exact_match": 0.5, "token_f1": 0.5}


def test_classification_metrics_per_class_and_macro():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 0, 0]
    m = ev.classification_metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision.a"] == pytest.approx(2 / 4) and m["recall.a"] == pytest.approx(2 / 3)
    assert m["precision.b"] == pytest.approx(1 / 2) and m["recall.b"] == pytest.approx(1 / 2)
    assert m["precision.c"] == 0.0 and m["recall.c"] == 0.0 and m["f1.c"] == 0.0
    f1_a = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)
    assert m["macro_f1"] == pytest.approx((f1_a + 0.5 + 0.0) / 3)
    assert ev.majority_baseline(y_true, 0, ["a", "b", "c"])["accuracy"] == pytest.approx(0.5)


def test_bigram_beats_unigram_on_structured_tokens_and_both_are_normalised():
    rng = np.random.default_rng(0)
    V = 40
    # A Markov chain: each token is mostly followed by one of two successors.
    successors = rng.integers(0, V, size=(V, 2))
    tokens = [0]
    for _ in range(20_000):
        tokens.append(int(successors[tokens[-1], rng.integers(0, 2)]) if rng.random() < 0.9 else int(rng.integers(V)))
    tokens = np.array(tokens)
    train, val = tokens[:15_000], tokens[15_000:]
    scores = fit_and_score(train, val, V)
    assert scores["bigram"].targets == scores["unigram"].targets == len(val) - 1
    assert scores["bigram"].nll_nats < 0.7 * scores["unigram"].nll_nats
    bigram = BigramLM(V).fit(train)
    for prev in (0, 5, V - 1):
        assert bigram.probs(np.full(V, prev), np.arange(V)).sum() == pytest.approx(1.0)
    assert np.exp(UnigramLM(V).fit(train).log_probs).sum() == pytest.approx(1.0)
    # A token never seen as a context falls back to the continuation distribution, still finite.
    assert math.isfinite(BigramLM(V + 5).fit(train).score(np.array([V + 4, V + 3, 1])).nll_nats)


def test_report_and_tables_are_byte_identical_across_writes(tmp_path):
    metrics = {"b.x": 1 / 3, "a.y": 2, "c": "text"}
    ev.write_report(tmp_path / "r1.json", metrics)
    ev.write_report(tmp_path / "r2.json", dict(reversed(list(metrics.items()))))
    assert (tmp_path / "r1.json").read_bytes() == (tmp_path / "r2.json").read_bytes()
    assert json.loads((tmp_path / "r1.json").read_text()) == {"a.y": 2, "b.x": 0.333333, "c": "text"}
    rows = [{"model": "base", "prompt": "In the, beginning", "completion": 'said "hi"\nthen'}]
    csv_path, json_path = ev.write_table(rows, tmp_path, "samples")
    assert json.loads(json_path.read_text()) == rows
    assert csv_path.read_text().startswith("model,prompt,completion\n")


def test_confusion_matrix_png_is_written_and_reproducible(tmp_path):
    first = ev.plot_confusion_matrix([[3, 1], [0, 4]], ["old", "new"], tmp_path / "a.png", "confusion")
    second = ev.plot_confusion_matrix([[3, 1], [0, 4]], ["old", "new"], tmp_path / "b.png", "confusion")
    assert first.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first.read_bytes() == second.read_bytes()


def test_baselines_fitted_chunk_by_chunk_equal_one_pass():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 30, size=5_000)
    chunks = [tokens[i : i + 777] for i in range(0, len(tokens), 777)]
    val = rng.integers(0, 30, size=500)
    whole, pieces = BigramLM(30).fit(tokens), BigramLM(30).fit(iter(chunks))
    assert np.array_equal(whole.pairs, pieces.pairs) and np.array_equal(whole.pair_counts, pieces.pair_counts)
    assert whole.score(val).nll_nats == pieces.score(val).nll_nats
    assert np.array_equal(UnigramLM(30).fit(tokens).log_probs, UnigramLM(30).fit(iter(chunks)).log_probs)


def test_shard_scoring_covers_every_target_once(tmp_path):
    from lmcore.baselines import score_shards, shard_chunks
    from lmcore.data.shards import ShardWriter, TokenShards

    tokens = np.random.default_rng(2).integers(0, 30, size=1_000)
    writer = ShardWriter(tmp_path, "0" * 16, vocab_size=30, shard_tokens=128)
    writer.add(tokens, np.array([len(tokens)]), utf8_bytes=4_000)
    writer.close()
    shards = TokenShards(tmp_path)
    bigram = BigramLM(30).fit(shard_chunks(shards, chunk=100))
    assert np.array_equal(bigram.pairs, BigramLM(30).fit(tokens).pairs)
    chunked, whole = score_shards(bigram, shards, chunk=100), bigram.score(tokens)
    assert chunked.targets == whole.targets == 999
    assert chunked.nll_nats == pytest.approx(whole.nll_nats, rel=1e-12)
