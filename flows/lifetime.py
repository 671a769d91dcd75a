"""Nothing that `lmcycle run` starts outlives it, even when it is killed with SIGKILL.

The means is the kernel's parent-death signal (Linux `prctl(PR_SET_PDEATHSIG)`), set in a child between fork and
exec: the kernel signals the child when the thread that started it ends, however it ends. No handler of ours has to
run, which is the point (SIGKILL runs none). Elsewhere than Linux these helpers do nothing.

- Prefect's ephemeral API is a real uvicorn subprocess that the Prefect client starts on first use, from whatever
  thread asks first; a SIGKILLed flow process left it running. `start_tied_prefect_server` starts that same server
  (Prefect's own command and settings) from the main thread with a parent-death signal, and registers it where the
  client looks for the ephemeral server, the way `prefect.testing.utilities.prefect_test_harness` does; Prefect
  then uses and stops it as before.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

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
