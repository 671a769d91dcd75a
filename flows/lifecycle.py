"""The Prefect flow `lm-lifecycle`: every DVC stage as a Prefect task, then registration with a promotion gate.

Design choices:
- DVC owns the graph. The flow reads the stage list and order from DVC itself (`Repo.index.graph`) and runs
  each stage as `dvc repro --single-item NAME`, so dvc.lock is written exactly as `dvc repro` writes it. A stage
  DVC finds up to date (`dvc status`, asked in this process: ~0.2 s instead of a ~1.5 s `dvc repro` that skips)
  is reported as a Completed state named "Skipped" ("Restored" when DVC checks outputs out of its run cache).
  Stages run one at a time: DVC locks the repository during a repro anyway.
- A stage runs in its own process group. Its output streams into the task log; a timeout, a cancelled or
  interrupted flow stops the whole group: SIGTERM to the stage command first (the trainers checkpoint on it, and
  DVC then exits cleanly and frees its lock), then to the group, SIGKILL after `flow.kill_grace_s`. DVC does not
  forward signals to its stage command, hence the group.
- Tracking: the flow opens the MLflow parent run and hands its id to the stage processes (LMCYCLE_PARENT_RUN_ID);
  each `lmcycle stage` logs its own child run (plain `dvc repro` is tracked the same way). Under the flow a stage
  writes its events to a spool directory and this process logs them (lmcore.tracking.SpoolForwarder), so stage
  processes never import mlflow.
- One flow run per workspace at a time: the `.lmcycle/lock` file lock (see lmcore.workspace).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from lmcore.errors import LmcycleError

FLOW_NAME = "lm-lifecycle"
TAIL_LINES = 60
_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
_RESTORED = re.compile(r"Stage '([^']+)' is cached - skipping run")
_COMMAND_EXIT = re.compile(r"failed to run: .*, exited with (-?\d+)")


class StageFailed(LmcycleError):
    """A stage's command failed, timed out or was stopped."""


# --- the graph ---------------------------------------------------------------------------------------------


def stage_graph(root: str | Path) -> tuple[list[str], dict[str, set[str]]]:
    """DVC's pipeline stages in run order (upstream first, dvc.yaml order between independent stages) and, for
    each, the stages it depends on directly or not. `.dvc` files (data added with `dvc add`) are not stages."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        stages = [s for s in graph.nodes if getattr(s, "cmd", None)]
        position = {s: i for i, s in enumerate(repo.index.stages)}
        sub = graph.subgraph(stages)
        order = list(nx.lexicographical_topological_sort(sub.reverse(), key=lambda s: f"{position.get(s, 0):08d}"))
        upstream = {_address(s, root): {_address(d, root) for d in nx.descendants(sub, s)} for s in stages}
    return [_address(s, root) for s in order], upstream


def _address(stage: Any, root: str | Path) -> str:
    """How `dvc repro` run in `root` names a stage: NAME for the root dvc.yaml, else path/dvc.yaml:NAME."""
    dvcfile = Path(stage.dvcfile.path).resolve()
    if dvcfile == (Path(root).resolve() / "dvc.yaml"):
        return stage.name
    return f"{dvcfile.relative_to(Path(root).resolve()).as_posix()}:{stage.name}"


def up_to_date(root: str | Path, name: str) -> bool:
    """`dvc status NAME` in this process: a quarter of a second, against ~1.5 s for a `dvc repro` that skips."""
    from dvc.repo import Repo

    path, _, stage = name.rpartition(":")
    target = f"{Path(root).resolve() / (path or 'dvc.yaml')}:{stage}"  # absolute: our cwd may be elsewhere
    with Repo(str(root)) as repo:
        return not repo.status(targets=[target])


def select_stages(order: list[str], upstream: dict[str, set[str]], until: str | None) -> list[str]:
    if until is None:
        return list(order)
    if until not in upstream:
        raise LmcycleError(f"--until: unknown stage {until!r}; stages in dvc.yaml: {', '.join(order)}")
    wanted = upstream[until] | {until}
    return [name for name in order if name in wanted]


# --- one stage in its own process group --------------------------------------------------------------------


@dataclass
class StageResult:
    name: str
    state: str  # ran | skipped | restored | failed | timeout
    seconds: float
    returncode: int
    tail: str = ""

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "tail"}


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return alive


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop DVC and everything it started: SIGTERM to the stage commands, then the group, SIGKILL after grace."""
    import psutil

    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    deadline = time.monotonic() + grace_s
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.send_signal(signal.SIGTERM)
    psutil.wait_procs(children, timeout=max(0.0, grace_s / 2))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    while group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.1)
    if group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The stage subprocess's environment: ours, this interpreter's bin/ first on PATH (DVC runs `lmcycle stage`
    by name), unbuffered output (so it streams), plus `extra`."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_dvc_stage(
    name: str,
    root: Path,
    *,
    force: bool = False,
    timeout_s: float = 3600.0,
    grace_s: float = 10.0,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] = print,
) -> StageResult:
    """`dvc repro --single-item NAME` in its own process group, streaming its output line by line."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", name]
    if force:
        cmd.append("--force")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    seen = {"ran": False, "skipped": False, "restored": False}
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=root,
        env=stage_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        text=True,
        errors="replace",
        bufsize=1,
    )
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        stop_group(proc, grace_s)

    timer = threading.Timer(timeout_s, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in raw.rstrip("\n").split("\r"):
                if not line.strip():
                    continue
                tail.append(line)
                on_line(line)
                seen["ran"] |= bool(_RAN.search(line))
                seen["skipped"] |= bool(_SKIPPED.search(line))
                seen["restored"] |= bool(_RESTORED.search(line))
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None or group_alive(proc.pid):
            stop_group(proc, grace_s)
    if timed_out.is_set():
        state = "timeout"
    elif code != 0:
        state = "failed"
    elif seen["restored"] and not seen["ran"]:
        state = "restored"
    elif seen["skipped"] and not seen["ran"]:
        state = "skipped"
    else:
        state = "ran"
    return StageResult(name, state, round(time.monotonic() - started, 3), proc.returncode or 0, "\n".join(tail))


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
    experiment: str | None = None,
) -> Any:
    """One DVC stage. A Completed state named Skipped/Restored when DVC did not run its command.

    With a parent MLflow run, the stage's events come back through a spool directory and are logged here.
    """
    import shutil
    import uuid

    from lmcore.tracking import SPOOL_ENV, SpoolForwarder, connect

    logger = get_run_logger()
    root = Path(workspace)
    if not force and up_to_date(root, name):
        logger.info("Stage '%s' didn't change (dvc status), skipping", name)
        return Completed(name="Skipped", message="DVC: up to date", data=StageResult(name, "skipped", 0.0, 0).summary())
    forwarder: Any = contextlib.nullcontext()
    spool = root / ".lmcycle" / "spool" / uuid.uuid4().hex
    if experiment and env.get("LMCYCLE_PARENT_RUN_ID"):
        client, experiment_id = connect(root, experiment)
        forwarder = SpoolForwarder(spool, client, experiment_id)
        env = {**env, SPOOL_ENV: str(spool)}
    try:
        with forwarder:
            result = run_dvc_stage(
                name, root, force=force, timeout_s=timeout_s, grace_s=grace_s, env=env, on_line=logger.info
            )
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    if result.state in {"failed", "timeout"}:
        why = f"timed out after {timeout_s:g} s (flow.stage_timeout_s)"
        if result.state == "failed":
            code = _COMMAND_EXIT.findall(result.tail)
            why = f"exited with code {code[-1]}" if code else f"failed (dvc exited with code {result.returncode})"
        create_markdown_artifact(
            key=f"{_artifact_key(name)}-failure",
            markdown=f"# Stage `{name}` {why}\n\nLast {TAIL_LINES} lines of output:\n\n```\n{result.tail}\n```\n",
            description=f"stage {name} {why}",
        )
        raise StageFailed(f"stage {name} {why}")
    if result.state in {"skipped", "restored"}:
        label = "Skipped" if result.state == "skipped" else "Restored"
        message = "DVC: up to date" if result.state == "skipped" else "DVC: outputs restored from the run cache"
        return Completed(name=label, message=message, data=result.summary())
    return result.summary()


@task(cache_policy=NO_CACHE)
def register(workspace: str, parent_run_id: str | None, flow_run_id: str | None) -> dict[str, Any]:
    """Register the workspace's model in MLflow and run the promotion gate (see lmcore.registry)."""
    from lmcore.config import load_config
    from lmcore.paths import Paths
    from lmcore.registry import register_model

    paths = Paths.of(workspace)
    result = register_model(paths, load_config(paths.root / "params.yaml"), parent_run_id, flow_run_id)
    get_run_logger().info("registered %s v%s (%s): %s", result.name, result.version, result.decision, result.reason)
    return result.as_dict()


# --- the flow ----------------------------------------------------------------------------------------------


def _telemetry_off() -> None:
    from flows.cli import _telemetry_off as off

    off()


@flow(name=FLOW_NAME, log_prints=True, validate_parameters=True)
def lifecycle(
    workspace: str = ".",
    until: str | None = None,
    force: list[str] | None = None,
    overrides: list[str] | None = None,
    register_model: bool = True,
) -> dict[str, Any]:
    """Run the stage graph through DVC, then register the model and apply the promotion gate.

    `overrides` (section.key=value) are validated and written into params.yaml first, like `dvc exp run -S`;
    `until` stops after that stage (and its upstream); `force` reruns the named stages even if up to date.
    """
    from lmcore.config import apply_overrides, read_params, validate
    from lmcore.tracking import tracking_enabled
    from lmcore.workspace import workspace_lock

    _telemetry_off()
    root = Path(workspace).resolve()
    params_file = root / "params.yaml"
    lock_timeout = validate(read_params(params_file), str(params_file)).flow.lock_timeout_s
    with workspace_lock(root, lock_timeout):
        config = apply_overrides(list(overrides or []), params_file)
        order, upstream = stage_graph(root)
        selected = select_stages(order, upstream, until)
        unknown = [s for s in force or [] if s not in upstream]
        if unknown:
            raise LmcycleError(
                f"--force: unknown stage(s) {', '.join(unknown)}; stages in dvc.yaml: {', '.join(order)}"
            )
        run = _ParentRun.start(root, config, overrides or [], until, force or []) if tracking_enabled() else None
        report: dict[str, Any] = {"stages": [], "failed": "", "workspace": str(root)}
        status = "FAILED"
        try:
            _run_graph(root, config, selected, set(force or []), run, report)
            if register_model and until is None:
                report["registration"] = (
                    _register(root, run) if run is not None else {"skipped": "tracking is off (LMCYCLE_TRACKING)"}
                )
            status = "FINISHED"
        except BaseException as err:
            report["failed"] = report["failed"] or f"{type(err).__name__}: {err}"
            status = "FAILED" if isinstance(err, Exception) else "KILLED"  # Ctrl-C, SIGTERM, cancellation
            raise
        finally:
            with contextlib.suppress(Exception):
                _publish(root, report, run)
            if run is not None:
                run.end(status)
    return report


def _run_graph(
    root: Path, config: Any, selected: list[str], force: set[str], run: _ParentRun | None, report: dict[str, Any]
) -> None:
    from prefect.runtime import flow_run

    env = {"LMCYCLE_FLOW_RUN_ID": str(flow_run.id or "")}
    if run is not None:
        env["LMCYCLE_PARENT_RUN_ID"] = run.run_id
    stage_task = dvc_stage.with_options(retries=config.flow.retries, retry_delay_seconds=config.flow.retry_delay_s)
    for name in selected:
        started = time.monotonic()
        state = stage_task.with_options(task_run_name=name)(
            name,
            str(root),
            name in force,
            config.flow.stage_timeout_s,
            config.flow.kill_grace_s,
            env,
            config.project.experiment if run is not None else None,
            return_state=True,
        )
        seconds = round(time.monotonic() - started, 2)
        if not state.is_completed():
            report["stages"].append({"name": name, "state": state.name.lower(), "seconds": seconds})
            error = state.result(raise_on_failure=False)
            report["failed"] = str(error) if isinstance(error, LmcycleError) else f"stage {name}: {state.message}"
            raise StageFailed(report["failed"])
        result = state.result()
        report["stages"].append({"name": name, "state": result["state"], "seconds": seconds})
        if run is not None:
            run.log_metrics({f"stage_seconds.{name}": seconds})


def _register(root: Path, run: _ParentRun) -> dict[str, Any]:
    from lmcore.config import load_config
    from lmcore.paths import Paths
    from lmcore.registry import model_to_register

    paths = Paths.of(root)
    if model_to_register(paths, load_config(root / "params.yaml")) is None:
        return {"skipped": "no model in this workspace yet (models/finetune/hf or models/pretrain/hf)"}
    from prefect.runtime import flow_run

    result = register(str(root), run.run_id, str(flow_run.id or ""))
    run.set_tags({f"lmcycle.registered_{k}": str(v) for k, v in result.items() if k in {"name", "version", "decision"}})
    return result


class _ParentRun:
    """The MLflow run that groups one flow run (its stages are child runs)."""

    def __init__(self, client: Any, run_id: str, root: Path):
        self.client, self.run_id, self.root = client, run_id, root
        self.ended = False

    @classmethod
    def start(cls, root: Path, config: Any, overrides: list[str], until: str | None, force: list[str]) -> _ParentRun:
        from prefect.runtime import flow_run

        from lmcore.tracking import check_tracking, start_parent_run, tracking_uri
        from lmcore.workspace import dvc_lock_hash

        check_tracking(tracking_uri(root))
        tags = {
            "lmcycle.kind": "flow",
            "prefect.flow_run_id": str(flow_run.id or ""),
            "prefect.flow_run_name": str(flow_run.name or ""),
            "lmcycle.overrides": json.dumps(overrides),
            "lmcycle.until": until or "",
            "lmcycle.force": ",".join(force),
            "lmcycle.dvc_lock_hash_before": dvc_lock_hash(root),
        }
        client, run_id = start_parent_run(root, config, str(flow_run.name or FLOW_NAME), tags)
        return cls(client, run_id, root)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from lmcore.tracking import MLflowReporter

        MLflowReporter(self.client, self.run_id).log_metrics(metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        from lmcore.tracking import MLflowReporter

        MLflowReporter(self.client, self.run_id).set_tags(tags)

    def link(self) -> str:
        from lmcore.tracking import run_link

        return run_link(self.client, self.run_id)

    def end(self, status: str) -> None:
        if self.ended:
            return
        from lmcore.workspace import dvc_lock_hash

        self.ended = True
        try:
            self.set_tags({"lmcycle.dvc_lock_hash": dvc_lock_hash(self.root)})
        finally:
            self.client.set_terminated(self.run_id, status)


# --- what a flow run publishes -----------------------------------------------------------------------------


def _eval_rows(root: Path) -> list[dict[str, Any]]:
    from lmcore.paths import Paths
    from lmcore.registry import eval_metrics

    metrics, _, _ = eval_metrics(Paths.of(root))
    return [{"metric": k, "value": round(v, 6)} for k, v in sorted(metrics.items())]


def _markdown(root: Path, report: dict[str, Any], run: _ParentRun | None, rows: list[dict[str, Any]]) -> str:
    from lmcore.workspace import dvc_lock_hash, git_commit, git_dirty

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
    if run is not None:
        lines += ["", "## MLflow", "", f"- parent run `{run.run_id}`", f"- {run.link()}"]
    return "\n".join(lines) + "\n"


def _publish(root: Path, report: dict[str, Any], run: _ParentRun | None) -> None:
    """The flow run's markdown summary and the table of eval metrics (Prefect artifacts), once per run."""
    if report.get("published"):
        return
    report["published"] = True
    rows = _eval_rows(root)
    create_markdown_artifact(
        key="lifecycle-summary", markdown=_markdown(root, report, run, rows), description=FLOW_NAME
    )
    if rows:
        create_table_artifact(key="eval-metrics", table=rows, description="evaluation metrics of this run")
        if run is not None:
            run.log_metrics({r["metric"]: r["value"] for r in rows})
