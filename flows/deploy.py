"""Scheduling and serving helpers: a Prefect server that can schedule, `lmcycle serve`, and rebuilding a version.

Design choice: Prefect's ephemeral API (what `lmcycle run` uses when PREFECT_API_URL is unset) runs flows but
never schedules them, so everything here requires a real `prefect server` — the user's (PREFECT_API_URL), or one
this process starts on 127.0.0.1 and stops when it exits (`lmcycle serve --start-server`). Nothing here changes a
user's settings: a started server is announced to this process and its children only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmcore.errors import LmcycleError

SERVER_START_TIMEOUT_S = 120.0


class ServerError(LmcycleError):
    """No Prefect server to schedule on."""


def api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active Prefect profile."""
    from prefect.settings import get_current_settings

    url = os.environ.get("PREFECT_API_URL") or get_current_settings().api.url
    return str(url) if url else None


def server_answers(url: str, timeout_s: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s):  # noqa: S310
            return True
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(port: int | None = None, home: Path | None = None, log: Path | None = None) -> tuple[Any, str]:
    """`prefect server start` on 127.0.0.1, in its own process group; returns (process, API URL) once healthy."""
    port = port or free_port()
    env = dict(os.environ)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (handed to the child)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    from flows.lifetime import die_with_parent

    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGTERM),  # a SIGKILLed caller (or test session) leaves no server
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"prefect server start exited with code {proc.returncode}" + (f"; see {log}" if log else "")
            )
        if server_answers(url, 2.0):
            return proc, url
        time.sleep(0.5)
    stop_process(proc)
    raise ServerError(f"prefect server did not answer on {url} within {SERVER_START_TIMEOUT_S:g} s")


def stop_process(proc: Any, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
    """Signal a process group we started; SIGKILL it if it is still there after `timeout_s`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def scheduling_server(start: bool) -> Iterator[str]:
    """The API URL of a Prefect server that can schedule: the configured one, or one started for this process."""
    url = api_url()
    if url:
        if not server_answers(url):
            raise ServerError(f"PREFECT_API_URL {url}: no Prefect server answers there (start `prefect server start`)")
        yield url
        return
    if not start:
        raise ServerError(
            "schedules need a Prefect server (the ephemeral API runs flows but never schedules them): run "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, or pass --start-server"
        )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proc, url = start_server(port=4200 if _port_free(4200) else None)
    os.environ["PREFECT_API_URL"] = url  # this process and its children only; the server dies with us
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):  # settings already loaded in this process
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        stop_process(proc)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def serve_lifecycle(
    workspace: Path, cron: str, name: str, parameters: dict[str, Any], start: bool = False, limit: int | None = None
) -> None:
    """Schedule `lm-lifecycle` on this machine with `flow.serve` (blocks; each run is a subprocess)."""
    with scheduling_server(start) as url:
        from flows.lifecycle import lifecycle

        print(f"serving {lifecycle.name}/{name} on {url} with cron {cron!r} (Ctrl-C stops)", flush=True)
        # A process started in the background by a non-interactive shell inherits SIGINT as *ignored*, and Python
        # then never raises KeyboardInterrupt: restore it so Ctrl-C / SIGINT always stops serving.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(workspace)
        lifecycle.serve(name=name, cron=cron, parameters=parameters, limit=limit, print_starting_message=True)
