"""Faults and races: nothing a run starts outlives it, nothing is recorded that did not happen.

Each test is one scenario: a flow process killed with SIGKILL (its Prefect server, stage host and stages go too),
a stage host that answers too late, a kill between the two renames that replace a checkpoint, a malformed spool
line, a served model's answer. Real processes throughout; the long ones are marked `slow`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import copy_workspace

# --- helpers -----------------------------------------------------------------------------------------------


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(procs: list[psutil.Process]) -> str:
    lines = []
    for proc in procs:
        with_cmd = "?"
        with contextlib.suppress(psutil.Error):
            with_cmd = " ".join(proc.cmdline())[:160]
        lines.append(f"{proc.pid}: {with_cmd}")
    return "\n".join(lines)


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


class RunUnderTest:
    """`lmcycle run` started in a workspace, with every process it starts tracked as seen (they are reparented
    when it dies, so the set is collected while it lives) and killed at the end of the test whatever happens."""

    def __init__(self, root: Path, env: dict[str, str], *args: str):
        self.log = (root / "run.log").open("wb")
        self.proc = subprocess.Popen(["lmcycle", "run", *args], cwd=root, env=env, stdout=self.log, stderr=self.log)
        self.seen: dict[int, psutil.Process] = {}
        self.root = root

    def descendants(self) -> list[psutil.Process]:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        return [p for p in self.seen.values() if _alive(p)]

    def wait_for(self, what: str, ready, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            self.descendants()
            assert self.proc.poll() is None, f"lmcycle run ended before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s:\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return (self.root / "run.log").read_text(errors="replace")

    def kill9(self) -> list[psutil.Process]:
        """SIGKILL `lmcycle run`; what it had started and still ran then."""
        started = self.descendants()
        self.proc.kill()
        self.proc.wait()
        return started

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _kill_all(self.descendants())
        self.log.close()


def survivors(procs: list[psutil.Process], timeout_s: float = 60.0) -> list[psutil.Process]:
    """The processes of `procs` still alive after up to `timeout_s` (zombies count as ended)."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _is_prefect_server(proc: psutil.Process) -> bool:
    try:
        return "prefect.server.api.server:create_app" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _checkpoints(root: Path, stage: str = "pretrain") -> list[Path]:
    return sorted((root / "checkpoints" / stage).glob("step_*"))


@pytest.fixture
def long_pretrain(data_workspace: Path, tmp_path: Path) -> Path:
    """The tiny workspace after tokenize, with a pretrain long enough to be killed mid-run."""
    return copy_workspace(
        data_workspace,
        tmp_path / "ws",
        pretrain={"steps": 100_000, "checkpoint_every": 20, "eval_every": 100_000, "log_every": 100_000},
    )


def _run_env(**extra: str) -> dict[str, str]:
    """Tracking off; Prefect's ephemeral API server (started by `lmcycle run` itself) unless `extra` names one."""
    env = {**os.environ, "LMCYCLE_TRACKING": "off"}
    env.pop("PREFECT_API_URL", None)
    return {**env, **extra}


# --- A: the ephemeral Prefect server -------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_of_lmcycle_run_leaves_no_ephemeral_server_host_or_stage(long_pretrain: Path):
    run = RunUnderTest(long_pretrain, _run_env(LMCYCLE_WARM_STAGES="1"), "--until", "pretrain")
    try:
        run.wait_for("ephemeral Prefect server", lambda: any(_is_prefect_server(p) for p in run.descendants()))
        run.wait_for("pretrain checkpoint", lambda: _checkpoints(long_pretrain))
        started = run.kill9()
        assert any(_is_prefect_server(p) for p in started)
        assert len(started) >= 3, _describe(started)  # the server, the stage host, the trainer it forked
        left = survivors(started)
        assert not left, f"outlived `lmcycle run`:\n{_describe(left)}"
    finally:
        run.close()


# --- B: a stage started fresh --------------------------------------------------------------------------------


def _trainers(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The `lmcycle stage pretrain` processes the flow started: not the helpers they fork (a forked child shares
    its parent's command line, so a match whose parent also matches is a helper, not a trainer)."""
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if "stage pretrain" in " ".join(proc.cmdline()):
                found.append(proc)
    pids = {proc.pid for proc in found}
    return [proc for proc in found if _parent_pid(proc) not in pids]


def _parent_pid(proc: psutil.Process) -> int | None:
    try:
        return proc.ppid()
    except psutil.Error:
        return None


@pytest.mark.slow
def test_kill9_of_the_flow_mid_pretrain_leaves_no_trainer_and_the_rerun_resumes(long_pretrain: Path, prefect_api):
    # SHELL=/bin/sh: DVC's shell where SHELL is unset, and dash does not exec a lone command as bash does
    env = _run_env(LMCYCLE_WARM_STAGES="0", PREFECT_API_URL=prefect_api, SHELL="/bin/sh")
    run = RunUnderTest(long_pretrain, env, "--until", "pretrain")
    reruns: list[RunUnderTest] = []
    try:
        run.wait_for("pretrain checkpoint", lambda: _checkpoints(long_pretrain) and _trainers(run.descendants()))
        # the stage process the flow recorded, not a helper it forked (those share its command line)
        recorded = json.loads((long_pretrain / ".lmcycle" / "stage.json").read_text())
        trainer = psutil.Process(recorded["pid"])
        assert trainer in _trainers(run.descendants()), (recorded, _describe(run.descendants()))
        trainer.suspend()  # it cannot act on anything until resumed: a trainer of a killed run, still alive
        started = run.kill9()
        refused = RunUnderTest(long_pretrain, env, "--until", "pretrain")
        reruns.append(refused)
        assert refused.proc.wait(timeout=600) != 0
        errors = [line for line in refused.output().splitlines() if line.startswith("error:")]
        assert errors and "stage pretrain of a previous run is still running" in errors[-1], refused.output()[-3000:]
        assert _alive(trainer), f"the stopped trainer ended:\n{_describe(run.descendants())}\n{run.output()[-3000:]}"
        trainer.resume()  # the SIGTERM from its parent's death is delivered now: it checkpoints and exits
        left = survivors(started)
        assert not left, f"outlived `lmcycle run`:\n{_describe(left)}"
        rerun = RunUnderTest(long_pretrain, env, "--until", "pretrain")
        reruns.append(rerun)
        rerun.wait_for("resumed pretrain", lambda: "pretrain: resuming from" in rerun.output())
        rerun.proc.send_signal(signal.SIGTERM)
        rerun.proc.wait(timeout=120)
    finally:
        for each in [run, *reruns]:
            each.close()


# --- D: a warm stage host that answers too late --------------------------------------------------------------


def test_a_stage_host_answering_after_the_deadline_never_runs_the_stage_a_second_time(
    tmp_path: Path, kjv_slice: Path, chatter_slice: Path
):
    """The flow gives up on a stopped host and starts the stage itself; the request left in the host's socket is
    withdrawn, so exactly one stage process runs (each writes its own spool file: stage.PID.jsonl)."""
    from conftest import make_workspace, tiny_params

    from flows.executor import CommandRunner, WarmHost
    from flows.stagehost import StageHost, stage_env
    from lmcore.lifecycle.tracking import SPOOL_ENV

    root = make_workspace(tmp_path / "ws", tiny_params(kjv_slice, chatter_slice), dvc=False)
    spool = tmp_path / "spool"
    env = {**os.environ, **stage_env(), SPOOL_ENV: str(spool), "LMCYCLE_TRACKING": "on"}
    log = tmp_path / "host.log"
    host = StageHost.start(root, env, log=log)
    host.ready_s = 3.0
    try:
        deadline = time.monotonic() + 60
        while not host.socket_path.exists():  # bound: it serves from here on
            assert host.alive() and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(host.proc.pid, signal.SIGSTOP)
        lines: list[str] = []
        runner = CommandRunner(time.monotonic() + 300, 5.0, lines.append, WarmHost(host))
        # no tokens in this workspace: pretrain fails, after it started
        assert runner(["/bin/sh", "-c", "lmcycle stage pretrain"], str(root), env) != 0
        assert any("did not answer in 3 s" in line for line in lines), lines
        assert not any("closed the connection" in line for line in lines), lines
        os.kill(host.proc.pid, signal.SIGCONT)
        while "withdrew" not in log.read_text() and time.monotonic() < deadline + 120:  # the host caught up
            assert host.alive()
            if len(list(spool.glob("*.jsonl"))) > 1:
                break
            time.sleep(0.1)
        host.close()
        ran = sorted(p.name for p in spool.glob("*.jsonl"))
        assert len(ran) == 1, f"stage processes that ran: {ran}\n{log.read_text()}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(host.proc.pid, signal.SIGCONT)
        host.close()


# --- E: a grace period Prefect's cancellation would cut short -----------------------------------------------


def test_a_kill_grace_longer_than_prefects_cancellation_window_is_refused(tmp_path: Path):
    import shutil

    from conftest import REPO

    from lmcore.errors import ConfigError
    from lmcore.lifecycle.config import apply_overrides, load_config

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_bytes()
    with pytest.raises(ConfigError) as err:
        apply_overrides(["flow.kill_grace_s=40"], params)
    assert str(err.value).startswith("flow.kill_grace_s: must be ≤ 25, got 40")
    assert "\n" not in str(err.value)
    assert params.read_bytes() == before
    assert load_config(params).flow.kill_grace_s == 10.0
    assert apply_overrides(["flow.kill_grace_s=25"], params).flow.kill_grace_s == 25.0


# --- F: a kill between the two renames that replace a directory ---------------------------------------------

_KILLED_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path

real = {name}
def killed_before_moving_in(src, dst):
    if Path(dst).name == sys.argv[2] and Path(src).name != sys.argv[2] and not Path(dst).name.startswith("."):
        if any(p.name.startswith(".") and p.is_dir() and p != Path(src) for p in Path(dst).parent.iterdir()):
            os._exit(9)  # the old copy is aside, the new one not yet in place
    return real(src, dst)
{name} = killed_before_moving_in
"""


def _killed_mid_replace(code: str) -> None:
    proc = subprocess.run(["python", "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-3000:]


def test_a_checkpoint_replaced_by_a_writer_killed_between_its_renames_is_still_resumed(tmp_path: Path):
    import torch

    from lmcore.train import checkpoint as ck

    root = tmp_path / "checkpoints"
    weights = {"w": torch.arange(6, dtype=torch.float32)}
    ck.write_checkpoint(root, 10, weights, {"opt": 1}, {}, {"fingerprint": "fp"})
    code = _KILLED_BETWEEN_RENAMES.format(name="os.rename") + (
        "import torch\nfrom lmcore.train import checkpoint as ck\n"
        "ck.write_checkpoint(Path(sys.argv[1]), 10, {'w': torch.zeros(6)}, {'opt': 2}, {}, {'fingerprint': 'fp'})\n"
    )
    _killed_mid_replace(code.replace("sys.argv[1]", repr(str(root))).replace("sys.argv[2]", repr("step_0000010")))
    assert not (root / "step_0000010").exists()  # the kill landed in the window
    found = ck.find_resumable(root, "fp")
    assert found is not None and found.path.name == "step_0000010"
    assert torch.equal(ck.load_weights(found.path)["w"], weights["w"])
    assert sorted(p.name for p in root.iterdir()) == ["step_0000010"]


def test_a_tokenizer_directory_replaced_by_a_writer_killed_between_its_renames_comes_back(tmp_path: Path):
    from lmcore.files import atomic_directory

    target = tmp_path / "tokenizer"
    with atomic_directory(target) as tmp:
        (tmp / "tokenizer.json").write_text("first")
    code = _KILLED_BETWEEN_RENAMES.format(name="os.replace") + (
        "from lmcore.files import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1])) as tmp:\n    (tmp / 'tokenizer.json').write_text('second')\n"
    )
    _killed_mid_replace(code.replace("sys.argv[1]", repr(str(target))).replace("sys.argv[2]", repr("tokenizer")))
    assert not target.exists()  # the kill landed in the window
    with pytest.raises(RuntimeError), atomic_directory(target):  # the next write starts, and fails
        raise RuntimeError("a failed rewrite")
    assert (target / "tokenizer.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


# --- C: what a served model calls itself ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_registered_model_answers_under_its_registered_name_not_a_local_path(
    pretrained_workspace, tmp_path, monkeypatch
):
    """Through pyfunc and through `mlflow models serve` (its /invocations answer wraps that same predict)."""
    import mlflow
    from mlflow.models import Model

    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.registry.register import register_model

    monkeypatch.setenv("LMCYCLE_CACHE", str(tmp_path / "cache"))
    root = copy_workspace(pretrained_workspace, tmp_path / "ws", project={"registered_model": "faults-served"})
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    register_model(Paths.of(root), load_config(root / "params.yaml"))
    model = mlflow.pyfunc.load_model("models:/faults-served@champion")
    out = model.predict({"messages": [{"role": "user", "content": "Who made the heaven?"}], "max_tokens": 4})
    assert out[0]["object"] == "chat.completion"
    assert out[0]["model"] == "faults-served"
    recorded = json.dumps(Model.load("models:/faults-served@champion").flavors["transformers"])
    assert str(root) not in recorded and str(tmp_path) not in recorded, recorded
    answer = _served_answer("models:/faults-served@champion", tmp_path / "serve.log")
    assert answer["model"] == "faults-served" and "/" not in answer["model"], answer
    assert answer["choices"][0]["message"]["role"] == "assistant"


def _served_answer(uri: str, log_path: Path) -> dict:
    """One OpenAI-style chat request to `mlflow models serve` on a free 127.0.0.1 port, stopped by process group."""
    import socket
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        return answer["predictions"][0] if "predictions" in answer else answer[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- G: the spool forwarder -----------------------------------------------------------------------------------


def test_a_malformed_spool_line_loses_no_later_event_and_never_fails_a_finished_stage(tmp_path: Path, capfd):
    """The final poll (at the stage's end) meets a line that is no event: it is skipped with a warning, the events
    after it are still logged, and leaving the forwarder raises nothing."""
    from lmcore.lifecycle.tracking import SpoolForwarder, SpoolReporter, connect

    client, experiment_id = connect(tmp_path, "spool-faults")
    spool = tmp_path / "spool"
    with SpoolForwarder(spool, client, experiment_id, interval_s=3600) as forwarder:  # only the final poll
        rep = SpoolReporter(spool / "toy.1.jsonl")
        rep.write("start", stage="toy", root=str(tmp_path), tags={}, params={"a": 1})
        rep.log_metrics({"toy.loss": 1.0}, step=1)
        rep.file.write('{"op": "metrics", "data": {"toy.loss": 0.5}, "st\n')  # cut short, then a newline
        rep.file.write("[1, 2]\n")  # JSON, but no event
        rep.log_metrics({"toy.loss": 0.25}, step=3)
        rep.write("end", status="FINISHED", error="", env={})
        rep.close()
    (run,) = map(client.get_run, forwarder.run_ids)
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "toy.loss")] == [(1, 1.0), (3, 0.25)]
    assert capfd.readouterr().err.count("skipped a malformed line") == 2


# --- E: Ctrl-C in a terminal ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_the_run_and_its_last_calls_still_reach_the_ephemeral_server(long_pretrain: Path):
    """A terminal's Ctrl-C signals the whole foreground process group. The ephemeral Prefect server lives in a
    session of its own, so it outlives the signal long enough for the flow's last calls (its summary artifact);
    once stopped there, it left the run retrying against a dead server for minutes."""
    log = (long_pretrain / "run.log").open("wb")
    proc = subprocess.Popen(
        ["lmcycle", "run", "--until", "pretrain"],
        cwd=long_pretrain,
        env=_run_env(LMCYCLE_WARM_STAGES="1"),
        stdout=log,
        stderr=log,
        start_new_session=True,  # a process group of its own, as a shell gives a foreground job
    )
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 300
        while not _checkpoints(long_pretrain):
            assert proc.poll() is None and time.monotonic() < deadline, (long_pretrain / "run.log").read_text()[-3000:]
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert proc.wait(timeout=120) != 0
        output = (long_pretrain / "run.log").read_text(errors="replace")
        # the flow run's final state reached the server, which answered until Prefect itself stopped it at exit
        # (an event still in flight after that may fail to send, which is not this fault)
        assert re.search(r"Flow run '[^']+' - Finished in state (Crashed|Failed|Cancelled)", output), output[-3000:]
        assert "Unable to connect" not in output.split("Stopping temporary server")[0], output[-3000:]
        left = survivors(list(seen.values()))
        assert not left, f"outlived `lmcycle run`:\n{_describe(left)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _kill_all(list(seen.values()))
        log.close()
