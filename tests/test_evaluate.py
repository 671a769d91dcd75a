"""The evaluate stage end to end: pretrained model vs baselines, SFT vs base, classifier vs majority, samples."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import copy_workspace, lmcycle

PROMPTS = ["In the beginning", "Hello, how are you?"]
EVALUATE = {"prompts": PROMPTS, "max_new_tokens": 6, "sft_max_examples": 12}


def read_report(root: Path) -> dict:
    return json.loads((root / "reports" / "evaluate.json").read_text())


def table(root: Path, name: str) -> list[dict]:
    return json.loads((root / "reports" / "evaluate" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def sft_evaluated(tmp_path_factory: pytest.TempPathFactory, pretrained_workspace: Path) -> Path:
    root = copy_workspace(
        pretrained_workspace,
        tmp_path_factory.mktemp("sft-eval") / "ws",
        finetune={"steps": 16, "lr": 0.002, "warmup_steps": 2, "eval_every": 8, "checkpoint_every": 16},
        evaluate=EVALUATE,
    )
    lmcycle("stage", "finetune", cwd=root)
    lmcycle("stage", "evaluate", cwd=root)
    return root


@pytest.fixture(scope="module")
def classification_evaluated(tmp_path_factory: pytest.TempPathFactory, pretrained_workspace: Path) -> Path:
    root = copy_workspace(
        pretrained_workspace,
        tmp_path_factory.mktemp("cls-eval") / "ws",
        finetune={
            "task": "classification",
            "steps": 60,
            "batch_size": 16,
            "lr": 0.002,
            "warmup_steps": 5,
            "eval_every": 30,
            "checkpoint_every": 60,
        },
        evaluate=EVALUATE,
    )
    lmcycle("stage", "finetune", cwd=root)
    lmcycle("stage", "evaluate", cwd=root)
    return root


def test_pretrained_model_is_scored_beside_the_count_baselines(sft_evaluated):
    report = read_report(sft_evaluated)
    for key in ("val_loss", "val_perplexity", "val_bpb", "unigram_bpb", "bigram_bpb"):
        assert math.isfinite(report[f"pretrain.{key}"]) and report[f"pretrain.{key}"] > 0
    assert report["pretrain.val_perplexity"] == pytest.approx(math.exp(report["pretrain.val_loss"]), rel=1e-5)
    # The bigram is the stronger baseline on real text; the 60-step tiny model loses to it and is called so.
    assert report["pretrain.bigram_bpb"] < report["pretrain.unigram_bpb"]
    assert report["pretrain.beats_bigram"] == 0 and report["pretrain.verdict"].startswith("undertrained")
    # Same bits-per-byte as the pretrain stage's own final evaluation of the same model on the same split.
    pretrain = json.loads((sft_evaluated / "reports" / "pretrain.json").read_text())
    assert report["pretrain.val_bpb"] == pytest.approx(pretrain["val_bpb"], abs=1e-5)
    val_text = (sft_evaluated / "data/ingest/pretrain/val.jsonl").read_bytes()
    assert report["pretrain.data_fingerprint"] == hashlib.sha256(val_text).hexdigest()[:16]
    assert (sft_evaluated / "reports/evaluate/pretrain_bpb.png").read_bytes()[:4] == b"\x89PNG"
    assert (report["evaluate.device"], report["evaluate.dtype"]) == ("cpu", "float32")  # evaluate.device left out


def test_sft_lowers_heldout_assistant_loss_against_the_base_model(sft_evaluated):
    report = read_report(sft_evaluated)
    assert report["sft.examples"] == 12 and report["sft.assistant_tokens"] == report["base.sft_assistant_tokens"] > 0
    assert report["sft.loss"] < report["base.sft_loss"]
    assert report["sft.loss_gain"] == pytest.approx(report["base.sft_loss"] - report["sft.loss"], abs=2e-6)
    for prefix in ("sft.", "base.sft_"):
        assert 0.0 <= report[f"{prefix}exact_match"] <= report[f"{prefix}token_f1"] <= 1.0
    rows = table(sft_evaluated, "predictions")
    assert [r["model"] for r in rows] == ["sft"] * 12 + ["base"] * 12
    mean_f1 = sum(r["token_f1"] for r in rows[:12]) / 12
    assert mean_f1 == pytest.approx(report["sft.token_f1"], abs=1e-6)
    assert (sft_evaluated / "reports/evaluate/finetune.png").is_file()


def test_default_sft_metrics_keep_the_reports_keys(sft_evaluated):
    """No `evaluate.sft_metrics` in params: the SFT sections hold exactly the keys they had before metrics could be
    chosen, and the predictions table exactly its columns."""
    report = read_report(sft_evaluated)
    answers = {"assistant_tokens", "exact_match", "loss", "perplexity", "token_f1"}
    assert {k for k in report if k.startswith("sft.")} == {
        f"sft.{k}" for k in answers | {"data_fingerprint", "examples", "loss_gain"}
    }
    assert {k for k in report if k.startswith("base.")} == {f"base.sft_{k}" for k in answers}
    columns = ["model", "prompt", "reference", "answer", "exact_match", "token_f1"]
    assert all(list(row) == columns for row in table(sft_evaluated, "predictions"))


def test_samples_table_has_greedy_and_top_p_from_base_and_finetuned(sft_evaluated):
    rows = table(sft_evaluated, "samples")
    combos = {(r["model"], r["mode"], r["prompt"]) for r in rows}
    assert combos == {(m, mode, p) for m in ("base", "finetuned") for mode in ("greedy", "top_p") for p in PROMPTS}
    with (sft_evaluated / "reports/evaluate/samples.csv").open(newline="") as f:
        assert list(csv.DictReader(f)) == rows


def test_evaluate_reruns_byte_identical(sft_evaluated, tmp_path):
    first = {name: (sft_evaluated / name).read_bytes() for name in ("reports/evaluate.json",)}
    first |= {
        f"reports/evaluate/{n}": (sft_evaluated / "reports/evaluate" / n).read_bytes()
        for n in ("samples.json", "predictions.csv", "pretrain_bpb.png", "finetune.png")
    }
    lmcycle("stage", "evaluate", cwd=sft_evaluated)
    for name, content in first.items():
        assert (sft_evaluated / name).read_bytes() == content, name


def test_classifier_beats_majority_and_transformers_predicts_the_same(classification_evaluated):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = classification_evaluated
    report = read_report(root)
    assert report["classification.majority_accuracy"] == pytest.approx(0.5)  # the testament set is balanced
    assert report["classification.accuracy"] > report["classification.majority_accuracy"] + 0.1
    assert report["classification.beats_majority"] == 1
    assert report["classification.macro_f1"] > report["classification.majority_macro_f1"]
    assert report["classification.verdict"].startswith("beats the majority-class baseline (accuracy ")
    for label in ("old", "new"):
        assert 0 < report[f"classification.precision.{label}"] <= 1
        assert 0 < report[f"classification.recall.{label}"] <= 1
    assert "sft.loss" not in report and report["classification.val_rows"] == 160
    assert (root / "reports/evaluate/finetune.png").read_bytes()[:4] == b"\x89PNG"

    rows = table(root, "predictions")
    hf_dir = root / "models" / "finetune" / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    texts = [r["text"] for r in rows]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == [r["predicted"] for r in rows]
    accuracy = sum(r["predicted"] == r["actual"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(report["classification.accuracy"], abs=1e-6)

    samples = table(root, "samples")
    assert {r["mode"] for r in samples if r["model"] == "finetuned"} == {"classify"}


@pytest.mark.slow
def test_lm_evaluation_harness_results_are_merged(tmp_path, pretrained_workspace):
    root = copy_workspace(
        pretrained_workspace, tmp_path / "ws", evaluate=EVALUATE | {"lm_eval": {"enabled": True, "limit": 3}}
    )
    lmcycle("stage", "evaluate", cwd=root)
    report = read_report(root)
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert math.isfinite(report[f"lm_eval.pretrain.{metric}"]) and report[f"lm_eval.pretrain.{metric}"] > 0
    assert report["lm_eval.data_fingerprint"] == report["pretrain.data_fingerprint"]
    # Different windows and document boundaries, the same model and text: the two bits-per-byte agree roughly.
    assert report["lm_eval.pretrain.bits_per_byte"] == pytest.approx(report["pretrain.val_bpb"], rel=0.25)
    assert not any(k.startswith(("sft.", "classification.")) for k in report)
