"""MLflow tracking of stages: where runs go (anchored to the workspace, also from DVC's temporary experiment copies),
the fast reachability check, a stage's run with its params, metrics, artifacts and datasets, and the spool that
lets stages under the flow log without importing mlflow."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_workspace, tiny_params
from mlflow import MlflowClient

from lmcore.lifecycle.tracking import (
    MLflowReporter,
    SpoolForwarder,
    SpoolReporter,
    TrackingError,
    artifact_location,
    check_tracking,
    connect,
    tracking_uri,
)
from lmcore.lifecycle.workspace import original_root


def test_tracking_uri_is_the_users_or_anchored_to_the_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(tmp_path) == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpk1x2" / "sub"
    copy.mkdir(parents=True)
    assert original_root(copy) == tmp_path.resolve()  # a `dvc exp run --temp/--queue` copy logs to its workspace
    assert tracking_uri(copy) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_location(tracking_uri(copy)) == (tmp_path / "mlartifacts").resolve().as_uri()
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    assert original_root(elsewhere) == tmp_path.resolve()


def test_an_unreachable_tracking_server_is_reported_in_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError, match=rf"http://127.0.0.1:{port}: no answer within 3 s"):
        check_tracking(f"http://127.0.0.1:{port}")
    with pytest.raises(TrackingError, match="database does not answer"):
        check_tracking(f"postgresql://u:secret@127.0.0.1:{port}/mlflow")
    try:
        check_tracking(f"postgresql://u:secret@127.0.0.1:{port}/mlflow")
    except TrackingError as err:
        assert "secret" not in str(err)
    check_tracking(f"sqlite:///{tmp_path}/new/dir/mlflow.db")  # a creatable path is fine


def test_spooled_events_become_a_child_run_and_a_silent_death_is_marked_killed(tmp_path):
    client, experiment_id = connect(tmp_path, "spool-test")
    parent = client.create_run(experiment_id, run_name="parent").info.run_id
    spool = tmp_path / "spool"
    with SpoolForwarder(spool, client, experiment_id, interval_s=0.1) as forwarder:
        rep = SpoolReporter(spool / "toy.1.jsonl")
        rep.write("start", stage="toy", root=str(tmp_path), tags={"mlflow.parentRunId": parent}, params={"a.b": 1})
        for step in (1, 2, 3):
            rep.log_metrics({"toy.loss": 1.0 / step}, step=step)
        rep.log_input("data/x", "0123456789abcdef0123456789abcdef.dir", str(tmp_path / "data/x"))
        rep.set_tags({"custom": "yes"})
        rep.write("end", status="FINISHED", error="", env={"env.torch": "x"})
        rep.close()
        dead = SpoolReporter(spool / "dead.2.jsonl")
        dead.write("start", stage="dead", root=str(tmp_path), tags={"mlflow.parentRunId": parent}, params={})
        dead.close()
    runs = {run.info.run_name: run for run in map(client.get_run, forwarder.run_ids)}
    finished, killed = runs["toy"], runs["dead"]
    assert finished.data.tags["mlflow.parentRunId"] == parent and finished.info.status == "FINISHED"
    assert finished.data.params["a.b"] == "1" and finished.data.tags["custom"] == "yes"
    assert [m.step for m in client.get_metric_history(finished.info.run_id, "toy.loss")] == [1, 2, 3]
    (dataset,) = finished.inputs.dataset_inputs
    assert dataset.dataset.digest == "0123456789abcdef0123456789abcdef.dir"
    assert killed.info.status == "KILLED" and "without reporting" in killed.data.tags["lmcycle.error"]


def test_the_reporter_logs_steps_params_and_artifacts(tmp_path):
    client, experiment_id = connect(tmp_path, "reporter-test")
    run_id = client.create_run(experiment_id).info.run_id
    rep = MLflowReporter(client, run_id)
    rep.log_params({"model": {"d_model": 32, "n_layer": 2}})
    rep.log_metrics({"loss": 2.0, "skip": "text", "nan": float("nan")}, step=5)
    (tmp_path / "card.md").write_text("# card")
    rep.log_artifact(tmp_path / "card.md", "cards")
    rep.log_artifact(tmp_path / "card.md", "cards")  # logged once
    run = client.get_run(run_id)
    assert run.data.params == {"model.d_model": "32", "model.n_layer": "2"}
    assert run.data.metrics == {"loss": 2.0}
    assert [a.path for a in client.list_artifacts(run_id, "cards")] == ["cards/card.md"]


@pytest.fixture
def tokenizer_workspace(tmp_path, kjv_splits, kjv_slice, chatter_slice) -> Path:
    root = make_workspace(tmp_path / "ws", tiny_params(kjv_slice, chatter_slice), dvc=False)
    shutil.copytree(kjv_splits / "data", root / "data")
    return root


def test_a_stage_logs_its_own_run_with_params_metrics_and_artifacts(tokenizer_workspace):
    root = tokenizer_workspace
    client, experiment_id = connect(root, "lmcycle")
    parent = client.create_run(experiment_id, run_name="parent").info.run_id
    env = {**os.environ, "LMCYCLE_PARENT_RUN_ID": parent}
    proc = subprocess.run(["lmcycle", "stage", "tokenizer"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (run,) = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert run.info.run_name == "tokenizer" and run.info.status == "FINISHED"
    assert run.data.params["tokenizer.vocab_size"] == "512"
    report = json.loads((root / "reports" / "tokenizer.json").read_text())
    assert run.data.metrics["val_bytes_per_token"] == pytest.approx(report["val_bytes_per_token"])
    assert run.data.tags["lmcycle.workspace"] == str(root) and run.data.tags["env.requirements_lock_sha256"]
    paths = {a.path for a in client.list_artifacts(run.info.run_id, "models/tokenizer")}
    assert "models/tokenizer/tokenizer.json" in paths
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reports")] == ["reports/tokenizer.json"]


def test_the_experiment_opens_on_training_runs_in_the_mlflow_ui(tmp_path, monkeypatch):
    """MLflow 3 shows an experiment without `mlflow.experimentKind` as a GenAI one (an empty traces page); ours are
    tagged, and an experiment made elsewhere gets the tag on first use."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client, new_id = connect(tmp_path, "fresh")
    old_id = MlflowClient(uri).create_experiment("made-by-hand")
    connect(tmp_path, "made-by-hand")
    for experiment_id in (new_id, old_id):
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_stages_under_the_flow_never_import_mlflow(tokenizer_workspace, tmp_path):
    code = "import sys; from flows.cli import run_stage; run_stage('tokenizer'); print('mlflow' in sys.modules)"
    env = {**os.environ, "LMCYCLE_SPOOL_DIR": str(tmp_path / "spool"), "LMCYCLE_PARENT_RUN_ID": "0" * 32}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tokenizer_workspace, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
    events = [json.loads(line)["op"] for line in next((tmp_path / "spool").glob("tokenizer.*.jsonl")).open()]
    assert events[0] == "start" and events[-1] == "end" and "metrics" in events


@pytest.mark.slow
def test_a_temporary_dvc_experiment_logs_to_the_workspace_mlflow(workspace_factory):
    root = workspace_factory()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default: the workspace's db
    proc = subprocess.run(
        ["dvc", "exp", "run", "--temp", "-n", "exp-anchor", "ingest"], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("lmcycle")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`lmcycle.dvc_experiment` = 'exp-anchor'")
    assert run.info.run_name == "ingest" and run.info.status == "FINISHED"
    assert run.data.tags["lmcycle.workspace"] == str(root)
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing logged inside DVC's temporary copy
