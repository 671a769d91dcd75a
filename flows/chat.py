"""`lmcycle chat`: the terminal side of a multi-turn conversation (lmcore.chat holds the conversation itself).

Reads one message a line, streams each reply as it is generated, and keeps the prompt alive through a stopped reply:
Ctrl-C during a reply ends that reply (what was said stays in the history), Ctrl-C or EOF at the prompt leaves.
Notes and errors go to stderr, so stdout is the transcript. Torch and transformers load inside the command.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from lmcore.errors import LmcycleError

if TYPE_CHECKING:
    from lmcore.chat import Chat
    from lmcore.engine import SamplingConfig
    from lmcore.model import Transformer

USER_PROMPT = "you> "
DEVICE_HELP = "auto (CUDA when present, else cpu), cpu, cuda or cuda:N"
DTYPE_HELP = "weights: auto (bfloat16 on a CUDA device that supports it, else float32), float32 or bfloat16"
REPLY_PROMPT = "assistant> "
HELP = "/reset clears the history, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply"


def note(text: str) -> None:
    typer.echo(text, err=True)


def chat(
    model: Annotated[str, typer.Option(help="an exported model directory (Hugging Face format) or models:/NAME@ALIAS")],
    system: Annotated[str | None, typer.Option(help="a system prompt, kept however long the conversation")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="at most this many tokens per reply")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.8,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling; 1 = off")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="reproducible sampling (reply n uses SEED + n)")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
) -> None:
    """Talk with a model: a multi-turn conversation in its chat template, each reply streamed as it is generated."""
    from lmcore.chat import Chat
    from lmcore.device import resolve
    from lmcore.engine import SamplingConfig
    from lmcore.generate import load_model
    from lmcore.lifecycle.registry.uris import resolve_model_path

    try:
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        where = resolve(device, dtype, key="--device")
        transformer, tokenizer = load_model(resolve_model_path(model), where.device, where.dtype_name)
        conversation = Chat(tokenizer, transformer.config.context_length, max_new_tokens, system)
    except (LmcycleError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is a KeyboardInterrupt, even if inherited off
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    note(f"chatting with {model} ({HELP})")
    repl(conversation, transformer, cfg)


def repl(conversation: Chat, transformer: Transformer, cfg: SamplingConfig) -> None:
    replies = 0
    while True:
        try:
            line = input(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        if not sys.stdin.isatty():
            typer.echo(line)  # a piped conversation reads like a typed one
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            conversation.reset()
            note("(history cleared)")
        elif text.startswith("/") and " " not in text:
            note(f"unknown command {text}: {HELP}")
        elif text:
            turn_cfg = dataclasses.replace(cfg, seed=None if cfg.seed is None else cfg.seed + replies)
            answer(conversation, transformer, text, turn_cfg)
            replies += 1


def answer(conversation: Chat, transformer: Transformer, text: str, cfg: SamplingConfig) -> None:
    """One exchange: fit the prompt, stream the reply, record what was said (all of it, or up to a Ctrl-C)."""
    from lmcore.chat import reply

    pieces: list[str] = []
    ids: list[int] | None = None

    def show(piece: str) -> None:
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        ids, told = conversation.prompt(text)
        if told:
            note(told)
        sys.stdout.write(REPLY_PROMPT)
        reply(transformer, conversation.tokenizer, ids, cfg, on_text=show)
        typer.echo()
    except LmcycleError as err:
        note(f"error: {err}")
        return
    except KeyboardInterrupt:
        typer.echo()
        note("(reply stopped)")
        if ids is None:  # stopped before the reply began: nothing was said
            return
    conversation.record(text, "".join(pieces))
