"""A stage's run: `stage_run` opens it (a child of the flow's run under a flow, through the spool), logs the
stage's params, inputs and outputs, and ends it with the stage's status."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.lifecycle.dvcadapter import stage_definitions
from lmcore.lifecycle.tracking.connection import (
    FLOW_RUN_ENV,
    MAX_TAG_CHARS,
    PARENT_RUN_ENV,
    SPOOL_ENV,
    STAGE_HTTP_RETRIES,
    check_tracking,
    connect,
    environment_tags,
    lineage_tags,
    params_for_keys,
    tracking_enabled,
    tracking_uri,
)
from lmcore.lifecycle.tracking.reporter import MLflowReporter, _start_system_metrics, _text, log_stage_outputs
from lmcore.lifecycle.tracking.spool import SpoolReporter
from lmcore.lifecycle.workspace import (
    original_root,
    stage_param_keys,
)
from lmcore.reporting import Reporter

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lmcore.lifecycle.config import Config
    from lmcore.lifecycle.paths import Paths


log = logging.getLogger(__name__)


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
