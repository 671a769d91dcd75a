"""Where MLflow tracking goes and what it records: the tracking URI, a fast reachability and credential check,
the connection, params, lineage and environment tags, and the flow's parent run."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import LmcycleError
from lmcore.lifecycle.workspace import (
    environment,
    git_commit,
    git_dirty,
    original_root,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lmcore.lifecycle.config import Config


TRACKING_ENV = "LMCYCLE_TRACKING"
PARENT_RUN_ENV = "LMCYCLE_PARENT_RUN_ID"
FLOW_RUN_ENV = "LMCYCLE_FLOW_RUN_ID"
SPOOL_ENV = "LMCYCLE_SPOOL_DIR"
CHECK_TIMEOUT_S = 3.0
SYSTEM_METRICS_INTERVAL_S = 5.0
MAX_PARAM_CHARS = 6000
MAX_TAG_CHARS = 5000
# MLflow 3's UI opens an experiment without this tag in its GenAI view (an empty traces page); with it, on the
# training runs table.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
RETRY_AFTER_OUTAGE_S = 30.0  # while the server does not answer, events are dropped and one call tried this often
# A stage's calls give up after ~3 s (MLflow's default retries take ~2 min a call, stalling training that long);
# the user's own settings win.
STAGE_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

log = logging.getLogger(__name__)
# Stage outputs logged as run artifacts: everything small except model weights (those are logged once, by the
# registry) and data (DVC's cache holds it).
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npy", ".tokens"}
MAX_ARTIFACT_BYTES = 20 * 1024 * 1024


class TrackingError(LmcycleError):
    """The tracking server cannot be reached or used."""


# --- where to log ------------------------------------------------------------------------------------------


def tracking_enabled() -> bool:
    return os.environ.get(TRACKING_ENV, "on").strip().lower() not in {"0", "off", "false", "no"}


def tracking_uri(root: str | Path = ".") -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{original_root(root) / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of `sqlite:////abs/path.db` (absolute) or `sqlite:///rel.db` (relative to the CWD)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?")[0]
    return Path(rest) if rest.startswith("/") else Path(rest).resolve()


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite database; a server's own default otherwise."""
    db = _sqlite_path(uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db else None


def check_tracking(uri: str, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when the tracking store does not answer (MLflow's retries take minutes)."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in {"http", "https"}:
        _check_http(uri, timeout_s)
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is not None:
            folder = db.parent
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            if not os.access(folder, os.W_OK):
                raise TrackingError(f"MLFLOW_TRACKING_URI {uri}: {folder} is not writable")
    elif scheme.startswith(("postgresql", "mysql", "mssql")):
        parsed = urllib.parse.urlparse(uri)
        default_port = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
        port = parsed.port or next((p for k, p in default_port.items() if scheme.startswith(k)), 0)
        try:
            socket.create_connection((parsed.hostname or "localhost", port), timeout=timeout_s).close()
        except OSError as err:
            raise TrackingError(f"MLFLOW_TRACKING_URI {_redact(uri)}: database does not answer ({err})") from None


def _redact(uri: str) -> str:
    parsed = urllib.parse.urlparse(uri)
    if parsed.password:
        return uri.replace(f":{parsed.password}@", ":***@")
    return uri


def _check_http(uri: str, timeout_s: float) -> None:
    """/health (exempt from auth) tells whether a server answers; one search with the credentials MLflow's client
    would send (MLFLOW_TRACKING_TOKEN as a bearer token, else MLFLOW_TRACKING_USERNAME/PASSWORD as basic auth)
    tells whether it accepts them."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout_s):  # noqa: S310 (the user's own server)
            pass
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise TrackingError(f"MLFLOW_TRACKING_URI {_redact(uri)}: server error {err.code} on /health") from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLFLOW_TRACKING_URI {_redact(uri)}: no answer within {timeout_s:g} s ({reason}); "
            "start the server or set LMCYCLE_TRACKING=off"
        ) from None
    request = urllib.request.Request(base + "/api/2.0/mlflow/experiments/search?max_results=1", headers=_auth_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise TrackingError(f"MLFLOW_TRACKING_URI {_redact(uri)}: {_refused(err.code)}") from None
        if err.code >= 500:
            raise TrackingError(f"MLFLOW_TRACKING_URI {_redact(uri)}: server error {err.code} on its API") from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise TrackingError(f"MLFLOW_TRACKING_URI {_redact(uri)}: {getattr(err, 'reason', err)}") from None


def _auth_header() -> dict[str, str]:
    import base64

    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _refused(code: int) -> str:
    variables = (
        "MLFLOW_TRACKING_TOKEN"
        if os.environ.get("MLFLOW_TRACKING_TOKEN")
        else "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
    )
    if code == 403:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        who = f"the user {user!r}" if user and "USERNAME" in variables else "this client"
        return f"{who} has no permission on the server (403): ask its admin for access, or check {variables}"
    if not _auth_header():
        return "the server requires credentials (401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    return f"the server refused the credentials (401): check {variables}"


def connect(root: str | Path, experiment: str) -> tuple[MlflowClient, str]:
    """A client on the workspace's tracking store and the experiment id (created on first use)."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older lmcycle or by hand
            with contextlib.suppress(Exception):
                client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return client, found.experiment_id
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    try:
        return client, client.create_experiment(experiment, artifact_location=artifact_location(uri), tags=tags)
    except Exception:  # another process created it in between
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return client, found.experiment_id


# --- what to log -------------------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def numeric(flat: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def params_for_keys(config: Config, keys: list[str]) -> dict[str, Any]:
    """The resolved values of params.yaml keys (sections or dotted keys), flattened."""
    resolved = config.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out.update(flatten(node, key) if isinstance(node, dict) else {key: node})
    return out


def lineage_tags(root: Path) -> dict[str, str]:
    return {
        "lmcycle.workspace": str(original_root(root)),
        "lmcycle.git_commit": git_commit(root),
        "lmcycle.git_dirty": str(git_dirty(root)).lower(),
    }


def environment_tags(root: Path) -> dict[str, str]:
    return {f"env.{k}": v for k, v in environment(root).items()}
