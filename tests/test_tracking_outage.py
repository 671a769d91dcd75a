"""A tracking outage never kills training: the MLflow server dies mid-run, the stage trains on with one warning,
logs again once the server is back, finishes, and its run is tagged as having lost events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import copy_workspace


def start_mlflow(port: int, store: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--default-artifact-root", str(store / "art")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    from flows.deploy import server_answers

    deadline = time.monotonic() + 120
    try:
        while not server_answers(f"http://127.0.0.1:{port}"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
    except BaseException:  # a server that never answered is stopped too, not left running
        kill_group(proc)
        raise
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def metric_steps(uri: str, run_name: str = "pretrain") -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"attributes.run_name = '{run_name}'"
    )
    return [m.step for m in client.get_metric_history(runs[0].info.run_id, "pretrain.train_loss")] if runs else []


def read_lines(stream, into: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.extend(iter(stream.readline, "")), daemon=True)
    thread.start()
    return thread


def wait_until(condition, what: str, stage: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert stage.poll() is None, f"pretrain ended while waiting until {what}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_training_survives_a_tracking_outage(pretrained_workspace: Path, tmp_path: Path) -> None:
    """Kill the server once training logs, bring it back, and see the same process log again; then stop the
    stage (SIGTERM: the trainer checkpoints) so the test does not depend on how fast this machine trains."""
    from mlflow import MlflowClient

    from flows.deploy import free_port

    root = copy_workspace(
        pretrained_workspace,
        tmp_path / "ws",
        pretrain={"steps": 1_000_000, "log_every": 10, "eval_every": 1_000_000, "checkpoint_every": 1_000_000},
    )
    port, store, server_log = free_port(), tmp_path / "store", tmp_path / "server.log"
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow(port, store, server_log)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "LMCYCLE_TRACKING": "on"}
    stage = subprocess.Popen(
        ["lmcycle", "stage", "pretrain"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []
    reader = read_lines(stage.stderr, err)
    try:
        wait_until(lambda: len(metric_steps(uri)) >= 3, "training logs", stage)
        before = metric_steps(uri)[-1]
        kill_group(server)
        wait_until(lambda: any("MLflow did not answer" in line for line in err), "the outage is met", stage)
        server = start_mlflow(port, store, server_log)
        wait_until(lambda: any("MLflow answers again" in line for line in err), "logging resumes", stage)
        wait_until(lambda: metric_steps(uri)[-1] > before + 10, "new steps are logged", stage)
        stage.send_signal(signal.SIGTERM)
        stage.wait(timeout=300)
        reader.join(timeout=30)
        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        (run,) = client.search_runs(experiments, "attributes.run_name = 'pretrain'")
        logged = metric_steps(uri)
    finally:
        if stage.poll() is None:
            stage.kill()
        kill_group(server)
    assert sum("MLflow did not answer" in line for line in err) == 1, "".join(err)
    assert not any("Traceback" in line for line in err[: next(i for i, x in enumerate(err) if "answers again" in x)])
    assert run.data.tags.get("lmcycle.tracking_lost") == "true", run.data.tags
    assert int(run.data.tags["lmcycle.tracking_dropped_events"]) > 0
    gap = [b - a for a, b in zip(logged, logged[1:], strict=False) if a >= before]
    assert max(gap) > 10, "no step was dropped: the outage was never seen"
