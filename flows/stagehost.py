"""A warm interpreter that forks `lmcycle stage` commands, so a flow run pays for `import torch` once, not per stage.

Why by hand: before it does any work a stage process spends 3–5 s importing torch, torch._dynamo (which every
torch optimizer pulls in), transformers and matplotlib, and a small run does less work than that. The standard
library's forkserver cannot give a child the caller's stdout, environment, working directory and own process group,
which a stage needs to behave exactly like the process DVC would have started. The host:
- binds its Unix socket first, then imports the stages' libraries one module at a time, serving requests between
  imports (an early stage never waits for torch);
- stays single-threaded and never runs torch work itself, so a fork of it is as clean as a fresh interpreter;
- forks one child per request. The child leads its own process group (it can be signalled as a whole, as with
  `start_new_session=True`; the host itself runs in a session of its own, without a terminal), takes the caller's
  pipe as stdout and stderr, its environment and working directory, runs the `lmcycle` command line and exits
  with its status. The host reports the child's pid at once and its exit status when it ends. The child starts the
  command only once the caller confirms it took the pid: a caller that gave up waiting (`StageHost.ready_s`) and
  started the command itself has closed the connection, and the request still queued here is never run;
- exits when its stdin closes (the flow process ended, however it ended), stopping any child still running.

Client side: `StageHost.start()` in the flow process, `StageHost.spawn(argv, cwd, env)` → a `HostedProcess`
with `pid`, `stdout` (a text stream), `poll()` and `wait()`: flows.executor.WarmHost is the executor built on it.
See `warm_stages_enabled` for where it runs by default.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from flows.lifetime import set_parent_death_signal

WARM_ENV = "LMCYCLE_WARM_STAGES"
_HEADER = struct.Struct("!I")
_GO = b"g"  # the caller's confirmation that a forked command may run
READY_S = 30.0  # how long the flow waits for the host to answer before starting the command itself
# The command line a child runs: the `lmcycle` entry point (pyproject's [project.scripts]), named rather than
# imported here, since the command line itself starts hosts (a child runs it as a fresh `lmcycle` process would).
ENTRY = "flows.cli:app"

# What the stages import, cheapest first so that ingest and tokenizer are served before torch is loaded.
PRELOAD = [
    "flows.cli",
    "lmcore.lifecycle.config",
    "lmcore.lifecycle.tracking",
    "dvc.repo",  # a stage's tracking reads its dvc.yaml definition through DVC (lmcore.lifecycle.dvcadapter)
    "dvc.dvcfile",
    "dvc.parsing",
    "dvc.scm",
    "dvc.data_cloud",
    "dvc.cachemgr",
    "dvc.repo.plots",
    "dvc.repo.stage",
    "dvc.utils.strictyaml",
    "lmcore.lifecycle.stages.ingest",
    "lmcore.lifecycle.stages.tokenizer",
    "lmcore.lifecycle.stages.tokenize",
    "numpy",
    "tokenizers",
    "torch",
    "torch._dynamo",
    "safetensors.torch",
    "lmcore.model",
    "lmcore.kernels",
    "lmcore.engine",
    "lmcore.train.loop",
    "lmcore.lifecycle.stages.pretrain",
    "lmcore.lifecycle.stages.finetune",
    "lmcore.lifecycle.stages.evaluate",
    "lmcore.export",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "mlflow",  # registration (`lmcycle register`), the flow's last step
    "mlflow.transformers",
    "lmcore.lifecycle.registry.register",
]


def warm_stages_enabled() -> bool:
    """LMCYCLE_WARM_STAGES=1/0 decides; by default the host runs on Linux machines without NVIDIA GPUs. Elsewhere
    fork is not safe to assume: macOS system frameworks do not survive it, and a CUDA driver initialised by any
    import in the host would be unusable in its children (there, imports are a negligible share of a run)."""
    choice = os.environ.get(WARM_ENV, "").strip().lower()
    if choice:
        return choice not in {"0", "off", "false", "no"} and hasattr(os, "fork")
    return sys.platform.startswith("linux") and not Path("/dev/nvidiactl").exists()


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What a stage command's environment adds to ours: this interpreter's bin/ first on PATH (DVC runs
    `lmcycle stage` by name), unbuffered output (so it streams), plus `extra`."""
    env = {"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# --- the host process ---------------------------------------------------------------------------------------


def serve(socket_path: str, modules: list[str]) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(8)
    pending = list(modules)
    children: dict[int, socket.socket] = {}
    try:
        while True:
            timeout = 0.0 if pending else 0.2
            readable, _, _ = select.select([listener, sys.stdin], [], [], timeout)
            if sys.stdin in readable and not os.read(sys.stdin.fileno(), 4096):
                return  # our caller is gone
            if listener in readable:
                conn, _ = listener.accept()
                _serve_request(conn, listener, children)
            _reap(children)
            if pending and not readable:
                _preload(pending.pop(0))
    finally:
        _stop_children(children)
        listener.close()


def _preload(module: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as err:  # a missing optional library only costs the child its own import later
        print(f"stagehost: preloading {module} failed: {err}", file=sys.stderr)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 4)
    while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
        more = conn.recv(1 << 20)
        if not more:
            raise ConnectionError("request cut short")
        data += more
    (size,) = _HEADER.unpack_from(data)
    return json.loads(data[_HEADER.size : _HEADER.size + size]), list(fds)


def _reply(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(message).encode() + b"\n")


def _serve_request(conn: socket.socket, listener: socket.socket, children: dict[int, socket.socket]) -> None:
    try:
        request, fds = _receive(conn)
    except (OSError, ValueError, ConnectionError) as err:
        print(f"stagehost: bad request: {err}", file=sys.stderr)
        conn.close()
        return
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        _reply(conn, {"error": "expected one file descriptor for the output"})
        conn.close()
        return
    if _cuda_initialized():
        _reply(conn, {"error": "CUDA was initialised in the stage host; a forked child could not use it"})
        conn.close()
        return
    host = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        set_parent_death_signal(signal.SIGTERM, host)  # should the host be killed outright, the stage goes too
        listener.close()
        _await_go(conn, request)
        _run_child(request, fds[0])
    with contextlib.suppress(OSError):  # also here, so that the group exists before anyone is told the pid
        os.setpgid(pid, pid)
    os.close(fds[0])
    children[pid] = conn
    _reply(conn, {"pid": pid})


def _await_go(conn: socket.socket, request: dict[str, Any]) -> None:
    """In the child: run only once the caller, told the pid, confirms it still wants the command. A caller that
    gave up waiting (this host was slow to answer) has closed the connection and started the command itself."""
    try:
        go = conn.recv(1)
    except OSError:
        go = b""
    conn.close()
    if go != _GO:
        print(f"stagehost: the caller withdrew the request; not run: {' '.join(request['argv'])}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(0)


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _run_child(request: dict[str, Any], out_fd: int) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group, as with start_new_session=True (the host has no terminal)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        os.close(devnull)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = list(request["argv"])
        module, _, name = ENTRY.partition(":")
        app = getattr(importlib.import_module(module), name)
        app(args=sys.argv[1:], prog_name="lmcycle")  # typer ends with SystemExit
        code = 0
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _reap(children: dict[int, socket.socket]) -> None:
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            conn = children.pop(pid)
            _reply(conn, {"returncode": os.waitstatus_to_exitcode(status)})
            conn.close()


def _stop_children(children: dict[int, socket.socket], grace_s: float = 10.0) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while children and time.monotonic() < deadline:
        _reap(children)
        time.sleep(0.05)
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        children.pop(pid).close()


# --- the flow's side ----------------------------------------------------------------------------------------


class _Replies:
    """JSON lines from the host over the socket, read without a buffer that select() cannot see into."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buffer = conn, b""

    def read(self, timeout: float | None) -> dict[str, Any] | None:
        """The next message; None when none came within `timeout`; {} when the host closed the connection."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.conn], [], [], left)
            if not readable:
                return None
            chunk = self.conn.recv(65536)
            if not chunk:
                return {}
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


class HostedProcess:
    """A stage command forked by the host: enough of Popen's interface for the flow's stage runner.

    Like Popen, safe to poll from one thread while another waits (a timeout stops the process from a timer
    thread): the host's reply is read under a lock held for at most one short read.
    """

    def __init__(self, replies: _Replies, pid: int, stdout: IO[str]):
        self.replies, self.pid, self.stdout = replies, pid, stdout
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._returncode(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._returncode(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"stage process {self.pid}", timeout or 0.0)
        return code

    def _returncode(self, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.returncode is None:
                    left = 0.05 if deadline is None else min(0.05, max(0.0, deadline - time.monotonic()))
                    message = self.replies.read(left)
                    if message is not None:  # {}: the host died, and with it our way to learn the status
                        self.returncode = int(message.get("returncode", -signal.SIGKILL))
                        self.replies.conn.close()
                if self.returncode is not None or (deadline is not None and time.monotonic() >= deadline):
                    return self.returncode


class StageHost:
    """The flow's handle on a running host (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, socket_path: Path, folder: Path, ready_s: float = READY_S):
        self.proc, self.socket_path, self.folder, self.ready_s = proc, socket_path, folder, ready_s

    @classmethod
    def start(cls, cwd: Path, env: dict[str, str], log: Path | None = None) -> StageHost:
        folder = Path(tempfile.mkdtemp(prefix="lmcycle-host-"))  # short: a socket path holds ~100 bytes
        socket_path = folder / "host.sock"
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "flows.stagehost", str(socket_path)],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        return cls(proc, socket_path, folder)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def spawn(
        self, argv: list[str], cwd: str | Path, env: dict[str, str], ready_s: float | None = None
    ) -> HostedProcess:
        """Fork `argv` (an `lmcycle …` command line) in the host; raises OSError when the host cannot, or does not
        answer within `ready_s` (default `self.ready_s`). The forked command runs only after this side confirms it
        took the pid, so a request given up here is never run there too."""
        ready_s = self.ready_s if ready_s is None else ready_s
        conn = self._connect(ready_s)
        read_fd, write_fd = os.pipe()
        try:
            body = json.dumps({"argv": argv, "cwd": str(cwd), "env": env}).encode()
            socket.send_fds(conn, [_HEADER.pack(len(body)) + body], [write_fd])
        except OSError:
            os.close(read_fd)
            conn.close()
            raise
        finally:
            os.close(write_fd)
        stdout = os.fdopen(read_fd, "r", encoding="utf-8", errors="replace")
        replies = _Replies(conn)
        message = replies.read(timeout=ready_s)
        if message is None:
            message = {"error": f"the stage host did not answer in {ready_s:g} s"}
        elif "pid" in message:
            try:
                conn.sendall(_GO)
            except OSError:
                message = {"error": "the stage host closed the connection"}
        if "pid" not in message:
            stdout.close()
            conn.close()  # a request still queued in the host is withdrawn: its child exits without running
            raise OSError(message.get("error") or "the stage host closed the connection")
        return HostedProcess(replies, int(message["pid"]), stdout)

    def _connect(self, ready_s: float) -> socket.socket:
        deadline = time.monotonic() + ready_s
        while True:
            if not self.alive():
                raise OSError(f"the stage host exited with code {self.proc.returncode}")
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(str(self.socket_path))
                return conn
            except (FileNotFoundError, ConnectionRefusedError):
                conn.close()
                if time.monotonic() > deadline:
                    raise OSError(f"the stage host did not answer in {ready_s:g} s") from None
                time.sleep(0.02)

    def close(self, timeout_s: float = 15.0) -> None:
        """Close the host's stdin (it stops any child and exits); kill it if it does not."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(OSError):
            self.socket_path.unlink(missing_ok=True)
            self.folder.rmdir()


def main() -> None:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # a device query at import must not init CUDA
    serve(sys.argv[1], PRELOAD)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip tearing down torch and friends: nothing of the host's needs it, and it takes a second


if __name__ == "__main__":
    main()
