"""End to end, the data half: ingest → tokenizer → tokenize on the real KJV slice, in a real git + DVC workspace,
driven by `lmcycle stage` and by `dvc repro` (which must agree byte for byte and skip what did not change)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import lmcycle

from lmcore.data.shards import TokenShards
from lmcore.tokenizer import load_tokenizer, tokenizer_fingerprint

pytestmark = pytest.mark.slow
STAGES = ["ingest", "tokenizer", "tokenize"]
OUTPUTS = ["data/ingest", "models/tokenizer", "data/tokens", "reports/tokenizer.json", "reports/tokenize.json"]


def dvc(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def digest(root: Path) -> dict[str, str]:
    files = []
    for name in OUTPUTS:
        path = root / name
        files += (
            sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".gitignore") if path.is_dir() else [path]
        )
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def ran(output: str) -> set[str]:
    return {name for name in STAGES if f"Running stage '{name}'" in output}


def skipped(output: str) -> set[str]:
    return {name for name in STAGES if f"Stage '{name}' didn't change, skipping" in output}


def test_data_stages_through_lmcycle_and_dvc(workspace_factory) -> None:
    ws = workspace_factory()

    for name in STAGES:
        lmcycle("stage", name, cwd=ws)
    by_lmcycle = digest(ws)
    fingerprint = tokenizer_fingerprint(ws / "models/tokenizer")
    assert load_tokenizer(ws / "models/tokenizer").is_fast
    report = json.loads((ws / "reports/tokenize.json").read_text())
    for split in ("train", "val"):
        shards = TokenShards(ws / "data/tokens", expected_fingerprint=fingerprint, split=split)
        assert len(shards) == report[split]["tokens"] > 0
        assert shards.num_documents == report[split]["documents"] > 0
        text_bytes = sum(
            len(json.loads(line)["text"].encode("utf-8"))
            for line in (ws / f"data/ingest/pretrain/{split}.jsonl").read_text(encoding="utf-8").splitlines()
        )
        assert shards.utf8_bytes == text_bytes
    x, y = TokenShards(ws / "data/tokens/train").batch(0, 4, 64, seed=1337)
    assert x.shape == (4, 64) and np.array_equal(x[:, 1:], y[:, :-1])

    # DVC runs the same commands: the outputs are byte-identical to the ones lmcycle wrote.
    first = dvc("repro", "tokenize", cwd=ws)
    assert ran(first) == set(STAGES)
    assert digest(ws) == by_lmcycle
    lock = (ws / "dvc.lock").read_text()
    assert all(f"  {name}:" in lock for name in STAGES)

    # Ingest always runs (its sources may live outside the workspace); its output is unchanged, so nothing after it.
    second = dvc("repro", "tokenize", cwd=ws)
    assert ran(second) == {"ingest"} and skipped(second) == {"tokenizer", "tokenize"}
    assert (ws / "dvc.lock").read_text() == lock
    assert digest(ws) == by_lmcycle

    # A tokenizer parameter reruns tokenizer and tokenize (and ingest, as always); ingest's output stays the same.
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = 600
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc("repro", "tokenize", cwd=ws)
    assert ran(third) == set(STAGES) and not skipped(third)
    assert json.loads((ws / "reports/tokenizer.json").read_text())["vocab_size"] == 600
    assert tokenizer_fingerprint(ws / "models/tokenizer") != fingerprint
    assert TokenShards(ws / "data/tokens/val").fingerprint == tokenizer_fingerprint(ws / "models/tokenizer")
    changed = {path for path, sha in digest(ws).items() if by_lmcycle.get(path) != sha}
    assert not any(path.startswith("data/ingest") for path in changed)
    assert "reports/tokenizer.json" in changed and "reports/tokenize.json" in changed

    status = json.loads(dvc("status", "tokenize", "--json", cwd=ws))
    assert set(status) <= {"ingest"}  # only the always-changed stage is ever out of date

    metrics = dvc("metrics", "show", cwd=ws)
    assert "reports/tokenizer.json" in metrics and "reports/tokenize.json" in metrics
    assert "val_bytes_per_token" in metrics and "train.tokens" in metrics
