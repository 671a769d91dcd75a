"""The warm stage host: a forked `lmcycle stage` behaves like the fresh process DVC would start (the caller's
argv, environment and directory, its output and exit status, bit-identical results, its own process group), and
nothing it forked outlives a timeout or the host itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import copy_workspace, needs_fork_host

from flows.processes import group_alive, stop_group
from flows.stagehost import HostedProcess, StageHost, stage_env

pytestmark = needs_fork_host


@pytest.fixture
def host(tmp_path: Path):
    # tracking on and the session's MLFLOW_TRACKING_URI: a child must take the caller's settings, not these
    env = {k: v for k, v in {**os.environ, **stage_env()}.items() if k != "LMCYCLE_TRACKING"}
    elsewhere = tmp_path / "host-cwd"
    elsewhere.mkdir()
    started = StageHost.start(elsewhere, env)  # not the workspace: a child must take the caller's directory
    yield started
    started.close()


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def read_until(proc: HostedProcess, marker: str, timeout_s: float = 120.0) -> str:
    seen = ""
    deadline = time.monotonic() + timeout_s
    while marker not in seen:
        assert time.monotonic() < deadline, seen[-2000:]
        line = proc.stdout.readline()
        assert line, f"output ended before {marker!r}:\n{seen[-2000:]}"
        seen += line
    return seen


SHORT_PRETRAIN = {"steps": 20, "eval_every": 10, "checkpoint_every": 10}
LONG_PRETRAIN = {"steps": 100_000, "eval_every": 100_000, "checkpoint_every": 100_000}


def outputs(ws: Path) -> dict[str, bytes]:
    """The stages' reports (json, csv) and the exported weights, by path."""
    files = [p for p in (ws / "reports").rglob("*") if p.suffix in {".json", ".csv"}]
    files += [ws / "models/pretrain/hf/model.safetensors", ws / "models/finetune/hf/model.safetensors"]
    return {p.relative_to(ws).as_posix(): p.read_bytes() for p in files}


def runs_of(tracking_uri: str, ws: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, f"tags.`lmcycle.workspace` = '{ws}'") if ids else []
    return sorted(r.info.run_name for r in found)


def test_a_hosted_stage_matches_a_fresh_process_bit_for_bit(tmp_path, pretrained_workspace, host):
    hosted = copy_workspace(pretrained_workspace, tmp_path / "hosted", pretrain=SHORT_PRETRAIN)
    fresh = copy_workspace(pretrained_workspace, tmp_path / "fresh", pretrain=SHORT_PRETRAIN)
    caller_uri = f"sqlite:///{tmp_path / 'caller-mlflow.db'}"  # not the host's: the caller's environment wins
    env = {**os.environ, **stage_env(), "MLFLOW_TRACKING_URI": caller_uri}
    env.pop("LMCYCLE_TRACKING", None)

    for stage in ("pretrain", "finetune"):
        proc = host.spawn(["lmcycle", "stage", stage], hosted, env)
        out = proc.stdout.read()
        assert proc.wait(timeout=300) == 0, out
        assert f"stage {stage}" in out  # its output came through the caller's pipe
        ran = subprocess.run(["lmcycle", "stage", stage], cwd=fresh, env=env, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr[-3000:]
    assert not (tmp_path / "host-cwd" / "models").exists()  # it ran in the caller's directory
    assert runs_of(caller_uri, hosted) == ["finetune", "pretrain"]  # logged where the caller said
    assert runs_of(os.environ["MLFLOW_TRACKING_URI"], hosted) == []  # not where the host was started

    hosted_out, fresh_out = outputs(hosted), outputs(fresh)
    assert {"reports/pretrain.json", "reports/pretrain/train.csv", "reports/finetune.json"} <= set(hosted_out)
    assert hosted_out == fresh_out

    bad = host.spawn(["lmcycle", "stage", "nope"], hosted, env)
    assert "unknown stage 'nope'" in bad.stdout.read()
    assert bad.wait(timeout=30) == 2


def test_a_stopped_hosted_stage_checkpoints_and_leaves_nothing_behind(tmp_path, pretrained_workspace, host):
    long_run = {"steps": 100_000, "eval_every": 100_000, "checkpoint_every": 100_000}
    ws = copy_workspace(pretrained_workspace, tmp_path / "ws", pretrain=long_run)
    env = {**os.environ, **stage_env(), "LMCYCLE_TRACKING": "off"}

    proc = host.spawn(["lmcycle", "stage", "pretrain"], ws, env)
    assert os.getpgid(proc.pid) == proc.pid  # it leads its own process group, like start_new_session=True
    read_until(proc, "tok/s")  # training
    stop_group(proc, grace_s=30.0)  # what a stage timeout does
    assert proc.wait(timeout=30) != 0
    assert any((ws / "checkpoints" / "pretrain").glob("step_*"))  # SIGTERM: the trainer saved first
    assert not group_alive(proc.pid)

    again = host.spawn(["lmcycle", "stage", "pretrain"], ws, env)
    read_until(again, "tok/s")
    host.close()  # the flow went away: the host stops what it forked before it exits
    assert gone(again.pid)
    assert not host.alive()


def test_the_host_is_on_by_default_only_where_fork_is_safe_and_the_variable_decides(monkeypatch):
    from flows.stagehost import warm_stages_enabled

    monkeypatch.setenv("LMCYCLE_WARM_STAGES", "0")
    assert not warm_stages_enabled()
    monkeypatch.setenv("LMCYCLE_WARM_STAGES", "1")
    assert warm_stages_enabled()
    monkeypatch.delenv("LMCYCLE_WARM_STAGES")
    assert warm_stages_enabled() == (not Path("/dev/nvidiactl").exists())  # this is Linux


@pytest.mark.parametrize("host_state", ["live", "closed"])
def test_the_flow_runs_lmcycle_stage_commands_through_the_host_or_else_as_fresh_processes(
    tmp_path, pretrained_workspace, host, host_state
):
    from flows.executor import CommandRunner, WarmHost

    if host_state == "closed":
        host.close()
    ws = copy_workspace(pretrained_workspace, tmp_path / "ws", pretrain=LONG_PRETRAIN)
    env = {**os.environ, **stage_env(), "LMCYCLE_TRACKING": "off"}
    parents: list[int] = []

    def on_line(line: str) -> None:
        if "tok/s" not in line or parents:
            return
        # training, so the stage is alive: who started it? (the host's forks and fresh processes alike are
        # descendants of this process, which started the host)
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if proc.cwd() == str(ws) and proc.ppid() in {host.proc.pid, os.getpid()}:
                    parents.append(proc.ppid())
                    os.killpg(os.getpgid(proc.pid), signal.SIGTERM)  # done: stop it as a timeout would

    runner = CommandRunner(time.monotonic() + 600, 30.0, on_line, WarmHost(host))
    assert runner(["/bin/sh", "-c", "lmcycle stage pretrain"], str(ws), env) != 0  # as DVC hands it over
    assert parents == [host.proc.pid if host_state == "live" else os.getpid()]
    assert runner.exit_code != 0

    lines: list[str] = []
    runner = CommandRunner(time.monotonic() + 60, 5.0, lines.append, WarmHost(host))
    assert runner(["/bin/sh", "-c", "lmcycle stage nope"], str(tmp_path), env) == 2
    assert any("unknown stage 'nope'" in line for line in lines)
    assert runner.exit_code == 2


def test_a_registration_forked_from_the_host_fails_with_its_own_one_line_error(workspace_factory, host):
    from flows.executor import CommandRunner, WarmHost
    from flows.lifecycle import _register_command
    from lmcore.errors import LmcycleError

    ws = workspace_factory(dvc=False)  # params, but no trained model yet
    lines: list[str] = []
    runner = CommandRunner(time.monotonic() + 120, 5.0, lines.append, WarmHost(host))
    with pytest.raises(LmcycleError, match=r"registration failed \(exit code 1\): .*model") as failure:
        _register_command(runner, ws, None, None, timeout_s=120.0)
    assert "\n" not in str(failure.value)
    assert any(line.startswith("error:") for line in lines)
    expired = CommandRunner(time.monotonic(), 0.5, lines.append, WarmHost(host))  # the deadline is already here
    with pytest.raises(LmcycleError, match=r"^registration timed out after 7 s \(flow\.stage_timeout_s\)$"):
        _register_command(expired, ws, None, None, timeout_s=7.0)


def test_a_registration_without_a_host_runs_as_a_process_the_timeout_stops(workspace_factory):
    """Without a warm host the flow registers in a fresh process, not in its own: a hung registration is stopped
    by flow.stage_timeout_s like a stage (and leaves no process behind)."""
    import psutil

    from flows.executor import CommandRunner, FreshProcess
    from flows.lifecycle import _register_command
    from lmcore.errors import LmcycleError

    ws = workspace_factory(dvc=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    lines: list[str] = []
    expired = CommandRunner(time.monotonic(), 0.5, lines.append, FreshProcess())
    with pytest.raises(LmcycleError, match=r"^registration timed out after 3 s \(flow\.stage_timeout_s\)$"):
        _register_command(expired, ws, None, None, timeout_s=3.0)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
    assert not [p for p in left if p.status() != psutil.STATUS_ZOMBIE], left


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_a_fresh_stage_process_is_the_command_itself_not_a_shell_waiting_on_it(shell):
    """DVC starts `$SHELL -c CMD` (/bin/sh without SHELL): dash waits on CMD as its child where bash execs it, and
    the parent-death signal and the stage record are the started process's. A plain command runs in place."""
    from flows.executor import FreshProcess, exec_in_place

    proc = FreshProcess().start([shell, "-c", "sleep 30"], os.getcwd(), dict(os.environ))
    try:
        deadline = time.monotonic() + 10
        while psutil.Process(proc.pid).name() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(proc.pid).cmdline() == ["sleep", "30"]
    finally:
        stop_group(proc, 5.0)
    for compound in ("a && b", "a | b", "X=1 run", "cd x", "echo $(date)", "run > out"):
        assert exec_in_place([shell, "-c", compound]) == [shell, "-c", compound]
    assert exec_in_place(["lmcycle", "stage", "pretrain"]) == ["lmcycle", "stage", "pretrain"]
