"""The ingest stage: every data source → cleaned, deduplicated, split jsonl under data/ingest/<kind>/{train,val}.jsonl.

Records stream to the output files as they are read, so memory holds a block of input and one document, whatever
the corpus size: the 64-bit hash of each kept document (deduplication, across all sources of a kind; the first
copy in source and file order is kept) lives in an SQLite file (lmcore/data/dedup.py) and the n-gram hashes of the
contamination check in spill files (lmcore/data/hashspill.py), both in a scratch directory inside the temporary
output directory, removed before it is swapped in. Everything is written into a temporary directory beside
data/ingest that replaces it only at the end: a failed run leaves the previous output untouched. The same inputs
and params give byte-identical outputs and report (reports/ingest.json, no timings), which is what lets
`always_changed: true` in dvc.yaml skip every downstream stage when nothing changed. A source that yields no
document after cleaning (say, only binary or blank files) and a split left empty by `data.val_fraction` are errors.

Output records (one JSON object a line, keys sorted, UTF-8):
  pretrain        {"id", "source", "text"}
  sft             {"id", "source", "messages": [{"role": "system"|"user"|"assistant", "content"}, …]}
  classification  {"id", "source", "text", "label"}   (duplicates are found by text alone: the first label wins)
`id` is 16 hex digits of the content's SHA-256 and `source` the index of the source in its params list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmcore.data.dedup import SeenSet
from lmcore.data.records import (
    Message,
    Tally,
    classification_examples,
    cut_documents,
    pretrain_documents,
    sft_conversations,
)
from lmcore.data.sources import ResolvedSource, resolve
from lmcore.data.split import NgramOverlap, content_digest, content_id, is_val
from lmcore.diskspace import writing
from lmcore.errors import ConfigError, DataError
from lmcore.lifecycle.config import DATA_KINDS, Config, DataConfig, SourceConfig, atomic_write_text
from lmcore.lifecycle.paths import Paths
from lmcore.reporting import reporter

log = logging.getLogger(__name__)

KINDS = DATA_KINDS
SPLITS = ("train", "val")
COUNTERS = (
    "duplicates_removed",
    "empty_dropped",
    "docs_split",
    "bytes_repaired",
    "lines_repaired",
    "rows_missing_field",
    "rows_invalid",
)


@dataclass(frozen=True)
class Entry:
    """One output record: its fields, the content that identifies it, and the text the n-gram check sees."""

    fields: dict[str, Any]
    content: str
    text: str


def _pretrain_entries(resolved: ResolvedSource, source: SourceConfig, key: str, tally: Tally, data: DataConfig):
    documents = pretrain_documents(resolved, source, key, tally)
    for text in cut_documents(documents, data.max_doc_chars, data.min_doc_chars, tally):
        yield Entry({"text": text}, text, text)


def _sft_entries(resolved: ResolvedSource, source: SourceConfig, key: str, tally: Tally, data: DataConfig):
    for messages in sft_conversations(resolved, source, key, tally):
        yield Entry({"messages": messages}, _canonical(messages), "\n".join(m["content"] for m in messages))


def _classification_entries(resolved: ResolvedSource, source: SourceConfig, key: str, tally: Tally, data: DataConfig):
    for text, label in classification_examples(resolved, source, key, tally):
        yield Entry({"text": text, "label": label}, text, text)


ENTRIES: dict[str, Callable[..., Iterator[Entry]]] = {
    "pretrain": _pretrain_entries,
    "sft": _sft_entries,
    "classification": _classification_entries,
}


def _canonical(messages: list[Message]) -> str:
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


class KindWriter:
    """Deduplicates, splits and writes one kind's records, and keeps its numbers."""

    def __init__(self, kind: str, directory: Path, data: DataConfig) -> None:
        directory.mkdir(parents=True)
        self.kind, self.data = kind, data
        self.files = {s: (directory / f"{s}.jsonl").open("w", encoding="utf-8", newline="\n") for s in SPLITS}
        self.scratch = directory.parent / f".scratch-{kind}"  # inside the temporary output directory
        self.seen = SeenSet(self.scratch / "seen.sqlite")
        self.documents: Counter = Counter()
        self.bytes: Counter = Counter()
        self.per_source: Counter = Counter()
        self.overlap = NgramOverlap(data.contamination_ngram, self.scratch / "ngrams")
        self.tally = Tally()

    def add(self, entry: Entry, source_index: int) -> None:
        digest = content_digest(entry.content)
        if not self.seen.add(digest[:8]):
            self.tally.counts["duplicates_removed"] += 1
            return
        split = "val" if is_val(digest, self.data.split_salt, self.data.val_fraction) else "train"
        record = {"id": content_id(digest), "source": source_index, **entry.fields}
        self.files[split].write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self.documents[split] += 1
        self.bytes[split] += len(entry.text.encode("utf-8"))
        self.per_source[source_index] += 1
        self.overlap.add(entry.text, split)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.seen.close()
        self.overlap.close()

    def check_splits(self) -> None:
        train, val = self.documents["train"], self.documents["val"]
        for split, count in (("train", train), ("val", val)):
            if count == 0:
                raise DataError(
                    f"data.val_fraction={self.data.val_fraction}: the {split} split of {self.kind} is empty "
                    f"({train + val} documents: {train} train, {val} val)"
                )

    def report(self, sources: list[dict[str, Any]]) -> dict[str, Any]:
        counts = self.tally.counts
        out: dict[str, Any] = {name: counts[name] for name in COUNTERS}
        out["documents"] = {s: self.documents[s] for s in SPLITS}
        out["bytes"] = {s: self.bytes[s] for s in SPLITS}
        out["files_skipped"] = {"count": len(self.tally.files_skipped), "files": self.tally.files_skipped}
        out["contamination"] = self.overlap.result()
        shutil.rmtree(self.scratch, ignore_errors=True)
        out["sources"] = [{**s, "documents": self.per_source[s["index"]]} for s in sources]
        if self.kind == "sft":
            out["unknown_roles"] = {
                "count": counts["unknown_roles"],
                "roles": dict(sorted(self.tally.unknown_roles.items())),
            }
        return out


def _ingest_kind(kind: str, sources: list[SourceConfig], data: DataConfig, directory: Path, root: Path) -> dict:
    writer = KindWriter(kind, directory, data)
    try:
        source_reports = []
        for index, source in enumerate(sources):
            key = f"data.{kind}[{index}]"
            resolved = resolve(source, key, root)
            before = (Counter(writer.tally.counts), len(writer.tally.files_skipped))
            produced = 0
            entries = ENTRIES[kind](resolved, source, key, writer.tally, data)
            for entry in tqdm(entries, desc=f"ingest {kind}[{index}]", unit="doc", disable=None, leave=False):
                produced += 1
                writer.add(entry, index)
            if produced == 0:
                raise DataError(_nothing_left(key, source, writer.tally, before))
            source_reports.append({"index": index, "uri": source.uri, "fingerprint": resolved.fingerprint})
    finally:
        writer.close()
    writer.check_splits()
    return writer.report(source_reports)


def _nothing_left(key: str, source: SourceConfig, tally: Tally, before: tuple[Counter, int]) -> str:
    counts = tally.counts - before[0]
    skipped = tally.files_skipped[before[1] :]
    reasons = [f"{n} {name.replace('_', ' ')}" for name, n in sorted(counts.items()) if n]
    if skipped:
        reasons.append(f"binary files skipped: {', '.join(skipped)}")
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    return f"{key} ({source.uri}): no text after cleaning{detail}"


def _check_params(data: DataConfig) -> None:
    for kind in KINDS:
        for index, source in enumerate(getattr(data, kind)):
            key = f"data.{kind}[{index}]"
            if source.group_by and kind != "pretrain":
                raise ConfigError(f"{key}.group_by: only data.pretrain sources join records into documents")
            if source.format == "conversations" and kind != "sft":
                raise ConfigError(f"{key}.format: conversations belong under data.sft")


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished directory into place; the old one is renamed away first, then removed."""
    os.chmod(new, 0o755)  # mkdtemp makes it private
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(target: Path) -> None:
    """Temporary directories of runs that were killed before they could clean up."""
    for stale in target.parent.glob(f".{target.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)


def _summary(kinds: dict[str, dict], report_path: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for kind, rep in kinds.items():
        summary[f"{kind} documents"] = f"{rep['documents']['train']} train / {rep['documents']['val']} val"
        summary[f"{kind} duplicates removed"] = rep["duplicates_removed"]
        summary[f"{kind} contamination"] = rep["contamination"]["fraction"]
    summary["report"] = str(report_path)
    return summary


def _log_inputs(kinds: dict[str, dict]) -> None:
    """The sources read, as tracked datasets (the report's numbers are logged from dvc.yaml's metrics)."""
    rep = reporter()
    for kind, kind_report in kinds.items():
        for source in kind_report["sources"]:
            digest = hashlib.sha256(json.dumps(source["fingerprint"], sort_keys=True).encode()).hexdigest()[:16]
            rep.log_input(name=f"{kind}[{source['index']}]", digest=digest, source=source["uri"], context=kind)


def run(config: Config, paths: Paths) -> dict[str, Any]:
    data = config.data
    _check_params(data)
    started = time.perf_counter()
    paths.ingest.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(paths.ingest)
    with writing(paths.ingest):
        tmp = Path(tempfile.mkdtemp(prefix=f".{paths.ingest.name}.tmp-", dir=paths.ingest.parent))
        try:
            kinds = {
                kind: _ingest_kind(kind, getattr(data, kind), data, tmp / kind, paths.root)
                for kind in KINDS
                if getattr(data, kind)
            }
            _replace_dir(tmp, paths.ingest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    report_path = paths.report("ingest")
    atomic_write_text(report_path, json.dumps(kinds, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    _log_inputs(kinds)
    log.info("ingest finished in %.1f s", time.perf_counter() - started)
    return _summary(kinds, report_path)
