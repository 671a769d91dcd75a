"""Stage `tokenizer`: train the byte-level BPE on the pretraining train split and save it as models/tokenizer.

Reads data/ingest/pretrain/{train,val}.jsonl and params `tokenizer`; writes models/tokenizer (a Hugging Face
tokenizer directory with the chat template) and reports/tokenizer.json. Only the train split shapes the
vocabulary; the val split measures compression (UTF-8 bytes per token) on text the tokenizer never saw.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer

from lmcore.errors import DataError
from lmcore.lifecycle.config import Config, atomic_write_text
from lmcore.lifecycle.paths import Paths
from lmcore.reporting import reporter
from lmcore.tokenizer import (
    batch_bytes,
    document_batches,
    encode_documents,
    encode_threads,
    iter_texts,
    limit_bytes,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

log = logging.getLogger(__name__)
BATCH = 1000


def compression(tok: Tokenizer, texts: Iterable[str]) -> dict[str, int]:
    """Documents, UTF-8 bytes and tokens (document text only: no BOS/EOS) of a stream of texts."""
    utf8_bytes = tokens = documents = 0
    for batch, size in document_batches(texts, BATCH, batch_bytes(encode_threads())):
        _, lengths = encode_documents(tok, batch)
        tokens += int(lengths.sum()) - 2 * len(batch)
        utf8_bytes += size
        documents += len(batch)
    return {"utf8_bytes": utf8_bytes, "tokens": tokens, "documents": documents}


def run(config: Config, paths: Paths) -> dict:
    cfg = config.tokenizer
    train_file, val_file = paths.split_file("pretrain", "train"), paths.split_file("pretrain", "val")
    for path in (train_file, val_file):
        if not path.is_file():
            raise DataError(f"{path}: split file not found (run the ingest stage first)")

    started = time.perf_counter()
    train_docs = train_bytes = 0

    def counted_texts() -> Iterator[str]:
        nonlocal train_docs, train_bytes
        for text in limit_bytes(iter_texts(train_file), cfg.max_train_bytes):
            train_docs += 1
            train_bytes += len(text.encode("utf-8"))
            yield text

    tok = train_tokenizer(counted_texts(), cfg)
    if train_docs == 0:
        raise DataError(f"{train_file}: no documents to train the tokenizer on")
    save_tokenizer(tok, paths.tokenizer, cfg)
    val = compression(tok, iter_texts(val_file))
    seconds = time.perf_counter() - started

    vocab_size = tok.get_vocab_size()
    report = {
        "fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": vocab_size,
        "train_documents": train_docs,
        "train_utf8_bytes": train_bytes,
        "val_documents": val["documents"],
        "val_tokens": val["tokens"],
        "val_utf8_bytes": val["utf8_bytes"],
        "val_bytes_per_token": round(val["utf8_bytes"] / max(val["tokens"], 1), 4),
    }
    atomic_write_text(paths.report("tokenizer"), json.dumps(report, indent=2, sort_keys=True) + "\n")
    reporter().log_metrics({"tokenizer.val_bytes_per_token": report["val_bytes_per_token"]})
    log.info("tokenizer trained on %d documents (%d bytes) in %.1f s", train_docs, train_bytes, seconds)

    summary = {"directory": str(paths.tokenizer), **report, "seconds": round(seconds, 2)}
    if vocab_size < cfg.vocab_size:
        summary["note"] = f"the train split supports only {vocab_size} of tokenizer.vocab_size={cfg.vocab_size}"
    return summary
