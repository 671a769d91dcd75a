"""Process-group setup for `torchrun`, and wrapping the model for data parallelism.

One code path for one process and for many: without torchrun's environment (`WORLD_SIZE` unset) everything here
is a no-op and `DistEnv` says rank 0 of 1. Under `torchrun --nproc_per_node=N` the backend is NCCL on GPUs and
Gloo on CPU. Rank 0 alone logs, checkpoints, writes reports and exports; every rank reads its own slice of each
global batch.

Two ways to replicate the model (`pretrain.parallel`):
- `ddp` (default): every rank holds the whole model and optimizer; gradients are all-reduced in backward.
  Gradient accumulation skips the all-reduce on all but the last micro-batch (`no_sync`).
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each transformer block, then the root, so
  parameters, gradients and optimizer state are split across ranks: for models whose weights + AdamW state do
  not fit on one device. Checkpoints gather full (unsharded) state dicts on save, so a checkpoint is the same
  file whatever wrapped the model, and resumes under either mode or on one device.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group torchrun describes (if any) and pin this rank to its GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv(device=device_type)
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = device_type
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=30)}
        if device_type == "cuda":
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(**kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def training_process(train_cfg: Any) -> Iterator[DistEnv]:
    """Threads, device, determinism and (under torchrun) the process group of a training stage, torn down after."""
    from lmcore.train.runtime import make_deterministic, pick_device, set_threads

    set_threads(train_cfg.threads)
    device_type = pick_device(train_cfg.device)
    make_deterministic(device_type)
    env = init_distributed(device_type)
    try:
        yield env
    finally:
        destroy_distributed()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(env: DistEnv, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not env.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(env: DistEnv, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not env.enabled:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    if not env.enabled:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def wrap_model(model: torch.nn.Module, env: DistEnv, parallel: str = "ddp") -> torch.nn.Module:
    """The module the loop calls: the model itself on one process, else DDP- or FSDP2-wrapped."""
    if not env.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        if hasattr(model, "token_losses"):  # evaluation calls it instead of forward: gather the root's weights too
            register_fsdp_forward_method(model, "token_losses")
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.local_rank] if env.device_type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def no_sync(wrapped: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on micro-batches that are not the last of an optimizer step."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):  # DDP
        return wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def fsdp_no_sync():
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")
