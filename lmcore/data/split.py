"""Content hashes, the deterministic train/val split, and the n-gram contamination check.

- A document's id is the first 16 hex digits of the SHA-256 of its content; duplicates are found by that id.
- Its split depends only on its content and `data.split_salt`: SHA-256(salt, NUL, SHA-256(content)) read as a
  number in [0, 1) is compared with `data.val_fraction`. A document therefore keeps its split when files are
  reordered, renamed or appended to, and changing the salt draws a new split.
- Contamination is the share of distinct val word n-grams (words lower-cased, punctuation removed) that also
  occur in train.
  Each n-gram is a 64-bit polynomial hash over 64-bit word hashes (BLAKE2b). The hashes go to files as they come
  (8 bytes per word of text) and are counted exactly in bounded memory (lmcore/data/hashspill.py); the word
  hashes are cached for at most `WORD_CACHE` distinct words, so memory does not grow with the vocabulary either.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

import numpy as np

from lmcore.data.hashspill import HashSpill

_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "“”‘’«»„‚‹›–—…¡¿"})
_PRIME = np.uint64(1_000_000_007)
WORD_CACHE = 100_000  # distinct words whose hash is kept (about 10 MB); the cache starts over when full


def content_digest(content: str) -> bytes:
    return hashlib.sha256(content.encode("utf-8")).digest()


def content_id(digest: bytes) -> str:
    return digest[:8].hex()


def is_val(digest: bytes, salt: str, val_fraction: float) -> bool:
    draw = hashlib.sha256(salt.encode("utf-8") + b"\0" + digest).digest()
    return int.from_bytes(draw[:8], "big") / 2**64 < val_fraction


class NgramOverlap:
    """Collects word n-gram hashes of train and val documents, then measures how much of val occurs in train.

    The hashes are spilled to files under `directory` (a new temporary directory when None), removed by `result`.
    """

    def __init__(self, n: int, directory: Path | None = None) -> None:
        self.n = n
        self.spill = HashSpill(directory)
        self._word_hashes: dict[str, int] = {}
        self._result: dict[str, float | int] | None = None

    def add(self, text: str, split: str) -> None:
        ngrams = self._ngram_hashes(text)
        if ngrams.size:
            self.spill.add(split, ngrams)

    def result(self) -> dict[str, float | int]:
        if self._result is None:
            val, shared = self.spill.overlap()
            fraction = round(shared / val, 6) if val else 0.0
            self._result = {"ngram": self.n, "val_ngrams": val, "shared_with_train": shared, "fraction": fraction}
        return self._result

    def close(self) -> None:
        """No more `add`: close the spill files (`result` still counts them)."""
        self.spill.close()

    def _word_hash(self, word: str) -> int:
        value = self._word_hashes.get(word)
        if value is None:
            value = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
            if len(self._word_hashes) >= WORD_CACHE:
                self._word_hashes.clear()
            self._word_hashes[word] = value
        return value

    def _ngram_hashes(self, text: str) -> np.ndarray:
        words = text.lower().translate(_PUNCTUATION).split()
        count = len(words) - self.n + 1
        if count <= 0:
            return np.empty(0, dtype=np.uint64)
        values = list(map(self._word_hashes.get, words))
        if None in values:
            values = [self._word_hash(w) if v is None else v for w, v in zip(words, values, strict=True)]
        ids = np.array(values, dtype=np.uint64)
        acc = np.zeros(count, dtype=np.uint64)
        for offset in range(self.n):  # uint64 arithmetic wraps modulo 2**64, which is what a rolling hash wants
            acc = acc * _PRIME + ids[offset : offset + count]
        return acc
