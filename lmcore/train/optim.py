"""AdamW and the learning-rate schedules of the training loop.

Weight decay applies to matrices (linear and embedding weights) only, never to norms or biases, as in nanoGPT and
Llama. The schedule is a pure function of the step (`lr_at`), so a resumed run recomputes it instead of storing a
scheduler object: warmup (linear), then cosine decay, warmup-stable-decay (WSD: constant, then a linear decay
over the last `decay_fraction` of the steps), or constant; every decay ends at `lr × min_lr_ratio`.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lmcore.options import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) out of `cfg.steps`."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.steps * cfg.decay_fraction))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / max(1, cfg.steps - decay_start))
        return peak - (peak - floor) * progress
    # cosine from the end of warmup to the last step
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: tensors of two or more dimensions decay, the rest (norm gains, biases) do not."""
    decay, no_decay = [], []
    for param in model.parameters():  # shared (tied) parameters are yielded once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW, the fused kernel where this torch build offers it for the device (CUDA, and CPU in torch ≥ 2.4)."""
    import torch

    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in {"cuda", "cpu"}:
        kwargs["fused"] = True
    groups = param_groups(model, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, **kwargs)
    except (RuntimeError, ValueError):  # a build or dtype the fused kernel does not cover
        kwargs.pop("fused", None)
        return torch.optim.AdamW(groups, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
