"""Binary token shards: the tokenize stage's output format, a streaming writer and a memmap reader.

A split directory (data/tokens/<split>/) holds:
  shard-00000.bin …   a 64-byte header, then the tokens as little-endian uint16 (uint32 when vocab > 65536)
  documents.npy       int64 start offset (in tokens, across shards) of every document
  index.json          the shards and their token counts, documents, tokens, UTF-8 bytes of the encoded texts

Header: magic b"LMCYTOK1", format version (u32), bytes per token (u32), token count (u64), tokenizer fingerprint
(16 ASCII hex chars), zero padding. The writer streams (memory bounded by one batch, whatever the corpus size).

Design choice of the reader: batches are a pure function of (seed, step, rank), nanoGPT-style random windows drawn
from `numpy.random.default_rng([seed, step])`. The reader keeps no position: after a crash, training resumes
exactly by asking for the next step number, and each rank of a DDP job takes its own rows of the same draw.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmcore.errors import DataError

MAGIC = b"LMCYTOK1"
VERSION = 1
HEADER = struct.Struct("<8sIIQ16s")
HEADER_BYTES = 64
INDEX_FILE = "index.json"
DOCUMENTS_FILE = "documents.npy"
INDEX_FORMAT = "lmcycle-token-shards"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def pack_header(itemsize: int, count: int, fingerprint: str) -> bytes:
    return HEADER.pack(MAGIC, VERSION, itemsize, count, fingerprint.encode("ascii")).ljust(HEADER_BYTES, b"\0")


def read_header(path: Path) -> tuple[int, int, str]:
    """(bytes per token, token count, fingerprint) of a shard file, after checking magic, version and size."""
    with path.open("rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard (header of {len(raw)} bytes, expected {HEADER_BYTES})")
    magic, version, itemsize, count, fingerprint = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not an lmcycle token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise DataError(f"{path}: shard format version {version}, this lmcycle reads version {VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: corrupt shard header (bytes per token {itemsize})")
    expected = HEADER_BYTES + count * itemsize
    size = path.stat().st_size
    if size != expected:
        raise DataError(f"{path}: truncated or corrupt shard ({size} bytes, header promises {expected})")
    return itemsize, count, fingerprint.decode("ascii", errors="replace")


# --- writing -------------------------------------------------------------------------------------------------


class ShardWriter:
    """Append documents' tokens to fixed-size shard files in `directory`, then `close()` writes the index.

    Only the open shard's file handle and the current batch live in memory; document offsets stream to disk too.
    """

    def __init__(self, directory: str | Path, fingerprint: str, vocab_size: int, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be ≥ 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.shard_tokens = shard_tokens
        self.shard_counts: list[int] = []
        self.tokens = 0
        self.documents = 0
        self.utf8_bytes = 0
        self._shard = None
        self._offsets = (self.directory / f"{DOCUMENTS_FILE}.part").open("wb")

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray, utf8_bytes: int) -> None:
        """Append a batch: `tokens` is the documents' tokens back to back, `doc_lengths` their lengths."""
        tokens = np.asarray(tokens)
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        if int(doc_lengths.sum()) != len(tokens):
            raise ValueError("doc_lengths must sum to the number of tokens")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        starts = self.tokens + np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]) if len(doc_lengths) else doc_lengths
        self._offsets.write(starts.astype("<i8").tobytes())
        self.documents += len(doc_lengths)
        self.utf8_bytes += utf8_bytes
        data = tokens.astype(self.dtype, copy=False)
        while len(data):
            if self._shard is None:
                self._open_shard()
            room = self.shard_tokens - self.shard_counts[-1]
            self._shard.write(data[:room].tobytes())
            written = min(room, len(data))
            self.shard_counts[-1] += written
            self.tokens += written
            data = data[written:]
            if self.shard_counts[-1] == self.shard_tokens:
                self._close_shard()

    def _open_shard(self) -> None:
        self._shard = (self.directory / shard_name(len(self.shard_counts))).open("wb")
        self._shard.write(pack_header(self.dtype.itemsize, 0, self.fingerprint))  # count filled in on close
        self.shard_counts.append(0)

    def _close_shard(self) -> None:
        self._shard.seek(0)
        self._shard.write(pack_header(self.dtype.itemsize, self.shard_counts[-1], self.fingerprint))
        self._shard.close()
        self._shard = None

    def close(self, **extra: Any) -> dict[str, Any]:
        """Finish the last shard, documents.npy and index.json; `extra` keys go into the index."""
        if self._shard is not None:
            self._close_shard()
        self._offsets.close()
        part = self.directory / f"{DOCUMENTS_FILE}.part"
        with (self.directory / DOCUMENTS_FILE).open("wb") as out, part.open("rb") as src:
            header = {"descr": "<i8", "fortran_order": False, "shape": (self.documents,)}
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out)
        part.unlink()
        index = {
            "format": INDEX_FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "utf8_bytes": self.utf8_bytes,
            "documents_file": DOCUMENTS_FILE,
            "shards": [{"file": shard_name(i), "tokens": n} for i, n in enumerate(self.shard_counts)],
            **extra,
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", "utf-8")
        return index


# --- reading -------------------------------------------------------------------------------------------------


def _split_dir(path: Path, split: str | None) -> Path:
    if split is not None:
        path = path / split
    if (path / INDEX_FILE).is_file():
        return path
    splits = sorted(p.parent.name for p in path.glob(f"*/{INDEX_FILE}")) if path.is_dir() else []
    if splits:
        raise DataError(f"{path}: holds the splits {', '.join(splits)}; open one of them (split=…)")
    raise DataError(f"{path}: no {INDEX_FILE} (run the tokenize stage first)")


class TokenShards:
    """The tokens of one split, memory-mapped: random-access windows, a resumable batch sampler, eval windows.

    `TokenShards("data/tokens/train")` or `TokenShards("data/tokens", split="val")`. Pass the fingerprint of the
    tokenizer in use as `expected_fingerprint` to refuse shards made by another tokenizer.
    """

    def __init__(self, path: str | Path, expected_fingerprint: str | None = None, split: str | None = None) -> None:
        self.directory = _split_dir(Path(path), split)
        index_path = self.directory / INDEX_FILE
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"{index_path}: unreadable index ({err})") from None
        if self.index.get("format") != INDEX_FORMAT or self.index.get("version") != VERSION:
            raise DataError(f"{index_path}: not a version {VERSION} lmcycle token index")
        self.fingerprint: str = self.index["fingerprint"]
        if expected_fingerprint is not None and expected_fingerprint != self.fingerprint:
            raise DataError(
                f"{self.directory}: shards were made by tokenizer {self.fingerprint}, "
                f"but the tokenizer in use is {expected_fingerprint} (rerun the tokenize stage)"
            )
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self._shards = [self._open(entry) for entry in self.index["shards"]]
        counts = [len(s) for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if int(self._starts[-1]) != self.index["tokens"]:
            raise DataError(f"{index_path}: shard token counts do not add up to {self.index['tokens']}")

    def _open(self, entry: dict[str, Any]) -> np.memmap:
        path = self.directory / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {INDEX_FILE} is missing")
        itemsize, count, fingerprint = read_header(path)
        if itemsize != self.dtype.itemsize or count != entry["tokens"] or fingerprint != self.fingerprint:
            raise DataError(f"{path}: header disagrees with {INDEX_FILE} (dtype, token count or fingerprint)")
        if count == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(count,))

    # -- facts about the split --

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return len(self)

    @property
    def utf8_bytes(self) -> int:
        """UTF-8 bytes of the texts that were encoded (BOS/EOS excluded): the denominator of bits-per-byte."""
        return int(self.index["utf8_bytes"])

    @property
    def num_documents(self) -> int:
        return int(self.index["documents"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def document_starts(self) -> np.ndarray:
        """Start offset of every document, in tokens from the start of the split."""
        return np.load(self.directory / self.index["documents_file"], mmap_mode="r")

    # -- access --

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside the {len(self)} tokens of {self.directory}")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[shard])
            take = min(length - done, len(self._shards[shard]) - offset)
            out[done : done + take] = self._shards[shard][offset : offset + take]
            done += take
            shard += 1
        return out

    def _check_context(self, context_length: int) -> None:
        if context_length < 1:
            raise ValueError(f"context_length must be ≥ 1, got {context_length}")
        if context_length + 1 > len(self):
            raise DataError(
                f"context length {context_length} larger than the shards can serve ({len(self)} tokens) "
                f"in {self.directory}"
            )

    def batch(
        self, step: int, batch_size: int, context_length: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and next-token targets, int64 arrays of shape (batch_size, context_length), for this rank.

        `batch_size` is per rank. Each step draws batch_size × world_size window starts uniformly from
        `default_rng([seed, step])`; rank r takes rows r·batch_size … (r+1)·batch_size − 1. So the result depends
        only on (seed, step, rank, world_size): the step number is the reader's whole state, and the ranks of
        one step together see exactly the batch a single process with the global batch size would see.
        """
        self._check_context(context_length)
        if step < 0 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need step ≥ 0, batch_size ≥ 1, 0 ≤ rank < world_size (got {step}, {batch_size}, {rank})")
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self) - context_length, size=batch_size * world_size)
        rows = np.stack([self.window(int(s), context_length + 1) for s in starts[rank * batch_size :][:batch_size]])
        return rows[:, :-1], rows[:, 1:]

    def sequential_windows(
        self, context_length: int, batch_size: int = 1, drop_last: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Non-overlapping (x, y) windows covering the split in order, stacked `batch_size` at a time.

        Window i holds tokens [i·C, (i+1)·C] (C = context_length), so every token after the first is a target
        exactly once. Unless `drop_last`, the remainder comes last as a (1, shorter) batch.
        """
        self._check_context(context_length)
        n_full = (len(self) - 1) // context_length
        for first in range(0, n_full, batch_size):
            rows = [
                self.window(i * context_length, context_length + 1)
                for i in range(first, min(first + batch_size, n_full))
            ]
            block = np.stack(rows)
            yield block[:, :-1], block[:, 1:]
        tail_start = n_full * context_length
        if not drop_last and len(self) - tail_start >= 2:
            tail = self.window(tail_start, len(self) - tail_start)[None, :]
            yield tail[:, :-1], tail[:, 1:]
