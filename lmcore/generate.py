"""Sampling from an lmcore Transformer with a KV cache: greedy, temperature, top-k, top-p, repetition penalty.

The prompt is run once (prefill) to fill the cache; each step then feeds one token per sequence through the
model's single-token `Decoder`, and greedy decoding takes the argmax without the sampling machinery. Several
prompts, and several samples per prompt, decode together as one left-padded batch (per-row positions and an
attention mask keep padding invisible). The logits processing follows transformers' order (repetition penalty,
temperature, top-k, top-p), so settings mean the same in both. Everything random draws from one
`torch.Generator`, so a seed reproduces a sample exactly. Text streams through an incremental decoder that holds
back incomplete UTF-8 characters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from lmcore.model import Transformer

CHAT_STOP_TOKEN = "<|end|>"


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    repetition_penalty: float = 1.0  # 1 = none; > 1 discourages tokens already in the sequence
    num_samples: int = 1  # per prompt
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # besides EOS, e.g. <|end|> in chat
    use_cache: bool = True  # False recomputes every position each step (for tests and benchmarks)

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "num_samples": self.num_samples >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")


# --- the decoding loop ---------------------------------------------------------------------------------------


def stream_tokens(
    model: Transformer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, pad_token_id: int = 0
) -> Iterator[torch.Tensor]:
    """Yield, each step, the next token of every sequence ((rows,) long tensor; -1 once a row has stopped).

    Rows are the prompts each repeated `num_samples` times, in order. A row stops at any of
    `cfg.stop_token_ids` (which is yielded) and the loop ends when all rows have stopped or the budget is spent.
    Prompts are cut to their last tokens when they and the new tokens would not fit in the context: the prompt
    keeps at least `context − min(max_new_tokens, context / 2)` tokens, and generation never runs past the context.
    """
    import torch

    from lmcore.model import Decoder, KVCache

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    context = model.config.context_length
    keep = context - min(cfg.max_new_tokens, context // 2)
    rows = [list(p)[-keep:] for p in prompts for _ in range(cfg.num_samples)]
    width = max(len(r) for r in rows)
    steps = min(cfg.max_new_tokens, context - width)
    device = model.lm_head.weight.device

    total = width + steps
    ids = torch.full((len(rows), total), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), total), dtype=torch.long, device=device)
    for i, row in enumerate(rows):  # left padding: every prompt ends at the same column
        ids[i, width - len(row) : width] = torch.tensor(row, device=device)
        mask[i, width - len(row) :] = 1
    padded = bool((mask[:, :width] == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    stop_ids = torch.tensor(sorted(set(cfg.stop_token_ids)), dtype=torch.long, device=device)
    stopped = torch.zeros(len(rows), dtype=torch.bool, device=device)
    cache = KVCache(model.config, len(rows), total, device, model.lm_head.weight.dtype) if cfg.use_cache else None
    greedy = cfg.temperature == 0 and cfg.repetition_penalty == 1.0
    can_stop = len(stop_ids) > 0

    def last_logits(start: int, end: int) -> torch.Tensor:
        h = model.hidden_states(
            ids[:, start:end],
            attention_mask=mask[:, :end] if padded else None,
            cache=cache,
            start=start,
            position_ids=positions[:, start:end] if padded else None,
        )
        return model.lm_head(h[:, -1]).float()

    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        with torch.inference_mode():
            logits = last_logits(0, width)  # the prompt in one pass, filling the cache
            if cache is not None:
                decode = Decoder(model, cache, positions if padded else positions[:1], mask if padded else None)
            for step in range(steps):
                end = width + step  # tokens so far
                token = logits.argmax(dim=-1) if greedy else next_token(logits, ids[:, :end], cfg, generator)
                if can_stop:  # rows that stopped yield -1 from then on
                    token = torch.where(stopped, -1, token)
                    stopped |= torch.isin(token, stop_ids)
                yield token
                if step == steps - 1 or (can_stop and bool(stopped.all())):
                    return
                if can_stop:
                    token = token.clamp(min=0)  # a stopped row keeps feeding a harmless token
                ids[:, end] = token
                logits = decode(token, end).float() if cache is not None else last_logits(0, end + 1)
    finally:
        model.train(was_training)


def next_token(
    logits: torch.Tensor, ids: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from (rows, vocab) logits: penalty → temperature → top-k → top-p → draw (or argmax)."""
    import torch

    if cfg.repetition_penalty != 1.0:
        seen = logits.gather(1, ids)
        logits = logits.scatter(
            1, ids, torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        )
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth_best = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the most likely always stays).
        drop_sorted = probs.cumsum(dim=-1) - probs >= cfg.top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    pad_token_id: int = 0,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """The new tokens of every row (prompt × sample, in order), each without its stop token."""
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * cfg.num_samples)]
    done = [False] * len(outputs)
    stop = set(cfg.stop_token_ids)
    for token in stream_tokens(model, prompts, cfg, pad_token_id):
        if on_token is not None:
            on_token(token)
        for row, value in enumerate(token.tolist()):
            if done[row] or value < 0:
                continue
            if value in stop:
                done[row] = True
            else:
                outputs[row].append(value)
    return outputs


# --- text ----------------------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces as they arrive.

    Byte-level BPE splits multi-byte characters across tokens; decoding such a prefix ends in U+FFFD, so that
    piece is held back until the character is complete (or the stream ends).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens))

    def _emit(self, text: str) -> str:
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Prompt token ids: plain text gets the tokenizer's BOS; chat wraps it as a user turn of the chat template."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def stop_tokens(tokenizer: Any, chat: bool = False) -> tuple[int, ...]:
    ids = [tokenizer.eos_token_id]
    if chat:
        ids.append(tokenizer.convert_tokens_to_ids(CHAT_STOP_TOKEN))
    return tuple(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def generate_text(
    model: Transformer,
    tokenizer: Any,
    prompt: str,
    cfg: SamplingConfig,
    chat: bool = False,
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """`cfg.num_samples` completions of one prompt; `on_text(sample, piece)` receives text as it is produced."""
    import dataclasses

    cfg = dataclasses.replace(cfg, stop_token_ids=tuple(cfg.stop_token_ids) + stop_tokens(tokenizer, chat))
    decoders = [IncrementalDecoder(tokenizer) for _ in range(cfg.num_samples)]
    stop = set(cfg.stop_token_ids)

    def on_token(token: torch.Tensor) -> None:
        for row, value in enumerate(token.tolist()):
            if value >= 0 and value not in stop:
                piece = decoders[row].push(value)
                if piece and on_text is not None:
                    on_text(row, piece)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generate(model, [encode_prompt(tokenizer, prompt, chat)], cfg, pad, on_token)
    texts = []
    for row, decoder in enumerate(decoders):
        tail = decoder.flush()
        if tail and on_text is not None:
            on_text(row, tail)
        texts.append(tokenizer.decode(decoder.ids, skip_special_tokens=True))
    return texts


# --- loading -------------------------------------------------------------------------------------------------


def load_model(model: str | Path, device: str = "cpu") -> tuple[Transformer, Any]:
    """An exported Hugging Face directory as (lmcore Transformer in eval mode, transformers tokenizer); a
    registry URI is resolved to such a directory by the lifecycle layer first (lmcore.lifecycle.registry)."""
    from transformers import AutoTokenizer

    from lmcore.export import import_hf

    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{model}: no such model directory")
    transformer, _ = import_hf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({str(err).splitlines()[0]})") from None
    return transformer.to(device).eval(), tokenizer
