"""Start the processes of a multi-process training stage with PyTorch's own launcher (torchrun's elastic agent).

`lmcycle stage pretrain` (what `dvc repro`, `lmcycle run` and a deployment run) calls `launch` when the stage asks
for more than one process and is not already running under torchrun: the calling process becomes the elastic agent
and starts `nproc_per_node` copies of the stage command, so DVC still sees one command and records one stage.

Design choices:
- Where the process count comes from: the torchrun environment variables (PET_NPROC_PER_NODE, PET_NNODES,
  PET_RDZV_ENDPOINT, PET_RDZV_ID; MASTER_ADDR:MASTER_PORT as the endpoint) win over the stage's params, because a
  scheduler that sets them knows the machines; params.yaml holds the default for a plain `dvc repro`. None of them
  change what is computed, so the checkpoint fingerprint leaves them out (lmcore.options.LAUNCH_KEYS).
- One machine: a c10d rendezvous on 127.0.0.1 with a port the OS picks (torchrun --standalone). Several: at
  `rdzv_endpoint`, all machines sharing `rdzv_id`; with PET_NODE_RANK set (torchrun's --node-rank) the static
  rendezvous puts global rank 0 on node 0, else c10d ranks machines in arrival order. No restarts: a failed stage
  fails, and a rerun (the flow's retry) resumes from the last checkpoint.
- Faults: one failing or killed rank stops the group (the agent terminates the others), and the stage fails with
  one line naming the rank and its last line of output (every rank's output goes to a file; local rank 0's is
  also copied to the console, tracebacks shortened to their last line). The agent starts workers in sessions of
  their own, so each worker asks the kernel to kill it when the agent dies (`guard_worker`, PR_SET_PDEATHSIG): a
  SIGKILL of the stage leaves no worker behind.
- A checkpoint written by N processes resumes on M ≠ N (`check_process_count`): the global batch of a step is
  drawn from (seed, step) alone and rank r reads its r-th share of it, so the batches continue unchanged; only
  float summation order differs. With dropout each rank draws its own random numbers, which cannot be carried over
  to another count: that case fails with one line.
Library code: no MLflow, Prefect or DVC here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import CheckpointError, ConfigError, LmcycleError

if TYPE_CHECKING:
    import torch

    from lmcore.train.distributed import DistEnv

LAUNCHER_PID_ENV = "LMCYCLE_LAUNCHER_PID"
# param -> torchrun's environment variable for it (torch.distributed.run reads PET_<OPTION>)
ENV_VARS = {
    "nproc_per_node": "PET_NPROC_PER_NODE",
    "nnodes": "PET_NNODES",
    "rdzv_endpoint": "PET_RDZV_ENDPOINT",
    "rdzv_id": "PET_RDZV_ID",
}
NODE_RANK_ENV = "PET_NODE_RANK"
PR_SET_PDEATHSIG = 1
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class LaunchError(LmcycleError):
    """The processes of a stage could not start, or one of them failed."""


@dataclass(frozen=True)
class LaunchPlan:
    stage: str
    nproc_per_node: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    node_rank: int | None = None  # PET_NODE_RANK: this machine's place, so that node 0 holds global rank 0

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def needs_launch(self) -> bool:
        """More than one process, and not already one of torchrun's workers."""
        return self.world_size > 1 and "WORLD_SIZE" not in os.environ


def plan(stage: str, cfg: Any) -> LaunchPlan:
    """The process layout of `stage` from its params section `cfg`, the environment winning (module docstring)."""
    values = {key: getattr(cfg, key) for key in ENV_VARS}
    for key, var in ENV_VARS.items():
        if os.environ.get(var, "").strip():
            values[key] = os.environ[var].strip()
    if not values["rdzv_endpoint"] and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        values["rdzv_endpoint"] = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    nproc = _whole(stage, "nproc_per_node", values["nproc_per_node"], allow_auto=True)
    if nproc == "auto":
        nproc = _gpu_count(cfg.device)
    result = LaunchPlan(
        stage=stage,
        nproc_per_node=nproc,
        nnodes=_whole(stage, "nnodes", values["nnodes"]),
        rdzv_endpoint=values["rdzv_endpoint"] or None,
        rdzv_id=values["rdzv_id"] or None,
        node_rank=_node_rank(),
    )
    if result.nnodes > 1:
        for key in ("rdzv_endpoint", "rdzv_id"):
            if not getattr(result, key):
                raise ConfigError(f"{stage}.{key}: required when {stage}.nnodes > 1 (or set {ENV_VARS[key]})")
    if cfg.batch_size % result.world_size:
        raise ConfigError(
            f"{stage}.batch_size: {cfg.batch_size} sequences cannot be split evenly over {result.world_size} processes"
        )
    return result


def _whole(stage: str, key: str, value: Any, allow_auto: bool = False) -> int | str:
    if allow_auto and value == "auto":
        return value
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        source = ENV_VARS[key] if os.environ.get(ENV_VARS[key], "").strip() else f"{stage}.{key}"
        allowed = "auto or a whole number ≥ 1" if allow_auto else "a whole number ≥ 1"
        raise ConfigError(f"{source}: must be {allowed}, got {value!r}")
    return int(text)


def _node_rank() -> int | None:
    text = os.environ.get(NODE_RANK_ENV, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ConfigError(f"{NODE_RANK_ENV}: must be a whole number ≥ 0, got {text!r}")
    return int(text)


def _gpu_count(device: str) -> int:
    if device not in {"auto", "cuda"}:
        return 1
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


# --- the agent (the stage command itself) --------------------------------------------------------------------


def launch(argv: list[str], layout: LaunchPlan) -> None:
    """Run `argv` as `layout.nproc_per_node` workers on this machine; return when all succeeded, else raise."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    log_dir = Path(tempfile.mkdtemp(prefix=f"lmcycle-{layout.stage}-"))
    _say(f"{layout.stage}: starting {layout.nproc_per_node} process(es) on this machine, {layout.world_size} in all")
    with _worker_env(layout), _quiet_agent(), _echoing(log_dir):
        try:
            elastic_launch(_launch_config(layout, log_dir), argv[0])(*argv[1:])
        except ChildFailedError as err:
            raise LaunchError(f"{_failure_line(layout.stage, err, log_dir)}; logs in {log_dir}") from None
        except SignalException as err:
            name = signal.Signals(err.sigval).name
            raise LaunchError(f"{layout.stage}: stopped by {name}, and every rank with it; logs in {log_dir}") from None
        except Exception as err:  # rendezvous and agent errors: one line, not torch's traceback
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise LaunchError(f"{layout.stage}: the launcher failed: {type(err).__name__}: {first}") from None
    shutil.rmtree(log_dir, ignore_errors=True)  # kept after a failure, for the whole tracebacks


def _launch_config(layout: LaunchPlan, log_dir: Path) -> Any:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    single = layout.nnodes == 1
    # static (as torchrun --node-rank): machine k's ranks follow machine k-1's, rank 0 on node 0; c10d: any order
    static = not single and layout.node_rank is not None
    return LaunchConfig(
        min_nodes=layout.nnodes,
        max_nodes=layout.nnodes,
        nproc_per_node=layout.nproc_per_node,
        run_id=layout.rdzv_id or f"{layout.stage}-{uuid.uuid4().hex[:12]}",
        role=layout.stage,
        rdzv_backend="static" if static else "c10d",
        rdzv_endpoint="127.0.0.1:0" if single else str(layout.rdzv_endpoint),  # port 0: the OS picks a free one
        rdzv_configs={"rank": layout.node_rank} if static else {},
        local_addr="127.0.0.1" if single else None,
        max_restarts=0,
        monitor_interval=0.1,
        # every rank's output to files (for the failure line); local rank 0's is echoed as it comes (_echoing)
        logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.ALL),
    )


@contextlib.contextmanager
def _worker_env(layout: LaunchPlan) -> Iterator[None]:
    """What the workers inherit: the launcher's pid (guard_worker), unbuffered output, and as torchrun a share of
    the cores each unless the user chose OMP_NUM_THREADS."""
    previous = {k: os.environ.get(k) for k in (LAUNCHER_PID_ENV, "OMP_NUM_THREADS", "PYTHONUNBUFFERED")}
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // layout.nproc_per_node)))
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent logs each worker it stops and each failure; the stage's error line says it once. LOGLEVEL (torch's
    own setting) set by the user keeps them."""
    if os.environ.get("LOGLEVEL"):
        yield
        return
    loggers = [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger)
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _echoing(log_dir: Path) -> Iterator[None]:
    finished = threading.Event()
    echoes = [
        threading.Thread(target=_echo, args=(log_dir, name, dst, finished), daemon=True)
        for name, dst in (("stdout.log", sys.stdout), ("stderr.log", sys.stderr))
    ]
    for thread in echoes:
        thread.start()
    try:
        yield
    finally:
        finished.set()
        for thread in echoes:
            thread.join(timeout=5)


def _echo(log_dir: Path, name: str, dst: Any, finished: threading.Event) -> None:
    """Copy local rank 0's `name` log to `dst` as it grows, without the prefix torch's own tee would add."""
    found: list[Path] = []
    while not found:
        if finished.is_set():
            return
        found = sorted(log_dir.glob(f"*/attempt_*/0/{name}"))
        time.sleep(0.05)
    quiet = _TracebackFilter(found[0])
    with found[0].open(encoding="utf-8", errors="replace") as src:
        while True:
            line = src.readline()
            if line:
                if shown := quiet(line):
                    dst.write(shown)
                    dst.flush()
            elif finished.is_set():
                return
            else:
                time.sleep(0.05)


class _TracebackFilter:
    """Passes a worker's lines on, but a traceback only as its last line: when a peer dies, every other rank fails
    in a collective with one, and the stage's error line names the rank that failed first. The log keeps it all."""

    def __init__(self, log: Path):
        self.log, self.inside = log, False

    def __call__(self, line: str) -> str:
        text = _RANK_PREFIX.sub("", line.rstrip("\n"))  # torch's excepthook prefixes a worker's traceback
        if text.startswith("Traceback (most recent call last)"):
            self.inside = True
            return ""
        if self.inside:
            if not text.strip() or text[0].isspace() or text.startswith(_CHAINED):
                return ""
            self.inside = False
            return f"{text} (traceback in {self.log})\n"
        if text.startswith(_CHAINED):
            self.inside = True
            return ""
        return line


def _failure_line(stage: str, err: Any, log_dir: Path) -> str:
    rank, failure = err.get_first_failure()
    killed = failure.exitcode < 0
    how = f"was killed by {failure.signal_name()}" if killed else f"exited with code {failure.exitcode}"
    last = last_line(log_dir, failure.local_rank)
    others = len(err.failures) - 1
    tail = f"; {others} other rank(s) failed too" if others > 0 else ""
    return f"{stage}: rank {rank} (pid {failure.pid}) {how}; its last line: {last or '(no output)'}{tail}"


def last_line(log_dir: Path, local_rank: int) -> str:
    """The last non-empty line a worker wrote: its stderr, else its stdout (progress bars' carriage returns split)."""
    for name in ("stderr.log", "stdout.log"):
        for path in sorted(log_dir.glob(f"**/attempt_*/{local_rank}/{name}")):
            text = _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
            lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
            if lines:
                return lines[-1]
    return ""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the workers -----------------------------------------------------------------------------------------------


def guard_worker() -> None:
    """In a worker the launcher started: die with the launcher (Linux), even when it was killed with SIGKILL."""
    parent = os.environ.get(LAUNCHER_PID_ENV)
    if not parent or "WORLD_SIZE" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the launcher died before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def check_process_count(model: torch.nn.Module, saved: int, env: DistEnv, name: str, path: Path) -> str | None:
    """Whether a checkpoint written by `saved` processes may resume on env.world_size: None if they are equal, a
    note if so, CheckpointError if not (see the module docstring)."""
    if saved == env.world_size:
        return None
    if _draws_random_numbers(model):
        raise CheckpointError(
            f"{name}: checkpoint {path} was written by {saved} process(es), this run has {env.world_size}: with "
            f"dropout each rank draws its own random numbers, so it cannot continue exactly; run it with "
            f"{saved} process(es) ({name}.nproc_per_node × nnodes), or move {path.parent} aside to start over"
        )
    return (
        f"{name}: note: checkpoint written by {saved} process(es), resuming on {env.world_size}: the same batches "
        f"follow (each step's global batch is a function of the step), summed in another float order"
    )


def _draws_random_numbers(model: torch.nn.Module) -> bool:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
        rate = getattr(module, "dropout", None)
        if isinstance(rate, float) and rate > 0:
            return True
    return False
