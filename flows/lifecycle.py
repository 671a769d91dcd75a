"""The Prefect flow `lm-lifecycle`: every DVC stage as a Prefect task, then registration with a promotion gate.

Design choices:
- DVC owns the graph. The flow reads the stage list and order from DVC itself (`Repo.index.graph`) and runs
  each stage with DVC's API in this process (`Repo.reproduce(NAME, single_item=True)`, what `dvc repro
  --single-item NAME` calls), so dvc.lock is written exactly as `dvc repro` writes it, without paying a DVC process
  per stage. A stage DVC finds up to date is reported as a Completed state named "Skipped" ("Restored" when DVC
  checks its outputs out of its run cache). Stages run one at a time: DVC locks the repository during a repro.
- A stage's command runs in its own process group. Its output streams into the task log; a timeout, a cancelled or
  interrupted flow stops the whole group: SIGTERM (the trainers checkpoint on it), SIGKILL after
  `flow.kill_grace_s`. `lmcycle stage …` commands are forked from a warm interpreter (flows.stagehost) that has
  imported torch and the rest while the flow started, so a stage costs its work, not its imports.
- Tracking: the flow opens the MLflow parent run in the background while the first stages run. Under the flow a
  stage writes its events to a spool directory and this process logs them as a child run of the parent
  (lmcore.lifecycle.tracking.SpoolForwarder), so stage processes never import mlflow; plain `dvc repro` stages
  log their own.
- One flow run per workspace at a time: the `.lmcycle/lock` file lock (see lmcore.lifecycle.workspace).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from flows.stagehost import stage_env
from lmcore.errors import LmcycleError

FLOW_NAME = "lm-lifecycle"
TAIL_LINES = 60
HOSTED_COMMANDS = (["lmcycle", "stage"], ["lmcycle", "register"])  # what the warm stage host may fork
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


def _target(root: str | Path, name: str) -> str:
    """A stage address DVC resolves the same whatever this process's working directory is."""
    path, _, stage = name.rpartition(":")
    return f"{Path(root).resolve() / (path or 'dvc.yaml')}:{stage}"


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


def stop_group(proc: Any, grace_s: float) -> None:
    """Stop a stage command and everything it started: SIGTERM to its process group (a trainer checkpoints on
    it), SIGKILL to what is left after `grace_s`. `proc` leads its own process group (a Popen or a HostedProcess)."""
    pgid = proc.pid
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    while group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.05)
    if group_alive(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class _CommandRunner:
    """Runs a stage's command for DVC (in place of `dvc.stage.run._run`, same signature).

    The command leads its own process group, so a timeout or an interrupted flow stops its whole tree; its output goes
    line by line to `on_line`; `lmcycle stage …` and `lmcycle register …` are forked by the warm stage host when
    there is one.
    """

    def __init__(
        self,
        deadline: float,
        grace_s: float,
        on_line: Callable[[str], None],
        host: Any = None,
        record: tuple[Path, str] | None = None,
    ):
        self.deadline, self.grace_s, self.on_line, self.host = deadline, grace_s, on_line, host
        self.record = record  # (workspace, stage name): where the running stage is recorded (flows.lifetime)
        self.timed_out = threading.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.exit_code: int | None = None

    def __call__(self, executable: str | None, cmd: str, **kwargs: Any) -> None:
        from dvc.stage.exceptions import StageCmdFailedError

        from flows.lifetime import forget_stage, remember_stage

        proc = self._start(executable, cmd, kwargs["cwd"], kwargs["env"])
        remember_stage(self.record, proc.pid)
        timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._on_timeout, [proc])
        timer.daemon = True
        timer.start()
        try:
            for raw in proc.stdout:
                for line in raw.rstrip("\n").split("\r"):
                    if line.strip():
                        self.line(line)
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None or group_alive(proc.pid):
                stop_group(proc, self.grace_s)
            proc.stdout.close()
            forget_stage(self.record)
        self.exit_code = code
        if code != 0:
            raise StageCmdFailedError(cmd, code)

    def line(self, text: str) -> None:
        self.tail.append(text)
        self.on_line(text)

    def _on_timeout(self, proc: Any) -> None:
        self.timed_out.set()
        stop_group(proc, self.grace_s)

    def _start(self, executable: str | None, cmd: str, cwd: str, env: dict[str, str]) -> Any:
        import shlex

        from dvc.stage.run import _make_cmd

        argv = shlex.split(cmd)
        if self.host is not None and argv[:2] in HOSTED_COMMANDS and self.host.alive():
            try:
                return self.host.spawn(argv, cwd, env)
            except OSError as err:
                self.line(f"warm stage host unavailable ({err}); starting a fresh process")
        from flows.lifetime import die_with_parent

        return subprocess.Popen(
            _make_cmd(executable, cmd),
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # a SIGKILLed flow leaves no stage running
            text=True,
            errors="replace",
            bufsize=1,
        )


SUPPORTED_DVC = ((3, 67), (3, 68))  # [low, high): the range pyproject.toml pins and the tests ran


def check_dvc_version() -> None:
    """One line, not a traceback deep in DVC, when the installed DVC is outside the range whose private
    `dvc.stage.run._run` signature the runner below was tested against."""
    import dvc

    parts = tuple(int(p) for p in dvc.__version__.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_DVC
    if not (low <= parts < high):
        raise LmcycleError(
            f"dvc {dvc.__version__} is not supported by this lmcycle (needs dvc >={low[0]}.{low[1]},"
            f"<{high[0]}.{high[1]}): pip install 'dvc>={low[0]}.{low[1]},<{high[0]}.{high[1]}'"
        )


@contextlib.contextmanager
def _dvc_runs_commands_with(runner: _CommandRunner) -> Iterator[None]:
    """DVC has no hook for how a stage's command is executed, and the flow needs its output, its process group
    and its timeout: swap in `runner` for the one private function that starts it (the DVC version is pinned in
    requirements.lock; tests exercise this path), and DVC's INFO log lines go to the same place."""
    import logging

    import dvc.stage.run as dvc_run

    check_dvc_version()

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                for line in record.getMessage().splitlines():
                    if line.strip():
                        runner.line(line)

    dvc_logger = logging.getLogger("dvc")
    saved = (dvc_logger.handlers, dvc_logger.level, dvc_logger.propagate)
    original = dvc_run._run
    dvc_run._run = runner
    dvc_logger.handlers = [Forward(logging.INFO)]  # DVC's own console handlers would print the lines twice
    dvc_logger.setLevel(logging.INFO)
    dvc_logger.propagate = False
    try:
        yield
    finally:
        dvc_run._run = original
        dvc_logger.handlers, dvc_logger.propagate = saved[0], saved[2]
        dvc_logger.setLevel(saved[1])


def run_dvc_stage(
    name: str,
    root: Path,
    *,
    force: bool = False,
    timeout_s: float = 3600.0,
    grace_s: float = 10.0,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] = print,
    host: Any = None,
    pull: bool = False,
) -> StageResult:
    """`dvc repro --single-item NAME` through DVC's API in this process: DVC decides, runs the command and writes
    dvc.lock exactly as the CLI does; the command itself runs in its own process group (see `_CommandRunner`)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    started = time.monotonic()
    runner = _CommandRunner(started + timeout_s, grace_s, on_line, host, record=(Path(root), name))
    error: DvcException | None = None
    reproduced: list[Any] = []
    with _dvc_runs_commands_with(runner), Repo(str(root)) as repo:
        try:
            reproduced = repo.reproduce(
                _target(root, name), single_item=True, force=force, run_env=stage_env(env), pull=pull
            )
        except DvcException as err:
            error = err
            runner.line(f"ERROR: {err}{f': {err.__cause__}' if err.__cause__ else ''}")
    tail = "\n".join(runner.tail)
    seconds = round(time.monotonic() - started, 3)
    if error is not None:
        state = "timeout" if runner.timed_out.is_set() else "failed"
        return StageResult(name, state, seconds, runner.exit_code or 1, tail)
    if not reproduced:
        return StageResult(name, "skipped", seconds, 0, tail)
    restored = runner.exit_code is None and _RESTORED.search(tail) is not None
    return StageResult(name, "restored" if restored else "ran", seconds, 0, tail)


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
    host: Any = None,
    pull: bool = False,
) -> Any:
    """One DVC stage. A Completed state named Skipped/Restored when DVC did not run its command; with `pull`
    (a DVC remote is configured) DVC fetches missing outputs and run-cache hits instead of running it.

    With `tracking` (a `_ParentRun`), the stage's events come back through a spool directory and are logged here.
    """
    import shutil
    import uuid

    from flows.remote import ingest_up_to_date
    from lmcore.lifecycle.tracking import SPOOL_ENV

    logger = get_run_logger()
    root = Path(workspace)
    started = time.monotonic()
    if not force and ingest_up_to_date(root, name):
        logger.info("%s: outputs, code and params as in dvc.lock and the sources' fingerprints unchanged", name)
        seconds = round(time.monotonic() - started, 3)
        data = StageResult(name, "skipped", seconds, 0).summary()
        return Completed(name="Skipped", message="up to date: sources unchanged", data=data)
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
                host=host,
                pull=pull,
            )
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    if result.state in {"failed", "timeout"}:
        why = f"timed out after {timeout_s:g} s (flow.stage_timeout_s)"
        if result.state == "failed":
            code = _COMMAND_EXIT.findall(result.tail)
            why = f"exited with code {code[-1]}" if code else "failed in DVC (see its last lines)"
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
def register(
    workspace: str,
    parent_run_id: str | None,
    flow_run_id: str | None,
    host: Any = None,
    timeout_s: float = 3600.0,
    grace_s: float = 10.0,
) -> dict[str, Any]:
    """Register the workspace's model in MLflow and run the promotion gate (see lmcore.lifecycle.registry).

    With a warm stage host it runs as `lmcycle register` forked from the host, which has transformers and
    mlflow's transformers flavor imported already; otherwise here.
    """
    logger = get_run_logger()
    if host is not None and host.alive():
        runner = _CommandRunner(time.monotonic() + timeout_s, grace_s, logger.info, host)
        result = _register_in_host(runner, Path(workspace), parent_run_id, flow_run_id, timeout_s)
    else:
        from lmcore.lifecycle.config import load_config
        from lmcore.lifecycle.paths import Paths
        from lmcore.lifecycle.registry.register import register_model

        paths = Paths.of(workspace)
        result = register_model(paths, load_config(paths.root / "params.yaml"), parent_run_id, flow_run_id).as_dict()
    logger.info("registered %s v%s (%s): %s", result["name"], result["version"], result["decision"], result["reason"])
    return result


@task(name="push", cache_policy=NO_CACHE)
def dvc_push(workspace: str) -> dict[str, Any]:
    """`dvc push --run-cache` to the workspace's default remote, so another host pulls instead of recomputing."""
    from flows.remote import push

    result = push(workspace)
    get_run_logger().info("pushed %d file(s) to DVC remote %r (with the run cache)", result["pushed"], result["remote"])
    return result


def _register_in_host(
    runner: _CommandRunner, root: Path, parent_run_id: str | None, flow_run_id: str | None, timeout_s: float
) -> dict[str, Any]:
    import shlex
    import tempfile

    from dvc.stage.exceptions import StageCmdFailedError

    with tempfile.TemporaryDirectory(prefix="lmcycle-register-") as tmp:
        out = Path(tmp) / "registration.json"
        argv = ["lmcycle", "register", "--workspace", str(root), "--json", str(out)]
        argv += ["--parent-run-id", parent_run_id or "", "--flow-run-id", flow_run_id or ""]
        try:
            runner("/bin/sh", shlex.join(argv), cwd=str(root), env={**os.environ, **stage_env()})
        except StageCmdFailedError:
            if runner.timed_out.is_set():
                raise LmcycleError(f"registration timed out after {timeout_s:g} s (flow.stage_timeout_s)") from None
            last = next(
                (t for t in reversed(runner.tail) if t.startswith("error:")), runner.tail[-1] if runner.tail else ""
            )
            raise LmcycleError(
                f"registration failed (exit code {runner.exit_code}): {last.removeprefix('error: ')}"
            ) from None
        return json.loads(out.read_text())


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
    push: bool | None = None,
) -> dict[str, Any]:
    """Run the stage graph through DVC, then register the model and apply the promotion gate.

    `overrides` (section.key=value) are validated and written into params.yaml first, like `dvc exp run -S`;
    `until` stops after that stage (and its upstream); `force` reruns the named stages even if up to date;
    `push` runs `dvc push --run-cache` at the end (None: when the workspace has a default DVC remote).
    """
    from flows.lifetime import wait_for_previous_stage
    from flows.remote import should_push
    from lmcore.lifecycle.config import apply_overrides, read_params, validate
    from lmcore.lifecycle.tracking import tracking_enabled
    from lmcore.lifecycle.workspace import dvc_write_lock, workspace_lock

    _telemetry_off()
    root = Path(workspace).resolve()
    params_file = root / "params.yaml"
    lock_timeout = validate(read_params(params_file), str(params_file)).flow.lock_timeout_s
    # In the workspace: DVC's run cache resolves the stages it restores against the working directory
    # (StageCache._create_stage), so a restore from elsewhere (`lmcycle run --workspace DIR`) would fail.
    with contextlib.chdir(root), workspace_lock(root, lock_timeout), _warm_stage_host(root) as host:
        wait_for_previous_stage(root, lock_timeout)
        with dvc_write_lock(root, params_file):  # never under a running `dvc repro`
            config = apply_overrides(list(overrides or []), params_file)
        order, upstream = stage_graph(root)
        selected = select_stages(order, upstream, until)
        pushing = should_push(root, push)
        unknown = [s for s in force or [] if s not in upstream]
        if unknown:
            raise LmcycleError(
                f"--force: unknown stage(s) {', '.join(unknown)}; stages in dvc.yaml: {', '.join(order)}"
            )
        run = _ParentRun.start(root, config, overrides or [], until, force or []) if tracking_enabled() else None
        report: dict[str, Any] = {"stages": [], "failed": "", "workspace": str(root)}
        status = "FAILED"
        try:
            _run_graph(root, config, selected, set(force or []), run, report, host, pull=pushing)
            if register_model and until is None:
                report["registration"] = (
                    _register(root, run, host) if run is not None else {"skipped": "tracking is off (LMCYCLE_TRACKING)"}
                )
            if pushing:
                report["push"] = dvc_push(str(root))
            status = "FINISHED"
        except BaseException as err:
            report["failed"] = report["failed"] or f"{type(err).__name__}: {err}"
            status = "FAILED" if isinstance(err, Exception) else "KILLED"  # Ctrl-C, SIGTERM, cancellation
            raise
        finally:
            with contextlib.suppress(Exception):
                _publish(root, report, run)
            if run is not None:
                run.end(status, report)
    return report


@contextlib.contextmanager
def _warm_stage_host(root: Path) -> Iterator[Any]:
    """The warm interpreter that forks `lmcycle stage` commands (flows.stagehost), for the length of a flow run;
    None when LMCYCLE_WARM_STAGES=0 or it cannot start (stages then start as fresh processes)."""
    from flows.stagehost import start_for, take_prestarted

    host = take_prestarted(root) or start_for(root)
    try:
        yield host
    finally:
        if host is not None:
            host.close()


def _run_graph(
    root: Path,
    config: Any,
    selected: list[str],
    force: set[str],
    run: _ParentRun | None,
    report: dict[str, Any],
    host: Any,
    pull: bool = False,
) -> None:
    """The selected stages in order; DVC decides for each whether it runs (with `pull`, whether the remote has it)."""
    from prefect.runtime import flow_run

    env = {"LMCYCLE_FLOW_RUN_ID": str(flow_run.id or "")}
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
            run,
            host,
            pull,
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


def _register(root: Path, run: _ParentRun, host: Any = None) -> dict[str, Any]:
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.registry.candidate import model_to_register

    paths, config = Paths.of(root), load_config(root / "params.yaml")
    if model_to_register(paths, config) is None:
        return {"skipped": "no model in this workspace yet (models/finetune/hf or models/pretrain/hf)"}
    from prefect.runtime import flow_run

    flow = config.flow
    result = register(str(root), run.run_id, str(flow_run.id or ""), host, flow.stage_timeout_s, flow.kill_grace_s)
    run.set_tags({f"lmcycle.registered_{k}": str(v) for k, v in result.items() if k in {"name", "version", "decision"}})
    return result


class _ParentRun:
    """The MLflow run that groups one flow run (its stages are child runs).

    It is opened in a background thread (importing mlflow and opening its store takes seconds) while the first
    stages run: a stage's events wait in its spool until the run exists, and whatever needs the run waits for it.
    The tracking store is checked (in seconds, with one clear line) before that, so nothing runs against a store
    that does not answer.
    """

    def __init__(self, root: Path, opened: Any):
        self.root, self._opened = root, opened
        self.ended = False

    @classmethod
    def start(cls, root: Path, config: Any, overrides: list[str], until: str | None, force: list[str]) -> _ParentRun:
        from concurrent.futures import ThreadPoolExecutor

        from prefect.runtime import flow_run

        from lmcore.lifecycle.tracking import check_tracking, start_parent_run, tracking_uri
        from lmcore.lifecycle.workspace import dvc_lock_hash

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


def _markdown(root: Path, report: dict[str, Any], run: _ParentRun | None, rows: list[dict[str, Any]]) -> str:
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
