"""Training stages that start their own processes (lmcore/train/launch.py), and checkpoints outside the workspace.

`pretrain.nproc_per_node: 2` makes `lmcycle stage pretrain` the launcher of two workers (gloo on CPU) under
`lmcycle run`, `dvc repro` or by hand. Checked: the same training as one process with the same global batch, one
MLflow run, dvc.lock recording the launcher keys, a killed rank or a killed launcher leaving no process behind,
the rerun resuming, and a run stopped in one workspace resuming in another through LMCYCLE_CHECKPOINT_DIR.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import assert_same_training, copy_workspace, lmcycle

FAST = {"threads": 1}


def start(ws: Path, *cmd: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=ws,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "LMCYCLE_TRACKING": "off", **env},
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def workers(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The launcher's worker processes by global rank (they hold torchrun's RANK in their environment)."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


def assert_all_gone(processes: list[psutil.Process], timeout: float = 30) -> None:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:  # clean up before failing, so nothing outlives the test
        p.kill()
    assert not alive, f"still running: {[p.pid for p in alive]}"


def set_params(ws: Path, **sections: dict) -> Path:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


def stop(proc: subprocess.Popen) -> None:
    """Teardown: the test's process group, whatever state it is in."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


# --- validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "env", "message"),
    [
        ({"pretrain": {"nproc_per_node": 0}}, {}, "error: pretrain.nproc_per_node: must be auto or a whole number ≥ 1"),
        ({"pretrain": {"nproc_per_node": "two"}}, {}, "error: pretrain.nproc_per_node: must be auto or a whole number"),
        ({"pretrain": {"nnodes": 2}}, {}, "error: pretrain.rdzv_endpoint: required when pretrain.nnodes > 1"),
        ({"pretrain": {"rdzv_endpoint": "nohost"}}, {}, "error: pretrain.rdzv_endpoint: must be host:port"),
        ({}, {"PET_NPROC_PER_NODE": "x"}, "error: PET_NPROC_PER_NODE: must be auto or a whole number ≥ 1, got 'x'"),
        ({"pretrain": {"nproc_per_node": 3}}, {}, "error: pretrain.batch_size: 4 sequences cannot be split evenly"),
    ],
)
def test_bad_launcher_settings_name_the_key(workspace_factory, sections, env, message) -> None:
    ws = set_params(workspace_factory(dvc=False), **sections)
    proc = subprocess.run(
        ["lmcycle", "stage", "pretrain"], cwd=ws, capture_output=True, text=True, env={**os.environ, **env}
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr


def test_override_with_a_bad_process_count_changes_nothing(workspace_factory) -> None:
    ws = workspace_factory()
    before = (ws / "params.yaml").read_bytes()
    proc = lmcycle("run", "-S", "finetune.nproc_per_node=-1", cwd=ws, check=False)
    assert proc.returncode == 1
    assert "error: finetune.nproc_per_node: must be auto or a whole number ≥ 1, got -1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (ws / "params.yaml").read_bytes() == before


def test_torchrun_variables_win_over_the_params(monkeypatch) -> None:
    from lmcore.errors import ConfigError
    from lmcore.lifecycle.config import PretrainConfig
    from lmcore.train.launch import plan

    cfg = PretrainConfig(batch_size=8, nproc_per_node=2, nnodes=1)
    for name in ("WORLD_SIZE", "PET_NPROC_PER_NODE", "PET_NNODES", "PET_RDZV_ENDPOINT", "PET_RDZV_ID", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert plan("pretrain", cfg).world_size == 2 and plan("pretrain", cfg).needs_launch
    monkeypatch.setenv("PET_NPROC_PER_NODE", "4")
    monkeypatch.setenv("PET_NNODES", "2")
    monkeypatch.setenv("PET_RDZV_ID", "run-7")
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29400")
    layout = plan("pretrain", cfg)
    assert (layout.nproc_per_node, layout.nnodes, layout.rdzv_endpoint, layout.rdzv_id) == (
        4,
        2,
        "node0:29400",
        "run-7",
    )
    monkeypatch.setenv("PET_NODE_RANK", "first")
    with pytest.raises(ConfigError, match="PET_NODE_RANK: must be a whole number ≥ 0, got 'first'"):
        plan("pretrain", cfg)
    monkeypatch.setenv("WORLD_SIZE", "8")  # one of torchrun's workers: it starts nothing
    monkeypatch.setenv("PET_NODE_RANK", "1")
    assert not plan("pretrain", cfg).needs_launch


# --- two processes under the flow ------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_under_lmcycle_run_train_as_one(data_workspace, prefect_api, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    single = copy_workspace(data_workspace, tmp_path / "single", pretrain=FAST)
    lmcycle("stage", "pretrain", cwd=single)

    ws = copy_workspace(data_workspace, tmp_path / "two", pretrain=FAST)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": tracking}
    proc = subprocess.run(
        ["lmcycle", "run", "--until", "pretrain", "--no-register", "-S", "pretrain.nproc_per_node=2"],
        cwd=ws,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starting 2 process(es)" in proc.stdout + proc.stderr

    meta = yaml.safe_load(next((ws / "checkpoints/pretrain").glob("step_*/meta.json")).read_text())
    assert meta["world_size"] == 2
    assert_same_training(single, ws)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["pretrain"]["params"]["params.yaml"]
    assert lock["pretrain"]["nproc_per_node"] == 2
    assert lock["pretrain"]["nnodes"] == 1 and lock["pretrain"]["rdzv_endpoint"] is None
    # rank 0 alone tracked: one MLflow run for the stage, with its metrics
    client = MlflowClient(tracking_uri=tracking)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, "tags.`lmcycle.stage` = 'pretrain'")
    assert len(runs) == 1 and runs[0].data.params["pretrain.nproc_per_node"] == "2"
    assert len(client.get_metric_history(runs[0].info.run_id, "pretrain.train_loss")) == 4  # steps 5, 10, 15, 20

    # without dropout the same batches follow on another process count: one process resumes the checkpoint
    one = lmcycle("stage", "pretrain", cwd=set_params(ws, pretrain={"nproc_per_node": 1}))
    assert "note: checkpoint written by 2 process(es), resuming on 1" in one.stderr
    assert re.search(r"resuming from \S+step_0000020", one.stderr)


# --- faults ----------------------------------------------------------------------------------------------------

LONG = {**FAST, "steps": 160, "checkpoint_every": 20, "eval_every": 80, "eval_max_batches": 2, "log_every": 10}


@pytest.mark.slow
def test_killed_launcher_or_rank_leaves_nothing_running_and_the_rerun_resumes(data_workspace, tmp_path: Path) -> None:
    ws = copy_workspace(data_workspace, tmp_path / "ws", model={"dropout": 0.1}, pretrain={**LONG, "nproc_per_node": 2})
    ckpts = ws / "checkpoints/pretrain"

    # SIGKILL of the launcher alone: its workers (in sessions of their own) die with it, long before they would end
    set_params(ws, pretrain={"steps": 100_000})
    proc = start(ws, "lmcycle", "stage", "pretrain")
    try:
        wait_for(ckpts / "step_0000020", proc)
        ranks = workers(proc)
        assert sorted(ranks) == [0, 1]
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert_all_gone(list(ranks.values()), timeout=10)
    finally:
        stop(proc)
    set_params(ws, pretrain={"steps": LONG["steps"]})  # the run below: another fingerprint, a fresh start

    # SIGKILL of rank 1: the group stops, one line names the rank, nothing is left
    proc = start(ws, "lmcycle", "stage", "pretrain")
    try:
        wait_for(ckpts / "step_0000060", proc)
        ranks = workers(proc)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        ranks[1].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: pretrain: rank 1 \(pid {ranks[1].pid}\) was killed by SIGKILL; its last line: .+", last
    )
    assert "Traceback" not in err
    assert_all_gone(descendants, timeout=5)
    newest = max(int(p.name.removeprefix("step_")) for p in ckpts.glob("step_*"))

    rerun = lmcycle("stage", "pretrain", cwd=ws)
    resumed = int(re.search(r"resuming from \S+step_(\d+)", rerun.stderr).group(1))
    assert resumed == newest >= 60
    assert yaml.safe_load((ws / "reports/pretrain.json").read_text())["steps"] == 160

    # with dropout, each rank's random draws cannot carry over to another process count: one line says so
    one = lmcycle("stage", "pretrain", cwd=set_params(ws, pretrain={"nproc_per_node": 1}), check=False)
    assert one.returncode == 1 and "Traceback" not in one.stderr
    assert re.search(
        r"error: pretrain: checkpoint \S+step_0000160 was written by 2 process\(es\), this run has 1", one.stderr
    )


# --- checkpoints outside the workspace ---------------------------------------------------------------------------

RESUMABLE = {
    "model": {"dropout": 0.1},  # resuming must restore the RNG too
    "pretrain": {**FAST, "steps": 80, "checkpoint_every": 20, "eval_every": 40, "eval_max_batches": 4},
}
FINAL = "models/pretrain/hf/model.safetensors"
REPORTS = ["reports/pretrain.json", "reports/pretrain/train.csv", "reports/pretrain/val.csv"]


def outputs(ws: Path) -> dict[str, bytes]:
    return {name: (ws / name).read_bytes() for name in [FINAL, *REPORTS]}


def test_a_run_stopped_in_one_workspace_resumes_in_another(data_workspace, tmp_path: Path) -> None:
    shared = tmp_path / "volume"
    env = {"LMCYCLE_CHECKPOINT_DIR": str(shared)}
    project = yaml.safe_load((data_workspace / "params.yaml").read_text())["project"]["name"]
    ckpts = shared / project / "pretrain"

    reference = copy_workspace(data_workspace, tmp_path / "reference", **RESUMABLE)
    lmcycle("stage", "pretrain", cwd=reference)

    a = copy_workspace(data_workspace, tmp_path / "a", **RESUMABLE)
    proc = start(a, "lmcycle", "stage", "pretrain", **env)
    try:
        wait_for(ckpts / "step_0000020", proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        stop(proc)
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+)/80", err).group(1))
    assert 20 <= stopped < 80 and not (a / "checkpoints").exists()

    # someone else's run on the same volume (another seed) does not resume it, and sets it aside
    other = copy_workspace(
        data_workspace, tmp_path / "other", project={"seed": 7}, **{"pretrain": {**FAST, "steps": 5}}
    )
    done = subprocess.run(
        ["lmcycle", "stage", "pretrain"], cwd=other, capture_output=True, text=True, env={**os.environ, **env}
    )
    assert done.returncode == 0 and "resuming" not in done.stderr, done.stderr

    b = copy_workspace(data_workspace, tmp_path / "b", **RESUMABLE)
    rerun = subprocess.run(
        ["lmcycle", "stage", "pretrain"], cwd=b, capture_output=True, text=True, env={**os.environ, **env}
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {ckpts}/step_{stopped:07d} (step {stopped})" in rerun.stderr
    assert outputs(b) == outputs(reference)
