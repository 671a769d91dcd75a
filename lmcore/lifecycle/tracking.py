"""MLflow tracking for stages and flows: where to log, a fast reachability check, runs, datasets and artifacts.

Design choices:
- The tracking URI is `MLFLOW_TRACKING_URI` when set, else `sqlite:///<workspace>/mlflow.db` with artifacts in
  `<workspace>/mlartifacts` (with any sqlite store, artifacts go beside the database). The workspace is the
  *original* one, so stages that DVC runs in temporary experiment copies still log to the workspace's MLflow.
- Every stage process logs its own run (so plain `dvc repro` is tracked too); with LMCYCLE_PARENT_RUN_ID set it
  becomes that run's child. Under a flow, the flow's forwarder makes it a child of the flow's run.
  LMCYCLE_TRACKING=off turns tracking off for a process.
- mlflow is imported only inside functions: `import mlflow` plus its sqlite store cost ~4 s per process. Under the
  flow a stage does not pay it at all: it appends its events to a spool file (LMCYCLE_SPOOL_DIR) and the flow
  process, which has mlflow loaded already, forwards them to the child run live (`SpoolForwarder`).
- Runs are driven through `MlflowClient` with explicit run ids (no global active run), so a reporter can be used
  from any thread and the training loop never sees MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import LmcycleError
from lmcore.lifecycle.dvcadapter import lock_outs, output_hash, stage_definitions
from lmcore.lifecycle.workspace import (
    entry_paths,
    environment,
    git_commit,
    git_dirty,
    original_root,
    stage_param_keys,
)
from lmcore.reporting import Reporter

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lmcore.lifecycle.config import Config
    from lmcore.lifecycle.paths import Paths

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


# --- the reporter ------------------------------------------------------------------------------------------


def _is_outage(err: BaseException) -> bool:
    """Whether a tracking call failed because the server did not answer (refused, unreachable, timed out, 5xx)."""
    if isinstance(err, OSError | TimeoutError):
        return True
    with contextlib.suppress(ImportError):
        import requests

        if isinstance(err, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
    from mlflow.exceptions import RestException

    if isinstance(err, RestException) and err.get_http_status_code() >= 500:  # the server answered, but broken
        return True
    return str(err).startswith("API request to")  # MLflow's REST client: no answer, or a non-JSON error page


def _survives_outage(method: Any) -> Any:
    """A reporter call that drops its events, with one warning, while the tracking server does not answer."""

    @functools.wraps(method)
    def call(self: MLflowReporter, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if self._down_since is not None and now - self._down_since < RETRY_AFTER_OUTAGE_S:
            self.dropped += 1
            return
        try:
            method(self, *args, **kwargs)
        except Exception as err:
            if not _is_outage(err):  # a refused call (a bad value, a locked sqlite store) raises as ever
                raise
            if self._down_since is None:
                reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                log.warning("tracking: MLflow did not answer (%s); the work goes on, its events are dropped", reason)
            self._down_since = now
            self.dropped += 1
            return
        if self._down_since is not None:
            log.warning("tracking: MLflow answers again (%d events dropped meanwhile)", self.dropped)
            self._down_since = None

    return call


class MLflowReporter(Reporter):
    """lmcore's Reporter that writes to one MLflow run.

    A tracking outage never stops the work it tracks: a call that fails (after MLflow's own retries) drops its
    events with one warning, later events are dropped too while the server stays away (one call is tried every
    `RETRY_AFTER_OUTAGE_S`), and logging resumes when it answers. `dropped` counts what was lost; the stage's run
    is tagged `lmcycle.tracking_lost` at its end."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self.logged: set[Path] = set()  # files already logged, so the generic pass after a stage skips them
        self.dropped = 0
        self._down_since: float | None = None

    @_survives_outage
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        batch = [Param(k, _text(v, MAX_PARAM_CHARS)) for k, v in flat.items()]
        for i in range(0, len(batch), 100):
            try:
                self.client.log_batch(self.run_id, params=batch[i : i + 100])
            except Exception:  # a param logged before with another value: keep the first, log the rest
                for param in batch[i : i + 100]:
                    with contextlib.suppress(Exception):
                        self.client.log_param(self.run_id, param.key, param.value)

    @_survives_outage
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in numeric(flatten(metrics)).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    @_survives_outage
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
            self.logged.update(p for p in path.rglob("*") if p.is_file())
        elif path.is_file() and path not in self.logged:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            self.logged.add(path)

    @_survives_outage
    def log_input(self, name: str, digest: str, source: str, context: str = "training") -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(
            name=name, digest=str(digest)[:36], source_type="local", source=json.dumps({"uri": str(source)})
        )
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags)])

    @_survives_outage
    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, _text(v, MAX_TAG_CHARS)) for k, v in tags.items()]
        if batch:
            self.client.log_batch(self.run_id, tags=batch)


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- a stage's run -----------------------------------------------------------------------------------------


def _status_for(err: BaseException) -> str:
    return "KILLED" if isinstance(err, KeyboardInterrupt | SystemExit) else "FAILED"


def _stage_start(stage: str, config: Config, paths: Paths) -> dict[str, Any]:
    """What a stage's run starts with: its tags and the params.yaml keys dvc.yaml declares for it."""
    root = original_root(paths.root)
    definition = stage_definitions(paths.root).get(stage, {})
    tags = {
        "lmcycle.stage": stage,
        **lineage_tags(paths.root),
        **environment_tags(root),
    }
    if parent := os.environ.get(PARENT_RUN_ENV):
        tags["mlflow.parentRunId"] = parent
    if flow_run := os.environ.get(FLOW_RUN_ENV):
        tags["lmcycle.flow_run_id"] = flow_run
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["lmcycle.dvc_experiment"] = exp_name
    params = params_for_keys(config, stage_param_keys(definition) or [stage])
    return {"stage": stage, "root": str(paths.root), "tags": tags, "params": params}


@contextlib.contextmanager
def stage_run(stage: str, config: Config, paths: Paths) -> Iterator[Reporter]:
    """Track one stage as an MLflow run: a child of the flow's run when LMCYCLE_PARENT_RUN_ID is set.

    After the stage succeeds, the run gets the stage's report as metrics, its small outputs, reports and plots
    as artifacts, and its data dependencies as datasets (digest = DVC's hash). Under the flow (LMCYCLE_SPOOL_DIR
    set) the stage never imports mlflow: it appends its events to a spool file that the flow process, which has
    mlflow loaded already, forwards to the run as they come. With tracking off, nothing is logged at all.
    """
    if not tracking_enabled() or int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone logs
        yield Reporter()
        return
    spool = os.environ.get(SPOOL_ENV)
    if spool:
        with _spooled_run(stage, config, paths, Path(spool)) as rep:
            yield rep
        return
    root = original_root(paths.root)
    for key, value in STAGE_HTTP_RETRIES.items():
        os.environ.setdefault(key, value)
    check_tracking(tracking_uri(root))
    client, experiment_id = connect(root, config.project.experiment)
    start = _stage_start(stage, config, paths)
    run = client.create_run(experiment_id, run_name=stage, tags=start["tags"])
    run_id = run.info.run_id
    rep = MLflowReporter(client, run_id)
    rep.log_params(start["params"])
    monitor = _start_system_metrics(run_id, tracking_uri(root))
    status = "FINISHED"
    try:
        yield rep
        log_stage_outputs(rep, stage, paths, stage_definitions(paths.root).get(stage, {}))
    except BaseException as err:
        status = _status_for(err)
        with contextlib.suppress(Exception):
            rep.set_tags({"lmcycle.error": _text(f"{type(err).__name__}: {err}", MAX_TAG_CHARS)})
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        _end_stage_run(rep, root, status)


def _end_stage_run(rep: MLflowReporter, root: Path, status: str) -> None:
    """Close a stage's run; after an outage, mark it as having lost events. A server still away is one warning."""
    tags = environment_tags(root)  # torch details, now that the stage has imported it
    if rep.dropped:
        tags |= {"lmcycle.tracking_lost": "true", "lmcycle.tracking_dropped_events": str(rep.dropped)}
    rep._down_since = None  # one more try, whatever the outage timer says
    rep.set_tags(tags)
    try:
        rep.client.set_terminated(rep.run_id, status)
    except Exception as err:  # noqa: BLE001
        log.warning("tracking: could not close MLflow run %s (%s)", rep.run_id, str(err).splitlines()[0][:200])


# --- the spool: a stage under the flow writes events, the flow process logs them ---------------------------


class SpoolReporter(Reporter):
    """Appends reporter calls as JSON lines (flushed each time) for the flow process to forward to MLflow."""

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("a", encoding="utf-8")

    def write(self, op: str, **data: Any) -> None:
        self.file.write(json.dumps({"op": op, "ts": int(time.time() * 1000), **data}, default=str) + "\n")
        self.file.flush()

    def log_params(self, params: dict[str, Any]) -> None:
        self.write("params", data=params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.write("metrics", data=numeric(flatten(metrics)), step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.write("artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_input(self, name: str, digest: str, source: str, context: str = "training") -> None:
        self.write("input", name=name, digest=digest, source=source, context=context)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.write("tags", data=tags)

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def _spooled_run(stage: str, config: Config, paths: Paths, spool: Path) -> Iterator[Reporter]:
    spool.mkdir(parents=True, exist_ok=True)
    rep = SpoolReporter(spool / f"{stage}.{os.getpid()}.jsonl")
    rep.write("start", **_stage_start(stage, config, paths))
    status, error = "FINISHED", ""
    try:
        yield rep
    except BaseException as err:
        status, error = _status_for(err), f"{type(err).__name__}: {err}"
        raise
    finally:
        rep.write("end", status=status, error=error, env=environment_tags(original_root(paths.root)))
        rep.close()


class SpoolForwarder:
    """Runs in the flow process: turns spool files into MLflow child runs, live (polled) and at the end.

    A stage that DVC skips never starts, writes no spool file and gets no run. System metrics of a stage's run
    are sampled here (psutil reads the whole machine, so the flow process sees what the stage uses).
    """

    def __init__(
        self,
        spool: Path,
        client: MlflowClient,
        experiment_id: str,
        interval_s: float = 1.0,
        parent_run_id: str | None = None,
    ):
        self.spool, self.client, self.experiment_id, self.interval_s = spool, client, experiment_id, interval_s
        self.parent_run_id = parent_run_id
        self.files: dict[Path, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lmcycle-spool", daemon=True)

    def __enter__(self) -> SpoolForwarder:
        self.spool.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        try:  # tracking is best effort here: a stage that succeeded is not failed by its bookkeeping
            self.poll(final=True)
        except Exception as err:
            _warn(f"events of {self.spool} not all forwarded to MLflow: {type(err).__name__}: {err}")
        for state in self.files.values():
            if state.get("run_id") and not state.get("ended"):  # the process died without its end record
                self._end(state, {"status": "KILLED", "error": "stage process ended without reporting"})

    @property
    def run_ids(self) -> list[str]:
        return [s["run_id"] for s in self.files.values() if s.get("run_id")]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):
                self.poll()

    def poll(self, final: bool = False) -> None:
        """Forward the complete lines written since the last poll. A line that is not an event is skipped with a
        warning; an event MLflow refuses is retried at the next poll (skipped with a warning at the final one).
        The offset only moves past a line once it is dealt with."""
        with self._lock:
            for path in sorted(self.spool.glob("*.jsonl")):
                state = self.files.setdefault(path, {"offset": 0})
                with path.open("rb") as f:
                    f.seek(state["offset"])
                    data = f.read()
                for line in data[: data.rfind(b"\n") + 1].splitlines(keepends=True):
                    self._forward_line(path, state, line, final)
                    state["offset"] += len(line)

    def _forward_line(self, path: Path, state: dict[str, Any], line: bytes, final: bool) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
            if not isinstance(event, dict) or "op" not in event:
                raise ValueError("not an event")
        except ValueError as err:
            _warn(f"{path}: skipped a malformed line at byte {state['offset']} ({err})")
            return
        try:
            self._apply(state, event)
        except Exception as err:
            if not final:
                raise  # the offset stays at this line: the next poll retries it
            _warn(f"{path}: event {event['op']!r} not forwarded: {type(err).__name__}: {err}")

    def _apply(self, state: dict[str, Any], event: dict[str, Any]) -> None:
        op = event["op"]
        if op == "start":
            if not state.get("run_id"):  # else a retried start: its run exists already
                tags = event["tags"]
                if self.parent_run_id:
                    tags = {**tags, "mlflow.parentRunId": self.parent_run_id}
                run = self.client.create_run(self.experiment_id, run_name=event["stage"], tags=tags)
                state.update(run_id=run.info.run_id, stage=event["stage"], root=event["root"])
                state["rep"] = MLflowReporter(self.client, run.info.run_id)
            state["rep"].log_params(event["params"])
            if state.get("monitor") is None:
                state["monitor"] = _start_system_metrics(state["run_id"], self.client.tracking_uri)
            return
        rep = state.get("rep")
        if rep is None:
            return
        if op == "params":
            rep.log_params(event["data"])
        elif op == "metrics":
            _log_metrics_at(rep, event["data"], event.get("step"), event["ts"])
        elif op == "artifact":
            with contextlib.suppress(OSError):
                rep.log_artifact(event["path"], event.get("artifact_path"))
        elif op == "input":
            rep.log_input(event["name"], event["digest"], event["source"], event.get("context", "training"))
        elif op == "tags":
            rep.set_tags(event["data"])
        elif op == "end":
            self._end(state, event)

    def _end(self, state: dict[str, Any], event: dict[str, Any]) -> None:
        from lmcore.lifecycle.paths import Paths

        rep: MLflowReporter = state["rep"]
        if (monitor := state.pop("monitor", None)) is not None:
            monitor.finish()
        status = event.get("status", "FAILED")
        try:
            if status == "FINISHED":
                root = Path(state["root"])
                log_stage_outputs(rep, state["stage"], Paths.of(root), stage_definitions(root).get(state["stage"], {}))
            if event.get("error"):
                rep.set_tags({"lmcycle.error": _text(event["error"], MAX_TAG_CHARS)})
            if event.get("env"):
                rep.set_tags(event["env"])
        finally:
            state["ended"] = True
            self.client.set_terminated(state["run_id"], status)


def _warn(message: str) -> None:
    print(f"lmcycle: warning: {message}", file=sys.stderr)


def _log_metrics_at(rep: MLflowReporter, metrics: dict[str, float], step: int | None, ts: int) -> None:
    from mlflow.entities import Metric

    batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        rep.client.log_batch(rep.run_id, metrics=batch[i : i + 1000])


def _start_system_metrics(run_id: str, uri: str) -> Any:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:  # psutil missing or an exotic platform: the run is still useful without them
        return None


def log_stage_outputs(rep: Reporter, stage: str, paths: Paths, definition: dict[str, Any]) -> None:
    """What every stage leaves in its run, read from dvc.yaml: metrics, small outputs, plots, datasets."""
    root = paths.root
    for metrics_file in entry_paths(definition.get("metrics")):
        path = root / metrics_file
        if path.suffix == ".json" and path.is_file():
            rep.log_metrics(numeric(flatten(json.loads(path.read_text()))))
        rep.log_artifact(path, "reports")
    for plot in entry_paths(definition.get("plots")):
        rep.log_artifact(root / plot, "plots")
    plots_dir = paths.plots(stage)
    if plots_dir.is_dir():
        for png in sorted(plots_dir.rglob("*.png")):
            rep.log_artifact(png, "plots")
        for table in sorted(plots_dir.rglob("*")):
            if table.is_file() and table.suffix in {".csv", ".tsv", ".json", ".jsonl", ".md"}:
                rep.log_artifact(table, f"reports/{stage}")
    for out in entry_paths(definition.get("outs")):
        _log_small_files(rep, root, root / out)
    log_stage_inputs(rep, root, definition)


def _log_small_files(rep: Reporter, root: Path, path: Path) -> None:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    else:
        return
    for file in files:
        if file.suffix in WEIGHT_SUFFIXES or file.stat().st_size > MAX_ARTIFACT_BYTES:
            continue
        if file.relative_to(root).parts[0] == "data":
            continue
        rep.log_artifact(file, str(file.parent.relative_to(root)))


def log_stage_inputs(rep: Reporter, root: Path, definition: dict[str, Any]) -> None:
    """Datasets = the stage's dependencies that other stages produced, with DVC's hash from dvc.lock."""
    produced = lock_outs(root)
    for dep in entry_paths(definition.get("deps")):
        if not any(dep == p or dep.startswith(p + "/") for p in produced):
            continue
        if dep.split("/")[0] != "data":
            continue
        digest = output_hash(root, dep)
        if digest:
            rep.log_input(name=dep, digest=digest, source=str(root / dep))


# --- the flow's parent run ---------------------------------------------------------------------------------


def start_parent_run(root: Path, config: Config, name: str, tags: dict[str, str]) -> tuple[MlflowClient, str, str]:
    """The run that groups one flow run's stage runs: (client, run id, experiment id)."""
    client, experiment_id = connect(root, config.project.experiment)
    all_tags = {**lineage_tags(root), **environment_tags(root), **tags}
    clipped = {k: _text(v, MAX_TAG_CHARS) for k, v in all_tags.items()}
    run = client.create_run(experiment_id, run_name=name, tags=clipped)
    MLflowReporter(client, run.info.run_id).log_params(config.model_dump(mode="json"))
    return client, run.info.run_id, experiment_id


def run_link(client: MlflowClient, run_id: str) -> str:
    """A link to the run in the MLflow UI when the store is a server, else the `mlflow ui` command to open it."""
    uri = client.tracking_uri
    run = client.get_run(run_id)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri}  (experiment {run.info.experiment_id}, run {run_id})"
