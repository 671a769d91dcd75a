"""Evaluation building blocks: answer metrics, classification metrics, plots and the samples table.

Everything here is a pure function of predictions and references (plus a file path for what it writes), so the
evaluate stage is just plumbing and every number in `reports/evaluate.json` is reproducible from its inputs.
Answer metrics follow SQuAD's normalisation (lower case, no punctuation or articles, single spaces): exact match
and the F1 of the bag of words shared by a generated answer and the reference.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmcore.files import atomic_write_text

ROUND = 6  # decimals of every float in a report: byte-identical reruns, no float-printing noise

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def rounded(value: float) -> float:
    return round(float(value), ROUND)


# --- generated answers ------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    shared = sum((Counter(pred) & Counter(ref)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and token-level F1 over pairs."""
    n = max(1, len(references))
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
    }


def perplexity(nll_nats: float, count: int) -> tuple[float, float]:
    """(mean loss in nats, perplexity) from a total NLL over `count` tokens."""
    loss = nll_nats / max(1, count)
    return loss, math.exp(min(loss, 700.0))


# --- classification ---------------------------------------------------------------------------------------------


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> np.ndarray:
    """Counts (num_labels × num_labels): row = true label, column = predicted label."""
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1 (0 where undefined), plus the confusion matrix."""
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(0).astype(np.float64), matrix.sum(1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    metrics: dict[str, Any] = {
        "accuracy": float(tp.sum() / max(1, matrix.sum())),
        "macro_f1": float(f1.mean()),
        "confusion_matrix": matrix.tolist(),
    }
    for i, label in enumerate(labels):
        metrics[f"precision.{label}"] = float(precision[i])
        metrics[f"recall.{label}"] = float(recall[i])
        metrics[f"f1.{label}"] = float(f1[i])
    return metrics


def majority_baseline(y_true: Sequence[int], majority: int, labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 of always answering the training split's most frequent label."""
    scores = classification_metrics(y_true, [majority] * len(y_true), labels)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


# --- files --------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """PNG written atomically; the metadata date is dropped so reruns give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    tmp.replace(path)
    _pyplot().close(fig)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    matrix = np.asarray(matrix)
    size = 2.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels=labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    return save_figure(fig, path)


def plot_bars(values: dict[str, float], path: Path, title: str, ylabel: str) -> Path:
    """A bar per named value (e.g. model vs baselines bits-per-byte)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(values), 3.5))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color="#4C72B0")
    ax.bar_label(bars, labels=[f"{values[n]:.3f}" for n in names])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save_figure(fig, path)


def write_table(rows: list[dict[str, Any]], directory: Path, name: str) -> tuple[Path, Path]:
    """The same rows as `name.csv` and `name.json`, both written atomically."""
    columns = list(rows[0]) if rows else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = directory / f"{name}.csv", directory / f"{name}.json"
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(json_path, json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    return csv_path, json_path


def write_report(path: Path, metrics: dict[str, Any]) -> Path:
    """A flat JSON report: sorted keys, floats rounded, no timings, so reruns are byte-identical."""
    flat = {k: rounded(v) if isinstance(v, float) else v for k, v in metrics.items()}
    atomic_write_text(path, json.dumps(flat, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path
