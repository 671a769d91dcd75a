"""Races on a shared workspace: what two commands at once must not do to each other."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from conftest import copy_workspace, lmcycle


def wait_for_child_command(proc: subprocess.Popen, words: list[str], timeout_s: float = 120.0) -> None:
    """Until a descendant of `proc` runs a command line containing `words` (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{proc.args} ended early:\n{proc.stdout.read() if proc.stdout else ''}"
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if all(w in cmdline for w in words):
                return
        time.sleep(0.2)
    raise AssertionError(f"no {' '.join(words)} under {proc.args} within {timeout_s} s")


def test_overrides_never_rewrite_params_under_a_running_dvc_repro(data_workspace: Path, tmp_path: Path) -> None:
    """`lmcycle run -S` while `dvc repro` trains: DVC records params.yaml into dvc.lock after the command, so an
    override written meanwhile would be recorded for a model not trained with it. The override must fail in one line
    and leave params.yaml as the running stage read it."""
    root = copy_workspace(data_workspace, tmp_path / "ws", pretrain={"steps": 5000, "checkpoint_every": 5000})
    subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
    before = (root / "params.yaml").read_bytes()
    env = {**os.environ, "LMCYCLE_TRACKING": "off"}
    repro = subprocess.Popen(
        ["dvc", "repro", "pretrain"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for_child_command(repro, ["lmcycle", "stage", "pretrain"])
        proc = subprocess.run(
            ["lmcycle", "run", "--until", "pretrain", "-S", "pretrain.lr=0.001"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert repro.poll() is None, "the repro ended before the override was tried: the test proves nothing"
    finally:
        os.killpg(repro.pid, signal.SIGKILL)
        repro.wait(timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "params.yaml: not written: a running stage reads it" in lines[0]
    assert "Traceback" not in proc.stderr
    assert (root / "params.yaml").read_bytes() == before


def test_overrides_apply_when_no_dvc_command_runs(data_workspace: Path, tmp_path: Path) -> None:
    """The same override with the workspace idle goes through (the lock is DVC's, released when it ends)."""
    root = copy_workspace(data_workspace, tmp_path / "ws")
    proc = lmcycle("run", "--until", "ingest", "--no-register", "-S", "pretrain.lr=0.001", cwd=root, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lr: 0.001" in (root / "params.yaml").read_text()
