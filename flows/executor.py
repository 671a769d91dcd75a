"""How the flow starts a stage's command: an executor (`start(argv, cwd, env)` → a process handle) and the runner
that watches it (output, timeout, the recorded stage process).

Design choices:
- Two executors behind one interface: `FreshProcess` starts the command as DVC would (a new process in a session of
  its own, with a parent-death SIGTERM), `WarmHost` has the warm stage host (flows.stagehost) fork `lmcycle stage`
  and `lmcycle register` commands and hands anything else, or anything the host cannot take, to a fresh process.
  `executor_for` is the one place that chooses between them, for the length of a flow run (`lmcycle run` starts
  the host early, `prestarted`, so it imports torch while Prefect starts).
- A handle is what Popen offers and the runner needs: `pid` (it leads its own process group), `stdout` (text
  lines), `poll()`, `wait(timeout)`. A `HostedProcess` is one too.
- `CommandRunner` is what DVC calls to run a command (through lmcore.lifecycle.dvcadapter.reproduce_stage): the
  command's output streams line by line to `on_line`, a timeout or an interrupted flow stops its whole process
  group (flows.processes.stop_group), and the running process is recorded for the next run (flows.lifetime).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

from flows.processes import group_alive, stop_group
from flows.stagehost import StageHost, stage_env, warm_stages_enabled

TAIL_LINES = 60
HOSTED_COMMANDS = (["lmcycle", "stage"], ["lmcycle", "register"])  # what the warm stage host may fork

Argv = list[str] | str


class ProcessHandle(Protocol):
    pid: int
    stdout: IO[str]

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Executor(Protocol):
    def start(
        self, argv: Argv, cwd: str, env: dict[str, str], note: Callable[[str], None] | None = None
    ) -> ProcessHandle:
        """Start `argv` in `cwd` with exactly `env`, leading its own process group, stdout and stderr to the
        handle's `stdout`; `note` hears a line about how it was started when that is worth saying."""
        ...

    def warm(self) -> bool:
        """Whether `lmcycle` commands start without paying their imports (then registration runs as one too)."""
        ...


class FreshProcess:
    """A new process, as `dvc repro` would start it, in a session of its own, with a parent-death SIGTERM."""

    def start(
        self, argv: Argv, cwd: str, env: dict[str, str], note: Callable[[str], None] | None = None
    ) -> ProcessHandle:
        from flows.lifetime import die_with_parent

        return subprocess.Popen(
            exec_in_place(argv),
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

    def warm(self) -> bool:
        return False


class WarmHost:
    """`lmcycle stage|register` commands forked by a warm stage host; anything else, or when the host is gone or
    does not answer, a fresh process."""

    def __init__(self, host: StageHost, fallback: Executor | None = None):
        self.host = host
        self.fallback = fallback or FreshProcess()

    def start(
        self, argv: Argv, cwd: str, env: dict[str, str], note: Callable[[str], None] | None = None
    ) -> ProcessHandle:
        words = lmcycle_command(argv)
        if words is not None and self.host.alive():
            try:
                return self.host.spawn(words, cwd, env)
            except OSError as err:
                (note or print)(f"warm stage host unavailable ({err}); starting a fresh process")
        return self.fallback.start(argv, cwd, env, note)

    def warm(self) -> bool:
        return self.host.alive()


_SHELL_OPERATORS = re.compile(r"[;&|<>()`\n]")  # a list, a pipeline, a redirection, a subshell
_PROGRAM = re.compile(r"[\w./+-]+")  # a program's name or path: no assignment, no expansion
_NOT_PROGRAMS = {"if", "for", "while", "until", "case", "exec", "cd", "export", "set", "eval", "source", "."}


def exec_in_place(argv: Argv) -> Argv:
    """`SHELL [OPTS] -c CMD` with CMD one plain command becomes `SHELL [OPTS] -c 'exec CMD'`, so the process started
    (the one the parent-death signal and the stage record are about) is the command itself, not a shell waiting on
    it: bash execs a lone command by itself, dash (`/bin/sh` on Debian, DVC's shell when SHELL is unset) does not,
    and a SIGKILLed flow then left the stage running under a shell that died alone. Anything else is unchanged."""
    if isinstance(argv, str) or len(argv) < 3 or argv[-2] != "-c":
        return argv
    command = argv[-1].strip()
    program = command.split(maxsplit=1)[0] if command else ""
    if _SHELL_OPERATORS.search(command) or not _PROGRAM.fullmatch(program) or program in _NOT_PROGRAMS:
        return argv
    return [*argv[:-1], f"exec {command}"]


def lmcycle_command(argv: Argv) -> list[str] | None:
    """The words of the `lmcycle stage|register …` command that `argv` runs (itself, `SHELL [OPTS] -c CMD` as DVC
    starts a command, or a command string); None for any other command."""
    if isinstance(argv, str):
        words = shlex.split(argv)
    elif len(argv) >= 3 and argv[-2] == "-c":
        words = shlex.split(argv[-1])
    else:
        words = list(argv)
    return words if words[:2] in HOSTED_COMMANDS else None


# --- the choice, and the host's lifetime --------------------------------------------------------------------

_prestarted: dict[Path, StageHost] = {}


@contextlib.contextmanager
def executor_for(root: Path) -> Iterator[Executor]:
    """The executor of one flow run in workspace `root`: a warm stage host (the one `lmcycle run` started early,
    else a new one) unless LMCYCLE_WARM_STAGES=0 or it cannot start; fresh processes then. The host is closed at
    the end."""
    host = take_prestarted(root) or start_host(root)
    try:
        yield WarmHost(host) if host is not None else FreshProcess()
    finally:
        if host is not None:
            host.close()


def start_host(root: Path) -> StageHost | None:
    """A host for the workspace `root`, or None when LMCYCLE_WARM_STAGES=0 or it cannot start (stages then start
    as fresh processes)."""
    if not warm_stages_enabled():
        return None
    try:
        (root / ".lmcycle").mkdir(exist_ok=True)
        return StageHost.start(root, {**os.environ, **stage_env()}, log=root / ".lmcycle" / "stagehost.log")
    except OSError as err:
        print(f"lmcycle: warm stage host not started ({err}); stages start as fresh processes", file=sys.stderr)
        return None


@contextlib.contextmanager
def prestarted(root: Path) -> Iterator[None]:
    """Start the host before the flow is even imported (`lmcycle run`), for the flow to adopt; closed here if the
    flow never took it."""
    root = root.resolve()
    host = start_host(root)
    if host is not None:
        _prestarted[root] = host
    try:
        yield
    finally:
        left = _prestarted.pop(root, None)
        if left is not None:
            left.close()


def take_prestarted(root: Path) -> StageHost | None:
    host = _prestarted.pop(root.resolve(), None)
    return host if host is not None and host.alive() else None


class CommandRunner:
    """Runs a stage's command (`(argv, cwd, env) -> exit code`, what lmcore.lifecycle.dvcadapter.reproduce_stage
    asks for) with an executor, its output line by line to `on_line`, its whole process group stopped at
    `deadline` (then `timed_out` is set) or when the flow is interrupted."""

    def __init__(
        self,
        deadline: float,
        grace_s: float,
        on_line: Callable[[str], None],
        executor: Executor | None = None,
        record: tuple[Path, str] | None = None,
    ):
        self.deadline, self.grace_s, self.on_line = deadline, grace_s, on_line
        self.executor = executor or FreshProcess()
        self.record = record  # (workspace, stage name): where the running stage is recorded (flows.lifetime)
        self.timed_out = threading.Event()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.exit_code: int | None = None

    def __call__(self, argv: Argv, cwd: str, env: dict[str, str]) -> int:
        from flows.lifetime import forget_stage, remember_stage

        proc = self.executor.start(argv, cwd, env, self.line)
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
        return code

    def line(self, text: str) -> None:
        self.tail.append(text)
        self.on_line(text)

    def _on_timeout(self, proc: ProcessHandle) -> None:
        self.timed_out.set()
        stop_group(proc, self.grace_s)
