"""Benchmark: peak memory of the ingest stage as the corpus grows, against keeping every hash in memory.

Writes a synthetic pretraining corpus in a temporary directory (jsonl files of ~1 KB documents drawn from a
20 000-word vocabulary, a fifth of them repeats of earlier documents in other files, so deduplication has work),
at 1× and 8× its size, then runs `lmcore.lifecycle.stages.ingest.run` on each in a fresh process and reads its peak RSS:

- stage: the ingest stage as shipped (seen hashes in an SQLite scratch file, n-gram hashes spilled to disk).
- peer:  the same code with the previous in-memory structures put back in the same process: a Python `set` of
         every kept document's 8-byte hash, every train and val n-gram hash in an in-memory array (sorted at the
         end) and an unbounded word-hash cache.

Both must write byte-identical outputs and reports (checked). Goal: the stage's peak RSS grows ≤ 1.2× from the
1× to the 8× corpus. No timing goal; wall and CPU seconds are printed for information.

Usage: python bench/ingest_memory.py [--mib 40] [--copies 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np

MEMORY_GOAL = 1.2
DOC_WORDS = 170  # ~1 KB of text
FILE_DOCS = 4_000
REPEAT_SHARE = 0.2
VOCAB = 20_000


def write_corpus(directory: Path, mib: int, seed: int = 0) -> int:
    """jsonl files holding about `mib` MiB of text; returns the number of records written."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:x}" for i in range(VOCAB)] + ["the", "of", "and", "to", "in"], dtype=object)
    earlier: list[str] = []
    written = size = part = 0
    while size < mib * 2**20:
        words = vocab[rng.integers(0, vocab.size, size=(FILE_DOCS, DOC_WORDS))]
        texts = [" ".join(row) + "." for row in words]
        if earlier:  # repeats of documents from earlier files: duplicates across a file boundary
            repeat = rng.random(FILE_DOCS) < REPEAT_SHARE
            for i in np.flatnonzero(repeat):
                texts[i] = earlier[int(rng.integers(0, len(earlier)))]
        earlier = texts[:: max(1, FILE_DOCS // 2000)] + earlier[:2000]
        with (directory / f"part-{part:04d}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        size += sum(len(t) for t in texts)
        written += len(texts)
        part += 1
    return written


def peak_rss() -> int:
    """This process's peak RSS in bytes (Linux VmHWM: unlike ru_maxrss, not inherited from the forking parent)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class InMemorySeen:
    """The peer's deduplication: a Python set of every kept document's 8-byte hash."""

    def __init__(self, path: Path, cache_kib: int | None = None) -> None:
        self.keys: set[bytes] = set()

    def add(self, key: bytes) -> bool:
        if key in self.keys:
            return False
        self.keys.add(key)
        return True

    def close(self) -> None:
        pass


class InMemorySpill:
    """The peer's contamination check: every n-gram hash in an array, train sorted in place at the end."""

    def __init__(self, directory: Path | None = None) -> None:
        self.hashes = {"train": array("Q"), "val": array("Q")}

    def add(self, split: str, hashes: np.ndarray) -> None:
        self.hashes[split].frombytes(hashes.tobytes())

    def overlap(self) -> tuple[int, int]:
        train = np.frombuffer(self.hashes["train"], dtype=np.uint64)
        train.sort()
        val = np.unique(np.frombuffer(self.hashes["val"], dtype=np.uint64))
        if not (val.size and train.size):
            return int(val.size), 0
        at = np.minimum(np.searchsorted(train, val), train.size - 1)
        return int(val.size), int((train[at] == val).sum())

    def close(self) -> None:
        pass

    def remove(self) -> None:
        pass


def child(root: Path, peer: bool) -> dict:
    """Run the ingest stage once in this fresh process; its peak RSS, time and a digest of what it wrote."""
    from lmcore.data import split
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.stages import ingest

    if peer:
        ingest.SeenSet = InMemorySeen  # type: ignore[misc,assignment]
        split.HashSpill = InMemorySpill  # type: ignore[misc,assignment]
        split.WORD_CACHE = 1 << 62
    config = load_config(root / "params.yaml")
    baseline = peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    summary = ingest.run(config, Paths.of(root))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_rss()  # before reading the outputs back
    digest = hashlib.sha256()
    for path in [*sorted((root / "data" / "ingest").rglob("*")), root / "reports" / "ingest.json"]:
        if path.is_file():
            with path.open("rb") as f:
                file_hash = hashlib.file_digest(f, "sha256").hexdigest()
            digest.update(f"{path.relative_to(root).as_posix()}\0{file_hash}\n".encode())
    return {
        "peak_rss": peak,
        "baseline_rss": baseline,
        "seconds": seconds,
        "cpu": cpu,
        "digest": digest.hexdigest(),
        "documents": sum(int(n) for n in summary["pretrain documents"].split() if n.isdigit()),
        "duplicates": summary["pretrain duplicates removed"],
    }


def in_fresh_process(root: Path, peer: bool) -> dict:
    args = [sys.executable, __file__, "--child", "peer" if peer else "stage", "--root", str(root)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ingest measurement on {root} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def workspace(root: Path, mib: int) -> int:
    import yaml

    records = write_corpus(root / "corpus", mib)
    params = {"data": {"pretrain": [{"uri": "corpus"}], "val_fraction": 0.05, "max_doc_chars": 100_000}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=40, help="text in the 1× corpus (MiB)")
    parser.add_argument("--copies", type=int, default=8, help="size of the large corpus, in 1× corpora")
    parser.add_argument("--child", choices=["stage", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.root, args.child == "peer")))
        return

    mib = 2**20
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmcycle-bench-ingest-") as tmp:
        for scale in (1, args.copies):
            root = Path(tmp) / f"x{scale}"
            print(f"writing the {scale}× corpus ({scale * args.mib} MiB) ...", file=sys.stderr)
            records = workspace(root, scale * args.mib)
            results = {}
            for name in ("stage", "peer"):
                print(f"  ingest ({name}) ...", file=sys.stderr)
                results[name] = in_fresh_process(root, peer=name == "peer")
            if results["stage"]["digest"] != results["peer"]["digest"]:
                raise SystemExit(f"{scale}× corpus: the stage and the peer wrote different outputs")
            rows.append((scale, records, results))

    cores = len(os.sched_getaffinity(0))
    print(f"\nlmcycle ingest memory benchmark  (synthetic jsonl, ~1 KB documents; {cores} cores)")
    print("peer = the same stage with every hash held in memory (Python set + n-gram arrays); outputs identical\n")
    head = f"{'corpus':<10}{'records':>10}{'kept':>10}{'stage MiB':>11}{'peer MiB':>10}{'stage/peer':>12}"
    print(head + f"{'stage s':>9}{'peer s':>8}{'stage CPU s':>13}{'peer CPU s':>12}")
    for scale, records, r in rows:
        stage, peer = r["stage"], r["peer"]
        print(
            f"{f'{scale}×':<10}{records:>10,}{stage['documents']:>10,}"
            f"{stage['peak_rss'] / mib:>11.1f}{peer['peak_rss'] / mib:>10.1f}"
            f"{stage['peak_rss'] / peer['peak_rss']:>12.2f}{stage['seconds']:>9.1f}{peer['seconds']:>8.1f}"
            f"{stage['cpu']:>13.1f}{peer['cpu']:>12.1f}"
        )
    (_, _, small), (scale, _, large) = rows
    for name in ("stage", "peer"):
        growth = large[name]["peak_rss"] / small[name]["peak_rss"]
        above = [(r[name]["peak_rss"] - r[name]["baseline_rss"]) / mib for r in (small, large)]
        line = f"{name}: peak RSS 1× → {scale}× grows {growth:.2f}×"
        line += f" (above the imports: {above[0]:.1f} → {above[1]:.1f} MiB)"
        if name == "stage":
            line += f"   goal ≤ {MEMORY_GOAL}: {'ok' if growth <= MEMORY_GOAL else 'MISSED'}"
        print(line)


if __name__ == "__main__":
    main()
