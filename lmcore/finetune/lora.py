"""LoRA adapters through `peft`, on lmcore's own modules (or a transformers model's, lmcore.hfcausal), merged
back into plain weights before export.

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

# Hugging Face Llama projection name → the module that holds it, first found wins: lmcore's fused modules, then
# those of architectures run through transformers (lmcore.hfcausal): Phi-3, GPT-2, GPT-NeoX, Phi. GPT-2 names its
# attention and MLP output projections alike (`c_proj`), so o_proj and down_proj there adapt both.
HF_ALIASES = {
    "q_proj": ("qkv", "qkv_proj", "c_attn", "query_key_value", "Wqkv"),
    "k_proj": ("qkv", "qkv_proj", "c_attn", "query_key_value", "Wqkv"),
    "v_proj": ("qkv", "qkv_proj", "c_attn", "query_key_value", "Wqkv"),
    "o_proj": ("proj", "c_proj", "dense", "out_proj"),
    "gate_proj": ("gate_up", "gate_up_proj", "c_fc", "dense_h_to_4h", "fc1"),
    "up_proj": ("gate_up", "gate_up_proj", "c_fc", "dense_h_to_4h", "fc1"),
    "down_proj": ("down", "c_proj", "dense_4h_to_h", "fc2"),
}


def linear_names(model: nn.Module) -> list[str]:
    """Last name component of every Linear in the model that may carry an adapter (not a tied output head)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer, which peft adapts too

    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and id(module.weight) not in tied
    }
    return sorted(names)


def resolve_targets(model: nn.Module, requested: list[str], exclude: tuple[str, ...] = ()) -> list[str]:
    """lmcore module names for `finetune.lora.target_modules`; an unknown name is a ConfigError listing the choices."""
    available = [n for n in linear_names(model) if n not in exclude]
    aliases = {hf: next((m for m in ours if m in available), None) for hf, ours in HF_ALIASES.items()}
    aliases = {hf: ours for hf, ours in aliases.items() if ours is not None and hf not in available}
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
