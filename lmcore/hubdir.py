"""Where a model named in params lives: a local directory as given, or a Hugging Face hub id (`org/name`,
optionally `@revision`) resolved through the local Hugging Face cache.

The hub is asked only when a user has not set HF_HUB_OFFLINE; offline (as in CI and every test) the id must already
be in the cache, and nothing is downloaded. Only what a model directory needs is fetched: config, safetensors
weights, tokenizer and generation files — never pickled weights or code (`trust_remote_code` is never used).
"""

from __future__ import annotations

import re
from pathlib import Path

from lmcore.errors import CheckpointError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.*"]


def model_directory(value: str, root: Path, key: str, cache_dir: Path | None = None) -> Path:
    """The local directory of the model `value` names (relative paths from `root`); CheckpointError naming `key`
    when it is neither a Hugging Face model directory nor a hub id the cache (or, online, the hub) holds."""
    directory = Path(value).expanduser()
    directory = directory if directory.is_absolute() else root / directory
    if (directory / "config.json").is_file():
        return directory
    if directory.exists() or not HUB_ID.fullmatch(value) or (root / value.split("/")[0]).is_dir():
        # a local path (its first folder exists here, as `models/` does): a typo, not a hub id
        raise CheckpointError(f"{key}: {value} is not a Hugging Face model directory (run the pretrain stage first?)")
    return _from_hub(value, key, cache_dir)


def _from_hub(value: str, key: str, cache_dir: Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    repo_id, _, revision = value.partition("@")
    offline = constants.is_offline_mode()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision or None,
            cache_dir=cache_dir,
            allow_patterns=MODEL_FILES + TOKENIZER_FILES,
            local_files_only=offline,
        )
    except Exception as err:  # the hub library raises a family of its own and OSError; all mean "not there"
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{key}: {value} is not a Hugging Face model directory, nor a model in {where}: {first}"
        ) from None
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{key}: hub model {value} has no config.json (not a transformers model)")
    return directory
