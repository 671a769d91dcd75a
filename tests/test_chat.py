"""`lmcycle chat`: the conversation keeps its history in the chat template and fits it to the context window (oldest
exchanges dropped, the system prompt kept, a note said once), a real subprocess answers piped turns exactly as the
library does, /reset forgets, Ctrl-C stops a reply without leaving, bad models are one error line; `--version`."""

from __future__ import annotations

import importlib.metadata
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import lmcycle, tiny_model

from lmcore.chat import Chat, TextStream, prompt_budget, reply
from lmcore.engine import SamplingConfig
from lmcore.errors import ChatError
from lmcore.generate import load_model

WAIT_S = 300  # a guard against a hung child on a loaded machine, not a timing assertion


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def endless_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path, tokenizer) -> Path:
    """A tiny model with a 4096-token context that never ends its turn under greedy decoding: the embedding (tied to
    the output head) of <|eos|> and <|end|> is zero, so their logit is 0 while the peaked winners are far above."""
    import torch

    from lmcore.export import export_hf

    model = tiny_model(context_length=4096)
    with torch.no_grad():
        for name in ("<|eos|>", "<|end|>"):
            model.embed.weight[tokenizer.convert_tokens_to_ids(name)] = 0
    return export_hf(model, tiny_tokenizer_dir, tmp_path_factory.mktemp("endless") / "hf")


# --- the conversation ------------------------------------------------------------------------------------------


def test_history_is_fitted_to_the_window_oldest_first(tokenizer) -> None:
    chat = Chat(tokenizer, context_length=128, max_new_tokens=16, system="Be brief.")
    assert chat.budget == 112 == prompt_budget(128, 16)
    history: list[dict[str, str]] = []
    notes, kept_after_drops = [], []
    for i in range(10):
        user = {"role": "user", "content": f"Question {i}?"}
        ids, note = chat.prompt(user["content"])
        notes.append(note)
        text = tokenizer.decode(ids)
        assert len(ids) <= chat.budget
        assert text.startswith("<|bos|><|system|>Be brief.<|end|><|user|>")
        assert text.endswith(f"{user['content']}<|end|><|assistant|>")
        # what is kept is the longest run of the latest exchanges that fits: one more would not
        kept = len(chat.turns)
        assert kept % 2 == 0 and chat.turns == history[len(history) - kept :]
        if kept < len(history):
            kept_after_drops.append(kept)
            assert len(chat.encode([*history[len(history) - kept - 2 :], user])) > chat.budget
        answer = f"Answer {i}:" + " Adam begat Seth." * (1 + i % 3)  # exchanges of unequal lengths
        assistant = {"role": "assistant", "content": answer}
        chat.record(user["content"], assistant["content"])
        history += [user, assistant]
    said = [n for n in notes if n]
    assert len(said) == 1 and "128-token context" in said[0] and "system prompt stays" in said[0]
    assert notes.index(said[0]) >= 2 and len(kept_after_drops) > 1  # dropping went on after the one note
    assert min(kept_after_drops) >= 2  # whole exchanges: the history still starts with a user turn
    chat.reset()
    assert chat.turns == [] and tokenizer.decode(chat.prompt("Hello")[0]).count("<|user|>") == 1
    # a long first message: dropping it alone would fit, but its reply goes with it
    chat.reset()
    chat.record("And it came to pass, " * 12, "Yes.")
    chat.record("Hi", "Hello.")
    message = "Who begat whom? " * 8
    assert len(chat.encode([*chat.turns, {"role": "user", "content": message}])) > chat.budget
    assert len(chat.encode([*chat.turns[1:], {"role": "user", "content": message}])) <= chat.budget
    assert chat.prompt(message)[1] is None and chat.turns == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_a_message_or_system_prompt_too_long_for_the_window_is_refused(tokenizer) -> None:
    chat = Chat(tokenizer, context_length=64, max_new_tokens=16)
    chat.record("Hello", "Hi.")
    with pytest.raises(ChatError, match="this message takes .* tokens .* leaves 48 to the prompt"):
        chat.prompt("And it came to pass " * 10)
    assert chat.turns == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    with pytest.raises(ChatError, match="--system: the system prompt alone takes"):
        Chat(tokenizer, context_length=64, max_new_tokens=16, system="In the beginning " * 20)


def streamed(tokenizer, ids: list[int]) -> list[str]:
    pieces: list[str] = []
    stream = TextStream(tokenizer, pieces.append)
    for i in ids:
        stream.push(i)
    stream.flush()
    assert "".join(pieces) == stream.text() == tokenizer.decode(ids, skip_special_tokens=True)
    return pieces


def test_text_streams_in_whole_characters_and_adds_up(tokenizer) -> None:
    text = "In the beginning — Ἐν ἀρχῇ, 太初有道 ✓ 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = streamed(tokenizer, ids)
    assert "".join(pieces) == text and len(pieces) > 10 and not any("\ufffd" in p for p in pieces)
    rng = random.Random(0)  # arbitrary ids: invalid byte sequences decode the same piece by piece as whole
    for _ in range(100):
        streamed(tokenizer, [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))])


# --- the command -----------------------------------------------------------------------------------------------


def expected_transcript(model_dir: Path, lines: list[str], max_new_tokens: int, system: str) -> tuple[str, list]:
    """What `lmcycle chat --temperature 0` prints for piped `lines`, computed with the library; and its notes."""
    model, tok = load_model(model_dir)
    chat = Chat(tok, model.config.context_length, max_new_tokens, system)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)
    out, notes = [], []
    for line in lines:
        out.append(f"you> {line}\n")
        if line == "/reset":
            chat.reset()
        elif line != "/exit":
            ids, note = chat.prompt(line)
            notes.append(note)
            answer = reply(model, tok, ids, cfg)
            chat.record(line, answer)
            out.append(f"assistant> {answer}\n")
    return "".join(out), notes


def test_piped_conversation_with_reset(tiny_hf_dir: Path, tmp_path: Path) -> None:
    lines = ["Hello", "And who are you?", "In the beginning God created the heaven and the earth.", "/reset"]
    lines += ["Hello", "/exit"]
    args = ["chat", "--model", str(tiny_hf_dir), "--temperature", "0", "--max-new-tokens", "8", "--system", "Be brief."]
    proc = subprocess.run(
        ["lmcycle", *args], input=("\n".join(lines) + "\n").encode(), capture_output=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr.decode()
    expected, notes = expected_transcript(tiny_hf_dir, lines, 8, "Be brief.")
    assert proc.stdout.decode("utf-8") == expected
    stderr = proc.stderr.decode()
    assert "(history cleared)" in stderr and "Traceback" not in stderr
    assert sum(1 for n in notes if n) == 1 and stderr.count("note: the conversation outgrew") == 1
    replies = [line for line in expected.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 4 and replies[3] == replies[0]  # after /reset, "Hello" is a first turn again
    fresh, _ = expected_transcript(tiny_hf_dir, ["And who are you?"], 8, "Be brief.")
    assert fresh.splitlines()[1] != replies[1]  # so the second reply shows the history was used


class Child:
    """A running `lmcycle chat` whose stdout and stderr are collected as they come."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            ["lmcycle", "chat", *args], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.out, self.err = bytearray(), bytearray()
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, buffer: bytearray) -> None:
        while chunk := pipe.read1(4096):
            buffer.extend(chunk)

    def wait_for(self, ready: Callable[[str], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not ready(self.out.decode("utf-8", "replace")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never saw {what}; stdout {bytes(self.out)!r}, stderr {bytes(self.err)!r}")
            time.sleep(0.05)

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for reader in self.readers:
            reader.join(timeout=10)


def test_ctrl_c_stops_a_reply_and_returns_to_the_prompt(endless_hf_dir: Path, tmp_path: Path) -> None:
    child = Child(["--model", str(endless_hf_dir), "--temperature", "0", "--max-new-tokens", "2048"], tmp_path)
    try:
        child.wait_for(lambda out: out.startswith("you> "), "the prompt")
        child.send("Hello")
        child.wait_for(lambda out: len(out.partition("assistant> ")[2]) >= 4, "the reply streaming")
        child.proc.send_signal(signal.SIGINT)
        child.wait_for(lambda out: "\nyou> " in out.partition("assistant> ")[2], "the prompt after the reply")
        assert child.proc.poll() is None  # still chatting
        child.send("/exit")
        assert child.proc.wait(timeout=WAIT_S) == 0
    finally:
        child.stop()
    stderr = child.err.decode()
    assert "(reply stopped)" in stderr and "Traceback" not in stderr
    partial = child.out.decode("utf-8", "replace").partition("assistant> ")[2].partition("\nyou> ")[0]
    assert len(partial) >= 4 and child.out.decode("utf-8", "replace").endswith("you> /exit\n")


def test_ctrl_c_at_the_prompt_leaves(tiny_hf_dir: Path, tmp_path: Path) -> None:
    child = Child(["--model", str(tiny_hf_dir)], tmp_path)
    try:
        child.wait_for(lambda out: out.startswith("you> "), "the prompt")
        child.proc.send_signal(signal.SIGINT)
        assert child.proc.wait(timeout=WAIT_S) == 0
    finally:
        child.stop()
    assert "Traceback" not in child.err.decode()


@pytest.mark.parametrize("model", ["models:/absent@champion", "missing-dir"])
def test_a_model_that_is_not_there_is_one_error_line(model: str, tmp_path: Path) -> None:
    proc = lmcycle("chat", "--model", model, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # MLflow may log its db setup
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert model.split("@")[0].removeprefix("models:/") in errors[0] and proc.stdout == ""


def test_version(tmp_path: Path) -> None:
    proc = lmcycle("--version", cwd=tmp_path)
    assert proc.stdout == f"lmcycle {importlib.metadata.version('lmcycle')}\n"
