"""Content hashes, the deterministic train/val split, and the n-gram contamination check.

- A document's id is the first 16 hex digits of the SHA-256 of its content; duplicates are found by that id.
- Its split depends only on its content and `data.split_salt`: SHA-256(salt, NUL, SHA-256(content)) read as a
  number in [0, 1) is compared with `data.val_fraction`. A document therefore keeps its split when files are
  reordered, renamed or appended to, and changing the salt draws a new split.
- Contamination is the share of distinct val word n-grams (words lower-cased, punctuation removed) that also
  occur in train.
  Each n-gram is a 64-bit polynomial hash over 64-bit word hashes (BLAKE2b), so train costs 8 bytes per word of
  train text (about 6 MB for the 790 k words of the KJV). That is fine for corpora of this size; a corpus of many
  GB would need a sampled or on-disk set.
"""

from __future__ import annotations

import hashlib
import string
from array import array

import numpy as np

_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation + "“”‘’«»„‚‹›–—…¡¿"})
_PRIME = np.uint64(1_000_000_007)


def content_digest(content: str) -> bytes:
    return hashlib.sha256(content.encode("utf-8")).digest()


def content_id(digest: bytes) -> str:
    return digest[:8].hex()


def is_val(digest: bytes, salt: str, val_fraction: float) -> bool:
    draw = hashlib.sha256(salt.encode("utf-8") + b"\0" + digest).digest()
    return int.from_bytes(draw[:8], "big") / 2**64 < val_fraction


class NgramOverlap:
    """Collects word n-gram hashes of train and val documents, then measures how much of val occurs in train."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.hashes = {"train": array("Q"), "val": array("Q")}
        self._word_hashes: dict[str, int] = {}

    def add(self, text: str, split: str) -> None:
        ngrams = self._ngram_hashes(text)
        if ngrams.size:
            self.hashes[split].frombytes(ngrams.tobytes())

    def result(self) -> dict[str, float | int]:
        train = np.frombuffer(self.hashes["train"], dtype=np.uint64)
        train.sort()  # in place: no second copy of the largest array
        val = _sorted_unique(self.hashes["val"])
        shared = 0
        if val.size and train.size:
            at = np.minimum(np.searchsorted(train, val), train.size - 1)
            shared = int((train[at] == val).sum())
        fraction = round(shared / val.size, 6) if val.size else 0.0
        return {"ngram": self.n, "val_ngrams": int(val.size), "shared_with_train": shared, "fraction": fraction}

    def _word_hash(self, word: str) -> int:
        value = self._word_hashes.get(word)
        if value is None:
            value = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
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


def _sorted_unique(hashes: array) -> np.ndarray:
    values = np.sort(np.frombuffer(hashes, dtype=np.uint64))
    if values.size < 2:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]
