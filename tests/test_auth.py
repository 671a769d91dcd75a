"""Bad credentials fail in one line before any stage runs: against a real `mlflow server --app-name basic-auth`
and a real `prefect server start` with PREFECT_SERVER_API_AUTH_STRING, each started once for this module on a
free 127.0.0.1 port and stopped by its process group at the end."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.deploy import free_port, start_server, stop_process

MLFLOW_START_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{"uri", "user", "password"} of a basic-auth MLflow server (sqlite store and auth database)."""
    home = tmp_path_factory.mktemp("mlflow-auth")
    password = secrets.token_urlsafe(16)
    ini = home / "auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{home / 'auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "art")]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
        while not _answers(uri + "/health"):
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield {"uri": uri, "user": "admin", "password": password}
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(scope="module")
def prefect_auth_server(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{"url", "auth"} of a Prefect server that requires PREFECT_API_AUTH_STRING (its own PREFECT_HOME)."""
    home = tmp_path_factory.mktemp("prefect-auth")
    auth = f"admin:{secrets.token_urlsafe(12)}"
    saved = os.environ.get("PREFECT_SERVER_API_AUTH_STRING")
    os.environ["PREFECT_SERVER_API_AUTH_STRING"] = auth  # start_server hands os.environ to the server
    try:
        proc, url = start_server(home=home, log=home / "server.log")
    finally:
        os.environ.pop("PREFECT_SERVER_API_AUTH_STRING")
        if saved is not None:
            os.environ["PREFECT_SERVER_API_AUTH_STRING"] = saved
    try:
        yield {"url": url, "auth": auth}
    finally:
        stop_process(proc)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def cli(*args: str, cwd: Path, **env: str | None) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    for key in [k for k, v in env.items() if v is None]:
        full.pop(key, None)
    return subprocess.run(["lmcycle", *args], cwd=cwd, capture_output=True, text=True, env=full, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, secret: str = "") -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if secret:
        assert secret not in proc.stderr + proc.stdout
    return lines[0]


def assert_nothing_ran(root: Path, params_before: bytes) -> None:
    assert not (root / "data").exists() and not (root / "dvc.lock").exists() and not (root / "models").exists()
    assert (root / "params.yaml").read_bytes() == params_before  # not even the overrides were written


# --- MLflow ------------------------------------------------------------------------------------------------


def test_a_wrong_mlflow_password_fails_in_one_line_before_any_stage(workspace_factory, mlflow_auth_server):
    server = mlflow_auth_server
    name = "auth-wrong-model"
    root = workspace_factory(project={"registered_model": name})
    before = (root / "params.yaml").read_bytes()
    wrong = "wrong-" + secrets.token_hex(6)
    env = {"MLFLOW_TRACKING_URI": server["uri"], "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": wrong}
    needles = (
        f"MLFLOW_TRACKING_URI {server['uri']}: the server refused the credentials (401)",
        "MLFLOW_TRACKING_PASSWORD",
    )
    run = cli("run", "-S", "pretrain.steps=3", cwd=root, **env)
    assert_one_line_error(run, *needles, secret=wrong)
    stage = cli("stage", "ingest", cwd=root, **env)
    assert_one_line_error(stage, *needles, secret=wrong)
    no_credentials = cli("stage", "ingest", cwd=root, **{**env, "MLFLOW_TRACKING_PASSWORD": None})
    assert_one_line_error(no_credentials, "the server requires credentials (401)", "MLFLOW_TRACKING_PASSWORD")
    assert_nothing_ran(root, before)

    from mlflow import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=server["password"])
    try:
        client = MlflowClient(tracking_uri=server["uri"], registry_uri=server["uri"])
        assert client.search_registered_models(f"name = '{name}'") == []
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")


def test_the_right_mlflow_password_passes_the_check_and_the_stage_logs_its_run(workspace_factory, mlflow_auth_server):
    server = mlflow_auth_server
    root = workspace_factory()
    env = {
        "MLFLOW_TRACKING_URI": server["uri"],
        "MLFLOW_TRACKING_USERNAME": server["user"],
        "MLFLOW_TRACKING_PASSWORD": server["password"],
    }
    proc = cli("stage", "ingest", cwd=root, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server["password"] not in proc.stderr + proc.stdout
    assert (root / "data" / "ingest" / "pretrain" / "train.jsonl").is_file()

    from mlflow import MlflowClient

    os.environ.update(MLFLOW_TRACKING_USERNAME=server["user"], MLFLOW_TRACKING_PASSWORD=server["password"])
    try:
        client = MlflowClient(tracking_uri=server["uri"])
        experiment = client.get_experiment_by_name(
            yaml.safe_load((root / "params.yaml").read_text())["project"]["experiment"]
        )
        runs = client.search_runs([experiment.experiment_id], f"tags.`lmcycle.workspace` = '{root}'")
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("ingest", "FINISHED")]
    assert all(server["password"] not in str(v) for r in runs for v in {**r.data.params, **r.data.tags}.values())


# --- Prefect -----------------------------------------------------------------------------------------------


def test_a_wrong_prefect_auth_string_fails_in_one_line_before_any_stage(workspace_factory, prefect_auth_server):
    server = prefect_auth_server
    root = workspace_factory()
    before = (root / "params.yaml").read_bytes()
    wrong = "admin:" + secrets.token_hex(6)
    base = {"PREFECT_API_URL": server["url"], "LMCYCLE_TRACKING": "off", "PREFECT_API_KEY": None}
    run = cli("run", "-S", "pretrain.steps=3", cwd=root, **base, PREFECT_API_AUTH_STRING=wrong)
    assert_one_line_error(
        run,
        f"PREFECT_API_URL {server['url']}: the server refused the credentials (401)",
        "PREFECT_API_AUTH_STRING",
        secret=wrong,
    )
    missing = cli("run", cwd=root, **base, PREFECT_API_AUTH_STRING=None)
    assert_one_line_error(missing, "the server requires credentials (401): set PREFECT_API_AUTH_STRING")
    both = cli("run", cwd=root, **{**base, "PREFECT_API_KEY": "pnu_" + "x" * 20}, PREFECT_API_AUTH_STRING=wrong)
    assert_one_line_error(both, "PREFECT_API_KEY unset", secret=wrong)
    serve = cli("serve", "--cron", "0 3 * * *", cwd=root, **base, PREFECT_API_AUTH_STRING=wrong)
    assert_one_line_error(serve, "PREFECT_API_AUTH_STRING", secret=wrong)
    gone = f"http://127.0.0.1:{free_port()}/api"
    down = cli("run", cwd=root, **{**base, "PREFECT_API_URL": gone}, PREFECT_API_AUTH_STRING=server["auth"])
    assert_one_line_error(down, f"PREFECT_API_URL {gone}: no Prefect server answers")
    assert_nothing_ran(root, before)


def test_the_right_prefect_auth_string_passes_the_check_and_the_flow_runs(tmp_path, prefect_auth_server):
    from conftest import make_workspace

    server = prefect_auth_server
    root = make_workspace(tmp_path / "ws", {})
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]}}}))
    env = {"PREFECT_API_URL": server["url"], "PREFECT_API_AUTH_STRING": server["auth"], "LMCYCLE_TRACKING": "off"}
    proc = cli("run", "--no-push", cwd=root, **env, PREFECT_API_KEY=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "a.txt").read_text().strip() == "a"
    assert server["auth"].split(":")[1] not in proc.stderr + proc.stdout
