"""Process groups: whether anything of a group still runs, and stopping a whole group.

Design choice: a stage command leads its own process group (a fresh process starts a new session, a forked one
calls setpgid), so a timeout, a cancelled flow or a new run's check reaches everything the command started, by the
group id, without walking a process tree that may already have lost its parent links.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any


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
    it), SIGKILL to what is left after `grace_s`. `proc` leads its own process group (a process handle of
    flows.executor: `pid`, `poll`, `wait`)."""
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
