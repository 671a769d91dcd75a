"""The byte-level BPE tokenizer: exact round trips, determinism, the Hugging Face directory, the chat template,
fingerprints, and the `tokenizer` stage through the real `lmcycle` command."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import lmcycle

from lmcore.errors import CheckpointError
from lmcore.lifecycle.config import TokenizerConfig
from lmcore.lifecycle.tracking import TRACKING_ENV
from lmcore.tokenizer import (
    CHAT_TEMPLATE,
    DEFAULT_MODEL_MAX_LENGTH,
    iter_texts,
    limit_bytes,
    load_tokenizer,
    render_chat,
    save_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

CFG = TokenizerConfig(vocab_size=512)
TRICKY = [
    "Ångström — naïve 中文 🙂",
    " leading space",
    "\n\nleading newlines and trailing spaces  ",
    "tabs\tand\r\nwindows line ends",
    "In the beginning God created the heaven and the earth.",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "\n  What is 中文?"},
        {"role": "assistant", "content": " Chinese writing. "},
        {"role": "user", "content": "Thanks 🙂"},
    ],
]


@pytest.fixture(scope="module")
def train_texts(kjv_splits: Path) -> list[str]:
    return list(iter_texts(kjv_splits / "data/ingest/pretrain/train.jsonl"))


@pytest.fixture(scope="module")
def trained(train_texts: list[str]):
    return train_tokenizer(iter(train_texts), CFG)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tokenizer(trained, tmp_path_factory.mktemp("tok") / "tokenizer", CFG)


def test_round_trip_is_exact(trained, train_texts: list[str]) -> None:
    for text in [*TRICKY, *train_texts[:20]]:
        ids = trained.encode(text, add_special_tokens=False).ids
        assert trained.decode(ids) == text
    # Characters never seen in training still encode (as bytes), never as an unknown token.
    assert len(trained.encode("中文", add_special_tokens=False).ids) == len("中文".encode())


def test_training_is_deterministic(trained, train_texts: list[str], saved: Path, tmp_path: Path) -> None:
    again = train_tokenizer(iter(train_texts), CFG)
    assert again.to_str() == trained.to_str()
    second = save_tokenizer(again, tmp_path / "tokenizer", CFG)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        assert (second / name).read_bytes() == (saved / name).read_bytes()


def test_vocabulary_and_special_tokens(trained) -> None:
    assert trained.get_vocab_size() == CFG.vocab_size
    for i, token in enumerate(CFG.special_tokens):
        assert trained.token_to_id(token) == i
        assert trained.encode(f"a{token}b", add_special_tokens=False).ids.count(i) == 1


def test_max_train_bytes_limits_the_training_text(train_texts: list[str]) -> None:
    sizes = [len(t.encode()) for t in train_texts]
    limit = sizes[0] + sizes[1] // 2
    assert list(limit_bytes(train_texts, limit)) == train_texts[:2]  # the document crossing the limit is whole
    assert list(limit_bytes(train_texts, 0)) == train_texts
    small = train_tokenizer(iter(train_texts), TokenizerConfig(vocab_size=512, max_train_bytes=limit))
    assert small.to_str() == train_tokenizer(iter(train_texts[:2]), CFG).to_str()


def test_directory_loads_in_transformers(saved: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = AutoTokenizer.from_pretrained(saved)
    assert isinstance(hf, PreTrainedTokenizerFast) and hf.is_fast
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert hf.model_max_length == DEFAULT_MODEL_MAX_LENGTH
    assert json.loads((saved / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    for text in TRICKY:
        assert hf.decode(hf(text, add_special_tokens=False)["input_ids"]) == text
        # A plain call marks the start of a document the way pretraining saw it.
        assert hf(text)["input_ids"][0] == hf.bos_token_id
    assert load_tokenizer(saved).get_vocab() == hf.get_vocab()


def test_chat_template_matches_render_chat(saved: Path) -> None:
    hf = load_tokenizer(saved)
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            text = render_chat(messages, add_generation_prompt=prompt)
            assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == text
            ids = hf.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=True)["input_ids"]
            assert ids == hf(text, add_special_tokens=False)["input_ids"]
            assert ids.count(hf.bos_token_id) == 1
    assert render_chat(CONVERSATIONS[0], add_generation_prompt=True) == (
        "<|bos|><|user|>Hi there<|end|><|assistant|>Hello!<|end|><|assistant|>"
    )


def test_fingerprint_names_the_tokenizer(trained, saved: Path, train_texts: list[str]) -> None:
    fingerprint = tokenizer_fingerprint(trained)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint), fingerprint
    assert tokenizer_fingerprint(saved) == fingerprint
    assert tokenizer_fingerprint(saved / "tokenizer.json") == fingerprint
    assert tokenizer_fingerprint(load_tokenizer(saved)) == fingerprint
    other = train_tokenizer(iter(train_texts), TokenizerConfig(vocab_size=600))
    assert tokenizer_fingerprint(other) != fingerprint


def test_load_refuses_missing_or_broken_directories(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="broken"):
        load_tokenizer(broken)


def test_save_replaces_an_existing_directory_atomically(trained, tmp_path: Path) -> None:
    target = tmp_path / "tokenizer"
    target.mkdir()
    (target / "stale.txt").write_text("from an older run")
    save_tokenizer(trained, target, CFG)
    assert sorted(p.name for p in target.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temporary directory left behind


# --- the stage, through the real command -------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACKING_ENV, "off")  # MLflow tracking of stages is tested elsewhere; here it only costs time


def _workspace(workspace_factory, kjv_splits: Path, **sections: dict) -> Path:
    ws = workspace_factory(dvc=False, **sections)
    shutil.copytree(kjv_splits / "data", ws / "data")
    return ws


def test_stage_writes_tokenizer_and_report(workspace_factory, kjv_splits: Path) -> None:
    ws = _workspace(workspace_factory, kjv_splits)
    lmcycle("stage", "tokenizer", cwd=ws)
    report = json.loads((ws / "reports/tokenizer.json").read_text())
    assert report["vocab_size"] == 512
    assert report["fingerprint"] == tokenizer_fingerprint(ws / "models/tokenizer")
    assert report["train_documents"] == 270 and report["val_documents"] == 30
    assert report["val_bytes_per_token"] == round(report["val_utf8_bytes"] / report["val_tokens"], 4)
    assert 2.0 < report["val_bytes_per_token"] < 4.0  # a 512-token BPE on English text
    assert not any(key.endswith(("_s", "seconds")) for key in report)  # no timings in metrics


def test_stage_rejects_a_too_small_vocabulary(workspace_factory, kjv_splits: Path) -> None:
    ws = _workspace(workspace_factory, kjv_splits, tokenizer={"vocab_size": 100})
    proc = lmcycle("stage", "tokenizer", cwd=ws, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tokenizer.vocab_size")
    assert not (ws / "models/tokenizer").exists()


def test_stage_names_a_missing_split(workspace_factory) -> None:
    ws = workspace_factory(dvc=False)
    proc = lmcycle("stage", "tokenizer", cwd=ws, check=False)
    assert proc.returncode == 1
    assert "data/ingest/pretrain/train.jsonl" in proc.stderr and "ingest" in proc.stderr
