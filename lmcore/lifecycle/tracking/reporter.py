"""The MLflow reporter a stage logs through, and the artifacts and datasets of a stage's run.

Every call survives a tracking outage: while the server does not answer, events are dropped (counted and tagged
once it answers again) and training goes on; a refused call still raises."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.lifecycle.dvcadapter import lock_outs, output_hash
from lmcore.lifecycle.tracking.connection import (
    MAX_ARTIFACT_BYTES,
    MAX_PARAM_CHARS,
    MAX_TAG_CHARS,
    RETRY_AFTER_OUTAGE_S,
    SYSTEM_METRICS_INTERVAL_S,
    WEIGHT_SUFFIXES,
    flatten,
    numeric,
)
from lmcore.lifecycle.workspace import (
    entry_paths,
)
from lmcore.reporting import Reporter

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lmcore.lifecycle.paths import Paths


log = logging.getLogger(__name__)


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
