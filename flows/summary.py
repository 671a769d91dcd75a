"""What a flow run leaves outside Prefect's states: its MLflow parent run, and its summary artifacts.

Design choices:
- The parent run groups the run's stages (child runs) and is opened in a background thread while the first stages
  run (importing mlflow and opening its store takes seconds); under the flow a stage writes its events to a spool
  directory and this process logs them as a child run of the parent (lmcore.lifecycle.tracking.SpoolForwarder), so
  stage processes never import mlflow.
- The summary is published once per run, whether it succeeded or not: a markdown artifact (stages, failure, key
  metrics, registry decision, push, MLflow link) and a table artifact of the evaluation metrics.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FLOW_NAME = "lm-lifecycle"


class ParentRun:
    """The MLflow run that groups one flow run (its stages are child runs).

    It is opened in a background thread (importing mlflow and opening its store takes seconds) while the first
    stages run: a stage's events wait in its spool until the run exists, and whatever needs the run waits for it.
    The tracking store was checked (in seconds, with one clear line) by the run's pre-flight (flows.preflight), so
    nothing runs against a store that does not answer.
    """

    def __init__(self, root: Path, opened: Any):
        self.root, self._opened = root, opened
        self.ended = False

    @classmethod
    def start(cls, root: Path, config: Any, overrides: list[str], until: str | None, force: list[str]) -> ParentRun:
        from concurrent.futures import ThreadPoolExecutor

        from prefect.runtime import flow_run

        from lmcore.lifecycle.tracking import start_parent_run
        from lmcore.lifecycle.workspace import dvc_lock_hash

        tags = {
            "lmcycle.kind": "flow",
            "prefect.flow_run_id": str(flow_run.id or ""),
            "prefect.flow_run_name": str(flow_run.name or ""),
            "lmcycle.overrides": json.dumps(overrides),
            "lmcycle.until": until or "",
            "lmcycle.force": ",".join(force),
            "lmcycle.dvc_lock_hash_before": dvc_lock_hash(root),
        }
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcycle-parent-run")
        opened = pool.submit(start_parent_run, root, config, str(flow_run.name or FLOW_NAME), tags)
        pool.shutdown(wait=False)
        return cls(root, opened)

    @property
    def client(self) -> Any:
        return self._opened.result()[0]

    @property
    def run_id(self) -> str:
        return self._opened.result()[1]

    @contextlib.contextmanager
    def forwarder(self, spool: Path) -> Iterator[None]:
        """Forward a stage's spool to its child run of this run, as soon as this run exists."""
        from lmcore.lifecycle.tracking import SpoolForwarder

        spool.mkdir(parents=True, exist_ok=True)
        attached: dict[str, Any] = {}

        def attach() -> None:
            with contextlib.suppress(Exception):  # a failed start surfaces below, from the future
                client, run_id, experiment_id = self._opened.result()
                attached["forwarder"] = SpoolForwarder(spool, client, experiment_id, parent_run_id=run_id).__enter__()

        waiter = threading.Thread(target=attach, name="lmcycle-spool-attach", daemon=True)
        waiter.start()
        try:
            yield
        finally:
            waiter.join()
            if "forwarder" in attached:
                attached["forwarder"].__exit__(None, None, None)
            else:
                self._opened.result()  # raises why the run could not be opened

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from lmcore.lifecycle.tracking import MLflowReporter

        MLflowReporter(self.client, self.run_id).log_metrics(metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        from lmcore.lifecycle.tracking import MLflowReporter

        MLflowReporter(self.client, self.run_id).set_tags(tags)

    def link(self) -> str:
        from lmcore.lifecycle.tracking import run_link

        return run_link(self.client, self.run_id)

    def end(self, status: str, report: dict[str, Any]) -> None:
        if self.ended:
            return
        from lmcore.lifecycle.workspace import dvc_lock_hash

        self.ended = True
        try:
            self.log_metrics({f"stage_seconds.{s['name']}": s["seconds"] for s in report["stages"]})
            self.set_tags({"lmcycle.dvc_lock_hash": dvc_lock_hash(self.root)})
        finally:
            self.client.set_terminated(self.run_id, status)


# --- what a flow run publishes -----------------------------------------------------------------------------


def _eval_rows(root: Path) -> list[dict[str, Any]]:
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.registry.candidate import eval_metrics

    metrics, _, _ = eval_metrics(Paths.of(root))
    return [{"metric": k, "value": round(v, 6)} for k, v in sorted(metrics.items())]


def _markdown(root: Path, report: dict[str, Any], run: ParentRun | None, rows: list[dict[str, Any]]) -> str:
    from lmcore.lifecycle.workspace import dvc_lock_hash, git_commit, git_dirty

    dirty = " (dirty)" if git_dirty(root) else ""
    lines = [
        f"# {FLOW_NAME}: {'failed' if report['failed'] else 'completed'}",
        "",
        f"Workspace `{root}` at git `{git_commit(root)[:12]}`{dirty}, dvc.lock `{dvc_lock_hash(root)[:12]}`.",
        "",
        "| stage | state | seconds |",
        "|---|---|---|",
        *(f"| {s['name']} | {s['state']} | {s['seconds']:.1f} |" for s in report["stages"]),
    ]
    if report["failed"]:
        lines += ["", f"**Failed**: {report['failed']} (see the stage's failure artifact for its last lines)"]
    key = [r for r in rows if r["metric"].endswith(("bpb", "loss", "accuracy", "exact_match", "f1"))][:12]
    if key:
        lines += ["", "## Key metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {r['metric']} | {r['value']:.6g} |" for r in key]
    reg = report.get("registration")
    if reg:
        lines += ["", "## Registry", ""]
        if "skipped" in reg:
            lines.append(f"Not registered: {reg['skipped']}.")
        else:
            champion = (
                f"v{reg['champion_version']} = {reg['champion_value']}" if reg.get("champion_version") else "none"
            )
            lines += [
                f"- version: `{reg['uri']}`{' (reused: same dvc.lock)' if reg.get('reused') else ''}",
                f"- gate: **{reg['decision']}**: {reg['reason']}",
                f"- {reg['metric']}: challenger {reg['challenger_value']}, champion {champion}",
            ]
    if report.get("push"):
        lines += ["", f"DVC: pushed {report['push']['pushed']} file(s) to remote `{report['push']['remote']}`."]
    if run is not None:
        lines += ["", "## MLflow", "", f"- parent run `{run.run_id}`", f"- {run.link()}"]
    return "\n".join(lines) + "\n"


def publish(root: Path, report: dict[str, Any], run: ParentRun | None) -> None:
    """The flow run's markdown summary and the table of eval metrics (Prefect artifacts), once per run."""
    if report.get("published"):
        return
    report["published"] = True
    rows = _eval_rows(root)
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(
        key="lifecycle-summary", markdown=_markdown(root, report, run, rows), description=FLOW_NAME
    )
    if rows:
        create_table_artifact(key="eval-metrics", table=rows, description="evaluation metrics of this run")
        if run is not None:
            run.log_metrics({r["metric"]: r["value"] for r in rows})
