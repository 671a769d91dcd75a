"""The team topology run for real on 127.0.0.1 (PostgreSQL, Prefect and MLflow servers with auth, a process worker)
and what a team does with it: deploy prefect.yaml's `nightly` from one clone, and a worker runs it in a fresh
clone of its own (git_clone at the branch in Prefect variables, then `dvc pull`). Everything is checked through
the servers' REST APIs with credentials, never by reading their databases.

The servers and the worker are session fixtures (team_servers.py), shared by every test here: one start-up for
the whole suite, one tiny deployment run for the assertions that need it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_params
from team_servers import (  # noqa: F401 (team_fixture, team_worker_fixture: the fixtures team, team_worker)
    POOL,
    Team,
    TeamRepo,
    basic_auth,
    deploy,
    git,
    http_status,
    make_team_repo,
    team_fixture,
    team_worker_fixture,
    wait_for,
)

pytestmark = pytest.mark.team

BRANCH = "team-main"
# The tiny run's settings, given as the run's `overrides` parameter (the committed params are tiny already).
OVERRIDES = ["pretrain.steps=16", "finetune.steps=6", "pretrain.nproc_per_node=2"]


# --- the team's repository ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def team_repo(tmp_path_factory: pytest.TempPathFactory, kjv_slice: Path, chatter_slice: Path) -> TeamRepo:
    """The team's workspace repository (tiny params, prefect.yaml, a DVC remote) in a bare git remote, and clone
    #1 of it, the one that deploys."""
    return make_team_repo(tmp_path_factory.mktemp("team-repo"), tiny_params(kjv_slice, chatter_slice), BRANCH)


@pytest.fixture(scope="session")
def deployment(team: Team, team_worker: str, team_repo: TeamRepo) -> dict[str, Any]:
    """`prefect deploy -n nightly` from clone #1, then the Prefect variables naming the repository and branch."""
    return deploy(team, team_repo, "nightly")


def trigger(team: Team, cwd: Path, overrides: list[str]) -> str:
    """`prefect deployment run` as a teammate would; the new flow run's id."""
    params = json.dumps({"overrides": overrides, "workspace": "."})
    cmd = [sys.executable, "-m", "prefect", "deployment", "run", "lm-lifecycle/nightly", "--params", params]
    proc = subprocess.run(cmd, cwd=cwd, env=team.client_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"prefect deployment run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", proc.stdout) or re.search(r"flow-run/([0-9a-f-]{36})", proc.stdout)
    assert match, proc.stdout
    return match.group(1)


def flow_run_logs(team: Team, flow_run_id: str) -> list[str]:
    logs: list[str] = []
    while True:
        page = team.prefect("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "offset": len(logs)})
        logs += [entry["message"] for entry in page]
        if len(page) < 200:
            return logs


def task_states(team: Team, flow_run_id: str) -> dict[str, str]:
    runs = team.prefect("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {run["name"]: run["state"]["name"] for run in runs}


def summary_markdown(team: Team, flow_run_id: str) -> str:
    found = team.prefect("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return next(a["data"] for a in found if a["key"] == "lifecycle-summary")


@pytest.fixture(scope="session")
def first_run(team: Team, deployment: dict[str, Any], team_repo: TeamRepo) -> dict[str, Any]:
    """One deployment run with the tiny overrides, run by the worker; the final flow run."""
    flow_run = wait_for(team, trigger(team, team_repo.clone1, OVERRIDES))
    if flow_run["state"]["type"] != "COMPLETED":
        logs = "\n".join(flow_run_logs(team, flow_run["id"])[-80:])
        pytest.fail(f"the deployment run ended {flow_run['state']['name']}: {flow_run['state']['message']}\n{logs}")
    return flow_run


# --- the servers -------------------------------------------------------------------------------------------


def test_every_server_refuses_requests_without_the_right_credentials(team: Team):
    import psycopg2

    assert http_status(f"{team.prefect_api}/health") == 200  # health is exempt, for probes
    assert http_status(f"{team.prefect_api}/flows/filter") == 401
    assert http_status(f"{team.prefect_api}/deployments/filter", ("lmcycle", "wrong-password")) == 401
    assert team.prefect("/flows/filter", {}) is not None
    search = f"{team.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(f"{team.mlflow_uri}/health") == 200
    assert http_status(search) == 401
    assert http_status(search, (team.mlflow_user, "wrong-password")) == 401
    assert http_status(search, team.mlflow_credentials) == 200
    # the server remembers a successful check (auth_cache_ttl_seconds), never a failed one or another password
    assert http_status(search, (team.mlflow_user, team.mlflow_password + "x")) == 401
    assert http_status(search, (team.mlflow_user, "wrong-password")) == 401
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=team.postgres.port, user=team.postgres.user, password="wrong")
    team.postgres.connect("prefect").close()


def test_the_deployment_resolves_its_pull_steps_on_the_worker_not_at_deploy_time(deployment: dict[str, Any]):
    clone, pull = (next(iter(step.items())) for step in deployment["pull_steps"])
    assert clone == (
        "prefect.deployments.steps.git_clone",
        {
            "id": "clone",
            "repository": "{{ prefect.variables.lmcycle_repository }}",
            "branch": "{{ prefect.variables.lmcycle_branch }}",
        },
    )
    assert pull == ("flows.remote.dvc_pull_step", {"directory": "{{ clone.directory }}"})
    assert deployment["work_pool_name"] == POOL
    assert deployment["parameters"]["workspace"] == "."


# --- one deployment run, end to end ------------------------------------------------------------------------


def test_a_deployment_run_trains_tracks_and_registers_in_a_fresh_clone_on_the_worker(
    team: Team,
    team_repo: TeamRepo,
    first_run: dict[str, Any],
):
    from lmcore.lifecycle.dvcadapter import stage_graph

    # Prefect: every stage ran (DVC found nothing up to date in a fresh clone), then registration.
    stages, _ = stage_graph(team_repo.clone1)
    states = task_states(team, first_run["id"])
    assert {name: states.get(name) for name in stages} == dict.fromkeys(stages, "Completed"), states
    assert [state for name, state in states.items() if name.startswith("register")] == ["Completed"], states
    assert first_run["parameters"]["overrides"] == OVERRIDES

    # It ran in the worker's own clone of the pushed branch, not in the folder that deployed.
    summary = summary_markdown(team, first_run["id"])
    workspace = Path(re.search(r"Workspace `([^`]+)`", summary).group(1))
    clone1 = team_repo.clone1.resolve()
    assert workspace != clone1 and clone1 not in workspace.parents, summary
    assert workspace.name.startswith("origin"), workspace  # git_clone names the folder after the repository
    assert f"at git `{team_repo.commit[:12]}`" in summary
    assert not (clone1 / "models").exists() and not (clone1 / "dvc.lock").exists()

    # MLflow: the flow's parent run, a child run per stage with step metrics.
    experiment = team.mlflow("/api/2.0/mlflow/experiments/get-by-name?experiment_name=lmcycle")["experiment"]
    parent = search_runs(team, experiment["experiment_id"], f"tags.`prefect.flow_run_id` = '{first_run['id']}'")
    assert len(parent) == 1 and parent[0]["info"]["status"] == "FINISHED"
    parent_id = parent[0]["info"]["run_id"]
    children = search_runs(team, experiment["experiment_id"], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_stage = {tags(run).get("lmcycle.stage"): run for run in children}
    assert set(stages) | {"register"} <= set(by_stage), sorted(by_stage)
    pretrain = by_stage["pretrain"]["info"]["run_id"]
    keys = [m["key"] for m in by_stage["pretrain"]["data"]["metrics"] if m["key"].startswith("pretrain.")]
    steps = {
        key: {
            m["step"]
            for m in team.mlflow(f"/api/2.0/mlflow/metrics/get-history?run_id={pretrain}&metric_key={key}")["metrics"]
        }
        for key in keys
    }
    assert max(len(s) for s in steps.values()) >= 3, steps

    # Registry: the version with its lineage tags, holding `champion`.
    name = yaml.safe_load((team_repo.clone1 / "params.yaml").read_text())["project"]["registered_model"]
    query = urllib.parse.urlencode({"name": name, "alias": "champion"})
    version = team.mlflow(f"/api/2.0/mlflow/registered-models/alias?{query}")["model_version"]
    lineage = {t["key"]: t["value"] for t in version["tags"]}
    assert lineage["lmcycle.flow_run_id"] == first_run["id"]
    assert lineage["lmcycle.git_commit"] == team_repo.commit
    assert lineage["lmcycle.dvc_lock_hash"] and lineage["lmcycle.weights_sha256"]
    assert json.loads(lineage["lmcycle.params"])["pretrain"]["steps"] == 16  # the run's overrides

    # Its artifacts come through the MLflow server (proxied), only with credentials.
    source = version["source"]
    assert source.startswith(("mlflow-artifacts:", "models:/")), source
    files = artifact_files(team, model_artifact_path(team, version))
    mlmodel = next(path for path in files if path.endswith("/MLmodel"))
    url = f"{team.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts/{mlmodel}"
    assert http_status(url) == 401
    assert http_status(url, (team.mlflow_user, "wrong-password")) == 401
    assert "flavors" in download(team, mlmodel).decode()
    assert any(path.endswith(".safetensors") for path in files), files
    assert any(team.artifacts.rglob("MLmodel"))  # the proxied store is the server's folder (the "bucket")


def search_runs(team: Team, experiment_id: str, filter_string: str) -> list[dict[str, Any]]:
    body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 1000}
    return team.mlflow("/api/2.0/mlflow/runs/search", body).get("runs", [])


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def model_artifact_path(team: Team, version: dict[str, Any]) -> str:
    """The version's files under the proxied artifact root (`<experiment>/models/m-<id>/artifacts`)."""
    source = version["source"]
    if source.startswith("models:/"):
        model_id = source.removeprefix("models:/")
        source = team.mlflow(f"/api/2.0/mlflow/logged-models/{model_id}")["model"]["info"]["artifact_uri"]
    return source.removeprefix("mlflow-artifacts:").lstrip("/")


def artifact_files(team: Team, path: str = "") -> list[str]:
    """Every file under `path` of the proxied artifact store, listed through the server."""
    query = urllib.parse.urlencode({"path": path})
    listing = team.mlflow(f"/api/2.0/mlflow-artifacts/artifacts?{query}").get("files", [])
    files: list[str] = []
    for entry in listing:
        full = f"{path}/{entry['path']}".lstrip("/")
        files += artifact_files(team, full) if entry.get("is_dir") else [full]
    return files


def download(team: Team, path: str) -> bytes:
    url = f"{team.mlflow_uri}/api/2.0/mlflow-artifacts/artifacts/{urllib.parse.quote(path)}"
    with urllib.request.urlopen(urllib.request.Request(url, headers=basic_auth(team.mlflow_credentials))) as response:
        return response.read()


def test_no_credential_appears_in_any_run_artifact_param_tag_or_flow_run_log(
    team: Team,
    first_run: dict[str, Any],
):
    texts: dict[str, str] = {}
    experiments = team.mlflow("/api/2.0/mlflow/experiments/search", {"max_results": 1000})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    runs = team.mlflow("/api/2.0/mlflow/runs/search", {"experiment_ids": ids, "max_results": 1000})["runs"]
    assert len(runs) >= 8
    for run in runs:
        texts[f"run {run['info']['run_id']} params/tags"] = json.dumps(run["data"])
    models = team.mlflow("/api/2.0/mlflow/registered-models/search?max_results=1000")["registered_models"]
    texts["registered models"] = json.dumps(models)
    versions = team.mlflow("/api/2.0/mlflow/model-versions/search?max_results=1000")["model_versions"]
    texts["model versions"] = json.dumps(versions)
    files = artifact_files(team)
    assert any(f.endswith("MLmodel") for f in files) and any(f.endswith("params.yaml") for f in files)
    for path in files:
        texts[f"artifact {path}"] = download(team, path).decode("latin-1")
    texts["flow run logs"] = "\n".join(flow_run_logs(team, first_run["id"]))
    artifacts = team.prefect("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [first_run["id"]]}}})
    texts["prefect artifacts"] = json.dumps(artifacts)
    texts["flow run"] = json.dumps(first_run)
    leaks = [
        (what, where) for what, secret in team.secrets().items() for where, text in texts.items() if secret in text
    ]
    assert leaks == []
    for step in ("git_clone", "dvc_pull_step"):  # the logs searched include the pull steps'
        assert f"Deployment step '{step}' completed successfully" in texts["flow run logs"]


# --- a second run, a teammate's run restored from the DVC remote -------------------------------------------


def test_a_second_deployment_run_restores_every_stage_from_the_dvc_remote(
    team: Team,
    team_repo: TeamRepo,
    first_run: dict[str, Any],
):
    """The worker's fresh clone has no dvc.lock of the first run (its folder goes away with the run; nothing commits
    dvc.lock back), so nothing is "up to date": every stage, the always-changed ingest included, must come out of
    the run cache the first run pushed, and none may run."""
    pushed = [p for p in team_repo.dvc_remote.rglob("*") if p.is_file()]
    assert pushed, "the first deployment run pushed nothing to the workspace's DVC remote"
    flow_run = wait_for(team, trigger(team, team_repo.clone1, OVERRIDES))
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    from lmcore.lifecycle.dvcadapter import stage_graph

    stages, _ = stage_graph(team_repo.clone1)
    assert {"ingest", "pretrain", "finetune", "evaluate"} <= set(stages)
    states = task_states(team, flow_run["id"])
    assert {name: states.get(name) for name in stages} == dict.fromkeys(stages, "Restored"), states
    logs = "\n".join(flow_run_logs(team, flow_run["id"]))
    assert "Running stage '" not in logs, logs[-3000:]  # DVC started no stage command
    summary = summary_markdown(team, flow_run["id"])
    assert re.search(r"Workspace `([^`]+)`", summary).group(1) != re.search(
        r"Workspace `([^`]+)`", summary_markdown(team, first_run["id"])
    ).group(1)  # a fresh clone again


# --- pre-flight checks of a teammate's client --------------------------------------------------------------


def one_clear_line(proc: subprocess.CompletedProcess, team: Team) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    assert not [secret for secret in team.secrets().values() if secret in proc.stdout + proc.stderr]
    return lines[0]


def test_lmcycle_run_with_a_wrong_mlflow_password_fails_with_one_clear_line(team: Team, workspace_factory):
    root = workspace_factory()
    env = team.client_env(MLFLOW_TRACKING_PASSWORD="not-the-password")
    cmd = ["lmcycle", "run", "--until", "ingest"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    line = one_clear_line(proc, team)
    assert "mlflow" in line.lower() and ("401" in line or "credential" in line.lower() or "password" in line.lower())
    assert not (root / "dvc.lock").exists()  # nothing ran


def test_lmcycle_run_with_a_wrong_prefect_auth_string_fails_with_one_clear_line(team: Team, workspace_factory):
    root = workspace_factory()
    env = team.client_env(PREFECT_API_AUTH_STRING="lmcycle:not-the-password")
    cmd = ["lmcycle", "run", "--until", "ingest"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    line = one_clear_line(proc, team)
    assert "prefect" in line.lower() and ("401" in line or "auth" in line.lower())
    assert not (root / "dvc.lock").exists()


# --- without PostgreSQL --------------------------------------------------------------------------------------


def test_without_postgresql_the_team_tests_skip_unless_they_are_required(monkeypatch):
    import team_servers

    monkeypatch.setattr(team_servers, "postgres_bin_dir", lambda: None)
    monkeypatch.delenv("LMCYCLE_REQUIRE_TEAM", raising=False)
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL binaries"):
        team_servers.require_team_servers()
    monkeypatch.setenv("LMCYCLE_REQUIRE_TEAM", "1")
    with pytest.raises(BaseException, match=r"LMCYCLE_REQUIRE_TEAM=1.*PostgreSQL binaries") as raised:
        team_servers.require_team_servers()
    assert raised.type is pytest.fail.Exception  # a failure, not a skip
