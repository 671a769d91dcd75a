"""Supervised fine-tuning data: conversations → token ids with a loss mask on the assistant's words only.

A conversation is rendered with the tokenizer's own chat template (for lmcycle tokenizers `render_chat`, identical
to `tokenizer.apply_chat_template` in stock transformers) and tokenized once. Which tokens are trained on is found
from character spans, not from re-tokenizing pieces: the span of assistant turn i starts where the rendering of the
turns before it with a generation prompt ends, and ends where the rendering that includes it ends — so the target
tokens are exactly the assistant content and its closing `<|end|>`, for any template with that prefix property.
Prompts, system turns, user turns and role markers are context only (IGNORE_INDEX).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmcore.errors import CheckpointError, DataError
from lmcore.finetune.data import read_jsonl
from lmcore.model import IGNORE_INDEX
from lmcore.tokenizer import render_chat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

ROLES = ("system", "user", "assistant")


@dataclass
class SftExample:
    """One training row: `targets[t]` is the token after `input_ids[t]`, or IGNORE_INDEX when not trained on."""

    input_ids: list[int]
    targets: list[int]
    segments: list[int] | None = None  # packed rows: which example (1, 2, …) each token belongs to

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


@dataclass
class SftStats:
    rows: int = 0
    no_assistant: int = 0  # rows skipped: nothing to learn from
    truncated: int = 0  # rows cut to the context length (they keep their first tokens)
    emptied_by_truncation: int = 0  # rows whose every assistant token fell beyond the context length
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# --- reading conversations -------------------------------------------------------------------------------------


def to_messages(record: Any, where: str) -> list[dict[str, str]]:
    """The record's conversation: its `messages` list, or a `prompt`/`response` pair as a user and assistant turn."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with `messages` or `prompt`/`response`")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise DataError(f"{where}: a row needs `messages` or both `prompt` and `response`")
    if not isinstance(messages, list):
        raise DataError(f"{where}: `messages` must be a list of {{role, content}} objects")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} needs a string `content`")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {role!r}; roles are {', '.join(ROLES)}")
        checked.append({"role": role, "content": m["content"]})
    return checked


def has_assistant_turn(messages: list[dict[str, str]]) -> bool:
    return any(m["role"] == "assistant" and m["content"].strip() for m in messages)


def load_conversations(path: Path, stats: SftStats | None = None) -> list[list[dict[str, str]]]:
    """Every conversation of a jsonl split with at least one assistant turn; the others are counted and skipped."""
    stats = stats if stats is not None else SftStats()
    conversations = []
    for number, record in read_jsonl(path):
        stats.rows += 1
        messages = to_messages(record, f"{path}:{number}")
        if not has_assistant_turn(messages):
            stats.no_assistant += 1
            continue
        conversations.append(messages)
    if not conversations:
        detail = f"all {stats.rows} rows lack an assistant turn" if stats.rows else "no rows"
        raise DataError(f"{path}: no usable SFT conversations ({detail})")
    return conversations


# --- tokenizing with a loss mask -------------------------------------------------------------------------------


Render = Callable[[list[dict[str, str]], bool], str]


def chat_renderer(tokenizer: PreTrainedTokenizerFast, where: str) -> Render:
    """The tokenizer's own chat template as a function (messages, add_generation_prompt) -> text.

    lmcycle tokenizers carry CHAT_TEMPLATE, which `render_chat` reproduces without Jinja (fast); any other
    template (a model a user brings) is rendered by transformers.
    """
    from lmcore.tokenizer import CHAT_TEMPLATE

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise CheckpointError(f"{where}: the tokenizer has no chat template; SFT renders conversations with it")
    if template == CHAT_TEMPLATE:
        return render_chat

    def render(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def assistant_spans(messages: list[dict[str, str]], render: Render = render_chat) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans [start, end) of each assistant turn's content and its end marker."""
    text = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise CheckpointError("the chat template does not render a conversation's turns as prefixes of it")
        spans.append((len(prompt), len(upto)))
    return text, spans


def encode_conversation(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerFast, render: Render = render_chat
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn."""
    text, spans = assistant_spans(messages, render)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    trained = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), trained


def build_example(ids: list[int], trained: list[bool], max_length: int) -> tuple[SftExample, bool]:
    """Shift by one for next-token targets and cut to `max_length` positions; returns (example, was_truncated)."""
    truncated = len(ids) > max_length + 1
    ids, trained = ids[: max_length + 1], trained[: max_length + 1]
    targets = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids[1:], trained[1:], strict=True)]
    return SftExample(input_ids=ids[:-1], targets=targets), truncated


def build_examples(
    conversations: Iterable[list[dict[str, str]]],
    tokenizer: PreTrainedTokenizerFast,
    max_length: int,
    stats: SftStats | None = None,
    render: Render = render_chat,
) -> list[SftExample]:
    stats = stats if stats is not None else SftStats()
    examples = []
    for messages in conversations:
        ids, trained = encode_conversation(messages, tokenizer, render)
        example, truncated = build_example(ids, trained, max_length)
        stats.truncated += truncated
        if example.n_targets == 0:
            stats.emptied_by_truncation += 1
            continue
        examples.append(example)
        stats.tokens += len(example)
        stats.target_tokens += example.n_targets
    stats.examples = len(examples)
    return examples


def pack_examples(examples: list[SftExample], max_length: int) -> list[SftExample]:
    """Greedy packing in order: whole examples are appended to a row while they fit, so no example is split.

    Each token keeps the number of its example within the row (`segments`): collate hands them to the model as
    `segment_ids`, so an example attends only to itself, with positions from 0, exactly as it would unpacked.
    Fewer pad tokens, no cross-example context. The loss mask is kept per token.
    """
    packed: list[SftExample] = []
    row = SftExample([], [], [])
    for ex in examples:
        if row.input_ids and len(row) + len(ex) > max_length:
            packed.append(row)
            row = SftExample([], [], [])
        segment = (row.segments[-1] if row.segments else 0) + 1
        row = SftExample(row.input_ids + ex.input_ids, row.targets + ex.targets, row.segments + [segment] * len(ex))
    if row.input_ids:
        packed.append(row)
    return packed


def collate(examples: list[SftExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors. Causal attention keeps real tokens blind to the pads after them, so no mask is needed
    in the forward pass; `attention_mask` is returned for consumers that want it. Packed rows add `segment_ids`
    (0 on pads), which the model's forward takes as a per-example mask."""
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    batch = {"input_ids": ids, "targets": targets, "attention_mask": mask}
    if any(ex.segments for ex in examples):
        batch["segment_ids"] = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        targets[row, :n] = torch.tensor(ex.targets)
        mask[row, :n] = 1
        if "segment_ids" in batch:
            batch["segment_ids"][row, :n] = torch.tensor(ex.segments) if ex.segments else 1
    return batch


# --- loss -----------------------------------------------------------------------------------------------------


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the batch's assistant tokens (packed rows: each example on its own)."""
    if "segment_ids" in batch:
        return model(batch["input_ids"], targets=batch["targets"], segment_ids=batch["segment_ids"])
    return model(batch["input_ids"], targets=batch["targets"])


def assistant_nll(
    model: torch.nn.Module, examples: list[SftExample], pad_id: int, batch_size: int
) -> tuple[float, int]:
    """(total NLL in nats, number of assistant tokens) over examples, without gradients: loss and perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            losses = model.token_losses(batch["input_ids"].to(device), batch["targets"].to(device))
            total += float(losses.double().sum())
            count += int((batch["targets"] != IGNORE_INDEX).sum())
    return total, count


# --- prompts and references for generation metrics ------------------------------------------------------------


def prompt_and_reference(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The turns before the last assistant turn (the prompt) and that turn's content (the reference answer)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
