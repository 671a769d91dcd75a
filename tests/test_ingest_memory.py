"""Ingest in bounded memory: exact deduplication through the on-disk seen set, exact contamination counts through
the spilled n-gram hashes, and a peak RSS that stays flat when the corpus grows fourfold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmcore.data import dedup, hashspill
from lmcore.data.dedup import SeenSet
from lmcore.data.hashspill import HashSpill
from lmcore.data.split import content_digest, content_id
from lmcore.lifecycle.config import validate
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.stages import ingest

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def output_texts(root: Path) -> dict[str, list[str]]:
    out = {}
    for split in ("train", "val"):
        lines = (root / "data" / "ingest" / "pretrain" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]
        assert all(r["id"] == content_id(content_digest(r["text"])) for r in records)
        out[split] = [r["text"] for r in records]
    return out


def test_dedup_is_exact_across_a_file_boundary_and_across_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "CACHE_KIB", 1)  # the smallest page cache: every lookup goes to the file
    monkeypatch.setattr(dedup, "COMMIT_EVERY", 2)
    docs = [f"document {name}: the quick brown fox jumps over the lazy dog." for name in "abcdef"]
    write_jsonl(tmp_path / "one" / "1.jsonl", [docs[0], docs[1], docs[1], docs[2]])
    write_jsonl(tmp_path / "one" / "2.jsonl", [docs[2], docs[3], docs[0]])  # the last line of 1.jsonl again
    (tmp_path / "two.txt").write_text(docs[3].replace(" ", "   ") + "\n\n", encoding="utf-8")  # same once cleaned
    write_jsonl(tmp_path / "three.jsonl", [docs[4], docs[0], docs[5], docs[4]])
    data = {
        "pretrain": [{"uri": "one"}, {"uri": "two.txt"}, {"uri": "three.jsonl"}],
        "val_fraction": 0.5,
        "contamination_ngram": 3,
    }
    ingest.run(validate({"data": data}), Paths.of(tmp_path))

    report = json.loads((tmp_path / "reports" / "ingest.json").read_text())["pretrain"]
    assert report["duplicates_removed"] == 6
    assert [s["documents"] for s in report["sources"]] == [4, 0, 2]
    texts = output_texts(tmp_path)
    assert sorted(texts["train"] + texts["val"]) == sorted(docs)
    for split in ("train", "val"):  # first copies, in source and file order
        assert texts[split] == [d for d in docs if d in texts[split]]
    assert texts["train"] and texts["val"]
    # the scratch files (seen set, n-gram spill) are gone: only the outputs were swapped in
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ingest"]
    assert sorted(p.name for p in (tmp_path / "data" / "ingest").iterdir()) == ["pretrain"]


def test_seen_set_answers_like_a_python_set(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "COMMIT_EVERY", 1000)
    rng = np.random.default_rng(1)
    pool = [bytes(k) for k in rng.integers(0, 256, size=(8000, 8), dtype=np.uint8)]
    pool += [b"\x00" * 8, b"\xff" * 8, b"\x80" + b"\x00" * 7, b"\x7f" + b"\xff" * 7]  # signed 64-bit edges
    keys = [pool[i] for i in rng.integers(0, len(pool), size=30_000)]
    seen = SeenSet(tmp_path / "seen.sqlite", cache_kib=16)
    reference: set[bytes] = set()
    answers = []
    for key in keys:
        answers.append(seen.add(key))
        reference.add(key)
    expected, shadow = [], set()
    for key in keys:
        expected.append(key not in shadow)
        shadow.add(key)
    assert answers == expected and sum(answers) == len(reference)
    seen.close()
    assert not (tmp_path / "seen.sqlite").exists()


@pytest.mark.parametrize("chunk", [1, 300])
def test_spilled_ngram_counts_equal_the_in_memory_counts(tmp_path, monkeypatch, chunk):
    """A budget of 512 values forces the split by hash range (several levels deep); chunk=1 keeps every repeat,
    so two values that differ only in their last bit go down to the last level."""
    monkeypatch.setattr(hashspill, "BUDGET_BYTES", 4096)
    monkeypatch.setattr(hashspill, "CHUNK", chunk)
    rng = np.random.default_rng(2)
    size = 600 if chunk == 1 else 60_000
    train = rng.integers(0, 2**64, size=size, dtype=np.uint64)
    val = np.concatenate([rng.integers(0, 2**64, size=size // 3, dtype=np.uint64), train[: size // 10]])
    twins = np.array([2**63 + 6, 2**63 + 7], dtype=np.uint64)  # only the last bit differs
    train = np.concatenate([train, np.repeat(twins[:1], 300)])
    val = np.concatenate([val, val[:500], np.repeat(twins, 300)])
    spill = HashSpill(tmp_path / "spill")
    for part in np.array_split(rng.permutation(val), 7):
        spill.add("val", part)
    for part in np.array_split(train, 5):
        spill.add("train", part)
    unique_val = np.unique(val)
    assert spill.overlap() == (unique_val.size, int(np.isin(unique_val, train).sum()))
    assert not (tmp_path / "spill").exists()


CHILD = """
import json, sys
from pathlib import Path
from lmcore.data import dedup, hashspill, split
dedup.CACHE_KIB = 256            # tiny settings: whatever still grows with the corpus shows up
hashspill.BUDGET_BYTES = 256 * 1024
hashspill.CHUNK = 8192
split.WORD_CACHE = 1000
from lmcore.lifecycle.config import validate
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.stages import ingest

root, n = Path(sys.argv[1]), int(sys.argv[2])
words = " alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
for part in range(4):
    with (root / "corpus" / f"{part}.jsonl").open("w") as f:
        f.writelines(json.dumps({"text": f"record {i}" + words}) + "\\n" for i in range(part, n, 4))
data = {"pretrain": [{"uri": "corpus"}], "val_fraction": 0.5, "contamination_ngram": 2}
summary = ingest.run(validate({"data": data}), Paths.of(root))
status = Path("/proc/self/status").read_text().splitlines()
peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_kib": peak, "documents": summary["pretrain documents"]}))
"""


def peak_rss_kib(root: Path, records: int) -> int:
    (root / "corpus").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(records)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    train, val = (int(part.split()[0]) for part in result["documents"].split(" / "))
    assert train + val == records  # every record distinct, every one kept
    return result["peak_kib"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """40 000 then 160 000 distinct short records, each run in a fresh process with tiny cache settings. Held in
    memory, the 120 000 more kept documents would add ~12 MB as a set of 8-byte hashes, 12-24 MB as n-gram arrays
    (12 2-grams a record, 8 bytes each, in arrays grown by doubling) and ~10 MB of distinct words in an uncapped
    cache; with the scratch files the peak grows by about 1 MB."""
    small = peak_rss_kib(tmp_path / "n", 40_000)
    large = peak_rss_kib(tmp_path / "4n", 160_000)
    growth_mib = (large - small) / 1024
    assert growth_mib < 6, f"peak RSS grew by {growth_mib:.1f} MiB from 40 000 to 160 000 records"


def test_a_full_disk_under_the_seen_set_is_the_one_line_full_disk_error(tmp_path):
    """SQLite's own "database or disk is full" (here from a page limit) must reach `writing` as ENOSPC."""
    from lmcore.diskspace import writing
    from lmcore.errors import DiskFullError

    seen = SeenSet(tmp_path / "seen.sqlite")
    seen.db.execute("PRAGMA max_page_count=8")
    try:
        with pytest.raises(DiskFullError, match="/out: no space left on device \\("), writing(tmp_path / "out"):
            for i in range(100_000):
                seen.add(i.to_bytes(8, "big"))
    finally:
        seen.close()
