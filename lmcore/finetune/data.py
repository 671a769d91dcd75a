"""Reading the ingest splits and drawing fine-tuning batches.

Batches are a pure function of (seed, step): step s takes positions [s·B, (s+1)·B) of an endless stream of
per-epoch permutations, each seeded by (seed, epoch). A resumed run therefore needs no reader state to draw
exactly the batches an uninterrupted run would have drawn, and DDP ranks take disjoint slices of the same batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmcore.errors import DataError


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line; a line that is not JSON is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: not found (run the ingest stage first)")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The example indices of this rank's share of global batch `step` (batch_size is the per-rank size)."""
    global_size = batch_size * world_size
    first = step * global_size + rank * batch_size
    indices, cache = [], {}
    for position in range(first, first + batch_size):
        epoch, offset = divmod(position, n)
        if epoch not in cache:
            cache[epoch] = epoch_permutation(n, seed, epoch)
        indices.append(cache[epoch][offset])
    return indices
