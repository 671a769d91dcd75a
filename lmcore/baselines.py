"""Count-based unigram and bigram language models: the floor a trained transformer must clear.

Both are fitted on the token ids of the train split and score the val split on exactly the targets the model is
scored on (every val token after the first), so their total NLL divides by the same UTF-8 byte count into
bits-per-byte. The unigram is add-one smoothed. The bigram is interpolated Kneser-Ney (absolute discount
D = n1 / (n1 + 2·n2), continuation unigram with add-one), a strong count model: a transformer that does not beat
it has not learned more than which token tends to follow which.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lmcore.data.shards import TokenShards

CHUNK = 1 << 22  # tokens per read: memory stays bounded whatever the split's size


@dataclass(frozen=True)
class BaselineScore:
    nll_nats: float  # total over the scored targets
    targets: int


class UnigramLM:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.log_probs = np.full(vocab_size, -np.log(vocab_size))

    def fit(self, tokens: np.ndarray | Iterable[np.ndarray]) -> UnigramLM:
        """Fit on an array of token ids, or on consecutive chunks of one stream."""
        counts = np.zeros(self.vocab_size, dtype=np.float64)
        for chunk in as_chunks(tokens):
            counts += np.bincount(chunk, minlength=self.vocab_size)
        self.log_probs = np.log((counts + 1.0) / (counts.sum() + self.vocab_size))
        return self

    def score(self, tokens: np.ndarray) -> BaselineScore:
        targets = np.asarray(tokens, dtype=np.int64)[1:]
        return BaselineScore(float(-self.log_probs[targets].sum()), len(targets))


class BigramLM:
    """Interpolated Kneser-Ney bigram over token ids, stored sparsely (only the pairs seen in training)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def fit(self, tokens: np.ndarray | Iterable[np.ndarray]) -> BigramLM:
        """Fit on an array of token ids, or on consecutive chunks of one stream (pairs across chunk edges count)."""
        V = self.vocab_size
        pairs, counts, last = np.zeros(0, np.int64), np.zeros(0, np.int64), None
        for chunk in as_chunks(tokens):
            stream = chunk if last is None else np.concatenate([[last], chunk])
            if len(stream) >= 2:
                new_pairs, new_counts = np.unique(stream[:-1] * V + stream[1:], return_counts=True)
                pairs, inverse = np.unique(np.concatenate([pairs, new_pairs]), return_inverse=True)
                counts = np.bincount(inverse, weights=np.concatenate([counts, new_counts])).astype(np.int64)
            last = stream[-1] if len(stream) else last
        self.pairs, self.pair_counts = pairs, counts
        prev, nxt = self.pairs // V, self.pairs % V
        self.context_counts = np.bincount(prev, weights=self.pair_counts, minlength=V)
        self.followers = np.bincount(prev, minlength=V).astype(np.float64)  # distinct tokens seen after each token
        continuation = np.bincount(nxt, minlength=V).astype(np.float64)  # distinct tokens seen before each token
        self.p_continuation = (continuation + 1.0) / (continuation.sum() + V)
        n1, n2 = int((self.pair_counts == 1).sum()), int((self.pair_counts == 2).sum())
        self.discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.75
        return self

    def probs(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        V = self.vocab_size
        keys = prev * V + nxt
        at = np.clip(np.searchsorted(self.pairs, keys), 0, len(self.pairs) - 1)
        counts = np.where(self.pairs[at] == keys, self.pair_counts[at], 0).astype(np.float64)
        context = self.context_counts[prev]
        p_cont = self.p_continuation[nxt]
        seen = context > 0
        safe = np.where(seen, context, 1.0)
        interpolated = (
            np.maximum(counts - self.discount, 0.0) / safe + self.discount * self.followers[prev] / safe * p_cont
        )
        return np.where(seen, interpolated, p_cont)

    def score(self, tokens: np.ndarray, chunk: int = 1 << 20) -> BaselineScore:
        tokens = np.asarray(tokens, dtype=np.int64)
        total = 0.0
        for start in range(0, len(tokens) - 1, chunk):
            piece = tokens[start : start + chunk + 1]
            total += float(-np.log(self.probs(piece[:-1], piece[1:])).sum())
        return BaselineScore(total, max(0, len(tokens) - 1))


def as_chunks(tokens: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(tokens, np.ndarray):
        tokens = [tokens]
    for chunk in tokens:
        yield np.asarray(chunk, dtype=np.int64)


def shard_chunks(shards: TokenShards, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """The split's tokens in order, `chunk` at a time."""
    for start in range(0, len(shards), chunk):
        yield shards.window(start, min(chunk, len(shards) - start))


def score_shards(model: UnigramLM | BigramLM, shards: TokenShards, chunk: int = CHUNK) -> BaselineScore:
    """NLL of every token of the split after the first (what the model is scored on), chunk by chunk."""
    total, targets = 0.0, 0
    for start in range(0, len(shards) - 1, chunk):
        piece = shards.window(start, min(chunk + 1, len(shards) - start))  # one token of overlap: its predecessor
        score = model.score(piece)
        total, targets = total + score.nll_nats, targets + score.targets
    return BaselineScore(total, targets)


def fit_and_score(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> dict[str, BaselineScore]:
    """Both baselines fitted on `train_tokens` and scored on `val_tokens`."""
    return {
        "unigram": UnigramLM(vocab_size).fit(train_tokens).score(val_tokens),
        "bigram": BigramLM(vocab_size).fit(train_tokens).score(val_tokens),
    }
