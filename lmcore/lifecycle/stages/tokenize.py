"""Stage `tokenize`: encode the pretraining splits into binary token shards under data/tokens/{train,val}.

Reads data/ingest/pretrain/{train,val}.jsonl, models/tokenizer and params `tokenize`; writes data/tokens (built
in a temporary directory, then renamed) and reports/tokenize.json. Each document becomes `<|bos|> text <|eos|>`.
Batches of up to `tokenize.batch_size` documents (and 128 KiB of text per thread) are encoded by the Rust
tokenizer's thread pool (`tokenize.num_workers` threads, 0 = all cores), two batches in flight so reading overlaps
encoding, and are streamed to disk: memory does not grow with the corpus (lmcore.data.encode).
Imports numpy and tokenizers only (no torch, no transformers) so the command starts fast.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from lmcore.data.encode import encode_split
from lmcore.errors import DataError
from lmcore.files import atomic_directory
from lmcore.lifecycle.config import Config, TokenizeConfig, atomic_write_text
from lmcore.lifecycle.paths import Paths
from lmcore.reporting import reporter
from lmcore.tokenizer import read_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def tokenize_split(
    tok: Tokenizer, jsonl: Path, out_dir: Path, fingerprint: str, cfg: TokenizeConfig, **index_extra: Any
) -> dict[str, Any]:
    """Encode one jsonl split into shards in `out_dir` with the `tokenize` params; returns the split's index."""
    return encode_split(
        tok,
        jsonl,
        out_dir,
        fingerprint,
        num_workers=cfg.num_workers,
        batch_size=cfg.batch_size,
        shard_tokens=cfg.shard_tokens,
        **index_extra,
    )


def run(config: Config, paths: Paths) -> dict:
    cfg = config.tokenize
    tok = read_tokenizer(paths.tokenizer)
    fingerprint = tokenizer_fingerprint(paths.tokenizer)
    sources = {split: paths.split_file("pretrain", split) for split in SPLITS}
    for path in sources.values():
        if not path.is_file():
            raise DataError(f"{path}: split file not found (run the ingest stage first)")

    started = time.perf_counter()
    with atomic_directory(paths.tokens) as tmp:
        indexes = {
            split: tokenize_split(
                tok, source, tmp / split, fingerprint, cfg, source=source.relative_to(paths.root).as_posix()
            )
            for split, source in sources.items()
        }
    seconds = time.perf_counter() - started

    report: dict[str, Any] = {"fingerprint": fingerprint, "vocab_size": tok.get_vocab_size()}
    for split, index in indexes.items():
        report[split] = {
            "tokens": index["tokens"],
            "shards": len(index["shards"]),
            "utf8_bytes": index["utf8_bytes"],
            "documents": index["documents"],
        }
    atomic_write_text(paths.report("tokenize"), json.dumps(report, indent=2, sort_keys=True) + "\n")

    total = sum(index["tokens"] for index in indexes.values())
    rate = total / max(seconds, 1e-9)
    reporter().log_metrics({f"tokenize.{split}_tokens": float(index["tokens"]) for split, index in indexes.items()})
    log.info("tokenized %d tokens in %.1f s (%.0f tokens/s)", total, seconds, rate)
    return {
        "directory": str(paths.tokens),
        **{f"{split}_tokens": index["tokens"] for split, index in indexes.items()},
        **{f"{split}_shards": len(index["shards"]) for split, index in indexes.items()},
        "fingerprint": fingerprint,
        "tokens_per_s": round(rate),
    }
