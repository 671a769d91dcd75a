"""What the inputs of a source mean for each kind of data: pretraining documents, SFT conversations, labelled text.

Decisions, each counted in the ingest report where it drops something:
- A plain text file (`.txt`, `.md`, `.rst`, …) is one document; a record (jsonl/json/csv/parquet row, HF dataset
  row) is one document. With `group_by`, consecutive records with equal values of those fields form one document,
  their texts joined in order by a newline (so the KJV's verses, which the file keeps in order, become chapters).
  Grouping only consecutive records keeps memory bounded; a key that comes back later starts a new document.
- A row whose text field is absent, null, a list or a mapping is counted in `rows_missing_field` and skipped; a
  file in which every row lacks it is an error naming the file and the params key.
- Conversations: chatterbot-corpus YAML (`conversations:` lists of turns, the first turn from the user, then
  alternating), or records with a `messages` list of {role, content} (ShareGPT's {from, value} too) or
  `prompt`/`response` fields (the names come from the source's params). Role aliases map to user/assistant/system
  (`ROLE_ALIASES`); a conversation with any other role is skipped and counted in `unknown_roles` with the role's
  name. Trailing turns after the last assistant turn are dropped (a training example ends with a reply); a
  conversation without an assistant turn, or with a turn that is empty after cleaning, is dropped as empty.
  Conversations and classification texts are cleaned but never cut at `max_doc_chars`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lmcore.options import SourceConfig
from lmcore.data.clean import DocumentBuilder, carry_split, clean_text
from lmcore.data.sources import (
    BLOCK,
    TEXT_FORMATS,
    InputFile,
    ResolvedSource,
    is_binary,
    iter_conversations,
    iter_dataset_rows,
    iter_records,
    iter_text_blocks,
)
from lmcore.errors import DataError

ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "bot": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatbot": "assistant",
    "ai": "assistant",
    "system": "system",
}
Message = dict[str, str]


@dataclass
class Tally:
    """What one kind's ingest repaired, dropped and skipped (the numbers of its report)."""

    counts: Counter = field(default_factory=Counter)
    files_skipped: list[str] = field(default_factory=list)
    unknown_roles: Counter = field(default_factory=Counter)


@dataclass
class Input:
    """One unit of a source: a file, or an HF dataset."""

    name: str
    fmt: str
    file: InputFile | None = None
    dataset: Any = None

    def records(self, tally: Tally, columns: list[str]) -> Iterator[dict[str, Any]]:
        if self.dataset is not None:
            return iter_dataset_rows(self.dataset, columns)
        assert self.file is not None
        return iter_records(self.file, self.fmt, tally.counts, columns)


class FileRows:
    """Counts one input's rows and those lacking the needed field; every row lacking it is an error."""

    def __init__(self, name: str, what: str, key: str, tally: Tally) -> None:
        self.name, self.what, self.key, self.tally = name, what, key, tally
        self.rows = self.missing = 0

    def seen(self, ok: bool) -> bool:
        self.rows += 1
        if not ok:
            self.missing += 1
            self.tally.counts["rows_missing_field"] += 1
        return ok

    def check(self) -> None:
        if self.rows and self.missing == self.rows:
            raise DataError(f"{self.name}: none of its {self.rows} rows has {self.what} ({self.key})")


def iter_inputs(resolved: ResolvedSource, source: SourceConfig, tally: Tally) -> Iterator[Input]:
    """The inputs of a source in sorted order; binary files are skipped and listed."""
    if resolved.dataset is not None:
        yield Input(name=source.uri, fmt="records", dataset=resolved.dataset)
    for file in resolved.files:
        fmt = file.format(source.format)
        if fmt != "parquet" and is_binary(file):
            tally.files_skipped.append(file.name)
            continue
        yield Input(name=file.name, fmt=fmt, file=file)


def as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def string_blocks(text: str, size: int = BLOCK) -> Iterator[str]:
    """A long string as blocks of about `size` characters cut at line ends (or before whitespace), then a newline."""
    start = 0
    while len(text) - start > size:
        end = text.rfind("\n", start, start + size) + 1
        if end <= start:
            end = start + len(carry_split(text[start : start + size])[0])
        yield text[start:end]
        start = end
    yield text[start:] + "\n"


# --- pretrain ------------------------------------------------------------------------------------------------


def pretrain_documents(
    resolved: ResolvedSource, source: SourceConfig, key: str, tally: Tally
) -> Iterator[Iterable[str]]:
    """Each item is one document as a stream of text blocks, to be cleaned and cut by `cut_documents`."""
    for item in iter_inputs(resolved, source, tally):
        if item.fmt in TEXT_FORMATS:
            if source.group_by:
                raise DataError(f"{item.name}: {key}.group_by joins records, but this is a plain text file")
            yield _file_blocks(item.file, tally)
        elif item.fmt == "conversations":
            raise DataError(f"{item.name}: conversations (YAML) belong under data.sft, not {key}")
        else:
            yield from _record_documents(item, source, key, tally)


def _file_blocks(file: InputFile | None, tally: Tally) -> Iterator[str]:
    assert file is not None
    with file.open() as stream:
        yield from iter_text_blocks(stream, tally.counts)


def _record_texts(item: Input, source: SourceConfig, key: str, tally: Tally) -> Iterator[tuple[dict, str]]:
    rows = FileRows(item.name, f"the text field {source.text_field!r}", f"{key}.text_field", tally)
    for record in item.records(tally, [source.text_field, *source.group_by]):
        text = as_text(record.get(source.text_field))
        if rows.seen(text is not None):
            yield record, text  # type: ignore[misc]
    rows.check()


def _record_documents(item: Input, source: SourceConfig, key: str, tally: Tally) -> Iterator[Iterable[str]]:
    texts = _record_texts(item, source, key, tally)
    if not source.group_by:
        for _, text in texts:
            yield string_blocks(text)
        return
    group_key = lambda pair: tuple(pair[0].get(name) for name in source.group_by)  # noqa: E731
    for _, group in itertools.groupby(texts, key=group_key):
        yield itertools.chain.from_iterable(string_blocks(text) for _, text in group)


def cut_documents(documents: Iterable[Iterable[str]], max_chars: int, min_chars: int, tally: Tally) -> Iterator[str]:
    """Clean each document and cut the long ones (see lmcore.data.clean); count the empty and the cut ones."""
    for blocks in documents:
        builder = DocumentBuilder(max_chars)
        for block in blocks:
            yield from _long_enough(builder.feed(block), min_chars, tally)
        yield from _long_enough(builder.finish(), min_chars, tally)
        if builder.pieces == 0:
            tally.counts["empty_dropped"] += 1
        elif builder.pieces > 1:
            tally.counts["docs_split"] += 1


def _long_enough(pieces: Iterable[str], min_chars: int, tally: Tally) -> Iterator[str]:
    for piece in pieces:
        if len(piece) >= min_chars:
            yield piece
        else:
            tally.counts["empty_dropped"] += 1


# --- sft -----------------------------------------------------------------------------------------------------


def sft_conversations(
    resolved: ResolvedSource, source: SourceConfig, key: str, tally: Tally
) -> Iterator[list[Message]]:
    for item in iter_inputs(resolved, source, tally):
        if item.fmt in TEXT_FORMATS:
            raise DataError(f"{item.name}: plain text holds no conversations (set {key}.format or use jsonl/yml)")
        if item.fmt == "conversations":
            assert item.file is not None
            turns = iter_conversations(item.file, tally.counts)
            yield from _kept(_turns_to_messages(t, tally) for t in turns)
        else:
            yield from _kept(_record_conversations(item, source, key, tally))


def _kept(conversations: Iterable[list[Message] | None]) -> Iterator[list[Message]]:
    return (c for c in conversations if c is not None)


def _turns_to_messages(turns: Any, tally: Tally) -> list[Message] | None:
    if not isinstance(turns, list) or not turns or any(as_text(t) is None for t in turns):
        tally.counts["rows_invalid"] += 1
        return None
    roles = itertools.cycle(["user", "assistant"])
    return _finish_conversation([(next(roles), as_text(t) or "") for t in turns], tally)


def _record_conversations(item: Input, source: SourceConfig, key: str, tally: Tally) -> Iterator[list[Message] | None]:
    what = f"a {source.messages_field!r} list or {source.prompt_field!r}/{source.response_field!r} fields"
    rows = FileRows(item.name, what, f"{key}.messages_field", tally)
    columns = [source.messages_field, source.prompt_field, source.response_field]
    for record in item.records(tally, columns):
        messages = record.get(source.messages_field)
        prompt, response = as_text(record.get(source.prompt_field)), as_text(record.get(source.response_field))
        if isinstance(messages, list):
            rows.seen(True)
            yield _messages_from_list(messages, tally)
        elif rows.seen(prompt is not None and response is not None):
            yield _finish_conversation([("user", prompt or ""), ("assistant", response or "")], tally)
    rows.check()


def _messages_from_list(messages: list[Any], tally: Tally) -> list[Message] | None:
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            tally.counts["rows_invalid"] += 1
            return None
        raw_role = message.get("role", message.get("from"))
        content = as_text(message.get("content", message.get("value")))
        role = ROLE_ALIASES.get(str(raw_role).strip().lower())
        if role is None:
            tally.unknown_roles[str(raw_role)] += 1
            tally.counts["unknown_roles"] += 1
            return None
        if content is None:
            tally.counts["rows_invalid"] += 1
            return None
        turns.append((role, content))
    return _finish_conversation(turns, tally)


def _finish_conversation(turns: list[tuple[str, str]], tally: Tally) -> list[Message] | None:
    messages = [{"role": role, "content": clean_text(content)} for role, content in turns]
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not messages or any(not m["content"] for m in messages):
        tally.counts["empty_dropped"] += 1
        return None
    return messages


# --- classification ------------------------------------------------------------------------------------------


def classification_examples(
    resolved: ResolvedSource, source: SourceConfig, key: str, tally: Tally
) -> Iterator[tuple[str, str]]:
    for item in iter_inputs(resolved, source, tally):
        if item.fmt in TEXT_FORMATS or item.fmt == "conversations":
            raise DataError(f"{item.name}: classification needs records with text and label fields, not {item.fmt}")
        what = f"the fields {source.text_field!r} and {source.label_field!r}"
        rows = FileRows(item.name, what, f"{key}.text_field/label_field", tally)
        for record in item.records(tally, [source.text_field, source.label_field]):
            text, label = as_text(record.get(source.text_field)), as_text(record.get(source.label_field))
            if not rows.seen(text is not None and label is not None):
                continue
            text, label = clean_text(text or ""), clean_text(label or "")
            if text and label:
                yield text, label
            else:
                tally.counts["empty_dropped"] += 1
        rows.check()
