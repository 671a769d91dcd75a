"""The `lm-lifecycle` flow: stages through DVC in their own process groups, skipped stages, faults (a failing stage,
a timeout, two runs at once, bad overrides, an unreachable tracking server), and end to end on the tiny
workspace (MLflow runs, datasets, registration, a no-op rerun and a bit-identical rebuild of the registered model).

Flows talk to one session-wide `prefect server` (the `prefect_api` fixture) instead of each starting an
ephemeral one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import hf_scores
import psutil
import pytest
import yaml
from conftest import make_workspace, tiny_params

from flows.lifecycle import run_dvc_stage
from flows.processes import group_alive
from lmcore.lifecycle.workspace import dvc_lock_hash, workspace_lock


def synthetic_workspace(root: Path, kjv: Path, chatter: Path, stages: dict, **sections: dict) -> Path:
    """A git + DVC workspace with valid lmcycle params and a dvc.yaml of small Python stages (fast, and able to
    misbehave on purpose)."""
    make_workspace(root, tiny_params(kjv, chatter, **sections))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    git = dict(cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "stages"], **git)
    return root


def script(root: Path, name: str, code: str) -> str:
    (root / name).write_text(textwrap.dedent(code))
    return f"python {name}"


def run_cli(*args: str, cwd: Path, api: str | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    if api:
        full_env["PREFECT_API_URL"] = api
    return subprocess.run(["lmcycle", *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=900)


def artifact(api: str, key: str) -> dict | None:
    """The newest Prefect artifact with this key, straight from the server's REST API."""
    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).encode()
    request = urllib.request.Request(f"{api}/artifacts/filter", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        found = json.loads(response.read())
    return found[0] if found else None


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# --- a stage in its own process group ----------------------------------------------------------------------

STUBBORN_STAGE = """
    import os, signal, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    def on_term(*_):  # what a trainer does on SIGTERM: save, then exit
        open("terminated.txt", "w").write("checkpoint saved")
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    open("pids.txt", "w").write(f"{os.getpid()} {child.pid}")
    time.sleep(600)
"""


def test_a_stage_timeout_stops_its_whole_process_tree(tmp_path, kjv_slice, chatter_slice):
    root = tmp_path / "ws"
    root.mkdir()
    stages = {"slow": {"cmd": script(root, "slow.py", STUBBORN_STAGE), "outs": ["never.txt"]}}
    synthetic_workspace(root, kjv_slice, chatter_slice, stages)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    result = None
    while result is None or not (root / "pids.txt").exists():  # DVC's start-up varies: wait until it ran
        assert time.monotonic() < deadline
        result = run_dvc_stage("slow", root, timeout_s=8.0, grace_s=2.0, on_line=lines.append)
    assert result.state == "timeout"
    assert (root / "terminated.txt").read_text() == "checkpoint saved"  # the stage got SIGTERM (DVC would not)
    pids = [int(p) for p in (root / "pids.txt").read_text().split()]
    for pid in pids:  # the SIGTERM-ignoring grandchild was killed after the grace period
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not group_alive(pids[0])
    # DVC left no stale lock: the next repro in this workspace works
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ok": {"cmd": "echo fine", "always_changed": True}}}))
    assert run_dvc_stage("ok", root, on_line=lines.append).state == "ran"


def test_a_terminated_flow_run_stops_the_running_stage_tree(tmp_path, kjv_slice, chatter_slice, prefect_api):
    """What a cancelled deployment run gets (the worker sends SIGTERM): the stage tree goes too."""
    root = tmp_path / "ws"
    root.mkdir()
    stages = {"slow": {"cmd": script(root, "slow.py", STUBBORN_STAGE), "outs": ["never.txt"]}}
    synthetic_workspace(root, kjv_slice, chatter_slice, stages, flow={"kill_grace_s": 2.0, "retries": 0})
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    run = subprocess.Popen(["lmcycle", "run"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (root / "pids.txt").exists():
        assert run.poll() is None, run.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    out = run.communicate(timeout=120)[0].decode()
    assert run.returncode != 0
    assert (root / "terminated.txt").read_text() == "checkpoint saved", out[-3000:]
    pids = [int(p) for p in (root / "pids.txt").read_text().split()]
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# --- faults through the CLI --------------------------------------------------------------------------------


def test_a_failing_stage_fails_the_flow_after_its_retries_and_nothing_is_registered(
    tmp_path, kjv_slice, chatter_slice, prefect_api, tiny_hf_dir
):
    root = tmp_path / "ws"
    root.mkdir()
    code = 'open("attempts.txt", "a").write("x"); print("boom: bad input in data.txt"); raise SystemExit(3)'
    stages = {
        "first": {"cmd": script(root, "first.py", 'open("one.txt", "w").write("1")'), "outs": ["one.txt"]},
        "broken": {"cmd": script(root, "broken.py", code), "deps": ["one.txt"], "outs": ["two.txt"]},
    }
    name = "flow-fails-model"
    synthetic_workspace(
        root,
        kjv_slice,
        chatter_slice,
        stages,
        flow={"retries": 1, "retry_delay_s": 0.0},
        project={"registered_model": name},
    )
    # a registrable model and its gate metric are there: only the failure may keep the flow from registering it
    shutil.copytree(tiny_hf_dir, root / "models" / "pretrain" / "hf")
    (root / "reports").mkdir()
    (root / "reports" / "pretrain.json").write_text(json.dumps({"val_bpb": 3.0}))
    proc = run_cli("run", "--workspace", str(root), cwd=tmp_path, api=prefect_api)  # from another directory
    assert proc.returncode == 1
    assert "error: stage broken exited with code 3" in proc.stderr, proc.stderr[-3000:]
    assert (root / "attempts.txt").read_text() == "xx"  # one try and one retry
    failure = artifact(prefect_api, "broken-failure")
    assert failure is not None and "boom: bad input in data.txt" in failure["data"]
    summary = artifact(prefect_api, "lifecycle-summary")
    assert "failed" in summary["data"] and "| first | ran |" in summary["data"]

    from mlflow import MlflowClient

    assert MlflowClient().search_model_versions(f"name='{name}'") == []

    script(root, "broken.py", 'open("two.txt", "w").write("2")')  # fixed: the next run picks up where it failed
    proc = run_cli("run", cwd=root, api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = artifact(prefect_api, "lifecycle-summary")["data"]
    assert "| first | skipped |" in summary and "| broken | ran |" in summary
    (version,) = MlflowClient().search_model_versions(f"name='{name}'")  # the run that succeeded registered
    assert version.tags["lmcycle.gate.decision"] == "first"


def test_overrides_no_register_force_and_the_eval_metrics_artifact(
    tmp_path, kjv_slice, chatter_slice, prefect_api, tiny_hf_dir
):
    """The success paths the README promises: `-S` lands in params.yaml, dvc.lock and the MLflow parent run;
    `--no-register` registers nothing although a model is there; `--force` reruns an up-to-date stage; the
    eval-metrics table is published."""
    from mlflow import MlflowClient

    root = tmp_path / "ws"
    root.mkdir()
    code = 'import yaml; open("a.txt", "w").write(str(yaml.safe_load(open("params.yaml"))["pretrain"]["steps"]))'
    stages = {"a": {"cmd": script(root, "a.py", code), "params": ["pretrain.steps"], "outs": ["a.txt"]}}
    name = "flow-options-model"
    synthetic_workspace(root, kjv_slice, chatter_slice, stages, project={"registered_model": name})
    shutil.copytree(tiny_hf_dir, root / "models" / "pretrain" / "hf")
    (root / "reports").mkdir()
    (root / "reports" / "evaluate.json").write_text(json.dumps({"pretrain.val_bpb": 3.25}))

    proc = run_cli("run", "--no-register", "-S", "pretrain.steps=7", cwd=root, api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((root / "params.yaml").read_text())["pretrain"]["steps"] == 7
    assert (root / "a.txt").read_text() == "7"
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["a"]["params"]["params.yaml"] == {
        "pretrain.steps": 7
    }
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(ids, f"tags.`lmcycle.kind` = 'flow' and tags.`lmcycle.workspace` = '{root}'")
    assert parent.data.params["pretrain.steps"] == "7"
    assert json.loads(parent.data.tags["lmcycle.overrides"]) == ["pretrain.steps=7"]
    assert client.search_model_versions(f"name='{name}'") == []
    table = artifact(prefect_api, "eval-metrics")["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    assert {"metric": "pretrain.val_bpb", "value": 3.25} in rows

    proc = run_cli("run", "--force", "a", cwd=root, api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| a | ran |" in artifact(prefect_api, "lifecycle-summary")["data"]  # up to date, rerun all the same
    (version,) = client.search_model_versions(f"name='{name}'")  # registering is the default
    assert version.tags["lmcycle.gate.value"] == "3.25"


def test_two_runs_in_one_workspace_never_interleave(tmp_path, kjv_slice, chatter_slice, prefect_api):
    root = tmp_path / "ws"
    root.mkdir()
    hold = """
        import os, time
        open("started.txt", "w").write(str(os.getpid()))
        while not os.path.exists("release.txt"):
            time.sleep(0.2)
        open("held.txt", "w").write("done")
    """
    stages = {"hold": {"cmd": script(root, "hold.py", hold), "outs": ["held.txt"]}}
    synthetic_workspace(root, kjv_slice, chatter_slice, stages)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    first = subprocess.Popen(["lmcycle", "run"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (root / "started.txt").exists():
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        second = run_cli("run", cwd=root, api=prefect_api)
        assert second.returncode == 1
        assert "another lmcycle run holds this workspace" in second.stderr
        assert "flow.lock_timeout_s" in second.stderr
    finally:
        (root / "release.txt").write_text("go")
        out = first.communicate(timeout=300)[0].decode()
    assert first.returncode == 0, out[-3000:]
    assert (root / "held.txt").read_text() == "done"


def test_bad_overrides_and_stage_names_fail_before_anything_runs(tmp_path, kjv_slice, chatter_slice):
    root = tmp_path / "ws"
    root.mkdir()
    stages = {"a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]}}
    synthetic_workspace(root, kjv_slice, chatter_slice, stages)
    before = (root / "params.yaml").read_bytes()
    for args, message in [
        (["-S", "tokenizer.nope=1"], "error: tokenizer.nope: unknown key"),
        (["-S", "tokenizer.vocab_size=100"], "error: tokenizer.vocab_size: must be ≥"),
        (["-S", "novalue"], "expected section.key=value"),
        (["--until", "nope"], "error: --until: unknown stage 'nope'; stages in dvc.yaml: a"),
        (["--force", "nope"], "error: --force: unknown stage 'nope'"),
    ]:
        proc = run_cli("run", *args, cwd=root)
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
    assert (root / "params.yaml").read_bytes() == before
    assert not (root / "dvc.lock").exists() and not (root / "a.txt").exists()
    with workspace_lock(root):  # and a held lock is reported at once (flow.lock_timeout_s is 0)
        proc = run_cli("run", cwd=root)
    assert proc.returncode == 1 and f"pid {os.getpid()}" in proc.stderr


def test_an_unreachable_tracking_server_fails_in_seconds_before_any_stage(workspace_factory):
    root = workspace_factory()
    uri = f"http://127.0.0.1:{closed_port()}"
    proc = run_cli("run", cwd=root, MLFLOW_TRACKING_URI=uri)
    assert proc.returncode == 1
    assert f"error: MLFLOW_TRACKING_URI {uri}: no answer within 3 s" in proc.stderr
    stage = run_cli("stage", "ingest", cwd=root, MLFLOW_TRACKING_URI=uri)
    assert stage.returncode == 1 and "no answer within 3 s" in stage.stderr
    assert not (root / "dvc.lock").exists() and not (root / "data").exists()
    off = run_cli("stage", "ingest", cwd=root, MLFLOW_TRACKING_URI=uri, LMCYCLE_TRACKING="off")
    assert off.returncode == 0, off.stderr  # tracking off: the stage never talks to MLflow


# --- end to end --------------------------------------------------------------------------------------------


def mlflow_runs(client, root: Path) -> dict[str, list]:
    runs: dict[str, list] = {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], f"tags.`lmcycle.workspace` = '{root}'"):
            runs.setdefault(run.info.run_name, []).append(run)
    return runs


@pytest.mark.slow
def test_lifecycle_end_to_end_rerun_and_bit_identical_rebuild(workspace_factory, prefect_api, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.registry.promotion import RESCORERS
    from lmcore.lifecycle.registry.uris import local_model_dir

    name = "e2e-model"
    root = workspace_factory(project={"registered_model": name})
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    proc = run_cli("run", cwd=root, api=prefect_api)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = artifact(prefect_api, "lifecycle-summary")["data"]
    for stage in stages:
        assert f"| {stage} | ran |" in summary
    assert "**first**" in summary

    client = MlflowClient()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    version = client.get_model_version_by_alias(name, "champion")
    assert version.tags["lmcycle.dvc_lock_hash"] == dvc_lock_hash(root)
    assert version.tags["lmcycle.git_dirty"] == "false"
    runs = mlflow_runs(client, root)
    parents = [r for r in runs.get("register", [])]
    parent_id = parents[0].data.tags["mlflow.parentRunId"]
    for stage in stages:  # one child run per executed stage, under the flow's parent run
        (run,) = runs[stage]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["env.lmcycle"] and run.data.tags["lmcycle.flow_run_id"]
    tokenize = runs["tokenize"][0]
    logged = {d.dataset.name: d.dataset.digest for d in tokenize.inputs.dataset_inputs}
    for dep in lock["tokenize"]["deps"]:
        if dep["path"].startswith("data/"):
            assert logged[dep["path"]] == dep["md5"]  # the dataset digest is DVC's hash
    assert runs["tokenizer"][0].data.params["tokenizer.vocab_size"] == "512"
    history = client.get_metric_history(runs["pretrain"][0].info.run_id, "pretrain.train_loss")
    assert len({m.step for m in history}) > 1
    artifacts = {a.path for a in client.list_artifacts(runs["tokenizer"][0].info.run_id, "models/tokenizer")}
    assert "models/tokenizer/tokenizer.json" in artifacts

    # the gate's re-scorer computes exactly what the evaluation reported for the registered model
    paths = Paths.of(root)
    metric = version.tags["lmcycle.gate.metric"]
    reported = json.loads((paths.report("evaluate")).read_text())[metric]
    model_dir = root / version.tags["lmcycle.model_dir"]
    config = load_config(root / "params.yaml")
    rescored = RESCORERS[metric.split(".")[0]](metric, model_dir, paths, config)
    assert rescored == pytest.approx(reported, abs=1e-5)
    assert hf_scores.gate_metric(metric, model_dir, root, config) == pytest.approx(reported, abs=1e-4)  # stock HF

    again = run_cli("run", cwd=root, api=prefect_api)
    assert again.returncode == 0, again.stderr[-5000:]
    summary = artifact(prefect_api, "lifecycle-summary")["data"]
    for stage in stages[1:]:  # ingest always runs (its sources live outside the repository)
        assert f"| {stage} | skipped |" in summary
    assert "reused: same dvc.lock" in summary
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    uri = f"models:/{name}/{version.version}"
    rebuild = run_cli("reproduce", uri, "--run", "--dir", str(tmp_path / "re"), cwd=root)
    assert rebuild.returncode == 0, rebuild.stderr[-5000:]
    assert "bit-identical: yes" in rebuild.stdout
    monkeypatch.setenv("LMCYCLE_CACHE", str(tmp_path / "cache"))  # not the user's ~/.cache/lmcycle
    registered = local_model_dir(uri, root) / "model.safetensors"
    rebuilt = tmp_path / "re" / version.tags["lmcycle.model_dir"] / "model.safetensors"
    assert sha256(rebuilt) == sha256(registered) == sha256(model_dir / "model.safetensors")

    # a registered record the rebuild does not match: one error line, exit 1 (pretrain only, to keep it short)
    recorded_digest = version.tags["lmcycle.weights_sha256"]
    wrong = "0" * 64
    for key, value in {"weights_sha256": wrong, "stage": "pretrain", "model_dir": "models/pretrain/hf"}.items():
        client.set_model_version_tag(name, version.version, f"lmcycle.{key}", value)
    mismatch = run_cli("reproduce", uri, "--run", "--dir", str(tmp_path / "re2"), cwd=root)
    assert mismatch.returncode == 1, mismatch.stderr[-5000:]
    assert mismatch.stderr.strip().splitlines()[-1] == f"error: weights differ from {uri} (registered {wrong})"
    assert "Traceback" not in mismatch.stderr and "bit-identical: yes" not in mismatch.stdout
    assert "# bit-identical rebuild here: expected" in rebuild.stdout  # recorded and rebuilt on this machine

    # recorded on another CPU: no bit-identity expected, so the rebuild is held to the registered weights within the
    # tolerance, which pretrain's weights (the rebuild) are not against the fine-tuned ones (the version)
    client.set_model_version_tag(name, version.version, "lmcycle.weights_sha256", recorded_digest)
    client.set_model_version_tag(name, version.version, "env.cpu_model", "Another CPU")
    elsewhere = run_cli("reproduce", uri, "--run", "--dir", str(tmp_path / "re3"), cwd=root)
    assert "# bit-identical rebuild here: not expected (cpu_model 'Another CPU' there" in elsewhere.stdout
    assert elsewhere.returncode == 1, elsewhere.stderr[-5000:]
    assert "bit-identical: no, as expected on this machine; largest relative L2 distance" in elsewhere.stdout
    last = elsewhere.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: weights of the rebuild are beyond the tolerance of {uri}: "), last


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
