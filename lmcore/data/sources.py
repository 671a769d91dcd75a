"""Finding and reading ingest sources: local files, data files inside installed packages, HF datasets, URLs.

A source `uri` is one of
- a local file, directory (every non-hidden file below it) or glob (`**` allowed), relative to the workspace;
- `package:DIST/path/in/package` (glob allowed in the path): located through `importlib.metadata` without
  importing the package, since some data packages fail to import in a fresh environment;
- `hf:NAME[:CONFIG]`: `datasets.load_dataset(NAME, CONFIG, split=…, data_files=…)`, or `load_from_disk` when NAME
  is a directory written by `save_to_disk`;
- any fsspec URL (`file://`, `memory://`, `https://`, `s3://` with its fsspec package installed).

File lists are sorted, so outputs never depend on the order a file system lists them. Formats come from the file
suffix (after `.gz`) unless the source sets `format`; unknown suffixes are read as text. Text, jsonl and csv files
stream in bounded blocks (`BLOCK`), parquet in record batches; .json and .yml files are parsed whole.
Binary files (a NUL byte or a known magic number in the first 8 KiB; UTF-16 text counts as binary) are skipped
and listed in the report; a source left with no text at all is an error (see lmcore/lifecycle/stages/ingest.py).
Heavy readers (pyarrow, datasets, fsspec) are imported only when a source needs them.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import importlib.metadata
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import yaml

from lmcore.options import SourceConfig
from lmcore.data.clean import bad_utf8_lines, carry_split, decode_repair, split_incomplete_utf8
from lmcore.errors import DataError

BLOCK = 1 << 20  # bytes per read; a line longer than this streams through in pieces
SNIFF_BYTES = 8192
FORMAT_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".rst": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".yml": "conversations",
    ".yaml": "conversations",
}
TEXT_FORMATS = {"text", "markdown"}
BINARY_MAGIC = (
    b"\x89PNG",
    b"\xff\xd8\xff",  # JPEG
    b"GIF8",
    b"%PDF",
    b"PK\x03\x04",  # zip, docx, xlsx
    b"\x1f\x8b",  # gzip without a .gz suffix
    b"\x7fELF",
    b"PAR1",
    b"7z\xbc\xaf",
    b"RIFF",
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class InputFile:
    """One file of a source. `name` is shown in messages and the report; `rel` is relative to the source root."""

    name: str
    rel: str
    path: str
    fs: Any = None  # an fsspec file system; None for a local file

    @property
    def inner_name(self) -> str:
        return self.path[: -len(".gz")] if self.path.endswith(".gz") else self.path

    def open(self) -> IO[bytes]:
        raw = self.fs.open(self.path, "rb") if self.fs is not None else open(self.path, "rb")  # noqa: SIM115
        return gzip.GzipFile(fileobj=raw, mode="rb") if self.path.endswith(".gz") else raw

    def format(self, override: str) -> str:
        if override != "auto":
            return override
        return FORMAT_BY_SUFFIX.get(PurePosixPath(self.inner_name).suffix.lower(), "text")


@dataclass
class ResolvedSource:
    files: list[InputFile] = field(default_factory=list)
    dataset: Any = None  # a datasets.Dataset for hf: sources
    fingerprint: dict[str, Any] = field(default_factory=dict)


# --- resolving a uri -----------------------------------------------------------------------------------------


def resolve(source: SourceConfig, key: str, root: Path) -> ResolvedSource:
    """The files (or dataset) behind one source, with its fingerprint. `key` is e.g. `data.pretrain[0]`."""
    uri = source.uri
    if uri.startswith("package:"):
        return _package_source(uri, key)
    if uri.startswith("hf:"):
        return _hf_source(source, key, root)
    if _URL.match(uri):
        return _url_source(uri, key)
    return _local_source(uri, key, root)


def _glob_base(pattern: str) -> str:
    """The directory part of a glob before its first wildcard: matches are named relative to it."""
    fixed: list[str] = []
    for part in PurePosixPath(pattern).parts[:-1]:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    return str(PurePosixPath(*fixed)) if fixed else "."


def _walk(directory: Path) -> list[Path]:
    """Every non-hidden file below `directory`."""
    return [
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]


def _find_local(pattern: str, base: Path, key: str, where: str) -> tuple[list[Path], Path]:
    """Files for a path, directory or glob (absolute, or relative to `base`), and the root they are relative to."""
    full = pattern if Path(pattern).is_absolute() else str(base / pattern)
    if _GLOB_CHARS.search(pattern):
        files = [Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file()]
        if not files:
            raise DataError(f"{key}.uri: no file matches {pattern}{where}")
        return sorted(files), Path(_glob_base(full))
    path = Path(full)
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise DataError(f"{key}.uri: directory {pattern}{where} holds no files")
        return sorted(files), path
    if path.is_file():
        return [path], path.parent
    raise DataError(f"{key}.uri: no such file or directory: {pattern}{where}")


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _local_source(uri: str, key: str, root: Path) -> ResolvedSource:
    paths, base = _find_local(str(Path(uri).expanduser()), root, key, "")
    files = [InputFile(name=str(p), rel=p.relative_to(base).as_posix(), path=str(p)) for p in paths]
    sizes = [p.stat().st_size for p in paths]
    lines = [f"{f.rel}\t{size}\t{_file_digest(Path(f.path))}\n" for f, size in zip(files, sizes, strict=True)]
    fingerprint = {
        "type": "files",
        "files": len(files),
        "bytes": sum(sizes),
        "sha256": hashlib.sha256("".join(lines).encode()).hexdigest(),
    }
    return ResolvedSource(files=files, fingerprint=fingerprint)


def _package_source(uri: str, key: str) -> ResolvedSource:
    dist_name, _, inner = uri.removeprefix("package:").partition("/")
    if not dist_name or not inner:
        raise DataError(f"{key}.uri: expected package:DIST/path/in/package, got {uri!r}")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"{key}.uri: package {dist_name!r} is not installed (pip install {dist_name})") from None
    root = Path(str(dist.locate_file("")))
    where = f" in package {dist_name} {dist.version}"
    paths, _ = _find_local(inner, root, key, where)
    files = [InputFile(name=str(p), rel=p.relative_to(root).as_posix(), path=str(p)) for p in paths]
    fingerprint = {
        "type": "package",
        "distribution": dist.metadata["Name"],
        "version": dist.version,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in paths),
    }
    return ResolvedSource(files=files, fingerprint=fingerprint)


def _url_info(info: dict[str, Any]) -> dict[str, Any]:
    """The parts of an fsspec `info` that identify a file's contents (never access or creation times)."""
    out = {}
    for name in ("size", "ETag", "etag", "mtime", "LastModified", "last_modified", "md5", "checksum"):
        if info.get(name) is not None:
            value = info[name]
            out[name.lower()] = value if isinstance(value, int | float | str) else str(value)
    return out


def _url_source(uri: str, key: str) -> ResolvedSource:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise DataError(f"{key}.uri: cannot open {uri}: {err}") from None
    if _GLOB_CHARS.search(path):
        paths = [p for p in fs.glob(path) if fs.isfile(p)]
        base = _glob_base(path)
    elif fs.isdir(path):
        paths, base = fs.find(path), path
    elif fs.exists(path):
        paths, base = [path], str(PurePosixPath(path).parent)
    else:
        raise DataError(f"{key}.uri: no such file or directory: {uri}")
    if not paths:
        raise DataError(f"{key}.uri: no file matches {uri}")
    files, entries = [], []
    for p in sorted(paths):
        rel = PurePosixPath(p).relative_to(base).as_posix() if p.startswith(base) else p
        files.append(InputFile(name=fs.unstrip_protocol(p), rel=rel, path=p, fs=fs))
        entries.append({"path": rel, **_url_info(fs.info(p))})
    fingerprint = {"type": "url", "files": len(files), "entries": entries}
    return ResolvedSource(files=files, fingerprint=fingerprint)


def _hf_source(source: SourceConfig, key: str, root: Path) -> ResolvedSource:
    import datasets

    spec = source.uri.removeprefix("hf:")
    local = Path(spec) if Path(spec).is_absolute() else root / spec
    saved = local.is_dir() and any((local / n).exists() for n in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if source.split not in dataset:
                    raise DataError(f"{key}.split: {source.split!r} is not one of {sorted(dataset)} in {spec}")
                dataset = dataset[source.split]
        else:
            name, _, config = spec.partition(":")
            data_files = [f if Path(f).is_absolute() else str(root / f) for f in source.data_files] or None
            dataset = datasets.load_dataset(name, config or None, split=source.split, data_files=data_files)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (hub, offline, file, split errors)
        first = (str(err).strip().splitlines() or [""])[0]
        raise DataError(
            f"{key}.uri: cannot load Hugging Face dataset {spec!r}: {type(err).__name__}: {first}"
        ) from None
    fingerprint = {
        "type": "hf",
        "dataset": spec,
        "split": source.split,
        "fingerprint": dataset._fingerprint,
        "rows": dataset.num_rows,
        "version": str(dataset.info.version) if dataset.info.version else None,
    }
    return ResolvedSource(dataset=dataset, fingerprint=fingerprint)


# --- reading -------------------------------------------------------------------------------------------------


def is_binary(file: InputFile) -> bool:
    try:
        with file.open() as stream:
            head = stream.read(SNIFF_BYTES)
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{file.name}: cannot read ({err})") from None
    return b"\0" in head or head.startswith(BINARY_MAGIC)


class _RepairCounter:
    """Counts repaired bytes and lines; a line cut over several blocks is counted once."""

    def __init__(self, counts: Counter) -> None:
        self.counts = counts
        self.open_line_bad = False

    def decode(self, raw: bytes) -> str:
        text, bad = decode_repair(raw)
        if not bad:
            self.open_line_bad = self.open_line_bad and b"\n" not in raw
            return text
        segments = raw.split(b"\n")
        first_bad, last_bad = bool(bad_utf8_lines(segments[0])), bool(bad_utf8_lines(segments[-1]))
        self.counts["bytes_repaired"] += bad
        self.counts["lines_repaired"] += bad_utf8_lines(raw) - (self.open_line_bad and first_bad)
        if len(segments) == 1:  # no newline: the same line goes on
            self.open_line_bad = self.open_line_bad or last_bad
        else:
            self.open_line_bad = last_bad and segments[-1] != b""
        return text


def iter_text_blocks(stream: IO[bytes], counts: Counter, block: int = BLOCK) -> Iterator[str]:
    """Decoded text in blocks of whole lines; a line longer than `block` comes in pieces cut before whitespace.

    At most about two blocks of bytes and their text are held at a time, whatever the length of a line.
    """
    decoder = _RepairCounter(counts)
    rest, carry = b"", ""
    while chunk := stream.read(block):
        data = rest + chunk
        newline = data.rfind(b"\n")
        if newline >= 0:
            head, rest = data[: newline + 1], data[newline + 1 :]
        elif len(data) >= block:
            head, rest = split_incomplete_utf8(data)
        else:
            rest = data
            continue
        text = carry + decoder.decode(head)
        if text.endswith("\n"):
            carry = ""
            yield text
        else:
            text, carry = carry_split(text)
            if text:
                yield text
            elif len(carry) > block:  # a run of blanks longer than a block: bounded memory comes first
                yield carry
                carry = ""
    text = carry + (decoder.decode(rest) if rest else "")
    if text:
        yield text


def iter_lines(stream: IO[bytes], counts: Counter) -> Iterator[str]:
    """Decoded lines (with their newline), repaired and counted like `iter_text_blocks`; a line is held whole."""
    parts: list[bytes] = []
    while chunk := stream.read(BLOCK):
        start = 0
        while (newline := chunk.find(b"\n", start)) >= 0:
            parts.append(chunk[start : newline + 1])
            yield _decode_line(b"".join(parts), counts)
            parts, start = [], newline + 1
        if start < len(chunk):
            parts.append(chunk[start:])
    if parts:
        yield _decode_line(b"".join(parts), counts)


def _decode_line(raw: bytes, counts: Counter) -> str:
    text, bad = decode_repair(raw)
    if bad:
        counts["bytes_repaired"] += bad
        counts["lines_repaired"] += 1
    return text


def read_all(file: InputFile, counts: Counter) -> str:
    """A whole (small, structured) file as repaired text: .json and .yml are parsed whole anyway."""
    with file.open() as stream:
        raw = stream.read()
    text, bad = decode_repair(raw)
    if bad:
        counts["bytes_repaired"] += bad
        counts["lines_repaired"] += bad_utf8_lines(raw)
    return text


def iter_records(file: InputFile, fmt: str, counts: Counter, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Records (dicts) of a jsonl / json / csv / parquet file; rows that are not objects are counted as invalid."""
    if fmt == "jsonl":
        yield from _jsonl_records(file, counts)
    elif fmt == "json":
        yield from _json_records(file, counts)
    elif fmt == "csv":
        yield from _csv_records(file, counts)
    elif fmt == "parquet":
        yield from _parquet_records(file, columns)
    else:
        raise DataError(f"{file.name}: format {fmt!r} holds no records")


def _jsonl_records(file: InputFile, counts: Counter) -> Iterator[dict[str, Any]]:
    with file.open() as stream:
        for line in iter_lines(stream, counts):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested deeper than the parser goes
                counts["rows_invalid"] += 1
                continue
            if isinstance(record, dict):
                yield record
            else:
                counts["rows_invalid"] += 1


def _json_records(file: InputFile, counts: Counter) -> Iterator[dict[str, Any]]:
    try:
        data = json.loads(read_all(file, counts))
    except json.JSONDecodeError as err:
        raise DataError(f"{file.name}: not valid JSON ({err})") from None
    except RecursionError:
        raise DataError(f"{file.name}: JSON nested too deeply to read") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    for record in data if isinstance(data, list) else [data]:
        if isinstance(record, dict):
            yield record
        else:
            counts["rows_invalid"] += 1


def _csv_records(file: InputFile, counts: Counter) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(2**31 - 1)
    delimiter = "\t" if file.inner_name.lower().endswith(".tsv") else ","
    with file.open() as stream:
        reader = csv.DictReader(iter_lines(stream, counts), delimiter=delimiter)
        try:
            for row in reader:
                row.pop(None, None)  # values beyond the header
                yield row
        except csv.Error as err:
            raise DataError(f"{file.name}: line {reader.line_num}: {err}") from None


def _parquet_records(file: InputFile, columns: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    with file.open() as stream:
        try:
            parquet = pq.ParquetFile(stream)
            wanted = [c for c in columns if c in parquet.schema_arrow.names] or None
            for batch in parquet.iter_batches(batch_size=1024, columns=wanted):
                yield from batch.to_pylist()
        except pyarrow.ArrowException as err:
            raise DataError(f"{file.name}: not a readable parquet file ({err})") from None


def iter_conversations(file: InputFile, counts: Counter) -> Iterator[Any]:
    """The `conversations:` entries of a chatterbot-corpus YAML file (each a list of turns)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(read_all(file, counts), Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as err:
        raise DataError(f"{file.name}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise DataError(f"{file.name}: YAML nested too deeply to read") from None
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise DataError(f"{file.name}: no 'conversations:' list (the chatterbot-corpus format)")
    yield from data["conversations"]


def iter_dataset_rows(dataset: Any, columns: list[str]) -> Iterator[dict[str, Any]]:
    wanted = [c for c in columns if c in dataset.column_names]
    if not wanted:  # every row lacks every field the caller needs: it counts them as missing
        yield from ({} for _ in range(dataset.num_rows))
        return
    for batch in dataset.select_columns(wanted).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in wanted), strict=True):
            yield dict(zip(wanted, values, strict=True))
