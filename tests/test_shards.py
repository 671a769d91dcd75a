"""Token shards: the writer/reader format, the resumable batch sampler, refusals of bad shards, and the
`tokenize` stage (exact tokens, byte-identical reruns, no torch import)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import lmcycle

from lmcore.data.shards import HEADER_BYTES, MAGIC, ShardWriter, TokenShards, read_header
from lmcore.errors import DataError
from lmcore.lifecycle.config import validate
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.stages import tokenize as tokenize_stage
from lmcore.lifecycle.stages import tokenizer as tokenizer_stage
from lmcore.lifecycle.tracking import TRACKING_ENV
from lmcore.tokenizer import iter_texts, read_tokenizer, tokenizer_fingerprint

FINGERPRINT = "0123456789abcdef"


def write_split(directory: Path, docs: list[np.ndarray], vocab_size: int = 1000, shard_tokens: int = 7) -> Path:
    """Two batches of documents into shards of `shard_tokens` tokens."""
    writer = ShardWriter(directory, FINGERPRINT, vocab_size, shard_tokens)
    half = len(docs) // 2
    for batch in (docs[:half], docs[half:]):
        writer.add(np.concatenate(batch), np.array([len(d) for d in batch]), utf8_bytes=10 * len(batch))
    writer.close()
    return directory


@pytest.fixture
def docs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 1000, size=int(n)) for n in rng.integers(1, 30, size=12)]


@pytest.fixture
def split(tmp_path: Path, docs: list[np.ndarray]) -> Path:
    return write_split(tmp_path / "train", docs)


def test_reader_returns_what_was_written(split: Path, docs: list[np.ndarray]) -> None:
    tokens = np.concatenate(docs)
    shards = TokenShards(split, expected_fingerprint=FINGERPRINT)
    index = json.loads((split / "index.json").read_text())
    assert len(shards) == len(tokens) == index["tokens"]
    assert [s["tokens"] for s in index["shards"]][:-1] == [7] * (len(index["shards"]) - 1)
    assert shards.utf8_bytes == 120 and shards.num_documents == 12 and shards.fingerprint == FINGERPRINT
    assert np.array_equal(shards.window(0, len(tokens)), tokens)
    for start, length in [(5, 4), (6, 1), (7, 7), (3, 20), (len(tokens) - 3, 3)]:  # within and across shards
        window = shards.window(start, length)
        assert window.dtype == np.int64 and np.array_equal(window, tokens[start : start + length])
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])[:-1]])
    assert np.array_equal(shards.document_starts, starts)
    with pytest.raises(IndexError):
        shards.window(len(tokens) - 2, 3)


def test_header_and_dtype(tmp_path: Path, docs: list[np.ndarray]) -> None:
    small = write_split(tmp_path / "small", docs, vocab_size=2**16)
    itemsize, count, fingerprint = read_header(small / "shard-00000.bin")
    assert (itemsize, count, fingerprint) == (2, 7, FINGERPRINT)
    assert (small / "shard-00000.bin").read_bytes()[:8] == MAGIC
    big_docs = [d + 70_000 for d in docs]
    big = write_split(tmp_path / "big", big_docs, vocab_size=2**16 + 5_000 + 70_000)
    assert read_header(big / "shard-00000.bin")[0] == 4
    assert np.array_equal(TokenShards(big).window(0, 30), np.concatenate(big_docs)[:30])


def test_batches_are_a_pure_function_of_seed_and_step(split: Path) -> None:
    shards = TokenShards(split)
    x, y = shards.batch(step=3, batch_size=4, context_length=8, seed=1)
    assert x.shape == y.shape == (4, 8) and x.dtype == np.int64
    assert np.array_equal(x[:, 1:], y[:, :-1])
    again = TokenShards(split).batch(step=3, batch_size=4, context_length=8, seed=1)  # a fresh reader: "resume"
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)
    assert not np.array_equal(shards.batch(4, 4, 8, seed=1)[0], x)
    assert not np.array_equal(shards.batch(3, 4, 8, seed=2)[0], x)
    tokens = shards.window(0, len(shards))
    for row_x, row_y in zip(x, y, strict=True):
        start = next(s for s in range(len(tokens) - 8) if np.array_equal(tokens[s : s + 8], row_x))
        assert np.array_equal(tokens[start + 1 : start + 9], row_y)


def test_ranks_split_one_global_batch(split: Path) -> None:
    shards = TokenShards(split)
    whole, _ = shards.batch(step=5, batch_size=6, context_length=4, seed=7)
    parts = [shards.batch(step=5, batch_size=2, context_length=4, seed=7, rank=r, world_size=3)[0] for r in range(3)]
    assert np.array_equal(np.concatenate(parts), whole)
    rows = [{tuple(row) for row in part} for part in parts]
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])


def test_sequential_windows_cover_the_split_once(split: Path) -> None:
    shards = TokenShards(split)
    tokens = shards.window(0, len(shards))
    batches = list(shards.sequential_windows(context_length=10, batch_size=3))
    assert all(x.shape == y.shape for x, y in batches)
    assert np.array_equal(np.concatenate([y.ravel() for _, y in batches]), tokens[1:])
    assert np.array_equal(np.concatenate([x.ravel() for x, _ in batches]), tokens[:-1])
    full = list(shards.sequential_windows(context_length=10, drop_last=True))
    assert all(x.shape == (1, 10) for x, _ in full) and len(full) == (len(tokens) - 1) // 10


def test_context_longer_than_the_split_is_refused(split: Path) -> None:
    shards = TokenShards(split)
    with pytest.raises(DataError, match=rf"context length {len(shards)} larger than .*\({len(shards)} tokens\)"):
        shards.batch(0, 1, len(shards), seed=0)
    with pytest.raises(DataError, match=str(split)):
        next(shards.sequential_windows(len(shards) + 5))


def test_fingerprint_mismatch_is_refused(split: Path) -> None:
    with pytest.raises(DataError, match=f"{FINGERPRINT}.*fedcba9876543210"):
        TokenShards(split, expected_fingerprint="fedcba9876543210")


def test_damaged_shards_are_refused(split: Path) -> None:
    shard = split / "shard-00001.bin"
    original = shard.read_bytes()
    shard.write_bytes(original[:-1])
    with pytest.raises(DataError, match="shard-00001.bin: truncated"):
        TokenShards(split)
    shard.write_bytes(original[: HEADER_BYTES - 4])
    with pytest.raises(DataError, match="shard-00001.bin: truncated"):
        TokenShards(split)
    shard.write_bytes(b"NOTTOKEN" + original[8:])
    with pytest.raises(DataError, match="shard-00001.bin: not an lmcycle token shard"):
        TokenShards(split)
    shard.write_bytes(original[:8] + (99).to_bytes(4, "little") + original[12:])
    with pytest.raises(DataError, match="shard-00001.bin: shard format version 99"):
        TokenShards(split)
    shard.unlink()
    with pytest.raises(DataError, match="shard-00001.bin: shard listed in index.json is missing"):
        TokenShards(split)


def test_split_is_found_or_named(split: Path) -> None:
    assert len(TokenShards(split.parent, split="train")) == len(TokenShards(split))
    with pytest.raises(DataError, match="holds the splits train"):
        TokenShards(split.parent)
    with pytest.raises(DataError, match="run the tokenize stage"):
        TokenShards(split.parent / "val")


# --- the tokenize stage ------------------------------------------------------------------------------------------


CONFIG = validate(
    {
        "data": {"pretrain": [{"uri": "unused"}]},
        "tokenizer": {"vocab_size": 512},
        "tokenize": {"shard_tokens": 1000, "batch_size": 16},
    }
)


@pytest.fixture(scope="module")
def tokenized(kjv_splits: Path, tmp_path_factory: pytest.TempPathFactory) -> Paths:
    root = tmp_path_factory.mktemp("ws")
    shutil.copytree(kjv_splits / "data", root / "data")
    paths = Paths.of(root)
    tokenizer_stage.run(CONFIG, paths)
    tokenize_stage.run(CONFIG, paths)
    return paths


def test_shards_hold_exactly_the_encoded_documents(tokenized: Paths) -> None:
    tok = read_tokenizer(tokenized.tokenizer)
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    report = json.loads(tokenized.report("tokenize").read_text())
    for split in ("train", "val"):
        texts = list(iter_texts(tokenized.split_file("pretrain", split)))
        expected = [[bos, *tok.encode(text, add_special_tokens=False).ids, eos] for text in texts]
        shards = TokenShards(tokenized.tokens / split, expected_fingerprint=tokenizer_fingerprint(tokenized.tokenizer))
        assert np.array_equal(shards.window(0, len(shards)), np.concatenate(expected))
        assert np.array_equal(shards.document_starts, np.cumsum([0] + [len(e) for e in expected[:-1]]))
        assert shards.utf8_bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert report[split] == {
            "tokens": len(shards),
            "shards": -(-len(shards) // 1000),
            "utf8_bytes": shards.utf8_bytes,
            "documents": len(texts),
        }
    assert report["train"]["shards"] > 1


def test_shards_of_another_tokenizer_are_refused(tokenized: Paths, tmp_path: Path) -> None:
    other = tmp_path / "ws"
    shutil.copytree(tokenized.root / "data" / "ingest", other / "data" / "ingest")
    config = CONFIG.model_copy(update={"tokenizer": CONFIG.tokenizer.model_copy(update={"vocab_size": 600})})
    tokenizer_stage.run(config, Paths.of(other))
    with pytest.raises(DataError, match="made by tokenizer"):
        TokenShards(tokenized.tokens / "train", expected_fingerprint=tokenizer_fingerprint(other / "models/tokenizer"))


def _digest(root: Path, names: list[str]) -> dict[str, str]:
    files = [p for name in names for p in sorted((root / name).rglob("*")) if p.is_file()] + [
        root / name for name in names if (root / name).is_file()
    ]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_two_runs_are_byte_identical(workspace_factory, kjv_splits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACKING_ENV, "off")  # MLflow tracking is tested elsewhere; here it only costs time
    ws = workspace_factory(dvc=False, tokenize={"shard_tokens": 1000})
    shutil.copytree(kjv_splits / "data", ws / "data")
    outputs = ["models/tokenizer", "data/tokens", "reports/tokenizer.json", "reports/tokenize.json"]
    digests = []
    for _ in range(2):
        lmcycle("stage", "tokenizer", cwd=ws)
        lmcycle("stage", "tokenize", cwd=ws)
        digests.append(_digest(ws, outputs))
    assert len(digests[0]) > 10 and digests[0] == digests[1]
    assert not list((ws / "data").glob(".tokens*")) and not list((ws / "models").glob(".tokenizer*"))


def test_tokenize_stage_imports_neither_torch_nor_transformers(tokenized: Paths, tmp_path: Path) -> None:
    for name in ["data/ingest", "models/tokenizer"]:
        shutil.copytree(tokenized.root / name, tmp_path / name)
    (tmp_path / "params.yaml").write_text(json.dumps(CONFIG.model_dump(mode="json")))
    code = (
        "import sys; from flows.cli import run_stage; run_stage('tokenize', workspace=sys.argv[1], params=sys.argv[2]);"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    args = [sys.executable, "-c", code, str(tmp_path), str(tmp_path / "params.yaml")]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "data/tokens/train/index.json").is_file()
