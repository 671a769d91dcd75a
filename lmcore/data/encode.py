"""Encode a jsonl split of documents into token shards: what the tokenize stage writes and what re-scoring a model
with another tokenizer needs, written once.

Batches of documents (capped in count and in bytes per thread) are encoded by the Rust tokenizer's thread pool,
two batches in flight so reading overlaps encoding, and streamed to a ShardWriter: memory does not grow with the
corpus. Imports numpy and tokenizers only (no torch, no transformers).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from lmcore.data.shards import ShardWriter, token_dtype
from lmcore.tokenizer import batch_bytes, document_batches, encode_documents, iter_texts, use_threads


def encode_split(
    tok: Tokenizer,
    jsonl: Path,
    out_dir: Path,
    fingerprint: str,
    *,
    num_workers: int,
    batch_size: int,
    shard_tokens: int,
    **index_extra: Any,
) -> dict[str, Any]:
    """Encode one jsonl split into shards in `out_dir` (`num_workers` threads, 0 = all cores; `batch_size`
    documents a batch; `shard_tokens` tokens a shard); returns the split's index."""
    max_bytes = batch_bytes(use_threads(num_workers))
    vocab_size = tok.get_vocab_size()
    writer = ShardWriter(out_dir, fingerprint, vocab_size, shard_tokens)
    texts = tqdm(iter_texts(jsonl), desc=f"tokenize {out_dir.name}", unit=" docs", disable=not sys.stderr.isatty())
    batches = document_batches(texts, batch_size, max_bytes)
    for tokens, lengths, utf8_bytes in encode_ahead(tok, batches, token_dtype(vocab_size)):
        writer.add(tokens, lengths, utf8_bytes=utf8_bytes)
    return writer.close(**index_extra)


def encode_ahead(
    tok: Tokenizer, batches: Iterable[tuple[list[str], int]], dtype: np.dtype, in_flight: int = 2
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Encoded batches in their original order, with `in_flight` batches encoding at once.

    The Rust encoder releases the GIL, so while one batch encodes the next is read and parsed, and the thread
    pool never idles at the ragged end of a batch. Memory: `in_flight` batches.
    """
    with ThreadPoolExecutor(in_flight) as pool:
        pending: deque[tuple[Future, int]] = deque()
        for batch, utf8_bytes in batches:
            pending.append((pool.submit(encode_documents, tok, batch, dtype), utf8_bytes))
            if len(pending) == in_flight:
                future, size = pending.popleft()
                yield *future.result(), size
        while pending:
            future, size = pending.popleft()
            yield *future.result(), size
