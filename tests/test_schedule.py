"""Schedules against a real `prefect server` on 127.0.0.1: prefect.yaml deployed with `prefect deploy --all`, a
triggered run executed by a process worker, `lmcycle serve` registering its cron schedule, and the clear refusal
when no server can schedule."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def api_post(api: str, path: str, body: dict) -> object:
    request = urllib.request.Request(f"{api}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def deployment(api: str, flow: str, name: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{api}/deployments/name/{flow}/{name}", timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError:
        return None


def prefect(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["prefect", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_prefect_yaml_declares_a_nightly_process_deployment_of_the_flow():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    from flows.lifecycle import FLOW_NAME, lifecycle

    assert lifecycle.name == FLOW_NAME == "lm-lifecycle"
    assert [d["name"] for d in config["deployments"]] == ["nightly", "nightly-local"]
    for nightly in config["deployments"]:
        assert nightly["entrypoint"] == "flows/lifecycle.py:lifecycle"
        assert nightly["schedules"][0]["cron"] == "0 3 * * *"
        assert set(nightly["parameters"]) == {"workspace", "until", "force", "overrides", "register_model", "push"}
        assert set(nightly["parameters"]) == set(lifecycle.parameters.properties)
        assert nightly["parameters"]["workspace"] == "."


@pytest.mark.slow
def test_deploy_all_then_a_worker_runs_a_triggered_flow_run(workspace_factory, prefect_api):
    root = workspace_factory()
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PWD": str(root)}
    pool = "lmcycle"
    if not api_post(prefect_api, "/work_pools/filter", {"work_pools": {"name": {"any_": [pool]}}}):
        prefect("work-pool", "create", pool, "--type", "process", cwd=root, env=env)
    prefect("--no-prompt", "deploy", "--all", cwd=root, env=env)
    nightly = deployment(prefect_api, "lm-lifecycle", "nightly")
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert "prefect.deployments.steps.git_clone" in nightly["pull_steps"][0]  # a team's (tests/test_team.py)
    local = deployment(prefect_api, "lm-lifecycle", "nightly-local")
    assert local["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    assert local["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(root)}}]

    out = prefect(
        "deployment", "run", "lm-lifecycle/nightly-local", "--param", "until=ingest", cwd=root, env=env
    ).stdout
    run_id = next(line.split("/")[-1] for line in out.splitlines() if "/runs/flow-run/" in line).strip()
    # --run-once: poll once, run what is due (our run; the nightly ones are hours away), then exit
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", pool, "--run-once"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output = worker.communicate(timeout=600)[0].decode()
    finally:
        if worker.poll() is None:  # a worker may ignore SIGTERM: SIGINT stops it
            os.killpg(worker.pid, signal.SIGINT)
            worker.wait(timeout=60)
    with urllib.request.urlopen(f"{prefect_api}/flow_runs/{run_id}", timeout=30) as response:
        flow_run = json.loads(response.read())
    assert flow_run["state"]["type"] == "COMPLETED", output[-5000:]
    assert (root / "reports" / "ingest.json").is_file() and (root / "dvc.lock").is_file()
    assert not (root / "models").exists()  # --until ingest stopped there


def test_serve_refuses_without_a_server_that_can_schedule(workspace_factory):
    root = workspace_factory(dvc=False)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run(["lmcycle", "serve"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "schedules need a Prefect server" in proc.stderr and "--start-server" in proc.stderr


@pytest.mark.slow
def test_serve_registers_its_cron_schedule_and_stops_on_sigint(workspace_factory, prefect_api):
    root = workspace_factory()
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    cmd = ["lmcycle", "serve", "--cron", "15 4 * * *", "--name", "test-serve", "-S", "pretrain.steps=10"]
    serve = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        found = None
        while found is None:
            assert serve.poll() is None, serve.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(1)
            found = deployment(prefect_api, "lm-lifecycle", "test-serve")
        assert found["schedules"][0]["schedule"]["cron"] == "15 4 * * *"
        assert found["parameters"] == {"workspace": str(root), "overrides": ["pretrain.steps=10"]}
    finally:
        serve.send_signal(signal.SIGINT)
        out = serve.communicate(timeout=60)[0].decode()
    assert serve.returncode == 0, out[-3000:]  # SIGINT is how serving is meant to stop: not a failure
