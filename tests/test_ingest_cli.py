"""`lmcycle stage ingest` on bad and odd input: one clear error line and exit 1, or a success that reports repairs."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import lmcycle

from lmcore.data.records import Tally, cut_documents, pretrain_documents
from lmcore.data.sources import resolve
from lmcore.lifecycle.config import SourceConfig

MB = 1 << 20


@pytest.fixture(autouse=True)
def no_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about ingest; MLflow tracking of stage runs has its own tests."""
    monkeypatch.setenv("LMCYCLE_TRACKING", "off")


def workspace(factory, **data) -> Path:
    return factory(dvc=False, data={"pretrain": [], "sft": [], "classification": [], **data})


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def lines(n: int, tag: str) -> str:
    return "".join(f"{tag} line {i} of a small but real text file.\n\n" for i in range(n))


def fails_with(ws: Path, pattern: str) -> str:
    proc = lmcycle("stage", "ingest", cwd=ws, check=False)
    assert proc.returncode != 0
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert not (ws / "data" / "ingest").exists()
    return errors[0]


def succeeds(ws: Path) -> dict:
    lmcycle("stage", "ingest", cwd=ws)
    return json.loads((ws / "reports" / "ingest.json").read_text())


def documents(ws: Path, kind: str = "pretrain") -> list[dict]:
    out = []
    for split in ("train", "val"):
        with (ws / "data" / "ingest" / kind / f"{split}.jsonl").open(encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f)
    return out


def test_missing_path(workspace_factory):
    ws = workspace(workspace_factory, pretrain=[{"uri": "corpus/missing.txt"}])
    fails_with(ws, r"^error: data\.pretrain\[0\]\.uri: no such file or directory: corpus/missing\.txt$")


def test_a_source_with_no_text_after_cleaning(workspace_factory):
    ws = workspace(workspace_factory, pretrain=[{"uri": "ok.txt"}, {"uri": "blank.txt"}])
    write(ws / "ok.txt", lines(3, "fine"))
    write(ws / "blank.txt", " \n\x01\t\x07\n\r\n \ufeff  \n")  # no NUL byte: that would make it binary
    fails_with(ws, r"^error: data\.pretrain\[1\] \(blank\.txt\): no text after cleaning \(1 empty dropped\)$")


def test_a_png_among_text_files_is_skipped_and_reported(workspace_factory):
    ws = workspace(workspace_factory, pretrain=[{"uri": "corpus"}], val_fraction=0.5)
    for i in range(8):
        write(ws / "corpus" / f"{i}.txt", lines(2, f"file{i}"))
    png = write(ws / "corpus" / "figure.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    report = succeeds(ws)
    assert report["pretrain"]["files_skipped"] == {"count": 1, "files": [str(png)]}
    assert len(documents(ws)) == 8


def test_a_png_as_the_only_input_fails(workspace_factory):
    ws = workspace(workspace_factory, pretrain=[{"uri": "img/*"}])
    write(ws / "img" / "figure.png", b"\x89PNG\r\n\x1a\n" + bytes(100))
    fails_with(
        ws,
        r"^error: data\.pretrain\[0\] \(img/\*\): no text after cleaning \(binary files skipped: .*/img/figure\.png\)$",
    )


def test_mixed_encodings_are_repaired_and_counted(workspace_factory):
    ws = workspace(workspace_factory, pretrain=[{"uri": "mixed"}], val_fraction=0.5)
    for i in range(6):
        write(ws / "mixed" / f"utf8_{i}.txt", f"plain utf-8 file {i}: naïve café\n")
    write(
        ws / "mixed" / "cp1252.txt",
        "utf-8 first: żółw\n".encode() + b"caf\xe9 and \x93quoted\x94 text\nclean last line\n",
    )
    report = succeeds(ws)
    pre = report["pretrain"]
    assert (pre["bytes_repaired"], pre["lines_repaired"]) == (3, 1)
    texts = {d["text"] for d in documents(ws)}
    assert "utf-8 first: żółw\ncafé and “quoted” text\nclean last line" in texts


ROWS = [{"text": f"row {i} has its text field"} for i in range(10)] + [{"body": "no text"}, {"text": None}]


def test_jsonl_rows_missing_the_text_field_are_counted_and_skipped(workspace_factory):
    ws = workspace(workspace_factory, pretrain=[{"uri": "some.jsonl"}], val_fraction=0.5)
    write(ws / "some.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
    assert succeeds(ws)["pretrain"]["rows_missing_field"] == 2
    assert len(documents(ws)) == 10


def test_jsonl_file_without_the_text_field_fails(workspace_factory):
    ws = workspace(workspace_factory, pretrain=[{"uri": "some.jsonl"}, {"uri": "none.jsonl", "text_field": "content"}])
    write(ws / "some.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
    write(ws / "none.jsonl", "".join(json.dumps({"text": f"not content {i}"}) + "\n" for i in range(5)))
    fails_with(
        ws,
        r"^error: .*/none\.jsonl: none of its 5 rows has the text field 'content' \(data\.pretrain\[1\]\.text_field\)$",
    )


def test_val_fraction_that_leaves_a_split_empty(workspace_factory):
    ws = workspace(workspace_factory, pretrain=[{"uri": "one.txt"}], val_fraction=0.05)
    write(ws / "one.txt", "a single document cannot fill two splits\n")
    message = r"^error: data\.val_fraction=0\.05: the (train|val) split of pretrain is empty \(1 documents: [01] train"
    fails_with(ws, message + r", [01] val\)$")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bogus": 1}, r"^error: data\.bogus: unknown key in params\.yaml$"),
        (
            {"pretrain": [{"uri": "x.txt", "text_feld": "body"}]},
            r"^error: data\.pretrain\.0\.text_feld: unknown key in params\.yaml$",
        ),
    ],
)
def test_unknown_params_key(workspace_factory, data, message):
    ws = workspace(workspace_factory, **{"pretrain": [{"uri": "x.txt"}], **data})
    fails_with(ws, message)


# --- a 50 MB line ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_line_50mb(tmp_path_factory: pytest.TempPathFactory, kjv_slice: Path) -> tuple[Path, int]:
    """50 MB of real words (random KJV vocabulary, so no two pieces are equal) on one line, and its word count."""
    vocab = sorted({w for line in kjv_slice.open(encoding="utf-8") for w in json.loads(line)["text"].split()})
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("long") / "one_line.txt"
    count = 0
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < 50 * MB:
            chunk = rng.choices(vocab, k=200_000)
            count += len(chunk)
            f.write(" ".join(chunk) + " ")
    return path, count


def test_a_50mb_single_line_becomes_documents_under_max_doc_chars(workspace_factory, one_line_50mb):
    path, words = one_line_50mb
    ws = workspace(workspace_factory, pretrain=[{"uri": str(path)}], val_fraction=0.05)
    pre = succeeds(ws)["pretrain"]
    texts = [d["text"] for d in documents(ws)]
    assert all(len(t) <= 100_000 for t in texts)
    assert len(texts) == sum(pre["documents"].values()) > 500
    assert pre["docs_split"] == 1 and pre["duplicates_removed"] == 0
    assert sum(len(t.split()) for t in texts) == words  # cut only between words
    assert pre["contamination"]["val_ngrams"] > 0


def test_a_50mb_single_line_streams_in_bounded_memory(tmp_path, one_line_50mb):
    path, _ = one_line_50mb
    source = SourceConfig(uri=str(path))
    tally = Tally()
    tracemalloc.start()
    try:
        documents = pretrain_documents(resolve(source, "data.pretrain[0]", tmp_path), source, "data.pretrain[0]", tally)
        sizes = Counter(len(text) // 10_000 for text in cut_documents(documents, 100_000, 1, tally))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert max(sizes) <= 10 and sum(sizes.values()) > 500
    assert peak < 16 * MB  # the line is 50 MB: it is never held whole, let alone several times


# --- what the command imports ------------------------------------------------------------------------------


def test_ingest_imports_no_heavy_libraries(workspace_factory):
    """The tiny workspace's own sources (KJV slice as jsonl, chatterbot YAML): no torch, prefect, mlflow, datasets."""
    ws = workspace_factory(dvc=False)
    code = (
        "import sys\n"
        "from flows.cli import app\n"
        "sys.argv = ['lmcycle', 'stage', 'ingest']\n"
        "try:\n    app()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "heavy = {'torch', 'prefect', 'mlflow', 'datasets', 'pyarrow', 'pandas', 'transformers', 'fsspec'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    report = json.loads((ws / "reports" / "ingest.json").read_text())
    assert sum(report["pretrain"]["documents"].values()) == 300
    assert sum(report["sft"]["documents"].values()) > 100


def test_dvc_repro_twice_gives_the_same_ingest_output_hash(workspace_factory):
    """ingest is `always_changed`: it reruns, and identical bytes give DVC the same hash, so downstream skips."""
    ws = workspace_factory(dvc=True)
    hashes = []
    for _ in range(2):
        proc = subprocess.run(["dvc", "repro", "ingest"], cwd=ws, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lock = yaml.safe_load((ws / "dvc.lock").read_text())
        hashes.append([out["md5"] for out in lock["stages"]["ingest"]["outs"]])
    assert hashes[0] == hashes[1]
    assert "Running stage 'ingest'" in proc.stdout
