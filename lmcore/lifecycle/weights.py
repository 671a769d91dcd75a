"""Registered weights, checked against the SHA-256 recorded on their version before anything uses them.

Registration records on the version `lmcycle.weights_sha256` (one digest over every `*.safetensors` file, name and
content: what `reproduce` compares) and one `lmcycle.weights_sha256.<file>` per weight file. Whatever loads a
registered version's weights (`lmcycle generate --model models:/…`, the gate re-scoring the champion, a directory
downloaded for serving) hashes the files in hand first: a changed, missing or extra weight file fails with one line
naming the version and the file, so tampered weights are never decoded, scored or served. A version that records
no digest cannot be verified and is refused the same way.

Hashing costs one read of the weights per use (about a second per GB); nothing is cached, because the cache is
exactly what could have been changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from lmcore.errors import LmcycleError
from lmcore.lifecycle.workspace import file_sha256

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

DIGEST_TAG = "lmcycle.weights_sha256"
FILE_TAG = DIGEST_TAG + "."  # + the file's name


class WeightsIntegrityError(LmcycleError):
    """A registered version's weight files differ from the SHA-256 recorded on the version, or it records none."""


def safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def weights_digest(model_dir: Path) -> str:
    """sha256 over the model's weight files (each file's name and sha256, in name order)."""
    return _combined({file.name: file_sha256(file) or "" for file in safetensors_files(model_dir)})


def _combined(hashes: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(name.encode())
        digest.update(hashes[name].encode())
    return digest.hexdigest()


def weights_tags(model_dir: Path) -> dict[str, str]:
    """What registration records: the overall digest and each weight file's own."""
    files = {FILE_TAG + file.name: file_sha256(file) or "" for file in safetensors_files(model_dir)}
    return {DIGEST_TAG: weights_digest(model_dir), **files}


def verify_weights(version: ModelVersion, model_dir: Path) -> Path:
    """`model_dir` if its weight files are the ones recorded on `version`, else WeightsIntegrityError."""
    uri = f"models:/{version.name}/{version.version}"
    tags = dict(version.tags or {})
    recorded = tags.get(DIGEST_TAG)
    if not recorded:
        raise WeightsIntegrityError(
            f"{uri}: no SHA-256 recorded on the version (tag {DIGEST_TAG}); its weights cannot be verified"
        )
    on_disk = {file.name: file for file in safetensors_files(model_dir)}
    hashes = {name: file_sha256(path) or "" for name, path in on_disk.items()}  # each file read once
    per_file = {key.removeprefix(FILE_TAG): value for key, value in tags.items() if key.startswith(FILE_TAG)}
    for name, expected in sorted(per_file.items()):
        if name not in on_disk:
            raise WeightsIntegrityError(f"{uri}: {name} is missing from {model_dir} (the version records its SHA-256)")
        if hashes[name] != expected:
            raise _mismatch(uri, name, expected, hashes[name], on_disk[name])
    extra = sorted(set(on_disk) - set(per_file)) if per_file else []
    if extra:
        raise WeightsIntegrityError(f"{uri}: {extra[0]} is not among the weight files recorded on the version")
    found = _combined(hashes)
    if found != recorded:  # versions registered before per-file digests: the one digest over all files
        names = ", ".join(on_disk) or f"no *.safetensors in {model_dir}"
        raise _mismatch(uri, names, recorded, found, Path(model_dir))
    return Path(model_dir)


def _mismatch(uri: str, name: str, expected: str, found: str, where: Path) -> WeightsIntegrityError:
    return WeightsIntegrityError(
        f"{uri}: {name} does not match the SHA-256 recorded on the version "
        f"(recorded {expected[:16]}…, found {found[:16]}… in {where})"
    )
