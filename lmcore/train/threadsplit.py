"""Data parallelism inside one CPU process: each micro-batch split into parts that run at once, on threads.

A CPU training step alternates compute-bound matrix products with memory-bound passes (norms, rotary, SwiGLU,
softmax, attention). With every core on one batch, all cores wait on memory in the same phases, and every
operation pays to fork and join its threads. With the batch split into parts, each on a thread of its own with its
share of the cores, one part's matrix products run while another part streams memory. On 2 cores (cpu-demo,
16 × 256 tokens) 2 parts of 1 thread each train 3–9% faster than one batch on 2 threads (bench/train_throughput.py,
several runs): about what two DDP processes gain, without a second copy of the weights, an all-reduce or
processes to launch. (The Python threads do not contend for the GIL: autograd, aten kernels and inductor's C++
wrapper release it.)

Exactness: every part runs on a fixed number of threads, and the parts' gradients are summed in part order, so a
run is bit-repeatable; tests check it within a process and across fresh processes. (Two causes of runs that came
out different were found and fixed: compiling from two threads at once, below, and MKL's vector math set up by a
parallel first call, see the top of lmcore/model.py.) Each part's mean loss is weighted by its share of the
micro-batch's loss terms (targets that count; rows where the batch has no targets), so the sum is the gradient of
the whole micro-batch's mean loss. It differs from an unsplit run in the last bits (another order of summation),
which is why `batch_split` belongs to a run's fingerprint.

Not used with dropout (the threads would draw from one generator in no fixed order), under torchrun (each process
is one part already), on a GPU (one batch already fills it), and by `auto` not for small micro-batches (see
MIN_PART_TOKENS).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

from lmcore.errors import ConfigError

if TYPE_CHECKING:
    import torch

Batch = dict[str, "torch.Tensor"]
LossFn = Callable[["torch.nn.Module", Batch], "torch.Tensor"]


# Below this many tokens a part, threads cost more than they save: on 2 cores a 4 × 64-token batch split in two ran
# 9% slower, 16 × 64 as fast, 16 × 256 3–9% faster.
MIN_PART_TOKENS = 1024


def split_choice(
    setting: int | Literal["auto"],
    *,
    device_type: str,
    threads: int,
    rows: int,
    tokens: Callable[[], int],
    distributed: bool,
    model: torch.nn.Module,
    section: str,
) -> tuple[int, str]:
    """How many parts each micro-batch (`rows` sequences; `tokens()` counts its tokens, asked only by `auto`)
    runs as (1 = unsplit), and a line for the log ("" when unsplit).

    `auto` splits in two on a CPU with an even number of threads (≥ 2), in one process, without dropout, when each
    part gets ≥ MIN_PART_TOKENS tokens. An explicit count > 1 where splitting cannot work is a ConfigError.
    """
    if setting == 1:
        return 1, ""
    parts = 2 if setting == "auto" else int(setting)
    problem = _unsplittable(parts, device_type, threads, rows, distributed, model)
    if setting == "auto" and threads % 2:
        problem = problem or f"{threads} threads do not share out evenly between 2 parts"
    if setting == "auto" and problem is None and (count := tokens()) < parts * MIN_PART_TOKENS:
        problem = f"micro-batches of {count} tokens are too small to pay for threads"
    if problem is None:
        return parts, f"each micro-batch runs as {parts} parts at once, {threads // parts} thread(s) each"
    if setting == "auto":
        return 1, ""
    raise ConfigError(f"{section}.batch_split: {parts} parts, but {problem}: set {section}.batch_split to auto or 1")


def _unsplittable(parts: int, device_type: str, threads: int, rows: int, distributed: bool, model) -> str | None:
    if device_type != "cpu":
        return f"splitting is for CPUs, and this run is on {device_type}"
    if distributed:
        return "under torchrun each process is already one part"
    if threads < parts:
        return f"only {threads} thread(s) to share out"
    if rows < parts:
        return f"a micro-batch has only {rows} row(s)"
    if _has_dropout(model):
        return "the model uses dropout, whose draws would not be repeatable across threads"
    return None


def _has_dropout(model: torch.nn.Module) -> bool:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
        rate = getattr(module, "dropout", None)  # lmcore's blocks keep the rate as a float
        if isinstance(rate, float) and rate > 0:
            return True
    return False


class SplitBackward:
    """Runs forward and backward of one micro-batch as `parts` parts on a pool of threads; adds the gradients
    (part order) into each parameter's `.grad` and returns the weighted loss, detached."""

    def __init__(
        self,
        parts: int,
        threads: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        compiled: bool = False,
    ) -> None:
        self.parts = parts
        self.threads = threads
        self.part_threads = max(threads // parts, 1)
        self.autocast = autocast
        self.pool = ThreadPoolExecutor(parts, thread_name_prefix="lmcore-part")
        self.compiled = compiled
        self.seen: set[tuple] = set()  # the shapes of parts run so far

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def __call__(self, model: torch.nn.Module, batch: Batch, loss_fn: LossFn, scale: float) -> torch.Tensor:
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        pieces = [piece for piece in split_batch(batch, self.parts) if _rows(piece)]
        terms = [loss_terms(piece) for piece in pieces]
        total = max(sum(terms), 1)
        jobs = [(piece, scale * n / total) for piece, n in zip(pieces, terms, strict=True)]
        shapes = {tuple(tuple(t.shape) for t in piece.values()) for piece in pieces}
        # Shapes not seen before make compiled modules compile. Compiling from several threads at once was not
        # repeatable (a run came out different from the next), so those parts run one at a time.
        at_once = not self.compiled or shapes <= self.seen
        self.seen |= shapes
        try:
            if at_once:
                futures = [self.pool.submit(self._part, model, piece, loss_fn, params, w) for piece, w in jobs]
                results = [f.result() for f in futures]
            else:
                results = [self.pool.submit(self._part, model, piece, loss_fn, params, w).result() for piece, w in jobs]
        finally:
            # The parts' set_num_threads can reach the caller: torch keeps a process-wide count for threads it
            # starts later, and one measurement saw the caller slow down after the parts had run. Set it again.
            torch.set_num_threads(self.threads)
        _accumulate(params, [grads for _, grads in results])
        return torch.stack([loss for loss, _ in results]).sum()

    def _part(self, model, batch: Batch, loss_fn: LossFn, params: Sequence[torch.Tensor], weight: float):
        import torch

        torch.set_num_threads(self.part_threads)  # this thread's OpenMP and MKL counts
        with self.autocast():
            loss = loss_fn(model, batch) * weight
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach().float(), grads


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Row slices (views) of every tensor in the batch: `parts` pieces, as even as the rows allow. (The loop's
    batches hold one row per sequence in every tensor: ids, targets, masks, labels.)"""
    sliced = {key: value.tensor_split(parts) for key, value in batch.items()}
    return [{key: pieces[i] for key, pieces in sliced.items()} for i in range(parts)]


def loss_terms(batch: Batch) -> int:
    """How many terms the batch's mean loss averages: targets that count, else rows."""
    from lmcore.model import IGNORE_INDEX

    targets = batch.get("targets")
    if targets is not None:
        return int((targets != IGNORE_INDEX).sum())
    return _rows(batch)


def _rows(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0] if batch else 0


def _accumulate(params: Sequence[torch.Tensor], per_part: list[Sequence[torch.Tensor | None]]) -> None:
    """Adds each parameter's gradients, part by part, into the first part's (a fresh buffer from autograd, so the
    sum needs no new memory: allocating it cost more than the adding); that sum becomes or joins `.grad`."""
    owned: set[int] = set()
    for i, param in enumerate(params):
        grads = [grads[i] for grads in per_part if grads[i] is not None]
        if not grads:
            continue
        total = grads[0]
        if len(grads) > 1:
            if not _is_own_buffer(total, owned):
                total = total.clone()
            for grad in grads[1:]:
                total.add_(grad)
        if param.grad is None:
            param.grad = total
        else:
            param.grad.add_(total)


def _is_own_buffer(grad: torch.Tensor, owned: set[int]) -> bool:
    """A dense tensor of its own, not a view and not one already handed out: safe to add into."""
    if grad._base is not None or not grad.is_contiguous():
        return False
    address = grad.untyped_storage().data_ptr()
    if address in owned:
        return False
    owned.add(address)
    return True
