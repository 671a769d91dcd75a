"""LoRA adapters through `peft`, on lmcore's own modules, merged back into plain weights before export.

peft wraps any `nn.Linear` it is told to by name, so adapters go straight onto lmcore's model and the one training
loop trains them. lmcore fuses projections that Llama keeps apart (`qkv` = q/k/v_proj, `gate_up` = gate/up_proj,
`proj` = o_proj, `down` = down_proj): the Hugging Face names are accepted as aliases, and a fused module gets one
adapter of rank r over its whole output (a superset of what separate per-projection adapters can express).
`merge` folds the adapters into the base weights and returns the bare model, which exports like any other.
"""

from __future__ import annotations

from torch import nn

from lmcore.errors import ConfigError
from lmcore.options import LoraConfig

# Hugging Face Llama projection name → the lmcore module that contains it.
HF_ALIASES = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "o_proj": "proj",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
    "down_proj": "down",
}


def linear_names(model: nn.Module) -> list[str]:
    """Last name component of every Linear in the model that may carry an adapter (not a tied output head)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) not in tied
    }
    return sorted(names)


def resolve_targets(model: nn.Module, requested: list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """lmcore module names for `finetune.lora.target_modules`; an unknown name is a ConfigError listing the choices."""
    available = [n for n in linear_names(model) if n not in exclude]
    aliases = {hf: ours for hf, ours in HF_ALIASES.items() if ours in available}
    resolved: list[str] = []
    for name in requested:
        target = aliases.get(name, name)
        if target not in available:
            choices = ", ".join(available + sorted(aliases))
            raise ConfigError(f"finetune.lora.target_modules: no module {name!r} in the model; available: {choices}")
        if target not in resolved:
            resolved.append(target)
    if not resolved:
        raise ConfigError("finetune.lora.target_modules: empty; name at least one module")
    return resolved


def apply_lora(model: nn.Module, cfg: LoraConfig, trainable: tuple[str, ...] = ()) -> nn.Module:
    """The model with LoRA adapters on the target modules; only adapters (and `trainable` modules) get gradients."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = resolve_targets(model, cfg.target_modules, exclude=trainable)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(trainable) or None,
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def merge(model: nn.Module) -> nn.Module:
    """The bare model with the adapters folded into its weights (a no-op for a model without adapters)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
