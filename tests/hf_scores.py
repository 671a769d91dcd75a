"""The evaluation metrics the promotion gate compares, computed a second way: stock `transformers`
(AutoTokenizer, AutoModelForCausalLM, AutoModelForSequenceClassification) on the raw held-out files, written from
the metrics' definitions and sharing no code with lmcore's scorers. Tests check the gate's re-scoring against these.

- pretrain.val_bpb: each document as `<|bos|> text <|eos|>`, back to back; non-overlapping windows of the context
  length predict every token after the first once; total NLL in bits over the texts' UTF-8 bytes.
- sft.loss: mean NLL of the assistant tokens (each assistant turn's content and its `<|end|>`) of the first
  `evaluate.sft_max_examples` held-out conversations, each cut to the context length.
- classification.macro_f1: argmax predictions on the held-out texts, per-label F1 averaged over the labels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _context(model) -> int:
    return int(model.config.max_position_embeddings)


def val_bpb(model_dir: Path, val_jsonl: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts = [row["text"] for row in _rows(val_jsonl)]
    stream: list[int] = []
    for text in texts:
        stream += [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    context, nll = _context(model), 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, context):
            window = torch.tensor([stream[start : start + context + 1]])
            if window.shape[1] < 2:
                break
            logits = model(window[:, :-1]).logits[0].double()
            nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
    return nll / (math.log(2) * sum(len(t.encode("utf-8")) for t in texts))


def sft_loss(model_dir: Path, val_jsonl: Path, max_examples: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assistant, end = tok.convert_tokens_to_ids("<|assistant|>"), tok.convert_tokens_to_ids("<|end|>")
    conversations = [r["messages"] for r in _rows(val_jsonl) if any(m["role"] == "assistant" for m in r["messages"])]
    total, count = 0.0, 0
    for messages in conversations[:max_examples]:
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"][: _context(model) + 1]
        trained, inside = [], False
        for token in ids:  # from after <|assistant|> up to and including the <|end|> that closes the turn
            trained.append(inside)
            if token == assistant:
                inside = True
            elif token == end:
                inside = False
        targets = [(i, t) for i, t in enumerate(ids) if trained[i] and i > 0]
        if not targets:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        total -= sum(float(logp[i - 1, t]) for i, t in targets)
        count += len(targets)
    return total / count


def macro_f1(model_dir: Path, val_jsonl: Path, text_field: str = "text", label_field: str = "label") -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    rows = _rows(val_jsonl)
    enc = tok(
        [r[text_field] for r in rows],
        padding=True,
        truncation=True,
        max_length=_context(model),
        return_tensors="pt",
    )
    with torch.no_grad():
        predicted = [model.config.id2label[int(i)] for i in model(**enc).logits.argmax(-1)]
    actual = [r[label_field] for r in rows]
    scores = []
    for label in model.config.id2label.values():
        tp = sum(a == p == label for a, p in zip(actual, predicted, strict=True))
        fp = sum(p == label != a for a, p in zip(actual, predicted, strict=True))
        fn = sum(a == label != p for a, p in zip(actual, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def gate_metric(metric: str, model_dir: Path, root: Path, config) -> float:
    """The gate metric `metric` of the model in `model_dir` on the workspace `root`'s held-out data."""
    split = Path(root) / "data" / "ingest"
    if metric == "pretrain.val_bpb":
        return val_bpb(model_dir, split / "pretrain" / "val.jsonl")
    if metric == "sft.loss":
        return sft_loss(model_dir, split / "sft" / "val.jsonl", config.evaluate.sft_max_examples)
    if metric == "classification.macro_f1":
        cfg = config.finetune
        return macro_f1(model_dir, split / "classification" / "val.jsonl", cfg.text_field, cfg.label_field)
    raise ValueError(f"no independent scorer for {metric}")
