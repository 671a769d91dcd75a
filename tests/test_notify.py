"""Notifications: the flow's hooks post a Slack-compatible message to a real HTTP server on 127.0.0.1, for a failed
run (the stage, why, its last lines) and for a registering run (the gate's decision and both values); credentials
never leave; a webhook that fails or does not answer changes nothing about the run. Plus the pure message builders
and the redaction on their own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_flow import STUBBORN_STAGE, closed_port, run_cli, script, synthetic_workspace

from flows.notify import (
    RunInfo,
    completion_message,
    failure_message,
    post,
    redact,
    redact_payload,
    secrets_in,
    send,
)

PLANTED_PASSWORD = "pl4nted-tracking-pw"
PLANTED_USERINFO = "s3cret-in-a-url"
PLANTED_TOKEN = "hf_pl4ntedT0ken"


class Webhook:
    """A real HTTP server on a free 127.0.0.1 port that records every POST body and answers `status`."""

    def __init__(self, status: int = 200):
        self.bodies: list[bytes] = []
        self.status = status
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                hook.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/{'x' * 24}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def messages(self) -> list[dict]:
        return [json.loads(b) for b in self.bodies]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    hook.thread.start()
    try:
        yield hook
    finally:
        hook.server.shutdown()
        hook.server.server_close()
        hook.thread.join(timeout=10)


def assert_clean(body: bytes, *secrets: str) -> None:
    text = body.decode()
    for secret in secrets:
        assert secret not in text


# --- redaction and messages, pure --------------------------------------------------------------------------

ENV = {
    "MLFLOW_TRACKING_URI": f"https://alice:{PLANTED_USERINFO}@mlflow.internal:5000",
    "MLFLOW_TRACKING_PASSWORD": PLANTED_PASSWORD,
    "HF_TOKEN": PLANTED_TOKEN,
    "TOKENIZERS_PARALLELISM": "true",
    "PWD": "/home/someone",
    "HOME": "/home/someone",
}


def test_redaction_strips_userinfo_env_secrets_and_credential_pairs():
    text = (
        f"tracking at https://alice:{PLANTED_USERINFO}@mlflow.internal:5000/api and "
        f"http://bob:other-pw@127.0.0.1:9/x; password={PLANTED_PASSWORD} token: abc123xyz "
        f"Authorization: Bearer eyJhbGciOi.abc and {PLANTED_TOKEN} alone; the secret {PLANTED_USERINFO}; "
        f"tokens_seen=1200 parallel=true in /home/someone"
    )
    out = redact(text, ENV)
    for secret in (PLANTED_USERINFO, "other-pw", "bob:", "alice", PLANTED_PASSWORD, "abc123xyz", "eyJhbGciOi", "hf_"):
        assert secret not in out
    # what is not a credential stays readable
    for kept in ("https://mlflow.internal:5000/api", "http://127.0.0.1:9/x", "tokens_seen=1200", "parallel=true"):
        assert kept in out
    assert "/home/someone" in out  # PWD and HOME are not secrets
    assert set(secrets_in(ENV)) == {PLANTED_USERINFO, "alice", PLANTED_PASSWORD, PLANTED_TOKEN}


def test_redact_payload_reaches_every_string_and_extra_secrets():
    payload = {"text": f"a {PLANTED_PASSWORD}", "blocks": [{"text": {"text": "see https://hooks.example/T/B/zzz"}}]}
    out = redact_payload(payload, ENV, extra=("https://hooks.example/T/B/zzz",))
    assert PLANTED_PASSWORD not in json.dumps(out) and "hooks.example" not in json.dumps(out)
    assert out["blocks"][0]["text"]["text"] == "see ***"


RUN = RunInfo("brave-fox", "0b5e-77", "ws", "http://127.0.0.1:4200/runs/flow-run/0b5e-77")


def test_failure_message_names_the_stage_why_and_its_last_lines():
    tail = "\n".join(f"line {i}" for i in range(100))
    report = {
        "stages": [{"name": "ingest", "state": "ran"}, {"name": "pretrain", "state": "failed"}],
        "failed": "stage pretrain exited with code 3",
        "tail": tail,
    }
    msg = failure_message(RUN, report, "ignored when the report says why")
    text = msg["text"]
    assert text.startswith(":x: lm-lifecycle run `brave-fox` (0b5e-77) failed in stage `pretrain`")
    assert "stage pretrain exited with code 3" in text and "ignored" not in text
    assert "line 99" in text and "line 80" in text and "line 79\n" not in text  # the last 20 lines
    assert "http://127.0.0.1:4200/runs/flow-run/0b5e-77" in text
    assert all(b["type"] == "section" and len(b["text"]["text"]) <= 3000 for b in msg["blocks"])
    json.dumps(msg)  # plain JSON

    early = failure_message(RUN, None, "Flow run encountered an exception: LmcycleError: flow.lock_timeout_s")
    assert "failed: Flow run encountered an exception" in early["text"] and "stage `" not in early["text"]

    interrupted = {"stages": [{"name": "ingest", "state": "ran"}], "running": "pretrain", "failed": "Signal: "}
    crash = failure_message(RUN, interrupted, "Execution was aborted by a termination signal.", crashed=True)
    assert "crashed in stage `pretrain`: Execution was aborted by a termination signal." in crash["text"]
    after = {"stages": [{"name": "pretrain", "state": "ran"}], "running": "pretrain", "failed": "registration failed"}
    assert "failed: registration failed" in failure_message(RUN, after)["text"]  # not a stage's failure


def test_completion_message_has_the_decision_and_both_values():
    reg = {
        "name": "m",
        "version": "2",
        "uri": "models:/m/2",
        "decision": "promoted",
        "reason": "pretrain.val_bpb 3 beats champion v1 3.25 (same eval data)",
        "metric": "pretrain.val_bpb",
        "challenger_value": 3.0,
        "champion_version": "1",
        "champion_value": 3.25,
        "reused": False,
    }
    report = {"stages": [{"name": "a", "state": "ran"}, {"name": "b", "state": "skipped"}], "registration": reg}
    text = completion_message(RUN, report)["text"]
    assert text.startswith(":trophy: lm-lifecycle run `brave-fox` (0b5e-77) completed (1 ran, 1 skipped)")
    assert "`models:/m/2`: gate *promoted*; pretrain.val_bpb: challenger 3 vs champion v1 3.25." in text

    no_champion = {**reg, "decision": "first", "champion_version": None}
    first = completion_message(RUN, {"stages": [], "registration": no_champion})
    assert "gate *first*" in first["text"] and "challenger 3 vs champion none" in first["text"]
    rejected = completion_message(RUN, {"stages": [], "registration": {**reg, "decision": "rejected"}})
    assert rejected["text"].startswith(":white_check_mark:") and "gate *rejected*" in rejected["text"]
    skipped = completion_message(RUN, {"stages": [], "registration": {"skipped": "tracking is off"}})
    assert "not registered: tracking is off" in skipped["text"]
    assert "nothing registered" in completion_message(RUN, {"stages": []})["text"]


# --- posting -----------------------------------------------------------------------------------------------


def test_post_delivers_json_and_failures_are_a_reason_not_an_exception(webhook):
    assert post(webhook.url, {"text": "hello"}) == ""
    assert webhook.messages() == [{"text": "hello"}]

    webhook.status = 500
    assert post(webhook.url, {"text": "x"}) == "the webhook answered HTTP 500"
    webhook.status = 404
    assert post(webhook.url, {"text": "x"}) == "the webhook answered HTTP 404"

    assert post(f"http://127.0.0.1:{closed_port()}/hook", {"text": "x"}).startswith("the webhook is unreachable")
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        reason = post(f"http://127.0.0.1:{silent.getsockname()[1]}/hook", {"text": "x"}, timeout_s=0.5)
    assert reason.startswith("the webhook") and "127.0.0.1" not in reason
    assert post("file:///etc/passwd", {"text": "x"}) == "the webhook URL is not http(s)"


def test_send_warns_once_without_the_url_and_redacts_what_it_posts(webhook, monkeypatch):
    monkeypatch.setenv("LMCYCLE_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PLANTED_PASSWORD)
    warnings: list[str] = []
    assert send({"text": f"leak {PLANTED_PASSWORD} {webhook.url}"}, warnings.append)
    assert warnings == [] and webhook.messages() == [{"text": "leak *** ***"}]

    webhook.status = 503
    assert not send({"text": "x"}, warnings.append)
    assert warnings == ["notification not sent: the webhook answered HTTP 503"]

    monkeypatch.setenv("LMCYCLE_WEBHOOK_URL", f"http://user:{PLANTED_USERINFO}@127.0.0.1:{closed_port()}/T/B/C")
    warnings.clear()
    assert not send({"text": "x"}, warnings.append)
    assert len(warnings) == 1 and PLANTED_USERINFO not in warnings[0] and "/T/B/C" not in warnings[0]


# --- the hooks of real flow runs ---------------------------------------------------------------------------

FAILING_STAGE = f"""
    import os, sys
    print("loading data.txt")
    print("tracking at http://alice:{PLANTED_USERINFO}@127.0.0.1:9/ with", os.environ["MLFLOW_TRACKING_PASSWORD"])
    print("boom: bad input in data.txt")
    raise SystemExit(3)
"""


def failing_workspace(root: Path, kjv: Path, chatter: Path) -> Path:
    root.mkdir()
    stages = {
        "first": {"cmd": script(root, "first.py", 'open("one.txt", "w").write("1")'), "outs": ["one.txt"]},
        "broken": {"cmd": script(root, "broken.py", FAILING_STAGE), "deps": ["one.txt"], "outs": ["two.txt"]},
    }
    return synthetic_workspace(root, kjv, chatter, stages, flow={"retries": 0})


def test_a_failed_run_posts_the_failed_stage_and_its_last_lines_without_secrets(
    tmp_path, kjv_slice, chatter_slice, prefect_api, webhook
):
    root = failing_workspace(tmp_path / "ws", kjv_slice, chatter_slice)
    secrets = {"MLFLOW_TRACKING_PASSWORD": PLANTED_PASSWORD, "HF_TOKEN": PLANTED_TOKEN}
    proc = run_cli("run", cwd=root, api=prefect_api, LMCYCLE_WEBHOOK_URL=webhook.url, **secrets)
    assert proc.returncode == 1
    assert "error: stage broken exited with code 3" in proc.stderr, proc.stderr[-3000:]
    (body,) = webhook.bodies
    message = json.loads(body)
    text = message["text"]
    assert "failed in stage `broken`: stage broken exited with code 3" in text
    assert "boom: bad input in data.txt" in text and "loading data.txt" in text  # its last lines
    assert "tracking at http://127.0.0.1:9/ with ***" in text
    assert any("boom: bad input" in b["text"]["text"] for b in message["blocks"])
    assert_clean(body, PLANTED_PASSWORD, PLANTED_USERINFO, PLANTED_TOKEN, webhook.url, "/services/T000")
    assert not list((root / ".lmcycle" / "notify").glob("*.json"))  # the hook took the flow's report


def test_an_unreachable_webhook_leaves_the_outcome_unchanged(tmp_path, kjv_slice, chatter_slice, prefect_api):
    root = failing_workspace(tmp_path / "ws", kjv_slice, chatter_slice)
    url = f"http://127.0.0.1:{closed_port()}/services/T000/B000/{'y' * 24}"
    env = {"LMCYCLE_WEBHOOK_URL": url, "MLFLOW_TRACKING_PASSWORD": PLANTED_PASSWORD}
    proc = run_cli("run", cwd=root, api=prefect_api, **env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: stage broken exited with code 3", proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    warnings = [line for line in output.splitlines() if "notification not sent" in line]
    assert len(warnings) == 1 and "the webhook is unreachable" in warnings[0], output[-3000:]
    assert url not in output and "/services/T000" not in output


def test_a_crashed_run_posts_the_stage_it_interrupted(tmp_path, kjv_slice, chatter_slice, prefect_api, webhook):
    """What a worker's SIGTERM does to a run (Prefect: Crashed): the on_crashed hook still posts."""
    root = tmp_path / "ws"
    root.mkdir()
    stages = {"slow": {"cmd": script(root, "slow.py", STUBBORN_STAGE), "outs": ["never.txt"]}}
    synthetic_workspace(root, kjv_slice, chatter_slice, stages, flow={"kill_grace_s": 2.0, "retries": 0})
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "LMCYCLE_WEBHOOK_URL": webhook.url}
    run = subprocess.Popen(["lmcycle", "run"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (root / "pids.txt").exists():
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        out = run.communicate(timeout=120)[0].decode()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode != 0
    (message,) = webhook.messages()
    assert "crashed in stage `slow`: Execution was aborted by a termination signal" in message["text"], out[-3000:]


def save_secret_block(api: str, name: str, value: str) -> None:
    code = f"from prefect.blocks.system import Secret; Secret(value={value!r}).save({name!r}, overwrite=True)"
    env = {**os.environ, "PREFECT_API_URL": api}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=120)


EVALUATE_STAGE = """
    import json, os, yaml
    steps = yaml.safe_load(open("params.yaml"))["pretrain"]["steps"]
    os.makedirs("reports", exist_ok=True)
    json.dump({"pretrain.val_bpb": 3.25 if steps == 20 else 3.0}, open("reports/evaluate.json", "w"))
"""


def test_registering_runs_post_the_gate_decision_and_both_values(
    tmp_path, kjv_slice, chatter_slice, prefect_api, tiny_hf_dir, webhook
):
    """The first run registers v1 (first, webhook from the environment); a better one promotes v2 (webhook from a
    Prefect Secret block)."""
    root = tmp_path / "ws"
    root.mkdir()
    name = "notify-model"
    stages = {
        "evaluate": {
            "cmd": script(root, "evaluate.py", EVALUATE_STAGE),
            "params": ["pretrain.steps"],
            "outs": [{"reports/evaluate.json": {"cache": False}}],
        }
    }
    synthetic_workspace(root, kjv_slice, chatter_slice, stages, project={"registered_model": name})
    shutil.copytree(tiny_hf_dir, root / "models" / "pretrain" / "hf")
    secrets = {"MLFLOW_TRACKING_PASSWORD": PLANTED_PASSWORD}

    proc = run_cli("run", cwd=root, api=prefect_api, LMCYCLE_WEBHOOK_URL=webhook.url, **secrets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (first,) = webhook.messages()
    assert ":trophy:" in first["text"] and "(1 ran)" in first["text"]
    assert f"`models:/{name}/1`: gate *first*; pretrain.val_bpb: challenger 3.25 vs champion none" in first["text"]

    save_secret_block(prefect_api, "notify-test-webhook", webhook.url)
    proc = run_cli(
        "run", "-S", "pretrain.steps=7", cwd=root, api=prefect_api, LMCYCLE_WEBHOOK_BLOCK="notify-test-webhook"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = webhook.messages()[1]["text"]
    assert f"`models:/{name}/2`: gate *promoted*; pretrain.val_bpb: challenger 3 vs champion v1 3.25" in second
    for body in webhook.bodies:
        assert_clean(body, PLANTED_PASSWORD, webhook.url, "/services/T000")
