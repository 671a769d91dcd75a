"""The spool: a stage under the flow appends its events to a file, and the flow process, which has mlflow loaded
already, forwards them to the stage's child run as they come (`SpoolForwarder`)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.lifecycle.dvcadapter import stage_definitions
from lmcore.lifecycle.tracking.connection import MAX_TAG_CHARS, flatten, numeric
from lmcore.lifecycle.tracking.reporter import (
    MLflowReporter,
    _log_metrics_at,
    _start_system_metrics,
    _text,
    _warn,
    log_stage_outputs,
)
from lmcore.reporting import Reporter

if TYPE_CHECKING:
    from mlflow import MlflowClient


log = logging.getLogger(__name__)


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
