"""lmcore ⇄ Hugging Face Llama-family checkpoints (Llama, Qwen2, Mistral): what stock `transformers` loads
without remote code.

The lmcore model computes exactly what `LlamaForCausalLM` (or `Qwen2ForCausalLM`, `MistralForCausalLM`) computes,
so export is a renaming of tensors: the fused QKV and gate/up matrices (and their biases, where the architecture
has them) are split into the q/k/v and gate/up projections, and back again on import. A directory is written back
as the architecture it was read as (`lmcore.hfarch` maps config.json keys both ways). One
function pair (`to_hf_state_dict` / `from_hf_state_dict`) holds the renaming of the decoder body under a prefix
(`model.`), so the causal-LM export here and a sequence-classification export share it. Weights travel only as
safetensors: pickled `.bin` checkpoints are refused, never unpickled. Directories are written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore import hfarch
from lmcore.errors import CheckpointError
from lmcore.weightfiles import WEIGHTS_FILE, read_safetensors

if TYPE_CHECKING:
    import torch

    from lmcore.model import ModelConfig, Transformer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


# --- the renaming (shared by every Llama head) ---------------------------------------------------------------


def to_hf_state_dict(model: Transformer, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The decoder body (embedding, blocks, final norm) under Llama names, each a contiguous fp tensor of its own.

    Heads (LM head, classifier `score`) are left to the caller: they differ per architecture.
    """
    c = model.config
    q_size, kv_size = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    state = {f"{prefix}embed_tokens.weight": model.embed.weight, f"{prefix}norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        p = f"{prefix}layers.{i}."
        q, k, v = block.attn.qkv.weight.split([q_size, kv_size, kv_size])
        gate, up = block.mlp.gate_up.weight.chunk(2)
        state |= {
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.proj.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.down.weight,
        }
        state |= _hf_biases(block, p, [q_size, kv_size, kv_size])
    # safetensors refuses views sharing storage: give every tensor its own memory.
    return {name: t.detach().contiguous().clone() for name, t in state.items()}


def _hf_biases(block, p: str, qkv_sizes: list[int]) -> dict[str, torch.Tensor]:
    """The biases a block has (Qwen2's q/k/v, Llama's attention_bias and mlp_bias), under Llama names."""
    out = {}
    attn, mlp = block.attn, block.mlp
    if attn.qkv.bias is not None:
        q, k, v = attn.qkv.bias.split(qkv_sizes)
        out |= {p + "self_attn.q_proj.bias": q, p + "self_attn.k_proj.bias": k, p + "self_attn.v_proj.bias": v}
    if attn.proj.bias is not None:
        out[p + "self_attn.o_proj.bias"] = attn.proj.bias
    if mlp.gate_up.bias is not None:
        gate, up = mlp.gate_up.bias.chunk(2)
        out |= {p + "mlp.gate_proj.bias": gate, p + "mlp.up_proj.bias": up, p + "mlp.down_proj.bias": mlp.down.bias}
    return out


def from_hf_state_dict(
    state: dict[str, torch.Tensor], config: ModelConfig, prefix: str = "model.", source: str = "weights"
) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: lmcore parameter names (body only) from Llama names under `prefix`."""
    import torch

    def take(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        return state[name]

    out = {"embed.weight": take(f"{prefix}embed_tokens.weight"), "norm.weight": take(f"{prefix}norm.weight")}
    for i in range(config.n_layer):
        p = f"{prefix}layers.{i}."
        qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        gate_up = [take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
        out |= {
            f"blocks.{i}.attn_norm.weight": take(p + "input_layernorm.weight"),
            f"blocks.{i}.attn.qkv.weight": torch.cat(qkv),
            f"blocks.{i}.attn.proj.weight": take(p + "self_attn.o_proj.weight"),
            f"blocks.{i}.mlp_norm.weight": take(p + "post_attention_layernorm.weight"),
            f"blocks.{i}.mlp.gate_up.weight": torch.cat(gate_up),
            f"blocks.{i}.mlp.down.weight": take(p + "mlp.down_proj.weight"),
        }
        if config.attention_bias:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        if config.attention_out_bias:
            out[f"blocks.{i}.attn.proj.bias"] = take(p + "self_attn.o_proj.bias")
        if config.mlp_bias:
            out[f"blocks.{i}.mlp.gate_up.bias"] = torch.cat([take(p + f"mlp.{n}_proj.bias") for n in ("gate", "up")])
            out[f"blocks.{i}.mlp.down.bias"] = take(p + "mlp.down_proj.bias")
    return out


def hf_config_dict(config: ModelConfig, architecture: str | None = None, **token_ids: int | None) -> dict:
    """config.json (as the installed transformers writes it) for an lmcore ModelConfig: its own architecture
    (`config.architecture`), whose causal LM class `architecture` defaults to."""
    return hfarch.hf_config(config, architecture, **token_ids)


def hf_class_prefix(config: ModelConfig) -> str:
    """`Llama`, `Qwen2` or `Mistral`: the transformers class names of the config's architecture."""
    return hfarch.ARCHITECTURES.get(config.architecture, "Llama")


def native_features(config: ModelConfig) -> str:
    """One line saying that, and with what, a model runs natively in lmcore."""
    features = hfarch.describe(config)
    return f"{config.architecture} model runs natively in lmcore" + (f" ({features})" if features else "")


# --- export --------------------------------------------------------------------------------------------------


def export_hf(
    model: Transformer,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    card: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a `LlamaForCausalLM` (or Qwen2/Mistral, as the model was read) directory: config, safetensors
    weights, generation config, tokenizer, model card.

    `extra_config` entries are added to config.json (e.g. lineage); `card` fills the README (see `model_card`).
    The directory appears whole or not at all.
    """
    from safetensors.torch import save_file

    from lmcore.files import atomic_directory

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    config = model.config
    tokens = _special_token_ids(tokenizer_dir, config.vocab_size)
    state = to_hf_state_dict(model)
    if not config.tie_embeddings:  # tied: transformers re-ties lm_head to the embedding from the config
        state["lm_head.weight"] = model.lm_head.weight.detach().contiguous().clone()
    state = {name: t.float().cpu() for name, t in state.items()}

    hf_config = hf_config_dict(config, **tokens) | dict(extra_config or {})
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / "generation_config.json", generation_config(config, tokens))
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        _set_model_max_length(tmp / "tokenizer_config.json", config.context_length)
        (tmp / "README.md").write_text(model_card(config, card or {}, out_dir.name), encoding="utf-8")
    return out_dir


def generation_config(config: ModelConfig, tokens: dict[str, int | None]) -> dict[str, Any]:
    """Defaults for `model.generate` and pipelines: stop at EOS, never run far past the context window."""
    import transformers

    return {
        **tokens,
        "max_new_tokens": max(1, min(256, config.context_length // 2)),
        "transformers_version": transformers.__version__,
    }


def _special_token_ids(tokenizer_dir: Path, vocab_size: int) -> dict[str, int | None]:
    from transformers import AutoTokenizer

    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer.json (run the tokenizer stage first)")
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as err:
        raise CheckpointError(f"{tokenizer_dir}: cannot load the tokenizer ({str(err).splitlines()[0]})") from None
    if len(tok) > vocab_size:
        raise CheckpointError(f"{tokenizer_dir}: tokenizer has {len(tok)} tokens, the model only {vocab_size}")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _set_model_max_length(path: Path, context_length: int) -> None:
    """The tokenizer of a model directory truncates to the model's context, not a generic default."""
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        data["model_max_length"] = context_length
        _write_json(path, data)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def model_card(config: ModelConfig, card: dict[str, Any], name: str) -> str:
    """README.md for the hub and MLflow: YAML front matter, what the model is, how to load it, what it scored.

    `card` keys (all optional): title, description, license, data (text or list), params (dict: training
    settings), metrics (dict), tags (list), pipeline_tag.
    """
    lines = card_head(card, name, card.get("pipeline_tag", "text-generation"), config.architecture)
    lines += [
        "## Model",
        "",
        f"A {hf_class_prefix(config)}-architecture decoder (`{hf_class_prefix(config)}ForCausalLM`) with "
        f"{config.num_params() / 1e6:.2f}M parameters: "
        f"{config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads ({config.n_kv_head} key/value "
        f"heads), SwiGLU width {config.d_ff}, context {config.context_length} tokens, vocabulary "
        f"{config.vocab_size}, RoPE θ={config.rope_theta:g}, "
        f"{'tied' if config.tie_embeddings else 'separate'} input/output embeddings. Weights are fp32 safetensors.",
        "",
    ]
    lines += _card_sections(card)
    lines += [
        "## Use",
        "",
        "With stock `transformers` (no remote code):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")',
        'inputs = tokenizer("In the beginning", return_tensors="pt")',
        "output = model.generate(**inputs, do_sample=True, top_p=0.95, max_new_tokens=48)",
        "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        "```",
        "",
        "With lmcycle (KV-cache sampling, streamed to the terminal):",
        "",
        "```",
        'lmcycle generate --model path/to/this/dir --prompt "In the beginning" --max-new-tokens 48',
        "```",
        "",
    ]
    return "\n".join(lines)


def card_head(card: dict[str, Any], name: str, pipeline_tag: str, architecture: str) -> list[str]:
    """The opening every model card shares: YAML front matter (library, pipeline, tags, license), title, description."""
    import yaml

    front: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": pipeline_tag,
        "tags": ["lmcycle", architecture, *card.get("tags", [])],
    }
    if card.get("license"):
        front["license"] = card["license"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {card.get('title', name)}", ""]
    if card.get("description"):
        lines += [str(card["description"]), ""]
    return lines


def _card_sections(card: dict) -> list[str]:
    """The model-card sections every export shares: training data, training settings and metrics."""
    lines: list[str] = []
    data = card.get("data")
    if data:
        lines += ["## Training data", ""]
        lines += [f"- {item}" for item in data] if isinstance(data, list | tuple) else [str(data)]
        lines.append("")
    for heading, table in (("Training settings", card.get("params")), ("Metrics", card.get("metrics"))):
        if table:
            lines += [f"## {heading}", "", "| name | value |", "|---|---|"]
            lines += [f"| {key} | {_cell(value)} |" for key, value in sorted(table.items())]
            lines.append("")
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


# --- import --------------------------------------------------------------------------------------------------


def read_hf_config(directory: str | Path) -> ModelConfig:
    """The lmcore ModelConfig of a Hugging Face Llama, Qwen2 or Mistral directory; CheckpointError (one line naming
    config.json and the key) for anything lmcore cannot run natively."""
    from lmcore.model import ModelConfig

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    try:
        variants = hfarch.variant_fields(hf, path)
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            d_model=hf["hidden_size"],
            d_ff=hf["intermediate_size"],
            context_length=hf["max_position_embeddings"],
            dropout=hf.get("attention_dropout", 0.0),
            init_std=hf.get("initializer_range", 0.02),
            tie_embeddings=hf.get("tie_word_embeddings", False),  # the default of all three configs
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            **variants,
        )
    except KeyError as err:
        raise CheckpointError(f"{path}: required key {err.args[0]} is missing") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def import_hf(directory: str | Path) -> tuple[Transformer, ModelConfig]:
    """An lmcore Transformer (fp32, CPU) holding the weights of a Hugging Face Llama, Qwen2 or Mistral directory."""
    import torch

    from lmcore.model import Transformer

    directory = Path(directory)
    config = read_hf_config(directory)
    state = read_safetensors(directory)
    source = str(directory / WEIGHTS_FILE)
    weights = from_hf_state_dict(state, config, source=source)
    if not config.tie_embeddings:
        if "lm_head.weight" not in state:
            raise CheckpointError(f"{source}: tensor lm_head.weight is missing (tie_word_embeddings is false)")
        weights["lm_head.weight"] = state["lm_head.weight"]
    model = Transformer(config)
    expected = model.state_dict()
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensor.shape)}; config.json implies {tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in weights.items():
            expected[name].copy_(tensor)
    return model, config


# --- sequence classification export --------------------------------------------------------------------------


def export_hf_classifier(
    model: Transformer,
    score_weight: torch.Tensor,
    labels: list[str],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    card: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a `LlamaForSequenceClassification` (or Qwen2/Mistral) directory: the decoder body, the `score` head,
    id2label/label2id.

    `pad_token_id` is set because transformers pools the last non-pad token of each row with it. `card` takes the
    same keys as `model_card`. The directory appears whole or not at all.
    """
    from safetensors.torch import save_file

    from lmcore.files import atomic_directory

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    config = model.config
    tokens = _special_token_ids(tokenizer_dir, config.vocab_size)
    if tokens["pad_token_id"] is None:
        raise CheckpointError(f"{tokenizer_dir}: the tokenizer has no pad token; a sequence classifier needs one")
    if tuple(score_weight.shape) != (len(labels), config.d_model):
        raise CheckpointError(f"score weight of shape {tuple(score_weight.shape)} does not fit {len(labels)} labels")
    state = to_hf_state_dict(model) | {"score.weight": score_weight.detach().contiguous().clone()}
    state = {name: t.float().cpu() for name, t in state.items()}
    hf_config = hf_config_dict(config, f"{hf_class_prefix(config)}ForSequenceClassification", **tokens)
    hf_config |= {
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "problem_type": "single_label_classification",
    }
    hf_config |= dict(extra_config or {})
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(tmp / "config.json", hf_config)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        _set_model_max_length(tmp / "tokenizer_config.json", config.context_length)
        (tmp / "README.md").write_text(classifier_card(config, labels, card or {}, out_dir.name), encoding="utf-8")
    return out_dir


def classifier_card(config: ModelConfig, labels: list[str], card: dict[str, Any], name: str) -> str:
    """README.md of a sequence-classification export: labels, data, settings, metrics, how to load it."""
    lines = card_head(card, name, "text-classification", config.architecture)
    lines += [
        "## Model",
        "",
        f"`{hf_class_prefix(config)}ForSequenceClassification`: a {hf_class_prefix(config)}-architecture decoder "
        f"({config.num_params() / 1e6:.2f}M "
        f"parameters, {config.n_layer} layers, d_model {config.d_model}, context {config.context_length} tokens) "
        "with a linear `score` head on the last non-pad token of each sequence.",
        "",
        "## Labels",
        "",
        "| id | label |",
        "|---|---|",
        *[f"| {i} | {_cell(label)} |" for i, label in enumerate(labels)],
        "",
    ]
    lines += _card_sections(card)
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'classify = pipeline("text-classification", model="path/to/this/dir")',
        'print(classify("And Jesus answered and said unto them", truncation=True))',
        "```",
        "",
    ]
    return "\n".join(lines)
