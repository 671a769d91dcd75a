"""Byte-level BPE: training with HF `tokenizers`, the Hugging Face tokenizer directory, the chat template.

Design: one Rust `tokenizers.Tokenizer` is the source of truth. It is byte-level (ByteLevel pre-tokenizer without
a prefix space, ByteLevel decoder), so `decode(encode(text)) == text` for any UTF-8 text, and its post-processor
prepends `<|bos|>` the way Llama tokenizers do: `tokenizer("In the beginning")` in stock transformers gives the
same start-of-document marker that pretraining saw (`<|bos|> text <|eos|>` per document). The saved directory is
a plain `PreTrainedTokenizerFast` directory (tokenizer.json + tokenizer_config.json holding the chat template),
loaded by `AutoTokenizer.from_pretrained` without remote code. `tokenizer_fingerprint` names a tokenizer by the
hash of its canonical tokenizer.json, so token shards and models refuse a tokenizer they were not built with.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmcore.errors import CheckpointError, DataError
from lmcore.files import atomic_directory
from lmcore.options import SPECIAL_TOKENS, TokenizerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS  # all are `special` in tokenizer.json
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# The tokenizer alone knows no context length; model directories overwrite this with their own.
DEFAULT_MODEL_MAX_LENGTH = 1024
# Encoding batches also end at this much text per encoding thread: a batch's encodings and ids take ~25 bytes per
# byte of text, so memory stays bounded whatever the documents' lengths, and each thread still gets documents.
BATCH_BYTES_PER_THREAD = 128 * 1024

# What SFT trains on, and what `tokenizer.apply_chat_template(messages)` renders in stock transformers.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def render_chat(messages: Iterable[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE in plain Python (no Jinja): the exact text a conversation becomes."""
    text = BOS + "".join(f"<|{m['role']}|>{m['content']}{END}" for m in messages)
    return text + ASSISTANT if add_generation_prompt else text


# --- reading texts and training ------------------------------------------------------------------------------


def iter_texts(path: str | Path) -> Iterator[str]:
    """The `text` of every record of an ingest split (jsonl, one document per line), streamed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (run the ingest stage first)")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f'{path}:{number}: expected a JSON record with a "text" field') from None
            if not isinstance(text, str):
                raise DataError(f'{path}:{number}: "text" is not a string')
            yield text


def document_batches(texts: Iterable[str], max_docs: int, max_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Lists of at most `max_docs` texts and about `max_bytes` UTF-8 bytes, each with its byte count."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text.encode("utf-8"))
        if len(batch) == max_docs or size >= max_bytes:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def use_threads(num_workers: int) -> int:
    """Size the Rust thread pool (0 = all cores) and return its size. The pool reads RAYON_NUM_THREADS once,
    when the process first encodes in parallel."""
    if num_workers > 0:
        os.environ["RAYON_NUM_THREADS"] = str(num_workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    return encode_threads()


def encode_threads() -> int:
    """Threads of the Rust pool: RAYON_NUM_THREADS, else every core this process may run on."""
    threads = os.environ.get("RAYON_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        return int(threads)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def batch_bytes(threads: int) -> int:
    return BATCH_BYTES_PER_THREAD * max(1, threads)


def limit_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The first texts until `max_bytes` UTF-8 bytes are reached (the last one whole); 0 = no limit."""
    seen = 0
    for text in texts:
        if max_bytes and seen >= max_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE on a stream of texts; the result depends only on the texts and `cfg`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: nothing is ever unknown
        show_progress=sys.stderr.isatty(),
    )
    tok.train_from_iterator(limit_bytes(texts, cfg.max_train_bytes), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def encode_documents(tok: Tokenizer, texts: list[str], dtype: Any = np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch of documents (in parallel, the Rust thread pool) as `<|bos|> text <|eos|>` each.

    Returns the tokens back to back and each document's length in tokens (BOS and EOS included).
    """
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers ≥ 0.21)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if bos is None or eos is None:
        raise CheckpointError(f"the tokenizer has no {BOS} or {EOS} token: not an lmcycle tokenizer")
    flat: list[int] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, encoding in enumerate(encode(texts, add_special_tokens=False)):
        ids = encoding.ids
        flat.append(bos)
        flat.extend(ids)
        flat.append(eos)
        lengths[i] = len(ids) + 2
    return np.array(flat, dtype=dtype), lengths


# --- saving and loading --------------------------------------------------------------------------------------


def to_transformers(tok: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # byte-level decoding is already exact
    )


def save_tokenizer(
    tok: Tokenizer, directory: str | Path, cfg: TokenizerConfig, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> Path:
    """Write a Hugging Face tokenizer directory atomically (temporary directory, then rename)."""
    missing = [t for t in cfg.special_tokens if tok.token_to_id(t) is None]
    if missing:
        raise CheckpointError(f"tokenizer lacks special tokens {missing}; it cannot be saved to {directory}")
    hf = to_transformers(tok, model_max_length)
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        hf.save_pretrained(tmp, save_jinja_files=False)  # the chat template stays in tokenizer_config.json
        config_path = tmp / CONFIG_FILE
        config = json.loads(config_path.read_text(encoding="utf-8"))
        # The class name every transformers version maps to its fast tokenizer (v5 writes its internal name).
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")
    return directory


def read_tokenizer(directory: str | Path) -> Tokenizer:
    """The Rust tokenizer of a saved directory (no transformers import: what the tokenize stage uses)."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {TOKENIZER_FILE} (run the tokenizer stage first)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: not a valid tokenizer ({str(err).splitlines()[0]})") from None


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The saved directory as a transformers fast tokenizer, checked to carry bos/eos/pad tokens."""
    directory = Path(directory)
    read_tokenizer(directory)  # a clear error for a missing or malformed tokenizer.json
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:
        raise CheckpointError(f"{directory}: cannot load the tokenizer ({str(err).splitlines()[0]})") from None
    if not hf.is_fast or None in (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id):
        raise CheckpointError(f"{directory}: not an lmcycle tokenizer (needs a fast tokenizer with bos/eos/pad)")
    return hf


def model_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved with any Hugging Face model directory (lmcycle's or one a user brings); a missing pad
    token falls back to EOS (right padding is never attended)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # transformers raises many types for a broken or absent tokenizer
        raise CheckpointError(f"{directory}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise CheckpointError(f"{directory}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- identity ------------------------------------------------------------------------------------------------


def _tokenizer_json(source: str | Path | Tokenizer | PreTrainedTokenizerFast) -> str:
    if isinstance(source, Tokenizer):
        return source.to_str()
    if hasattr(source, "backend_tokenizer"):
        return source.backend_tokenizer.to_str()
    path = Path(source)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{source}: no {TOKENIZER_FILE} to fingerprint")
    return path.read_text(encoding="utf-8")


def tokenizer_fingerprint(source: str | Path | Tokenizer | PreTrainedTokenizerFast) -> str:
    """16 hex chars of sha256 over the canonical tokenizer.json (runtime padding/truncation settings left out)."""
    data = json.loads(_tokenizer_json(source))
    data.pop("padding", None)
    data.pop("truncation", None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
