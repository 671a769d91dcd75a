"""The n-gram hashes of the contamination check on disk: exact counts in bounded memory, whatever the corpus size.

Train text yields 8 bytes of n-gram hashes per word (over 1 GB for a corpus of a few GB), so `HashSpill` appends
each split's hashes to a file as they come and counts at the end:

- val distinct: when val's hashes fit `BUDGET_BYTES`, they are loaded, sorted and made unique; train then streams
  past them in chunks of `CHUNK` values, marking the val hashes it holds. Memory: val plus one chunk.
- otherwise both files are split by the next 8 bits of the hash into 256 pairs of files (disjoint value ranges,
  so the counts add up) and each pair is counted the same way, recursively: memory never exceeds about
  `BUDGET_BYTES` plus a chunk, and disk holds the hashes about twice while a file is being split.

The counts are exactly those of sorting everything in memory; only where the hashes sit differs.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

BUDGET_BYTES = 4 * 2**20  # val hashes held in memory at once; above it the files are split by hash range
CHUNK = 1 << 17  # values read at a time (1 MiB)
_FANOUT_BITS = 8
SPLITS = ("train", "val")


class HashSpill:
    """Appends 64-bit hashes of the train and val splits to files; `overlap` counts them and removes the files."""

    def __init__(self, directory: Path | None = None) -> None:
        if directory is None:  # a private temporary directory, removed with this object at the latest
            directory = Path(tempfile.mkdtemp(prefix="lmcycle-ngrams-"))
            weakref.finalize(self, shutil.rmtree, directory, True)
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.paths = {split: directory / f"{split}.u64" for split in SPLITS}
        self.files: dict[str, BinaryIO] = {split: self.paths[split].open("wb") for split in SPLITS}

    def add(self, split: str, hashes: np.ndarray) -> None:
        self.files[split].write(hashes.astype(np.uint64, copy=False).tobytes())

    def overlap(self) -> tuple[int, int]:
        """(distinct val hashes, how many of them occur in train); the files are removed afterwards."""
        self.close()
        try:
            return _count(self.paths["train"], self.paths["val"], 0)
        finally:
            self.remove()

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _count(train: Path, val: Path, bits_done: int) -> tuple[int, int]:
    """Distinct values of `val` and how many occur in `train`; all values of both share their top `bits_done` bits."""
    val_bytes = val.stat().st_size
    if val_bytes == 0:
        return 0, 0
    if bits_done >= 64:  # every value of both files is the same one
        return 1, int(train.stat().st_size > 0)
    if val_bytes <= BUDGET_BYTES:
        return _count_loaded(train, val)
    distinct = shared = 0
    for train_part, val_part in zip(_split(train, bits_done), _split(val, bits_done), strict=True):
        d, s = _count(train_part, val_part, bits_done + _FANOUT_BITS)
        distinct, shared = distinct + d, shared + s
        train_part.unlink(missing_ok=True)  # a part split further is already gone
        val_part.unlink(missing_ok=True)
    return distinct, shared


def _count_loaded(train: Path, val: Path) -> tuple[int, int]:
    """Val in memory (sorted, unique), train streamed past it."""
    values = _unique(np.fromfile(val, dtype=np.uint64))
    found = np.zeros(values.size, dtype=bool)
    for chunk in _chunks(train):
        chunk.sort()  # sorted keys make searchsorted about twice as fast
        at = np.minimum(np.searchsorted(values, chunk), values.size - 1)
        found[at[values[at] == chunk]] = True
    return int(values.size), int(found.sum())


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sorts `values` in place: no second copy while sorting)."""
    values.sort()
    if values.size < 2:
        return values
    return values[np.concatenate(([True], values[1:] != values[:-1]))]


def _chunks(path: Path) -> Iterator[np.ndarray]:
    with path.open("rb") as f:
        while (chunk := np.fromfile(f, dtype=np.uint64, count=CHUNK)).size:
            yield chunk


def _split(path: Path, bits_done: int) -> list[Path]:
    """Split a file of values into 2**_FANOUT_BITS files by the bits after the top `bits_done` (then delete it)."""
    fanout = 1 << _FANOUT_BITS
    parts = [path.with_name(f"{path.name}.{i:02x}") for i in range(fanout)]
    shift = np.uint64(64 - bits_done - _FANOUT_BITS)
    edges = np.arange(fanout + 1, dtype=np.uint64)
    files = [p.open("wb") for p in parts]
    try:
        for chunk in _chunks(path):
            chunk = _unique(chunk)  # sorted; values share their top bits, so the next bits come in order too
            keys = (chunk >> shift) & np.uint64(fanout - 1)
            bounds = np.searchsorted(keys, edges)
            for i in np.flatnonzero(np.diff(bounds)):
                files[i].write(chunk[bounds[i] : bounds[i + 1]].tobytes())
    finally:
        for f in files:
            f.close()
    path.unlink()
    return parts
