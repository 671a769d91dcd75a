"""A model directory's weight files: which safetensors files hold the weights (one file, or the shards its index
lists), reading them (pickled weights are refused), and the digest that names them in a checkpoint fingerprint.

Apart from lmcore/export.py (which converts between lmcore and Hugging Face layouts) because the stages fingerprint
their init weights with it without converting anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from lmcore.errors import CheckpointError
from lmcore.files import file_sha256

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin")


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files holding a directory's weights: model.safetensors, or the shards its index lists
    (sorted); pickled weights are refused."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
        paths = [directory / name for name in files]
    elif single.is_file():
        paths = [single]
    else:
        pickled = [name for name in PICKLE_WEIGHTS if (directory / name).exists()]
        if pickled:
            raise CheckpointError(
                f"{directory / pickled[0]}: pickled weights are not loaded (unsafe); convert them to safetensors"
            )
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {WEIGHTS_INDEX_FILE})")
    return paths


def init_weights_digest(directory: str | Path) -> str:
    """SHA-256 naming the weights of a model directory a stage starts from: the digest of model.safetensors when
    it is one file, else the digest of the index and of every shard in turn (so a changed shard changes it)."""
    paths = weight_files(directory)
    if len(paths) == 1 and paths[0].name == WEIGHTS_FILE:
        return file_sha256(paths[0])
    h = hashlib.sha256(file_sha256(Path(directory) / WEIGHTS_INDEX_FILE).encode())
    for path in paths:
        h.update(f"{path.name}:{file_sha256(path)}".encode())
    return h.hexdigest()


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's model.safetensors (or its shards); pickled weights are refused."""
    from safetensors.torch import load_file

    paths = weight_files(directory)
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            state |= load_file(str(path))
        except Exception as err:  # SafetensorError, OSError, or a header that is not JSON
            raise CheckpointError(f"{path}: unreadable safetensors ({str(err).splitlines()[0]})") from None
    return state
