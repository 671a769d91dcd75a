"""Which Hugging Face Llama-family architectures lmcore runs natively, and how their config.json maps to ModelConfig.

Llama, Qwen2 and Mistral share the decoder lmcore computes and its tensor names; they differ in a few config keys:
scaled RoPE (`rope_parameters`, or the older `rope_scaling`), projection biases (Qwen2's q/k/v; Llama's
`attention_bias` and `mlp_bias`), `head_dim`, and sliding-window attention (Mistral's `sliding_window` on every
layer; Qwen2's `use_sliding_window` from layer `max_window_layers` on). Reading keeps the model_type so that
export writes the same architecture back. Anything else is refused with a CheckpointError naming config.json and
the key: callers (and a fallback through transformers' own classes) rely on exactly that error.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import CheckpointError

if TYPE_CHECKING:
    from lmcore.model import ModelConfig
    from lmcore.rope import RopeScaling

# model_type → the prefix of its transformers classes (…Config, …ForCausalLM, …ForSequenceClassification)
ARCHITECTURES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
DEFAULT_THETA = 10_000.0


def variant_fields(hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """The architecture-dependent ModelConfig fields of a config.json's contents (`hf`)."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: model_type {arch!r} is not supported natively (lmcore runs {_names()})")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{path}: hidden_act={hf['hidden_act']!r} is not supported (lmcore needs 'silu')")
    rope, theta = rope_fields(hf, path)
    n_head, d_model = hf.get("num_attention_heads"), hf.get("hidden_size")
    head_dim = hf.get("head_dim")
    if n_head and d_model and head_dim == d_model // n_head:
        head_dim = None
    return {
        "architecture": arch,
        "rope_theta": theta,
        "rope_scaling": rope,
        "head_dim": head_dim,
        **bias_fields(hf, arch),
        **window_fields(hf, arch, path),
    }


def _names() -> str:
    return ", ".join(ARCHITECTURES)


def rope_fields(hf: dict[str, Any], path: Path) -> tuple[RopeScaling | None, float]:
    """RoPE scaling (None: plain) and θ, from transformers 5's `rope_parameters` or the older `rope_scaling`."""
    from lmcore.rope import ROPE_TYPES, RopeScaling

    sections = {key: hf.get(key) or {} for key in ("rope_parameters", "rope_scaling")}
    for key, section in sections.items():
        if not isinstance(section, dict):
            raise CheckpointError(f"{path}: {key} {section!r} is not a mapping")
    # As transformers reads them: an old-style rope_scaling overrides rope_parameters, θ may sit at the top level.
    key = "rope_scaling" if sections["rope_scaling"] else "rope_parameters"
    params = sections["rope_parameters"] | sections["rope_scaling"]
    kind = sections[key].get("rope_type", sections[key].get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA)))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{path}: partial_rotary_factor is not supported (lmcore rotates whole heads)")
    if kind in (None, "default"):
        return None, theta
    if kind not in ROPE_TYPES:
        raise CheckpointError(
            f"{path}: {key}.rope_type {kind!r} is not supported natively (lmcore runs default, {', '.join(ROPE_TYPES)})"
        )
    if "factor" not in params:
        raise CheckpointError(f"{path}: {key}.factor is missing (rope_type {kind!r} needs it)")

    def number(name: str, default: float) -> float:
        value = params.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CheckpointError(f"{path}: {key}.{name} {value!r} is not a number")
        return float(value)

    scaling = RopeScaling(rope_type=kind, factor=number("factor", 1.0))
    if kind == "llama3":
        original = params.get("original_max_position_embeddings")
        scaling = RopeScaling(
            rope_type=kind,
            factor=scaling.factor,
            low_freq_factor=number("low_freq_factor", 1.0),
            high_freq_factor=number("high_freq_factor", 4.0),
            original_max_position_embeddings=None
            if original is None
            else int(number("original_max_position_embeddings", 0)),
        )
    return scaling, theta


def bias_fields(hf: dict[str, Any], arch: str) -> dict[str, bool]:
    """Qwen2 always has q/k/v biases and no others; Llama has them where its config says; Mistral never."""
    if arch == "qwen2":
        return {"attention_bias": True, "attention_out_bias": False, "mlp_bias": False}
    if arch == "llama":
        attention = bool(hf.get("attention_bias", False))
        return {"attention_bias": attention, "attention_out_bias": attention, "mlp_bias": bool(hf.get("mlp_bias"))}
    return {}


def window_fields(hf: dict[str, Any], arch: str, path: Path) -> dict[str, Any]:
    """The sliding window and the first layer it applies to, as the installed transformers reads the config."""
    if arch == "mistral":
        return {"sliding_window": hf.get("sliding_window")}  # every layer; None: full attention
    if arch != "qwen2" or not hf.get("use_sliding_window", False):
        return {}
    window, n_layer = hf.get("sliding_window", 4096), hf.get("num_hidden_layers", 0)
    layer_types = hf.get("layer_types")
    if layer_types:
        first = next((i for i, kind in enumerate(layer_types) if kind != "full_attention"), len(layer_types))
        if any(kind != "sliding_attention" for kind in layer_types[first:]):
            raise CheckpointError(
                f"{path}: layer_types {layer_types!r} is not supported natively (lmcore needs full-attention layers "
                "first, then sliding-window ones)"
            )
    else:
        first = hf.get("max_window_layers", 28)
    if window is None or first >= n_layer:
        return {}
    return {"sliding_window": window, "sliding_window_from_layer": first}


def hf_config(config: ModelConfig, architecture: str | None = None, **token_ids: int | None) -> dict[str, Any]:
    """config.json (as the installed transformers writes it) for an lmcore ModelConfig, in its own architecture."""
    import transformers

    arch = config.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"model architecture {arch!r} cannot be exported (lmcore writes {_names()})")
    prefix = ARCHITECTURES[arch]
    values: dict[str, Any] = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_ff,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.context_length,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_dropout=config.dropout,
        initializer_range=config.init_std,
        hidden_act="silu",
        architectures=[architecture or f"{prefix}ForCausalLM"],
        dtype="float32",
        **_rope_values(config),
        **_arch_values(config),
        **token_ids,
    )
    if arch == "qwen2" and config.head_dim == config.d_model // config.n_head:
        del values["head_dim"]  # not a Qwen2Config key: written only where it differs
    return getattr(transformers, f"{prefix}Config")(**values).to_dict()


def _rope_values(config: ModelConfig) -> dict[str, Any]:
    scaling = config.rope_scaling
    if scaling is None:
        return {"rope_theta": config.rope_theta}
    params: dict[str, Any] = {"rope_type": scaling.rope_type, "rope_theta": config.rope_theta, "factor": scaling.factor}
    if scaling.rope_type == "llama3":
        params |= {
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings or config.context_length,
        }
    return {"rope_parameters": params}


def _arch_values(config: ModelConfig) -> dict[str, Any]:
    """The keys that differ per architecture; a combination it cannot express is refused."""
    arch, window = config.architecture, config.sliding_window
    expressible = {
        "llama": config.attention_bias == config.attention_out_bias and window is None,
        "qwen2": (config.attention_bias, config.attention_out_bias, config.mlp_bias) == (True, False, False),
        "mistral": not (config.attention_bias or config.attention_out_bias or config.mlp_bias)
        and config.sliding_window_from_layer == 0,
    }
    if not expressible[arch]:
        raise CheckpointError(f"model: these biases or sliding-window layers cannot be written as {arch!r}")
    if arch == "llama":
        return {"attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias}
    if arch == "qwen2":
        return {
            "use_sliding_window": window is not None,
            "sliding_window": window,
            "max_window_layers": config.sliding_window_from_layer if window is not None else config.n_layer,
        }
    return {"sliding_window": window}


def describe(config: ModelConfig) -> str:
    """The non-default features of a config, in words (empty for a plain Llama)."""
    parts = []
    if config.rope_scaling is not None:
        parts.append(f"{config.rope_scaling.rope_type} RoPE scaling ×{config.rope_scaling.factor:g}")
    biases = [name for name, on in (("q/k/v", config.attention_bias), ("output", config.attention_out_bias)) if on]
    if biases:
        parts.append(f"attention biases ({', '.join(biases)})")
    if config.mlp_bias:
        parts.append("MLP biases")
    if config.head_dim != config.d_model // config.n_head:
        parts.append(f"head_dim {config.head_dim}")
    if config.sliding_window is not None:
        layers = f" from layer {config.sliding_window_from_layer}" if config.sliding_window_from_layer else ""
        parts.append(f"sliding window {config.sliding_window}{layers}")
    return ", ".join(parts)
