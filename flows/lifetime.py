"""Nothing that `lmcycle run` starts outlives it, even when it is killed with SIGKILL.

The means is the kernel's parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`), set in a child between fork and
exec: the kernel signals the child when the thread that started it ends, however it ends. No handler of ours has to
run, which is the point (SIGKILL runs none). Elsewhere than Linux these helpers do nothing.

- Prefect's ephemeral API is a real uvicorn subprocess that the Prefect client starts on first use, from whatever
  thread asks first; a SIGKILLed flow process left it running. `start_tied_prefect_server` starts that same server
  (Prefect's own command and settings) from the main thread with a parent-death signal, and registers it where the
  client looks for the ephemeral server, the way `prefect.testing.utilities.prefect_test_harness` does; Prefect
  then uses and stops it as before.
- Stage processes get SIGTERM when the flow (or the warm stage host) that started them dies: a trainer saves a
  checkpoint on it and exits, so the next run resumes. The signal reaches the process the flow started (the stage
  command: `sh -c CMD` execs a single command); what that process starts is its own to stop.
- `remember_stage`/`wait_for_previous_stage`: the running stage's pid is kept in `.lmcycle/stage.json`; a new run waits
  `flow.lock_timeout_s` for a stage left by a killed run to end, then refuses to start.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmcore.errors import LmcycleError

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # looked up here, never in a freshly forked child


def set_parent_death_signal(sig: int, parent_pid: int) -> None:
    """In a child just forked from `parent_pid`: receive `sig` when the parent's thread ends (at once if it has)."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os.kill(os.getpid(), sig)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A Popen `preexec_fn` arming the parent-death signal `sig`; None where there is no such thing."""
    if _PRCTL is None:
        return None
    parent = os.getpid()
    return lambda: set_parent_death_signal(sig, parent)


# --- Prefect's ephemeral API server --------------------------------------------------------------------------


class _PopenDyingWithParent:
    """Stands in for the `subprocess` module inside prefect.server.api.server while it starts its server."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 (the name Prefect calls)
        # Its own session: Ctrl-C in a terminal signals the whole foreground process group, and a server stopped
        # with the flow left the flow's last calls (the run's summary) retrying against nothing for minutes. It
        # still dies with the flow (the parent-death signal), and Prefect stops it at exit as ever.
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(*args, preexec_fn=die_with_parent(signal.SIGTERM), **kwargs)


def start_tied_prefect_server() -> Any:
    """Start Prefect's ephemeral API server for this process, dying with it; the server, or None when Prefect is
    pointed at a server (PREFECT_API_URL), ephemeral mode is off, one is already running, or no parent-death signal
    can be armed here (Prefect then starts its own as usual)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or _PRCTL is None:
        return None
    if threading.current_thread() is not threading.main_thread():
        return None  # the signal would come when this thread ends, not when the process does
    from prefect.server.api import server as module

    if None in module.SubprocessASGIServer._instances:
        return None

    class TiedServer(module.SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            module.subprocess = _PopenDyingWithParent()  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                module.subprocess = subprocess

    server = TiedServer()  # registered as the default instance: what the Prefect client asks for
    server.start()  # stopped by Prefect at exit (atexit), as its own would be
    return server


# --- the running stage ---------------------------------------------------------------------------------------


def _record_path(root: Path) -> Path:
    return root / ".lmcycle" / "stage.json"


def remember_stage(record: tuple[Path, str] | None, pid: int) -> None:
    """Record the running stage process of workspace `record[0]` (it leads its own process group)."""
    if record is None:
        return
    import psutil

    root, name = record
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        started = 0.0
    path = _record_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "create_time": started, "stage": name, "flow_pid": os.getpid()}))


def forget_stage(record: tuple[Path, str] | None) -> None:
    """The recorded stage has ended (its whole group)."""
    if record is not None:
        _record_path(record[0]).unlink(missing_ok=True)


def _left_over(root: Path) -> dict[str, Any] | None:
    """The recorded stage when its process (or any of its group) still runs."""
    import psutil

    from flows.processes import group_alive

    try:
        record = json.loads(_record_path(root).read_text())
        pid = int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        same = abs(psutil.Process(pid).create_time() - float(record.get("create_time", 0))) < 0.01
        if same and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return record
    except psutil.Error:
        pass
    return record if group_alive(pid) else None


def wait_for_previous_stage(root: Path, timeout_s: float) -> None:
    """Wait up to `timeout_s` for a stage process of an earlier (killed) run to end; fail with one line if it does
    not. The record is removed once nothing of it runs."""
    deadline = time.monotonic() + timeout_s
    while (record := _left_over(root)) is not None:
        if time.monotonic() >= deadline:
            raise LmcycleError(
                f"{_record_path(root)}: stage {record.get('stage')} of a previous run is still running "
                f"(pid {record.get('pid')}); waited {timeout_s:g} s (flow.lock_timeout_s)"
            )
        time.sleep(0.2)
    _record_path(root).unlink(missing_ok=True)
