"""Causal LMs lmcore does not run natively, run through transformers' own model class behind lmcore's interface.

`lmcore.export.import_hf` turns a Hugging Face directory into lmcore's Transformer, and refuses (CheckpointError
naming config.json and the key) what that Transformer cannot compute. `load_causal_lm` then falls back to
`AutoModelForCausalLM` on the same directory: local files only, safetensors only, never remote code. `HFCausalLM`
wraps that model in the calls the training loop, the SFT loss, held-out scoring and decoding make of lmcore's
Transformer: `forward(input_ids, targets=…, segment_ids=…)` (mean loss over non-ignored, already shifted targets),
`token_losses`, `config.context_length` and `stream_tokens` (the engine hands decoding to it: transformers' own
KV cache, lmcore's sampling, so a seed or greedy decoding gives the same tokens every run). Packed rows become a
4-D boolean attention mask and per-document positions, so a packed example is computed as it would be alone.
Only a config-level refusal falls back: a Llama directory with a missing or misshapen tensor stays an error.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmcore.errors import CheckpointError

if TYPE_CHECKING:
    from lmcore.engine import SamplingConfig

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


@dataclass(frozen=True)
class HFModelInfo:
    """What lmcore's callers read of a model's config (`context_length`, `vocab_size`), for a transformers model."""

    model_type: str
    architecture: str
    context_length: int
    vocab_size: int
    reason: str  # why lmcore does not run it natively (the native import's refusal)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, stage: str) -> str:
        """The one line a stage prints about the path taken."""
        return (
            f"{stage}: {self.model_type} model runs through transformers' {self.architecture} "
            f"(not native to lmcore: {self.reason})"
        )


class HFCausalLM(nn.Module):
    """A transformers causal LM with the interface of lmcore's Transformer that lmcore's callers use."""

    base_model_prefix = ""  # what transformers' weight-name conversions (run by peft) ask of a model's root

    def __init__(self, hf: nn.Module, info: HFModelInfo) -> None:
        super().__init__()
        self.hf = hf
        self.config = info

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if segment_ids is not None:
            from lmcore.model import segment_positions

            T = segment_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
            attention_mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal)[:, None]
            position_ids = segment_positions(segment_ids)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.logits

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) without targets; with targets (B, T), the mean next-token loss (-100 skips)."""
        logits = self.logits(input_ids, attention_mask, position_ids, segment_ids)
        if targets is None:
            return logits
        losses = _token_nll(logits, targets)
        return losses.sum() / (targets != _ignore()).sum().clamp(min=1)

    def token_losses(self, input_ids: torch.Tensor, targets: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Per-token NLL in nats (B, T), 0 where the target is ignored."""
        return _token_nll(self.logits(input_ids, attention_mask), targets)

    def stream_tokens(
        self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, pad_token_id: int = 0
    ) -> Iterator[torch.Tensor]:
        """`lmcore.engine.stream_tokens` for this model: the same rows, prompt cut, stops and sampling, decoded over
        transformers' KV cache."""
        from lmcore.engine import next_token

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        context = self.config.context_length
        keep = context - min(cfg.max_new_tokens, context // 2)
        rows = [list(p)[-keep:] for p in prompts for _ in range(cfg.num_samples)]
        width = max(len(r) for r in rows)
        steps = min(cfg.max_new_tokens, context - width)
        device = next(self.parameters()).device
        ids = torch.full((len(rows), width + steps), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):  # left padding: every prompt ends at the same column
            ids[i, width - len(row) : width] = torch.tensor(row, device=device)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
        stop_ids = torch.tensor(sorted(set(cfg.stop_token_ids)), dtype=torch.long, device=device)
        stopped = torch.zeros(len(rows), dtype=torch.bool, device=device)
        greedy = cfg.temperature == 0 and cfg.repetition_penalty == 1.0
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                out = self.hf(
                    input_ids=ids[:, :width],
                    attention_mask=mask[:, :width],
                    position_ids=positions[:, :width],
                    use_cache=cfg.use_cache,
                )
                for step in range(steps):
                    end = width + step
                    logits = out.logits[:, -1].float()
                    token = logits.argmax(dim=-1) if greedy else next_token(logits, ids[:, :end], cfg, generator)
                    if len(stop_ids):
                        token = torch.where(stopped, -1, token)
                        stopped |= torch.isin(token, stop_ids)
                    yield token
                    if step == steps - 1 or (len(stop_ids) and bool(stopped.all())):
                        return
                    ids[:, end] = token.clamp(min=0)  # a stopped row keeps feeding a harmless token
                    start = end if cfg.use_cache else 0
                    out = self.hf(
                        input_ids=ids[:, start : end + 1],
                        attention_mask=mask[:, : end + 1],
                        position_ids=positions[:, start : end + 1],
                        cache=out.cache if cfg.use_cache else None,  # transformers 5.24 calls it `cache`
                        use_cache=cfg.use_cache,
                    )
        finally:
            self.train(was_training)


def _ignore() -> int:
    from lmcore.model import IGNORE_INDEX

    return IGNORE_INDEX


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(-1, logits.shape[-1]).to(acc)
    nll = nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=_ignore(), reduction="none")
    return nll.view(targets.shape)


# --- loading ---------------------------------------------------------------------------------------------------


def native_refusal(directory: Path) -> str | None:
    """Why lmcore's own Transformer cannot run the directory's config (None: it can, or no path can: a missing or
    unreadable config.json, which the native import then names)."""
    from lmcore.export import read_hf_config

    try:
        json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    try:
        read_hf_config(directory)
    except CheckpointError as err:
        return str(err).replace(str(directory / "config.json"), "config.json").replace(str(directory), ".")
    return None


def load_causal_lm(directory: str | Path) -> tuple[nn.Module, Any]:
    """(model, config) for a Hugging Face causal-LM directory: lmcore's Transformer where lmcore runs the
    architecture, else `HFCausalLM` over transformers' class (config: `HFModelInfo`). fp32, CPU, train mode."""
    from lmcore.export import import_hf

    directory = Path(directory)
    reason = native_refusal(directory)
    if reason is None:
        return import_hf(directory)
    model = load_fallback(directory, reason)
    return model, model.config


def load_fallback(directory: Path, reason: str) -> HFCausalLM:
    """transformers' own causal-LM class on the directory, or a CheckpointError saying why neither path runs it."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{directory}: lmcore cannot run it ({reason}) and {why}")

    raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if raw.get("auto_map"):
        raise refuse("its config.json needs remote code (auto_map), which lmcycle never runs")
    model_type = raw.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise refuse(f"transformers {transformers.__version__} has no causal LM for model_type {model_type!r}")
    if not any(directory.glob("*.safetensors")):
        raise refuse("it has no safetensors weights (pickled .bin weights are never loaded)")
    common = {"local_files_only": True, "trust_remote_code": False}
    try:
        hf_config = AutoConfig.from_pretrained(str(directory), **common)
        hf, loading = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32, use_safetensors=True, output_loading_info=True, **common
        )
    except Exception as err:  # transformers raises many types; the first line says what
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise refuse(f"transformers cannot load it ({first})") from None
    missing = sorted(loading.get("missing_keys") or [])
    if missing:  # transformers would start these at random: not the model the user brought
        raise refuse(f"its weights lack {len(missing)} tensors transformers expects, e.g. {missing[0]}")
    context = next((getattr(hf_config, key) for key in CONTEXT_KEYS if getattr(hf_config, key, None)), None)
    if not context:
        raise refuse(f"its config.json names no context length ({', '.join(CONTEXT_KEYS)})")
    info = HFModelInfo(
        model_type=str(model_type),
        architecture=type(hf).__name__,
        context_length=int(context),
        vocab_size=int(hf.get_output_embeddings().weight.shape[0]),
        reason=reason,
    )
    return HFCausalLM(hf.train(), info)


# --- export ----------------------------------------------------------------------------------------------------


def export_hf_causal(
    model: HFCausalLM,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    card: dict[str, Any] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """What `lmcore.export.export_hf` writes, for a transformers model: `save_pretrained` (fp32 safetensors,
    config with `extra_config` added), generation config, tokenizer files, model card. Appears whole or not at all."""
    from lmcore.export import TOKENIZER_FILES, _set_model_max_length, _special_token_ids, _write_json, generation_config
    from lmcore.files import atomic_directory

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    info, hf = model.config, model.hf
    tokens = _special_token_ids(tokenizer_dir, info.vocab_size)
    for key, value in {**tokens, **(extra_config or {})}.items():
        setattr(hf.config, key, value)
    hf.config.architectures = [info.architecture]
    with atomic_directory(out_dir) as tmp:
        hf.float().cpu().save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "generation_config.json").unlink(missing_ok=True)
        _write_json(tmp / "generation_config.json", generation_config(info, tokens))  # type: ignore[arg-type]
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, tmp / name)
        _set_model_max_length(tmp / "tokenizer_config.json", info.context_length)
        (tmp / "README.md").write_text(model_card(model, card or {}, out_dir.name), encoding="utf-8")
    return out_dir


def model_card(model: HFCausalLM, card: dict[str, Any], name: str) -> str:
    """README.md of a fallback export: the same front matter, sections and loading snippet as lmcore's own."""
    from lmcore.export import _card_sections, card_head

    info = model.config
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lines = card_head(card, name, card.get("pipeline_tag", "text-generation"), info.model_type)
    lines += [
        "## Model",
        "",
        f"`{info.architecture}` (model_type `{info.model_type}`) with {params / 1e6:.2f}M parameters, context "
        f"{info.context_length} tokens, vocabulary {info.vocab_size}; trained through transformers' own class "
        "(lmcore does not run this architecture natively). Weights are fp32 safetensors.",
        "",
        *_card_sections(card),
        "## Use",
        "",
        "With stock `transformers` (no remote code):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")',
        "```",
        "",
        "With lmcycle: `lmcycle generate --model path/to/this/dir --prompt ...` (or `lmcycle chat`).",
        "",
    ]
    return "\n".join(lines)
