"""Where registered models live: `models:/` URIs, the MLflow client, and the local copies of a version.

- `models:/NAME@ALIAS` and `models:/NAME/VERSION` are parsed once (`parse_model_uri`); `resolve` turns one into
  its version or one line saying which part does not exist.
- `local_model_dir` joins a version's MLflow folders (`model/`, `components/tokenizer/`) into one Hugging Face
  directory in the lmcycle cache (symlinks when the artifact store is local, else downloaded once), and every use
  re-checks the weights against the SHA-256 recorded on the version (lmcore.lifecycle.weights).
- `download_verified` fetches the MLflow model itself (what `mlflow models serve` loads), checked the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lmcore.errors import CheckpointError, LmcycleError
from lmcore.lifecycle.weights import WeightsIntegrityError, verify_weights

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

TAG = "lmcycle."
HISTORY_TAG = "lmcycle.champion_history"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class RegistryError(LmcycleError):
    """A registered model, version or alias that does not exist, or a registry that cannot be used."""


# --- addresses ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelRef:
    match = MODEL_URI.match(uri.strip())
    if not match:
        raise RegistryError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return ModelRef(match["name"], match["alias"], match["version"])


def client_for(root: str | Path = ".") -> MlflowClient:
    from mlflow import MlflowClient

    from lmcore.lifecycle.tracking import check_tracking, tracking_uri

    uri = tracking_uri(root)
    check_tracking(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve(client: MlflowClient, uri: str) -> ModelVersion:
    """The version a models:/ URI names, or one clear line saying which part does not exist."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(uri)
    try:
        client.get_registered_model(ref.name)
    except MlflowException:
        raise RegistryError(f"{uri}: no registered model named {ref.name!r}") from None
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException:
        what = f"alias {ref.alias!r}" if ref.alias else f"version {ref.version}"
        raise RegistryError(f"{uri}: registered model {ref.name!r} has no {what}") from None


def model_cache_dir() -> Path:
    base = os.environ.get("LMCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmcycle"
    )
    return Path(base) / "models"


def local_model_dir(uri: str, root: str | Path = ".") -> Path:
    """A Hugging Face directory (weights, config, tokenizer) of a registered version, in the lmcycle cache.

    MLflow keeps the model and its tokenizer in two folders (`model/`, `components/tokenizer/`); the cache joins
    them in one directory, with symlinks when the artifact store is local (nothing copied), else downloaded once.
    """
    client = client_for(root)
    version = resolve(client, uri)
    key = hashlib.sha256(f"{client.tracking_uri}|{version.name}|{version.version}".encode()).hexdigest()[:16]
    target = model_cache_dir() / f"{_safe(version.name)}-v{version.version}-{key}"
    if (target / "config.json").exists():
        return verify_weights(version, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        artifacts = _local_artifacts(client, version)
        if artifacts is None:
            import mlflow

            mlflow.set_tracking_uri(client.tracking_uri)
            artifacts = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(tmp / "download")
                )
            )
        joined = tmp / "hf"
        joined.mkdir()
        for folder in (artifacts / "components" / "tokenizer", artifacts / "model"):
            for file in sorted(folder.glob("*")) if folder.is_dir() else []:
                dst = joined / file.name
                dst.unlink(missing_ok=True)
                if file.is_relative_to(tmp):
                    os.replace(file, dst)
                else:
                    dst.symlink_to(file.resolve())
        if not (joined / "config.json").exists():
            raise RegistryError(f"{uri}: version {version.version} holds no Hugging Face model directory")
        with contextlib.suppress(FileExistsError, OSError):
            os.replace(joined, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return verify_weights(version, target)


def _local_artifacts(client: MlflowClient, version: ModelVersion) -> Path | None:
    """The model's artifact folder when the store is a local path (MLflow 3 sources are `models:/m-<id>`)."""
    import urllib.parse

    source = version.source or ""
    try:
        if source.startswith("models:/m-"):
            source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    except Exception:
        return None
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme not in {"", "file"}:
        return None
    path = Path(urllib.parse.unquote(parsed.path))
    return path if (path / "model" / "config.json").is_file() else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def resolve_model_path(model: str | Path) -> Path:
    """The local directory a `--model` argument names: a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION)
    is downloaded and verified; anything else is a directory."""
    if str(model).startswith("models:/"):
        return local_model_dir(str(model))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{model}: no such model directory")
    return path


def download_verified(client: MlflowClient, uri: str, dst: Path) -> Path:
    """Download a registered version's MLflow model (what `mlflow models serve` loads) into `dst`, only if its
    weights are the ones recorded on the version. Serving `dst` then serves exactly the bytes checked; MLflow's
    own loading (the stock transformers flavor) checks nothing."""
    import mlflow

    version = resolve(client, uri)
    dst = Path(dst)
    if dst.exists():
        raise WeightsIntegrityError(f"{dst}: already exists; name a new directory")
    tmp = dst.with_name(f".{dst.name}.download")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        mlflow.set_tracking_uri(client.tracking_uri)
        model = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(tmp)
        )
        verify_weights(version, Path(model) / "model")
        os.replace(model, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
