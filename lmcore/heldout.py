"""Score a Hugging Face model directory on held-out data: bits-per-byte of a text, assistant-token loss and
greedy-answer metrics on conversations (lmcore.taskmetrics, chosen by name), classifier metrics on labelled rows,
and the model + tokenizer loader and sampler they share.

The evaluate stage writes these numbers into reports/evaluate.json and the promotion gate re-scores a champion with
the same functions, so a champion and a challenger are compared by one definition of each metric. Every function
takes plain values (directories, data, batch sizes, a device and dtype name: cpu/float32 unless told), never the
params schema; torch and transformers are imported
inside the functions that need them.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import DataError
from lmcore.options import DEFAULT_SFT_METRICS

if TYPE_CHECKING:
    import torch

    from lmcore.finetune.classification import ClassificationData

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


def load_lm(directory: Path, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """(lmcore Transformer in eval mode on `device` with `dtype` weights, tokenizer) of an HF causal-LM directory
    (lmcore.hfcausal.HFCausalLM for an architecture lmcore does not run natively)."""
    from lmcore.hfcausal import load_causal_lm
    from lmcore.tokenizer import model_tokenizer

    model, _ = load_causal_lm(directory)
    return placed(model, device, dtype).eval(), model_tokenizer(directory)


def placed(model: torch.nn.Module, device: str, dtype: str) -> torch.nn.Module:
    """The model on `device` with `dtype` weights (names as lmcore.device resolves them); cpu/float32 is a no-op."""
    import torch

    return model.to(device=device, dtype=getattr(torch, dtype))


# --- language modelling --------------------------------------------------------------------------------------------


def text_bpb(
    model_dir: Path,
    jsonl: Path,
    batch_size: int,
    *,
    num_workers: int,
    encode_batch_size: int,
    shard_tokens: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> float:
    """Bits-per-byte of a model directory on a jsonl text split, tokenized afresh with the model's own tokenizer
    (so a model with another tokenizer is scored on the same text) and read by `evaluate_lm` over the whole split.
    The encoding settings change only how the text is batched, never the tokens."""
    import torch

    from lmcore.data.encode import encode_split
    from lmcore.data.shards import TokenShards
    from lmcore.hfcausal import load_causal_lm
    from lmcore.metrics import evaluate_lm
    from lmcore.tokenizer import read_tokenizer, tokenizer_fingerprint

    model, mcfg = load_causal_lm(model_dir)
    model = placed(model, device, dtype).eval()
    tok = read_tokenizer(model_dir)
    fingerprint = tokenizer_fingerprint(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "val"
        encode_split(
            tok,
            jsonl,
            out,
            fingerprint,
            num_workers=num_workers,
            batch_size=encode_batch_size,
            shard_tokens=shard_tokens,
        )
        shards = TokenShards(out, expected_fingerprint=fingerprint)
        with torch.no_grad():
            scores = evaluate_lm(model, shards, mcfg.context_length, batch_size)
    return float(scores["bpb"])


# --- conversations -------------------------------------------------------------------------------------------------


def sft_scores(
    directory: Path,
    conversations: list,
    name: str,
    *,
    batch_size: int,
    max_new_tokens: int,
    metrics: Sequence[str] = DEFAULT_SFT_METRICS,
    log: Log = _quiet,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Assistant-token loss and perplexity, then the chosen answer `metrics` (lmcore.taskmetrics) of greedy answers,
    and one row per answer with its per-example values."""
    from lmcore.finetune import sft
    from lmcore.taskmetrics import corpus_scores, example_scores

    model, tokenizer = load_lm(directory, device, dtype)
    render = sft.chat_renderer(tokenizer, str(directory))
    context = model.config.context_length
    examples = sft.build_examples(conversations, tokenizer, context, render=render)
    nll, count = sft.assistant_nll(model, examples, tokenizer.pad_token_id, batch_size)
    loss = nll / max(1, count)
    prompts, references, questions = [], [], []
    for messages in conversations:
        prompt, reference = sft.prompt_and_reference(messages)
        prompts.append(render(prompt, True))
        references.append(reference)
        questions.append(next((m["content"] for m in reversed(prompt) if m["role"] == "user"), ""))
    log(f"{name}: greedy answers to {len(prompts)} held-out prompts")
    answers = complete(model, tokenizer, prompts, max_new_tokens, True, seed=0, batch_size=batch_size)
    scores = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "assistant_tokens": count}
    per_example = example_scores(answers, references, metrics)
    rows = [
        {"model": name, "prompt": q, "reference": r, "answer": a} | values
        for q, r, a, values in zip(questions, references, answers, per_example, strict=True)
    ]
    return scores | corpus_scores(answers, references, metrics, per_example), rows


# --- classification ------------------------------------------------------------------------------------------------


@dataclass
class Classified:
    """A classifier's held-out scores (`classification.*`), its confusion matrix and one row per prediction."""

    metrics: dict[str, Any]
    matrix: Any
    labels: list[str]
    rows: list[dict[str, Any]]


def classifier_scores(
    model_dir: Path,
    data: ClassificationData,
    val_path: Path,
    batch_size: int,
    log: Log = _quiet,
    device: str = "cpu",
    dtype: str = "float32",
) -> Classified:
    """Accuracy, macro-F1, per-class scores and the majority-class baseline of a classifier on `data.val`
    (read from `val_path`, named in errors); a held-out label the classifier does not know is a DataError."""
    from lmcore.finetune import classification as cls
    from lmcore.scoring import classification_metrics, majority_baseline
    from lmcore.tokenizer import model_tokenizer

    model, labels = cls.import_hf_classifier(model_dir)
    model = placed(model, device, dtype)
    tokenizer = model_tokenizer(model_dir)
    unknown = sorted({row.label for row in data.val} - set(labels))
    if unknown:
        raise DataError(f"{val_path}: label(s) {unknown} unknown to the classifier in {model_dir} (labels {labels})")
    label2id = {label: i for i, label in enumerate(labels)}
    rows, _ = cls.encode_texts([r.text for r in data.val], tokenizer, model.config.context_length)
    log(f"classifier on {len(rows)} held-out rows")
    predicted = cls.predict(model, rows, tokenizer.pad_token_id, batch_size)
    actual = [label2id[r.label] for r in data.val]
    scores = classification_metrics(actual, predicted, labels)
    matrix = scores.pop("confusion_matrix")
    majority = majority_baseline(actual, label2id[data.majority_label()], labels)
    metrics = {f"classification.{k}": v for k, v in scores.items()}
    metrics |= {
        "classification.val_rows": len(rows),
        "classification.majority_label": data.majority_label(),
        "classification.majority_accuracy": majority["accuracy"],
        "classification.majority_macro_f1": majority["macro_f1"],
        "classification.beats_majority": int(scores["accuracy"] > majority["accuracy"]),
    }
    table = [
        {"text": r.text, "actual": labels[a], "predicted": labels[p]}
        for r, a, p in zip(data.val, actual, predicted, strict=True)
    ]
    return Classified(metrics, matrix, list(labels), table)


# --- generation ----------------------------------------------------------------------------------------------------


def complete(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    greedy: bool,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
) -> list[str]:
    """Continuations of already-rendered texts (their special tokens included), stopping at EOS or end of turn.

    lmcore's KV-cache sampler; prompts longer than the context allows keep their last tokens.
    """
    from tqdm import tqdm

    from lmcore.engine import SamplingConfig, generate
    from lmcore.generate import stop_tokens

    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        seed=seed,
        stop_token_ids=stop_tokens(tokenizer, chat=True),
    )
    prompts = [tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", file=sys.stderr, disable=not sys.stderr.isatty()):
        for ids in generate(model, prompts[start : start + batch_size], cfg, tokenizer.pad_token_id):
            outputs.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return outputs
