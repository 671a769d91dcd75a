"""The Prefect flow `lm-lifecycle`: every DVC stage as a Prefect task, then registration with a promotion gate.

Design choices:
- DVC owns the graph. The run's pre-flight (flows.preflight) reads the stage list and order from DVC itself, and
  each stage runs through DVC's API in this process (lmcore.lifecycle.dvcadapter.reproduce_stage, what `dvc repro
  --single-item NAME` calls), so dvc.lock is written exactly as `dvc repro` writes it, without paying a DVC process
  per stage. A stage DVC finds up to date is reported as a Completed state named "Skipped" ("Restored" when DVC
  checks its outputs out of its run cache). Stages run one at a time: DVC locks the repository during a repro.
- A stage's command runs in its own process group, started by the run's executor (flows.executor: forked from a
  warm interpreter that imported torch and the rest while the flow started, or a fresh process). Its output streams
  into the task log; a timeout, a cancelled or interrupted flow stops the whole group: SIGTERM (the trainers
  checkpoint on it), SIGKILL after `flow.kill_grace_s`.
- Tracking: the MLflow parent run and the summary artifacts live in flows.summary.
- One flow run per workspace at a time: the `.lmcycle/lock` file lock, held by the pre-flight for the whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.executor import TAIL_LINES, CommandRunner, Executor, FreshProcess, executor_for
from flows.notify import notify_completion, notify_failure, save_report
from flows.preflight import RunRequest, adopted_or_prepared, telemetry_off
from flows.stagehost import stage_env
from flows.summary import FLOW_NAME, ParentRun, publish
from lmcore.errors import LmcycleError


class StageFailed(LmcycleError):
    """A stage's command failed, timed out or was stopped; `tail` holds its last lines."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


# --- one stage ---------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    name: str
    state: str  # ran | skipped | restored | failed | timeout
    seconds: float
    returncode: int
    tail: str = ""
    command_failed: bool = False  # failed because its command exited non-zero (not in DVC itself)

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in {"tail", "command_failed"}}


def run_dvc_stage(
    name: str,
    root: Path,
    *,
    force: bool = False,
    timeout_s: float = 3600.0,
    grace_s: float = 10.0,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] = print,
    executor: Executor | None = None,
    pull: bool = False,
) -> StageResult:
    """`dvc repro --single-item NAME` through DVC's API in this process: DVC decides, runs the command and writes
    dvc.lock exactly as the CLI does; the command itself runs in its own process group (flows.executor)."""
    from lmcore.lifecycle.dvcadapter import reproduce_stage

    started = time.monotonic()
    runner = CommandRunner(started + timeout_s, grace_s, on_line, executor, record=(Path(root), name))
    repro = reproduce_stage(
        root, name, run_command=runner, on_log=runner.line, run_env=stage_env(env), force=force, pull=pull
    )
    if repro.error:
        runner.line(f"ERROR: {repro.error}")
    tail = "\n".join(runner.tail)
    seconds = round(time.monotonic() - started, 3)
    if repro.error:
        state = "timeout" if runner.timed_out.is_set() else "failed"
        return StageResult(name, state, seconds, runner.exit_code or 1, tail, command_failed=bool(runner.exit_code))
    if not repro.reproduced:
        return StageResult(name, "skipped", seconds, 0, tail)
    return StageResult(name, "restored" if repro.restored else "ran", seconds, 0, tail)


# --- tasks -------------------------------------------------------------------------------------------------


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-") or "stage"


@task(cache_policy=NO_CACHE)
def dvc_stage(
    name: str,
    workspace: str,
    force: bool,
    timeout_s: float,
    grace_s: float,
    env: dict[str, str],
    tracking: Any = None,
    executor: Executor | None = None,
    pull: bool = False,
) -> Any:
    """One DVC stage. A Completed state named Skipped/Restored when DVC did not run its command; with `pull`
    (a DVC remote is configured) DVC fetches missing outputs and run-cache hits instead of running it.

    With `tracking` (a `flows.summary.ParentRun`), the stage's events come back through a spool directory and are
    logged here.
    """
    import shutil
    import uuid

    from flows.remote import INGEST_STAGE, ingest_up_to_date, restore_ingest, save_ingest_run_cache
    from lmcore.lifecycle.tracking import SPOOL_ENV

    logger = get_run_logger()
    root = Path(workspace)
    started = time.monotonic()
    if not force and ingest_up_to_date(root, name):
        logger.info("%s: outputs, code and params as in dvc.lock and the sources' fingerprints unchanged", name)
        seconds = round(time.monotonic() - started, 3)
        data = StageResult(name, "skipped", seconds, 0).summary()
        return Completed(name="Skipped", message="up to date: sources unchanged", data=data)
    if not force and name == INGEST_STAGE and restore_ingest(root, pull=pull):
        logger.info("%s: outputs restored from the run cache; the sources' fingerprints unchanged", name)
        data = StageResult(name, "restored", round(time.monotonic() - started, 3), 0).summary()
        return Completed(name="Restored", message="DVC: outputs restored from the run cache", data=data)
    forwarder: Any = contextlib.nullcontext()
    spool = root / ".lmcycle" / "spool" / uuid.uuid4().hex
    if tracking is not None:
        forwarder = tracking.forwarder(spool)
        env = {**env, SPOOL_ENV: str(spool)}
    try:
        with forwarder:
            result = run_dvc_stage(
                name,
                root,
                force=force,
                timeout_s=timeout_s,
                grace_s=grace_s,
                env=env,
                on_line=logger.info,
                executor=executor,
                pull=pull,
            )
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    if result.state in {"failed", "timeout"}:
        why = f"timed out after {timeout_s:g} s (flow.stage_timeout_s)"
        if result.state == "failed":
            why = (
                f"exited with code {result.returncode}"
                if result.command_failed
                else "failed in DVC (see its last lines)"
            )
        create_markdown_artifact(
            key=f"{_artifact_key(name)}-failure",
            markdown=f"# Stage `{name}` {why}\n\nLast {TAIL_LINES} lines of output:\n\n```\n{result.tail}\n```\n",
            description=f"stage {name} {why}",
        )
        raise StageFailed(f"stage {name} {why}", result.tail)
    if result.state == "ran" and name == INGEST_STAGE:
        save_ingest_run_cache(root)  # DVC keeps none for an always-changed stage
    if result.state in {"skipped", "restored"}:
        label = "Skipped" if result.state == "skipped" else "Restored"
        message = "DVC: up to date" if result.state == "skipped" else "DVC: outputs restored from the run cache"
        return Completed(name=label, message=message, data=result.summary())
    return result.summary()


@task(cache_policy=NO_CACHE)
def register(
    workspace: str,
    parent_run_id: str | None,
    flow_run_id: str | None,
    executor: Executor | None = None,
    timeout_s: float = 3600.0,
    grace_s: float = 10.0,
) -> dict[str, Any]:
    """Register the workspace's model in MLflow and run the promotion gate (see lmcore.lifecycle.registry).

    It runs as `lmcycle register`, a command like a stage's: forked from the warm stage host when there is one
    (transformers and mlflow's transformers flavor imported already), else a fresh process, so
    `flow.stage_timeout_s` stops a registration that hangs (a server that stops answering mid-upload, say) as it
    stops a stage, which a call in this process could not be.
    """
    logger = get_run_logger()
    runner = CommandRunner(time.monotonic() + timeout_s, grace_s, logger.info, executor or FreshProcess())
    result = _register_command(runner, Path(workspace), parent_run_id, flow_run_id, timeout_s)
    logger.info("registered %s v%s (%s): %s", result["name"], result["version"], result["decision"], result["reason"])
    return result


@task(name="push", cache_policy=NO_CACHE)
def dvc_push(workspace: str) -> dict[str, Any]:
    """`dvc push --run-cache` to the workspace's default remote, so another host pulls instead of recomputing."""
    from flows.remote import push

    result = push(workspace)
    get_run_logger().info("pushed %d file(s) to DVC remote %r (with the run cache)", result["pushed"], result["remote"])
    return result


def _register_command(
    runner: CommandRunner, root: Path, parent_run_id: str | None, flow_run_id: str | None, timeout_s: float
) -> dict[str, Any]:
    import shlex
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lmcycle-register-") as tmp:
        out = Path(tmp) / "registration.json"
        argv = ["lmcycle", "register", "--workspace", str(root), "--json", str(out)]
        argv += ["--parent-run-id", parent_run_id or "", "--flow-run-id", flow_run_id or ""]
        if runner(["/bin/sh", "-c", shlex.join(argv)], str(root), {**os.environ, **stage_env()}) != 0:
            if runner.timed_out.is_set():
                raise LmcycleError(f"registration timed out after {timeout_s:g} s (flow.stage_timeout_s)")
            last = next(
                (t for t in reversed(runner.tail) if t.startswith("error:")), runner.tail[-1] if runner.tail else ""
            )
            raise LmcycleError(f"registration failed (exit code {runner.exit_code}): {last.removeprefix('error: ')}")
        return json.loads(out.read_text())


# --- the flow ----------------------------------------------------------------------------------------------


@flow(
    name=FLOW_NAME,
    log_prints=True,
    validate_parameters=True,
    on_failure=[notify_failure],
    on_crashed=[notify_failure],
    on_completion=[notify_completion],
)
def lifecycle(
    workspace: str = ".",
    until: str | None = None,
    force: list[str] | None = None,
    overrides: list[str] | None = None,
    register_model: bool = True,
    push: bool | None = None,
) -> dict[str, Any]:
    """Run the stage graph through DVC, then register the model and apply the promotion gate.

    `overrides` (section.key=value) are validated and written into params.yaml first, like `dvc exp run -S`;
    `until` stops after that stage (and its upstream); `force` reruns the named stages even if up to date;
    `push` runs `dvc push --run-cache` at the end (None: when the workspace has a default DVC remote).
    """
    from lmcore.lifecycle.tracking import tracking_enabled

    telemetry_off()
    root = Path(workspace).resolve()
    request = RunRequest(root, until, tuple(force or ()), tuple(overrides or ()), push)
    # In the workspace: DVC's run cache resolves the stages it restores against the working directory
    # (StageCache._create_stage), so a restore from elsewhere (`lmcycle run --workspace DIR`) would fail.
    with contextlib.chdir(root), adopted_or_prepared(request) as plan, executor_for(root) as executor:
        config = plan.config
        run = (
            ParentRun.start(root, config, list(request.overrides), until, list(request.force))
            if tracking_enabled()
            else None
        )
        report: dict[str, Any] = {"stages": [], "failed": "", "workspace": str(root)}
        status = "FAILED"
        try:
            _run_graph(root, config, list(plan.stages), set(request.force), run, report, executor, pull=plan.push)
            if register_model and until is None:
                report["registration"] = (
                    _register(root, run, executor)
                    if run is not None
                    else {"skipped": "tracking is off (LMCYCLE_TRACKING)"}
                )
            if plan.push:
                report["push"] = dvc_push(str(root))
            status = "FINISHED"
        except BaseException as err:
            report["failed"] = report["failed"] or f"{type(err).__name__}: {err}"
            status = "FAILED" if isinstance(err, Exception) else "KILLED"  # Ctrl-C, SIGTERM, cancellation
            raise
        finally:
            with contextlib.suppress(Exception):
                publish(root, report, run)
            save_report(root, report)  # for the notification hooks (flows.notify)
            if run is not None:
                run.end(status, report)
    return report


def _run_graph(
    root: Path,
    config: Any,
    selected: list[str],
    force: set[str],
    run: ParentRun | None,
    report: dict[str, Any],
    executor: Executor,
    pull: bool = False,
) -> None:
    """The selected stages in order; DVC decides for each whether it runs (with `pull`, whether the remote has it)."""
    from prefect.runtime import flow_run

    env = {"LMCYCLE_FLOW_RUN_ID": str(flow_run.id or "")}
    stage_task = dvc_stage.with_options(retries=config.flow.retries, retry_delay_seconds=config.flow.retry_delay_s)
    for name in selected:
        started = time.monotonic()
        report["running"] = name  # what a crash interrupted (flows.notify)
        state = stage_task.with_options(task_run_name=name)(
            name,
            str(root),
            name in force,
            config.flow.stage_timeout_s,
            config.flow.kill_grace_s,
            env,
            run,
            executor,
            pull,
            return_state=True,
        )
        seconds = round(time.monotonic() - started, 2)
        if not state.is_completed():
            report["stages"].append({"name": name, "state": state.name.lower(), "seconds": seconds})
            error = state.result(raise_on_failure=False)
            report["failed"] = str(error) if isinstance(error, LmcycleError) else f"stage {name}: {state.message}"
            report["tail"] = getattr(error, "tail", "")
            raise StageFailed(report["failed"])
        result = state.result()
        report["stages"].append({"name": name, "state": result["state"], "seconds": seconds})


def _register(root: Path, run: ParentRun, executor: Executor | None = None) -> dict[str, Any]:
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.registry.candidate import model_to_register

    paths, config = Paths.of(root), load_config(root / "params.yaml")
    if model_to_register(paths, config) is None:
        return {"skipped": "no model in this workspace yet (models/finetune/hf or models/pretrain/hf)"}
    from prefect.runtime import flow_run

    flow = config.flow
    result = register(str(root), run.run_id, str(flow_run.id or ""), executor, flow.stage_timeout_s, flow.kill_grace_s)
    run.set_tags({f"lmcycle.registered_{k}": str(v) for k, v in result.items() if k in {"name", "version", "decision"}})
    return result
