"""The training loop shared by pretraining and fine-tuning: a fixed number of optimizer steps, resumable exactly.

`train(model, batch_fn, cfg, ...)` knows nothing about where batches come from or what the loss is:
`batch_fn(index)` returns a dict of tensors for micro-batch `index = step * grad_accum + micro` (a pure function
of the index, so the data position is the step and needs no saved reader state), and `loss_fn(model, batch)`
returns a scalar mean loss. Pretraining passes token-shard windows and the LM loss; fine-tuning passes its own.

Each step: lr from the schedule → grad_accum micro-batches (autocast bf16 on GPU, fp32 on CPU; DDP/FSDP
gradient sync only on the last; on CPU each may run as parts on threads of their own, see threadsplit.py) → clip (the
pre-clip norm is logged) → a finiteness check (a NaN/inf loss or gradient stops with one line naming the step,
before the optimizer touches the weights) → AdamW step.
Validation runs every `eval_every` steps and at the end, checkpoints every `checkpoint_every` steps and at the
end. SIGTERM/SIGINT finish the current step, checkpoint it, and stop with an error (a non-zero exit), so a
scheduler's preemption loses nothing. On start, the newest checkpoint whose fingerprint matches is resumed: weights,
AdamW state, every RNG, step, tokens seen and the logged history, so the rest of the run is bit-identical on CPU.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.diskspace import shown, writing
from lmcore.errors import LmcycleError
from lmcore.train import checkpoint as ckpt
from lmcore.train.compile import compile_choice, compile_model, eager
from lmcore.train.distributed import (
    DistEnv,
    all_reduce_sum,
    is_sharded,
    no_sync,
    wrap_model,
)
from lmcore.train.optim import build_optimizer, lr_at, set_lr
from lmcore.train.resume import (
    TrainingError,
    TrainState,
    check_replicas,
    resolved_numerics,
    resume,
    save_checkpoint,
    say,
)
from lmcore.train.runtime import autocast, peak_flops, pick_dtype, seed_everything
from lmcore.train.threadsplit import SplitBackward, loss_terms, split_choice

if TYPE_CHECKING:
    import torch

    from lmcore.options import TrainConfig

Batch = dict[str, "torch.Tensor"]


class TrainingStopped(LmcycleError):
    """A stop signal arrived; the current step was checkpointed."""


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The default loss: mean next-token cross-entropy of `input_ids` against `targets`."""
    return model(batch["input_ids"], batch["targets"])


class TrainCallback:
    """Hooks called on rank 0 only; override what you need."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    train_loss: float | None
    val: dict[str, float]
    history: dict[str, list[dict[str, float]]]
    checkpoint: Path | None
    resumed_from: int | None
    replica_digest: str | None = None
    tokens_per_s: float | None = None  # this process's training throughput (evaluation and checkpoints excluded)


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (main thread only)."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _fmt_rate(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def train(
    model: torch.nn.Module,
    batch_fn: Callable[[int], Batch],
    cfg: TrainConfig,
    *,
    env: DistEnv,
    seed: int,
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] = lm_loss,
    evaluate_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    meta: dict[str, Any] | None = None,
    flops_per_token: float | None = None,
    callbacks: Sequence[TrainCallback] = (),
    name: str = "train",
    parallel: str = "ddp",
) -> TrainResult:
    """Train `model` (already on env.device) for cfg.steps optimizer steps, resuming from checkpoint_dir."""
    import torch

    from lmcore.kernels import use_fast_kernels

    use_fast_kernels(model)  # the hand-written gradients, before wrapping or compiling sees the model

    device_type = env.device_type
    dtype = pick_dtype(cfg.dtype, device_type)
    wrapped = wrap_model(model, env, parallel)
    optimizer = build_optimizer(model, cfg, device_type)
    compiling, how = compile_choice(cfg.compile, device_type, name)
    if how:
        say(env, f"{name}: {how}")
    parts, how = split_choice(
        cfg.batch_split,
        device_type=device_type,
        threads=torch.get_num_threads(),
        rows=cfg.batch_size // env.world_size,
        tokens=lambda: _count_tokens(batch_fn(0)),  # the first micro-batch, whatever step a run resumes at
        distributed=env.enabled,
        model=model,
        section=name,
    )
    if how:
        say(env, f"{name}: {how}")
    numerics = resolved_numerics(device_type, dtype, torch.get_num_threads(), parts, compiling)
    meta = {**(meta or {}), "numerics": numerics}

    state = TrainState()
    resumed_from = resume(model, optimizer, state, env, checkpoint_dir, fingerprint, name, numerics)
    if resumed_from is None:
        seed_everything(seed + env.rank)  # distinct dropout masks per rank, fixed per run
    peak = peak_flops(device_type, torch.cuda.current_device() if device_type == "cuda" else 0)
    if peak:
        say(env, f"{name}: MFU against {peak[1]} per device")
    last_checkpoint: Path | None = None
    if resumed_from is not None and checkpoint_dir is not None:
        last_checkpoint = checkpoint_dir / ckpt.step_dir_name(resumed_from)

    def save(step: int) -> Path | None:
        nonlocal last_checkpoint
        if checkpoint_dir is None:
            return None
        kept = f"last good checkpoint {shown(last_checkpoint)} kept" if last_checkpoint else "no checkpoint kept"
        with writing(checkpoint_dir / ckpt.step_dir_name(step), hint=f"{kept}; free space and rerun to resume"):
            path = save_checkpoint(
                model, optimizer, state, env, checkpoint_dir, fingerprint, meta or {}, cfg.keep_checkpoints
            )
        last_checkpoint = path or last_checkpoint
        if env.is_main and path is not None:
            for cb in callbacks:
                cb.on_checkpoint(step, path)
        return path

    def evaluate(step: int) -> None:
        if evaluate_fn is None:
            return
        metrics = _evaluate(wrapped, model, evaluate_fn, device_type, dtype)
        state.history["val"].append({"step": step, **metrics})
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "tokens")
        say(env, f"{name}: step {step}/{cfg.steps} | val {shown}")
        if env.is_main:
            from lmcore.reporting import reporter

            reporter().log_metrics({f"{name}.val_{k}": float(v) for k, v in metrics.items()}, step=step)
            for cb in callbacks:
                cb.on_eval(step, metrics)

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=state.step,
        desc=name,
        unit="step",
        file=sys.stderr,
        disable=not env.is_main or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    run_start, run_tokens, run_paused = window_start, 0, 0.0
    with (
        _StopFlag() as stop,
        bar,
        _splitter(parts, lambda: autocast(device_type, dtype), compiling) as split,
        # a split model's kernels are written for its parts' threads
        _compiled(model, wrapped, device_type, compiling, split.part_threads if split else 0) as wrapped,
    ):
        while state.step < cfg.steps:
            step = state.step
            lr = lr_at(step, cfg)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=env.device, dtype=torch.float32)
            batches = [batch_fn(step * cfg.grad_accum + micro) for micro in range(cfg.grad_accum)]
            weights, step_tokens = _micro_weights(env, batches)
            for micro, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
                if split is not None:
                    loss_sum += split(wrapped, batch, loss_fn, weight)
                else:
                    with no_sync(wrapped, micro == cfg.grad_accum - 1), autocast(device_type, dtype):
                        loss = loss_fn(wrapped, batch)
                        # the same division as ever when micro-batches weigh alike, so such runs stay bit-identical
                        loss = loss / cfg.grad_accum if weight == 1 / cfg.grad_accum else loss * weight
                    loss.backward()
                    loss_sum += loss.detach().float()
            grad_norm = _clip(model, cfg.grad_clip)
            loss_value, grad_value, stop_votes = _sync_scalars(env, loss_sum, grad_norm, stop.received is not None)
            if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
                optimizer.zero_grad(set_to_none=True)
                where = f"last good checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                raise TrainingError(
                    f"{name}: non-finite {what} at step {step + 1} (loss {loss_value:.4g}, gradient norm "
                    f"{grad_value:.4g}, lr {lr:.3g}): lower {name}.lr or raise {name}.warmup_steps; {where}"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += step_tokens
            window_tokens += step_tokens
            run_tokens += step_tokens
            state.window.append(loss_value)
            bar.update(1)

            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                now = time.perf_counter()
                rate = window_tokens / max(now - window_start, 1e-9)
                _log(env, state, cfg, name, lr, grad_value, rate, flops_per_token, peak, bar, callbacks)
                window_start, window_tokens = now, 0
            paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens/s
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                evaluate(state.step)
            stopping = stop_votes > 0
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps or stopping:
                save(state.step)
            window_start += time.perf_counter() - paused
            run_paused += time.perf_counter() - paused
            if stopping and state.step < cfg.steps:
                signame = stop.received or "a stop signal on another rank"
                raise TrainingStopped(
                    f"{name}: stopped by {signame} at step {state.step}/{cfg.steps}; "
                    f"checkpoint {last_checkpoint} saved: rerun to resume"
                )

    digest = check_replicas(model, env) if env.enabled and not is_sharded(model) else None
    train_rows = state.history["train"]
    val_rows = state.history["val"]
    return TrainResult(
        step=state.step,
        tokens_seen=state.tokens_seen,
        train_loss=train_rows[-1]["loss"] if train_rows else None,
        val={k: v for k, v in val_rows[-1].items() if k != "step"} if val_rows else {},
        history=state.history,
        checkpoint=last_checkpoint,
        resumed_from=resumed_from,
        tokens_per_s=run_tokens / max(time.perf_counter() - run_start - run_paused, 1e-9) if run_tokens else None,
        replica_digest=digest,
    )


# --- step pieces ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _compiled(model, wrapped, device_type: str, compiling: bool, threads: int):
    """The module to call while training; the model is eager again afterwards (export, generation)."""
    if not compiling:
        yield wrapped
        return
    wrapped, restore = compile_model(model, wrapped, device_type, threads)
    try:
        yield wrapped
    finally:
        restore()


@contextlib.contextmanager
def _splitter(parts: int, autocast_fn, compiled: bool):
    """A SplitBackward for `parts` > 1 (its threads end with training), else None."""
    if parts == 1:
        yield None
        return
    import torch

    split = SplitBackward(parts, torch.get_num_threads(), autocast_fn, compiled)
    try:
        yield split
    finally:
        split.close()


def _micro_weights(env: DistEnv, batches: list[Batch]) -> tuple[list[float], int]:
    """Each micro-batch's weight, so that the step's gradient is that of the mean loss over every loss term of the
    step on every rank (a target token that counts; a row for classification), as one process on the whole global
    batch computes it; and the tokens the step saw on all ranks. A micro-batch's loss is its own mean, and DDP
    averages the ranks' gradients, so each is scaled by world_size × its terms / the step's terms. Where every
    micro-batch has as many terms (pretraining) the weight is exactly 1 / grad_accum, as before."""
    terms = [loss_terms(batch) for batch in batches]
    tokens = sum(_count_tokens(batch) for batch in batches)
    total_terms, total_tokens = (int(v) for v in all_reduce_sum(env, [float(sum(terms)), float(tokens)]))
    if total_terms == 0:  # nothing to learn from in the whole step: the old equal weighting (a zero loss)
        return [1 / len(batches)] * len(batches), total_tokens
    return [env.world_size * n / total_terms for n in terms], total_tokens


def _count_tokens(batch: Batch) -> int:
    ids = batch.get("input_ids")
    return int(ids.numel()) if ids is not None else 0


def _clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return norm


def _sync_scalars(env: DistEnv, loss: torch.Tensor, grad_norm: torch.Tensor, stop: bool) -> tuple[float, float, int]:
    """One host sync per step: the loss (mean over ranks), the gradient norm, and how many ranks want to stop."""
    import torch

    packed = torch.stack(
        [loss.float(), grad_norm.float().to(loss.device), torch.tensor(float(stop), device=loss.device)]
    )
    if env.enabled:
        import torch.distributed as dist

        dist.all_reduce(packed)
        packed[0] /= env.world_size
        packed[1] /= env.world_size  # identical on every rank after the gradient all-reduce
    loss_value, grad_value, votes = packed.tolist()
    return loss_value, grad_value, int(votes)


def _log(env, state, cfg, name, lr, grad_norm, rate, flops_per_token, peak, bar, callbacks) -> None:
    loss = sum(state.window) / len(state.window)
    state.window.clear()
    row = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
    state.history["train"].append(row)
    if not env.is_main:
        return
    parts = [f"{name}: step {state.step}/{cfg.steps}", f"loss {loss:.4f}", f"lr {lr:.2e}", f"grad {grad_norm:.3f}"]
    parts.append(f"{_fmt_rate(rate)} tok/s")
    metrics = {"train_loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": rate}
    if flops_per_token:
        achieved = flops_per_token * rate
        metrics["flops_per_s"] = achieved
        if peak:
            mfu = achieved / (peak[0] * env.world_size)
            metrics["mfu"] = mfu
            parts.append(f"MFU {100 * mfu:.1f}%")
        else:
            parts.append(f"{_fmt_rate(achieved)}FLOP/s")
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=_fmt_rate(rate), refresh=False)
    say(env, " | ".join(parts))
    from lmcore.reporting import reporter

    reporter().log_metrics({f"{name}.{k}": v for k, v in metrics.items()}, step=state.step)
    for cb in callbacks:
        cb.on_log(state.step, metrics)


def _evaluate(wrapped, model, evaluate_fn, device_type, dtype) -> dict[str, float]:
    import torch

    model.eval()
    try:
        # FSDP must run forward through the sharded root; DDP's wrapper adds nothing at eval
        target = model if is_sharded(model) or not hasattr(wrapped, "module") else wrapped.module
        with torch.no_grad(), autocast(device_type, dtype), eager():
            return dict(evaluate_fn(target))
    finally:
        model.train()
