"""The training loop's state on disk: what a checkpoint holds beyond the weights (the loop's counters and history,
every RNG, the resolved numerics), how a run resumes from the newest matching checkpoint, and the digest that
shows data-parallel replicas stayed identical.

Apart from lmcore/train/loop.py so the loop reads as the steps it takes; the files themselves are
lmcore/train/checkpoint.py's.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import LmcycleError
from lmcore.train import checkpoint as ckpt
from lmcore.train.distributed import DistEnv, broadcast_object, gather_objects, is_sharded
from lmcore.train.launch import check_process_count
from lmcore.train.runtime import rng_state, set_rng_state

if TYPE_CHECKING:
    import torch


class TrainingError(LmcycleError):
    """Training cannot go on: a non-finite loss, replicas that disagree."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    history: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"train": [], "val": []})
    window: list[float] = field(default_factory=list)  # losses since the last log line


def say(env: DistEnv, message: str) -> None:
    if env.is_main:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes of a state dict: equal digests mean bit-identical weights."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolved_numerics(device_type: str, dtype: Any, threads: int, parts: int, compiling: bool) -> dict[str, Any]:
    """The settings that pick a run's floating-point code paths, as they resolved on this machine (`auto` and
    `threads: 0` say nothing by themselves): written into every checkpoint and compared on resume."""
    return {
        "device": device_type,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": int(threads),
        "batch_split": int(parts),
        "compile": bool(compiling),
    }


def numerics_note(saved: dict[str, Any] | None, now: dict[str, Any], name: str, path: Path) -> str | None:
    """One line when a checkpoint was written with other resolved numerics than this run's (None if the same, or
    if the checkpoint predates the record): the resume goes on, but is no longer bit-identical to a run that was
    never interrupted."""
    if not saved or saved == now:
        return None
    changed = ", ".join(f"{key} {saved.get(key)} → {now.get(key)}" for key in now if saved.get(key) != now.get(key))
    return (
        f"{name}: resuming {path} with other numerics ({changed}): the result will not be bit-identical to an "
        f"uninterrupted run; pin {name}.threads, {name}.dtype, {name}.device and {name}.batch_split to avoid this"
    )


def resume(
    model, optimizer, state: TrainState, env: DistEnv, root: Path | None, fp: str, name: str, numerics: dict[str, Any]
) -> int | None:
    if root is None:
        return None
    found = ckpt.find_resumable(root, fp) if env.is_main else None
    path = broadcast_object(env, str(found.path) if found else None)
    if path is None:
        return None
    path = Path(path)
    meta = ckpt.read_meta(path)
    note = check_process_count(model, int(meta.get("world_size", 1)), env, name, path)  # refuses what can't resume
    if note:
        say(env, note)
    if note := numerics_note(meta.get("numerics"), numerics, name, path):
        say(env, note)
    ckpt.load_model_state(model, ckpt.load_weights(path))
    trainer = ckpt.load_trainer(path)
    ckpt.load_optimizer_state(model, optimizer, trainer["optimizer"])
    rngs = trainer["rng"]
    set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    state.step = int(meta["step"])
    state.tokens_seen = int(meta["tokens_seen"])
    state.history = ckpt.load_history(path)
    state.window = list(trainer.get("window", []))
    say(env, f"{name}: resuming from {path} (step {state.step})")
    return state.step


def save_checkpoint(
    model, optimizer, state: TrainState, env: DistEnv, root: Path, fp: str, meta: dict, keep: int
) -> Path | None:
    weights = ckpt.model_state(model)  # every rank: FSDP gathers here
    optim_state = ckpt.optimizer_state(model, optimizer)
    rngs = gather_objects(env, rng_state())
    replicas = None
    if env.enabled and not is_sharded(model):
        replicas = gather_objects(env, state_digest(model.state_dict()))  # each rank's own copy
        if len(set(replicas)) != 1:
            raise TrainingError(f"data-parallel replicas diverged at step {state.step}: weight digests {replicas}")
    path = None
    if env.is_main:
        trainer = {"optimizer": optim_state, "rng": rngs, "window": list(state.window)}
        full_meta = {
            **meta,
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "fingerprint": fp,
            "world_size": env.world_size,
        }
        if replicas:
            full_meta["replica_weight_sha256"] = replicas
        path = ckpt.write_checkpoint(root, state.step, weights, trainer, state.history, full_meta)
        ckpt.prune(root, keep)
    shared = broadcast_object(env, str(path) if path else None)  # also keeps ranks in step with the write
    return Path(shared) if shared else None


def check_replicas(model, env: DistEnv) -> str:
    digests = gather_objects(env, state_digest(model.state_dict()))
    if len(set(digests)) != 1:
        raise TrainingError(f"data-parallel replicas ended with different weights: {digests}")
    return digests[0]
