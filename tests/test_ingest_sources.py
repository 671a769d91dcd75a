"""The ingest stage run in-process on every kind of source, with real files, package data and HF datasets."""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import CHATTERBOT_EN

from lmcore.errors import DataError
from lmcore.lifecycle.config import validate
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.stages import ingest


def run_ingest(root: Path, **data) -> dict:
    """Run the stage in `root` with these data params; returns reports/ingest.json."""
    params = {"pretrain": [], "sft": [], "classification": [], "val_fraction": 0.5, **data}
    ingest.run(validate({"data": params}), Paths.of(root))
    return json.loads((root / "reports" / "ingest.json").read_text())


def records(root: Path, kind: str, split: str | None = None) -> list[dict]:
    splits = [split] if split else ["train", "val"]
    out = []
    for s in splits:
        with (root / "data" / "ingest" / kind / f"{s}.jsonl").open(encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f)
    return out


def texts(root: Path, kind: str = "pretrain") -> set[str]:
    return {r["text"] for r in records(root, kind)}


def paragraphs(n: int, tag: str) -> list[str]:
    return [f"{tag} paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(n)]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def output_bytes(root: Path) -> dict[str, bytes]:
    base = root / "data" / "ingest"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.jsonl"))}


# --- local files ---------------------------------------------------------------------------------------------


def test_text_files_of_a_directory_are_documents(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "Plain   text.  \r\nSecond line.\n")
    write(corpus / "b.md", "# Title\n\nSome *markdown*.\n\n\n\n\nEnd.\n")
    write(corpus / "c.rst", "Title\n=====\n\nrestructured text\n")
    write(corpus / "sub" / "d.txt", "nested file\n")
    write(corpus / ".hidden.txt", "never read\n")
    (corpus / "e.txt.gz").write_bytes(gzip.compress(b"gzipped text\n"))
    for i, p in enumerate(paragraphs(8, "extra")):
        write(corpus / f"more{i}.txt", p)
    report = run_ingest(tmp_path, pretrain=[{"uri": "corpus"}])
    got = texts(tmp_path)
    expected = {"Plain text.\nSecond line.", "# Title\n\nSome *markdown*.\n\nEnd.", "Title\n=====\n\nrestructured text"}
    assert expected | {"nested file", "gzipped text"} | set(paragraphs(8, "extra")) == got
    assert "never read" not in got
    pre = report["pretrain"]
    assert sum(pre["documents"].values()) == 13
    assert pre["sources"][0]["fingerprint"]["files"] == 13
    for rec in records(tmp_path, "pretrain"):
        assert rec["id"] == hashlib.sha256(rec["text"].encode()).hexdigest()[:16]
        assert rec["source"] == 0 and sorted(rec) == ["id", "source", "text"]


def test_record_formats_jsonl_json_csv_tsv_parquet_and_gzip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        fmt: [{"body": t, "n": i} for i, t in enumerate(paragraphs(5, fmt))]
        for fmt in ["jl", "js", "cs", "ts", "pq", "gz"]
    }
    write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows["jl"]) + "\n[1, 2]\nnot json\n")
    write(tmp_path / "d.json", json.dumps({"data": rows["js"]}))
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["n", "body"])
        writer.writeheader()
        writer.writerows(rows["cs"])
        writer.writerow({"n": 9, "body": "a quoted field\nover two lines, with a comma"})
    with (tmp_path / "d.tsv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["n", "body"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows["ts"])
    pq.write_table(pa.Table.from_pylist(rows["pq"]), tmp_path / "d.parquet")
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows["gz"]).encode()))
    sources = [
        {"uri": f"d.{ext}", "text_field": "body"} for ext in ["jsonl", "json", "csv", "tsv", "parquet", "jsonl.gz"]
    ]
    report = run_ingest(tmp_path, pretrain=sources)
    expected = {r["body"] for rs in rows.values() for r in rs} | {"a quoted field\nover two lines, with a comma"}
    assert texts(tmp_path) == expected
    assert [s["documents"] for s in report["pretrain"]["sources"]] == [5, 5, 6, 5, 5, 5]
    assert report["pretrain"]["rows_invalid"] == 2  # the array row and the line that is not JSON
    by_source = {r["text"]: r["source"] for r in records(tmp_path, "pretrain")}
    assert by_source[rows["pq"][0]["body"]] == 4


def test_format_override_reads_any_suffix(tmp_path):
    write(tmp_path / "notes.data", "".join(json.dumps({"text": p}) + "\n" for p in paragraphs(6, "x")))
    run_ingest(tmp_path, pretrain=[{"uri": "notes.data", "format": "jsonl"}])
    assert texts(tmp_path) == set(paragraphs(6, "x"))


def test_group_by_joins_kjv_verses_into_chapters(tmp_path, kjv_slice):
    report = run_ingest(tmp_path, pretrain=[{"uri": str(kjv_slice), "group_by": ["book", "chapter"]}], val_fraction=0.1)
    assert sum(report["pretrain"]["documents"].values()) == 300
    genesis_1 = next(t for t in texts(tmp_path) if t.startswith("In the beginning"))
    verses = genesis_1.split("\n")
    assert len(verses) == 31  # Genesis 1 has 31 verses, one a line
    assert verses[1].startswith("And the earth was without form")
    assert report["pretrain"]["contamination"]["val_ngrams"] > 0


# --- conversations and classification ------------------------------------------------------------------------


def expected_conversations(files: list[Path]) -> set[str]:
    """The distinct chatterbot conversations, with turns after the last assistant turn dropped."""
    out = set()
    for path in files:
        for turns in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            if isinstance(turns, list) and len(turns) >= 2:
                kept = turns[: len(turns) // 2 * 2]
                out.add(json.dumps([" ".join(str(t).split()) for t in kept]))  # spaces collapsed
    return out


def test_chatterbot_yaml_conversations(tmp_path, chatter_slice):
    report = run_ingest(tmp_path, sft=[{"uri": str(chatter_slice / "*.yml"), "format": "conversations"}])
    convs = records(tmp_path, "sft")
    for rec in convs:
        roles = [m["role"] for m in rec["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert sorted(rec) == ["id", "messages", "source"]
    assert {json.dumps([m["content"] for m in r["messages"]]) for r in convs} == expected_conversations(
        sorted(chatter_slice.glob("*.yml"))
    )
    assert report["sft"]["sources"][0]["fingerprint"]["files"] == 6


def test_sft_jsonl_messages_roles_and_prompt_response(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "human", "content": "Hi"},
                {"role": "gpt", "content": "Hello."},
            ]
        },
        {
            "messages": [
                {"from": "user", "value": "2+2?"},
                {"from": "bot", "value": "4"},
                {"from": "user", "value": "thanks"},
            ]
        },
        {"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "upon"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "empty question"}]},
        {"prompt": "Capital of France?", "response": "Paris."},
        {"question": "no usable field"},
    ] + [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(8)]
    write(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    report = run_ingest(tmp_path, sft=[{"uri": "chat.jsonl"}])
    convs = {json.dumps(r["messages"], sort_keys=True) for r in records(tmp_path, "sft")}
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert json.dumps([*system, {"role": "assistant", "content": "Hello."}], sort_keys=True) in convs
    two_plus_two = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]  # "thanks" dropped
    assert json.dumps(two_plus_two, sort_keys=True) in convs
    paris = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    assert json.dumps(paris, sort_keys=True) in convs
    assert len(convs) == 3 + 8
    sft = report["sft"]
    assert sft["unknown_roles"] == {"count": 1, "roles": {"narrator": 1}}
    assert sft["empty_dropped"] == 2  # no assistant turn; an empty turn
    assert sft["rows_missing_field"] == 1


def test_classification_text_and_label(tmp_path):
    rows = [{"review": f"review number {i} of this product", "stars": i % 2} for i in range(12)]
    rows += [{"review": "no label here"}, {"review": "review number 0 of this product", "stars": 1}]
    write(tmp_path / "reviews.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    report = run_ingest(
        tmp_path, classification=[{"uri": "reviews.jsonl", "text_field": "review", "label_field": "stars"}]
    )
    got = {r["text"]: r["label"] for r in records(tmp_path, "classification")}
    assert got == {f"review number {i} of this product": str(i % 2) for i in range(12)}
    cls = report["classification"]
    assert (cls["rows_missing_field"], cls["duplicates_removed"]) == (1, 1)  # the first label wins
    assert all(sorted(r) == ["id", "label", "source", "text"] for r in records(tmp_path, "classification"))


# --- package data, HF datasets, URLs -------------------------------------------------------------------------


def test_package_source_is_found_without_importing_the_package(tmp_path):
    report = run_ingest(
        tmp_path,
        sft=[{"uri": "package:chatterbot-corpus/chatterbot_corpus/data/english/gr*.yml", "format": "conversations"}],
    )
    fingerprint = report["sft"]["sources"][0]["fingerprint"]
    assert fingerprint == {
        "type": "package",
        "distribution": "chatterbot-corpus",
        "version": importlib.metadata.version("chatterbot-corpus"),
        "files": 1,
        "bytes": (CHATTERBOT_EN / "greetings.yml").stat().st_size,
    }
    assert expected_conversations([CHATTERBOT_EN / "greetings.yml"]) == {
        json.dumps([m["content"] for m in r["messages"]]) for r in records(tmp_path, "sft")
    }
    with pytest.raises(DataError, match=r"data.sft\[0\].uri: package 'no-such-dist' is not installed"):
        run_ingest(tmp_path, sft=[{"uri": "package:no-such-dist/data/*.yml"}])
    with pytest.raises(DataError, match=r"no file matches nothing/\*.yml in package chatterbot-corpus"):
        run_ingest(tmp_path, sft=[{"uri": "package:chatterbot-corpus/nothing/*.yml"}])


def test_hf_dataset_saved_to_disk_and_local_data_files(tmp_path):
    import datasets

    docs = paragraphs(10, "hf")
    datasets.Dataset.from_dict({"content": docs, "n": list(range(10))}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": docs[:5]})}).save_to_disk(
        str(tmp_path / "dd")
    )
    write(tmp_path / "local.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in paragraphs(6, "json")))
    sources = [
        {"uri": "hf:saved", "text_field": "content"},
        {"uri": f"hf:{tmp_path / 'dd'}", "text_field": "content", "split": "train"},
        {"uri": "hf:json", "data_files": ["local.jsonl"]},
    ]
    report = run_ingest(tmp_path, pretrain=sources)
    assert texts(tmp_path) == set(docs) | set(paragraphs(6, "json"))
    fingerprints = [s["fingerprint"] for s in report["pretrain"]["sources"]]
    assert [f["rows"] for f in fingerprints] == [10, 5, 6]
    assert all(f["type"] == "hf" and len(f["fingerprint"]) == 16 for f in fingerprints)
    assert report["pretrain"]["duplicates_removed"] == 5
    assert report == run_ingest(tmp_path, pretrain=sources)
    with pytest.raises(DataError, match=r"data.pretrain\[0\].split: 'test' is not one of \['train'\]"):
        run_ingest(tmp_path, pretrain=[{"uri": "hf:dd", "split": "test", "text_field": "content"}])
    with pytest.raises(DataError, match=r"hf:saved: none of its 10 rows has the text field 'text'"):
        run_ingest(tmp_path, pretrain=[{"uri": "hf:saved"}])
    with pytest.raises(DataError, match=r"data.pretrain\[0\].uri: cannot load Hugging Face dataset 'no-such/dataset'"):
        run_ingest(tmp_path, pretrain=[{"uri": "hf:no-such/dataset"}])


def test_fsspec_urls_memory_and_file(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for i, text in enumerate(paragraphs(5, "mem")):
        fs.pipe(f"/lmcycle-test/corpus/{i}.txt", text.encode())
    write(tmp_path / "disk" / "a.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in paragraphs(5, "file")))
    sources = [{"uri": "memory://lmcycle-test/corpus/*.txt"}, {"uri": f"file://{tmp_path / 'disk'}"}]
    try:
        report = run_ingest(tmp_path, pretrain=sources)
    finally:
        fs.rm("/lmcycle-test", recursive=True)
    assert texts(tmp_path) == set(paragraphs(5, "mem")) | set(paragraphs(5, "file"))
    memory, local = (s["fingerprint"] for s in report["pretrain"]["sources"])
    assert memory["files"] == 5 and [e["path"] for e in memory["entries"]] == [f"{i}.txt" for i in range(5)]
    assert all(set(e) == {"path", "size"} for e in memory["entries"])  # never the creation time
    assert local["entries"] == [
        {
            "path": "a.jsonl",
            "size": (tmp_path / "disk" / "a.jsonl").stat().st_size,
            "mtime": os.path.getmtime(tmp_path / "disk" / "a.jsonl"),
        }
    ]


# --- cleaning, dedup, cutting, binary files in the stage -----------------------------------------------------


def test_duplicates_after_cleaning_are_removed_across_sources(tmp_path):
    docs = paragraphs(10, "dup")
    write(tmp_path / "a.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in docs))
    write(tmp_path / "b.jsonl", "".join(json.dumps({"text": t.replace(" ", "   ") + "  \n"}) + "\n" for t in docs[:4]))
    report = run_ingest(tmp_path, pretrain=[{"uri": "a.jsonl"}, {"uri": "b.jsonl"}])
    pre = report["pretrain"]
    assert pre["duplicates_removed"] == 4
    assert [s["documents"] for s in pre["sources"]] == [10, 0]
    assert texts(tmp_path) == set(docs)


def test_long_documents_are_cut_and_short_ones_dropped(tmp_path):
    long_doc = "\n\n".join(" ".join(f"word{i}x{j}" for j in range(30)) for i in range(40))  # ~11 k chars
    write(tmp_path / "long.txt", long_doc)
    write(
        tmp_path / "short.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in ["tiny", "   ", *paragraphs(4, "ok")])
    )
    report = run_ingest(
        tmp_path, pretrain=[{"uri": "long.txt"}, {"uri": "short.jsonl"}], max_doc_chars=1000, min_doc_chars=10
    )
    pre = report["pretrain"]
    pieces = [t for t in texts(tmp_path) if t.startswith("word")]
    assert all(len(p) <= 1000 for p in pieces) and len(pieces) >= 11
    assert sorted(" ".join(pieces).split()) == sorted(long_doc.split())
    assert pre["docs_split"] == 1
    assert pre["empty_dropped"] == 2  # "tiny" is under min_doc_chars, "   " is empty


def test_binary_files_in_a_directory_are_skipped_and_named(tmp_path):
    corpus = tmp_path / "corpus"
    for i, text in enumerate(paragraphs(6, "txt")):
        write(corpus / f"{i}.txt", text)
    (corpus / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (corpus / "zeros.txt").write_bytes(b"text\0with NUL bytes")
    report = run_ingest(tmp_path, pretrain=[{"uri": "corpus"}])
    assert report["pretrain"]["files_skipped"] == {
        "count": 2,
        "files": [str(corpus / "logo.png"), str(corpus / "zeros.txt")],
    }
    assert texts(tmp_path) == set(paragraphs(6, "txt"))


# --- determinism and split stability -------------------------------------------------------------------------


def test_two_runs_are_byte_identical_and_listing_order_does_not_matter(tmp_path):
    docs = paragraphs(30, "det")
    for name, order in (("one", docs), ("two", list(reversed(docs)))):
        for text in order:  # files created in a different order in each directory
            write(tmp_path / name / "corpus" / f"{docs.index(text):02d}.txt", text)
    first = run_ingest(tmp_path / "one", pretrain=[{"uri": "corpus"}])
    outputs = output_bytes(tmp_path / "one")
    report_bytes = (tmp_path / "one" / "reports" / "ingest.json").read_bytes()
    assert run_ingest(tmp_path / "one", pretrain=[{"uri": "corpus"}]) == first
    assert output_bytes(tmp_path / "one") == outputs
    assert (tmp_path / "one" / "reports" / "ingest.json").read_bytes() == report_bytes
    run_ingest(tmp_path / "two", pretrain=[{"uri": "corpus"}])
    assert output_bytes(tmp_path / "two") == outputs


def test_split_is_stable_when_files_are_renamed_reordered_or_added(tmp_path):
    corpus = tmp_path / "corpus"
    docs = paragraphs(40, "stable")
    for i, text in enumerate(docs):
        write(corpus / f"{i:02d}.txt", text)
    run_ingest(tmp_path, pretrain=[{"uri": "corpus"}])
    before = {r["id"]: split for split in ("train", "val") for r in records(tmp_path, "pretrain", split)}
    assert 0 < sum(s == "val" for s in before.values()) < 40
    shutil.rmtree(corpus)
    for i, text in enumerate(docs):  # the same texts under reversed names, plus new files
        write(corpus / f"{39 - i:02d}.txt", text)
    for i, text in enumerate(paragraphs(10, "added")):
        write(corpus / f"new{i}.txt", text)
    write(tmp_path / "extra.txt", "a second source listed first\n")
    run_ingest(tmp_path, pretrain=[{"uri": "extra.txt"}, {"uri": "corpus"}])
    after = {r["id"]: split for split in ("train", "val") for r in records(tmp_path, "pretrain", split)}
    assert len(after) == 51
    assert {k: after[k] for k in before} == before


def test_a_failed_run_leaves_the_previous_output_untouched(tmp_path):
    for i, text in enumerate(paragraphs(10, "keep")):
        write(tmp_path / "corpus" / f"{i}.txt", text)
    run_ingest(tmp_path, pretrain=[{"uri": "corpus"}])
    outputs = output_bytes(tmp_path)
    report = (tmp_path / "reports" / "ingest.json").read_bytes()
    with pytest.raises(DataError, match="no such file or directory: missing"):
        run_ingest(tmp_path, pretrain=[{"uri": "corpus"}, {"uri": "missing"}])
    assert output_bytes(tmp_path) == outputs
    assert (tmp_path / "reports" / "ingest.json").read_bytes() == report
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ingest"]  # no temporary directory left
