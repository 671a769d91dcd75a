"""`lmcycle run` as a user drives it: `flow.stage_timeout_s` set with -S stops a stage's whole tree, and Ctrl-C
stops the run and its stage, leaving the workspace free for the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
from test_flow import STUBBORN_STAGE, script, synthetic_workspace

from flows.processes import group_alive


def stage_pids(root: Path, proc: subprocess.Popen | None = None, timeout_s: float = 180.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while not (root / "pids.txt").exists():
        assert proc is None or proc.poll() is None, proc.communicate()[1][-3000:] if proc else ""
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.2)
    time.sleep(0.2)
    return [int(p) for p in (root / "pids.txt").read_text().split()]


def gone(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


def slow_workspace(tmp_path: Path, kjv: Path, chatter: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    stages = {"slow": {"cmd": script(root, "slow.py", STUBBORN_STAGE), "outs": ["never.txt"]}}
    return synthetic_workspace(root, kjv, chatter, stages, flow={"retries": 0, "kill_grace_s": 2.0})


def test_a_stage_timeout_set_with_s_stops_the_stage_through_lmcycle_run(
    tmp_path, kjv_slice, chatter_slice, prefect_api
):
    root = slow_workspace(tmp_path, kjv_slice, chatter_slice)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "LMCYCLE_TRACKING": "off"}
    proc = subprocess.run(
        ["lmcycle", "run", "--no-register", "-S", "flow.stage_timeout_s=6"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: stage slow timed out after 6 s (flow.stage_timeout_s)"
    assert (root / "terminated.txt").read_text() == "checkpoint saved"  # SIGTERM first, as a trainer needs
    pids = [int(p) for p in (root / "pids.txt").read_text().split()]
    assert gone(pids) and not group_alive(pids[0])
    assert "stage_timeout_s: 6" in (root / "params.yaml").read_text()


def test_ctrl_c_stops_lmcycle_run_and_its_stage_and_frees_the_workspace(
    tmp_path, kjv_slice, chatter_slice, prefect_api
):
    root = slow_workspace(tmp_path, kjv_slice, chatter_slice)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "LMCYCLE_TRACKING": "off"}
    run = subprocess.Popen(
        ["lmcycle", "run", "--no-register"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pids = stage_pids(root, run)
        run.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
        run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0
    deadline = time.monotonic() + 30
    while not gone(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone(pids), "the stage outlived Ctrl-C of lmcycle run"
    assert (root / "terminated.txt").read_text() == "checkpoint saved"
    (root / "pids.txt").unlink()
    again = subprocess.run(
        ["lmcycle", "run", "--no-register", "-S", "flow.stage_timeout_s=4"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # the workspace lock and DVC's lock were released: the next run gets as far as the stage again
    assert "timed out after 4 s" in again.stderr, again.stderr[-3000:]
