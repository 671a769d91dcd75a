"""Language-model metrics on token shards: loss, perplexity and bits-per-byte, defined once for every stage.

Bits-per-byte (bpb) is the tokenizer-independent score: the total next-token negative log-likelihood (nats) of
the whole val split, read as non-overlapping context-length windows (so every token after the first is predicted
exactly once, with at most one context of history), divided by ln 2 × the UTF-8 bytes of the val text. Two models
with different tokenizers compare on bpb; loss and perplexity are per token and do not. When only the first
`max_batches` batches are scored, the byte count is prorated by the share of targets scored.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lmcore.data.shards import TokenShards


def bits_per_byte(nll_nats: float, utf8_bytes: float) -> float:
    """Total NLL in nats over a text → bits per UTF-8 byte of that text."""
    return nll_nats / (math.log(2) * max(utf8_bytes, 1e-12))


def perplexity(mean_loss_nats: float) -> float:
    return math.exp(min(mean_loss_nats, 700.0))


def evaluate_lm(
    model: torch.nn.Module,
    shards: TokenShards,
    context_length: int,
    batch_size: int,
    max_batches: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """{loss, perplexity, bpb, tokens} of `model` on `shards` (put the model in eval mode first).

    Under data parallelism every rank calls this: batches are dealt round-robin, and each rank runs the same
    number of forward passes (FSDP needs every rank in every forward), the sums are all-reduced.
    """
    import torch

    device = next(model.parameters()).device
    batches = _my_batches(shards, context_length, batch_size, max_batches, rank, world_size)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y, real in batches:
            xt = torch.from_numpy(x).to(device, non_blocking=True)
            yt = torch.from_numpy(y).to(device, non_blocking=True)
            losses = model.token_losses(xt, yt)
            if real:
                nll += losses.double().sum()
                count += y.size
    if world_size > 1:
        import torch.distributed as dist

        packed = torch.stack([nll, count])
        dist.all_reduce(packed)
        nll, count = packed[0], packed[1]
    total_nll, tokens = float(nll), int(count)
    predictable = max(1, shards.num_tokens - 1)
    scored_bytes = shards.utf8_bytes * min(1.0, tokens / predictable)
    loss = total_nll / max(1, tokens)
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "bpb": bits_per_byte(total_nll, scored_bytes),
        "tokens": tokens,
    }


def count_batches(num_tokens: int, context_length: int, batch_size: int) -> int:
    """How many batches `TokenShards.sequential_windows` yields: full windows, then a shorter tail window."""
    full = (num_tokens - 1) // context_length
    tail = 1 if num_tokens - full * context_length >= 2 else 0
    return math.ceil(full / batch_size) + tail


def _my_batches(shards, context_length, batch_size, max_batches, rank, world_size):
    """This rank's (x, y, real) batches, streamed; ranks short of the most batches repeat one as padding."""
    total = count_batches(shards.num_tokens, context_length, batch_size)
    if max_batches:
        total = min(total, max_batches)
    per_rank = math.ceil(total / world_size)
    served, first = 0, None
    for index, (x, y) in enumerate(shards.sequential_windows(context_length, batch_size)):
        if index >= total:
            break
        if first is None:
            first = (x, y)
        if index % world_size == rank:
            served += 1
            yield x, y, True
    for _ in range(per_rank - served):
        yield first[0], first[1], False
