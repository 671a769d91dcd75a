"""Text generation from an lmcore Transformer: prompts in, text out, streamed as it is decoded.

The token-level decoding (KV cache, single-token step, sampling) is `lmcore.engine`; this module wraps it in
text: prompts (plain or as a chat turn), stop tokens, and an incremental decoder that holds back incomplete UTF-8
characters so text streams whole. It also loads an exported model (a directory or a registry URI) to generate
from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from lmcore.engine import SamplingConfig
    from lmcore.model import Transformer

CHAT_STOP_TOKEN = "<|end|>"

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

    from lmcore.engine import generate

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


def load_model(model: str | Path, device: str = "cpu", dtype: str = "float32") -> tuple[Transformer, Any]:
    """An exported Hugging Face directory as (lmcore Transformer in eval mode on `device` with `dtype` weights,
    transformers tokenizer; an architecture lmcore does not run natively comes through transformers,
    lmcore.hfcausal); a registry URI is resolved to such a directory by the lifecycle layer first
    (lmcore.lifecycle.registry). `lmcore.device.resolve` turns auto into a device and dtype of this machine."""
    from transformers import AutoTokenizer

    from lmcore.hfcausal import load_causal_lm

    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{model}: no such model directory")
    transformer, _ = load_causal_lm(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({str(err).splitlines()[0]})") from None
    import torch

    return transformer.to(device=device, dtype=getattr(torch, dtype)).eval(), tokenizer
