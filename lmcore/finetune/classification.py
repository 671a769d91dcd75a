"""Sequence classification on the decoder: labelled text, label ↔ id maps, and a linear head on the last token.

The head is Hugging Face's `LlamaForSequenceClassification` in miniature: a bias-free linear `score` layer applied
to the final hidden state of the last non-pad token of each (right-padded) row. Keeping that exact shape means the
exported model loads in stock transformers and predicts what lmcore predicts. Labels are strings (a CSV's `1` and
a JSON's `1` are the same class), numbered in sorted order, so the mapping depends only on the training labels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmcore.errors import DataError
from lmcore.finetune.data import read_jsonl
from lmcore.model import ModelConfig, Transformer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@dataclass
class LabelledText:
    text: str
    label: str


@dataclass
class ClassificationData:
    train: list[LabelledText]
    val: list[LabelledText]
    labels: list[str]  # id → label
    skipped_empty: dict[str, int] = field(default_factory=dict)

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def balance(self, split: str) -> dict[str, int]:
        counts = Counter(row.label for row in getattr(self, split))
        return {label: counts.get(label, 0) for label in self.labels}

    def majority_label(self) -> str:
        """The most frequent training label (ties: the first in label order): the majority-class baseline."""
        counts = self.balance("train")
        return max(self.labels, key=lambda label: (counts[label], -self.labels.index(label)))


def label_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def read_split(path: Path, text_field: str, label_field: str) -> tuple[list[LabelledText], int]:
    """Rows of one split and how many had empty text (skipped); missing columns are errors naming the params key."""
    rows, empty, total = [], 0, 0
    for number, record in read_jsonl(path):
        total += 1
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        if label_field not in record:
            raise DataError(f"{where}: no label column {label_field!r} (finetune.label_field)")
        if text_field not in record:
            raise DataError(f"{where}: no text column {text_field!r} (finetune.text_field)")
        text, label = record[text_field], record[label_field]
        if label is None or label_text(label) == "":
            raise DataError(f"{where}: empty label in column {label_field!r}")
        if not isinstance(text, str) or not text.strip():
            empty += 1
            continue
        rows.append(LabelledText(text=text, label=label_text(label)))
    if not rows:
        detail = f"all {total} rows have an empty text column {text_field!r}" if total else "no rows"
        raise DataError(f"{path}: no usable classification rows ({detail}; finetune.text_field)")
    return rows, empty


def load_classification(train_path: Path, val_path: Path, text_field: str, label_field: str) -> ClassificationData:
    train, train_empty = read_split(train_path, text_field, label_field)
    val, val_empty = read_split(val_path, text_field, label_field)
    labels = sorted({row.label for row in train})
    if len(labels) < 2:
        raise DataError(f"{train_path}: classification needs at least 2 labels, found {labels}")
    unseen = sorted({row.label for row in val} - set(labels))
    if unseen:
        raise DataError(f"{val_path}: label(s) {unseen} never appear in the training split {train_path}")
    return ClassificationData(train, val, labels, {"train": train_empty, "val": val_empty})


def encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerFast, max_length: int) -> tuple[list[list[int]], int]:
    """Token ids (with the tokenizer's own special tokens, as stock transformers adds them) cut to max_length.

    Returns (ids, number truncated). The text's start is kept: for last-token pooling the cut end is what is read.
    """
    encoded = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    truncated = sum(len(ids) > max_length for ids in encoded)
    return [list(ids[:max_length]) for ids in encoded], truncated


def collate_ids(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost real token of each row (what HF's sequence classifiers pool)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


class Classifier(nn.Module):
    """The decoder with a `score` head, pooled at the last real token of each right-padded row."""

    def __init__(self, transformer: Transformer, num_labels: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.score = nn.Linear(transformer.config.d_model, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=transformer.config.init_std)

    @property
    def config(self) -> ModelConfig:
        return self.transformer.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_labels). Causal attention keeps real tokens blind to the pads after them."""
        h = self.transformer.hidden_states(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pooled = h[torch.arange(h.shape[0], device=h.device), last_token_index(attention_mask)]
        return self.score(pooled).float()


def classification_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of the batch; `weight` (one per class, e.g. balanced class weights) weighs each row by
    its target's class and normalises by the summed weights, as torch does."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    return nn.functional.cross_entropy(logits, batch["labels"], weight=weight)


def predict(model: torch.nn.Module, rows: list[list[int]], pad_id: int, batch_size: int) -> list[int]:
    """Predicted label ids for token rows, in order."""
    return logits(model, rows, pad_id, batch_size).argmax(-1).tolist()


def logits(model: torch.nn.Module, rows: list[list[int]], pad_id: int, batch_size: int) -> torch.Tensor:
    """Class logits (N, num_labels) for token rows, in order, without gradients."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate_ids(rows[start : start + batch_size], pad_id)
            out.append(model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
    return torch.cat(out)


def import_hf_classifier(directory: str | Path) -> tuple[Classifier, list[str]]:
    """An lmcore Classifier and its labels (id order) from a `LlamaForSequenceClassification` directory."""
    import json

    from lmcore.errors import CheckpointError
    from lmcore.export import from_hf_state_dict, read_hf_config
    from lmcore.weightfiles import read_safetensors

    directory = Path(directory)
    config = read_hf_config(directory)
    hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    id2label = hf.get("id2label") or {}
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    state = read_safetensors(directory)
    if "score.weight" not in state:
        raise CheckpointError(f"{directory}: no score.weight (not a sequence-classification model)")
    if state["score.weight"].shape[0] != len(labels):
        raise CheckpointError(
            f"{directory}: score.weight has {state['score.weight'].shape[0]} rows, id2label {len(labels)}"
        )
    transformer = Transformer(config)
    weights = from_hf_state_dict(state, config, source=str(directory))
    model = Classifier(transformer, len(labels))
    with torch.no_grad():
        params = transformer.state_dict()
        for name, tensor in weights.items():
            params[name].copy_(tensor)
        model.score.weight.copy_(state["score.weight"])
    return model, labels
