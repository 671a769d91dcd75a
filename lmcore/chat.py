"""Multi-turn chat on a model: the conversation, its fit to the context window, and one streamed reply.

A `Chat` keeps the system prompt and the user/assistant exchanges and renders them with the tokenizer's own chat
template, the one SFT trains on. Before each reply the conversation is fitted to the part of the context window the
decoder leaves to the prompt (the context minus the reply's reserve, `stream_tokens`' rule): whole exchanges go,
oldest first, so the rendering still starts with the system prompt and a user turn; the system prompt always stays.
No terminal I/O here: the caller prints the text pieces and the one-time note.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmcore.errors import ChatError, CheckpointError

if TYPE_CHECKING:
    import torch

    from lmcore.engine import SamplingConfig
    from lmcore.model import Transformer

Message = dict[str, str]


def prompt_budget(context_length: int, max_new_tokens: int) -> int:
    """Tokens the prompt may take: what `stream_tokens` keeps of a prompt, so the reply gets its whole reserve."""
    return context_length - min(max_new_tokens, context_length // 2)


class Chat:
    """The conversation so far, rendered and fitted to the window turn by turn."""

    def __init__(self, tokenizer: Any, context_length: int, max_new_tokens: int, system: str | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise CheckpointError("the model's tokenizer has no chat template: chat needs one (lmcycle exports have)")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.budget = prompt_budget(context_length, max_new_tokens)
        self.system = system or None
        self.turns: list[Message] = []  # user, assistant, user, assistant, ...
        self.noted = False  # the note about dropped turns is given once
        if self.system and len(self.encode([])) > self.budget:
            raise ChatError(f"--system: {self._too_long(len(self.encode([])), 'the system prompt alone')}")

    def messages(self, turns: list[Message]) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def encode(self, turns: list[Message]) -> list[int]:
        """Token ids of the system prompt, `turns` and the opening of the assistant's reply."""
        text = self.tokenizer.apply_chat_template(self.messages(turns), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def prompt(self, user: str) -> tuple[list[int], str | None]:
        """The prompt ids with `user` as the next turn, fitted to the window by dropping the oldest exchanges (for
        good), and a one-line note the first time that happens. `record` adds the exchange once it is answered."""
        turns = [*self.turns, {"role": "user", "content": user}]
        ids = self.encode(turns)
        while len(ids) > self.budget and len(turns) > 1:
            turns = turns[2:]  # the oldest user turn and its reply
            ids = self.encode(turns)
        if len(ids) > self.budget:
            raise ChatError(self._too_long(len(ids), "this message"))
        dropped = len(self.turns) + 1 - len(turns)
        self.turns = turns[:-1]
        if not dropped or self.noted:
            return ids, None
        self.noted = True
        return ids, (
            f"note: the conversation outgrew the {self.context_length}-token context; its oldest turns are dropped "
            "from here on (the system prompt stays)"
        )

    def record(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.turns = []

    def _too_long(self, tokens: int, what: str) -> str:
        reserve = self.context_length - self.budget
        return (
            f"{what} takes {tokens} tokens in the chat template; the {self.context_length}-token context leaves "
            f"{self.budget} to the prompt ({reserve} are kept for the reply)"
        )


class TextStream:
    """Token ids in, text pieces out, in time linear in the reply's length.

    Byte-level BPE decodes token by token, so only the ids since the last piece are decoded (after a few earlier
    ones, for context); a piece ending in an incomplete UTF-8 character (U+FFFD) waits for the rest.
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.start = 0  # the decoding window opens here ...
        self.done = 0  # ... and its text up to here has been passed on

    def text(self) -> str:
        return self._decode(self.ids)

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        self._emit(final=False)

    def flush(self) -> None:
        self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _emit(self, final: bool) -> None:
        before = self._decode(self.ids[self.start : self.done])
        text = self._decode(self.ids[self.start :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return
        self.start, self.done = self.done, len(self.ids)
        if self.on_text is not None:
            self.on_text(text[len(before) :])


def reply(
    model: Transformer,
    tokenizer: Any,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The assistant's answer to a prompt from `Chat.prompt`, ending at the end of its turn (or EOS); `on_text`
    receives it piece by piece. An interruption (KeyboardInterrupt) propagates after the text so far is passed on."""
    from lmcore.engine import generate
    from lmcore.generate import stop_tokens

    stops = tuple(cfg.stop_token_ids) + stop_tokens(tokenizer, chat=True)
    cfg = dataclasses.replace(cfg, stop_token_ids=stops, num_samples=1)
    stream = TextStream(tokenizer, on_text)

    def on_token(token: torch.Tensor) -> None:
        value = int(token[0])
        if value >= 0 and value not in stops:
            stream.push(value)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        generate(model, [prompt_ids], cfg, pad, on_token)
    finally:
        stream.flush()
    return stream.text()
