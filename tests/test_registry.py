"""Registry and promotion gate on a real tiny pretrained model: register, reuse by lineage, gate decisions,
re-scoring a champion on other eval data, aliases by hand, clear errors, and serving the champion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import hf_scores
import pytest
from conftest import copy_workspace, lmcycle

from lmcore.lifecycle.config import load_config
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.registry.aliases import champion_history, promote, rollback
from lmcore.lifecycle.registry.promotion import rescore_val_bpb
from lmcore.lifecycle.registry.register import register_model
from lmcore.lifecycle.registry.uris import RegistryError, client_for, local_model_dir, resolve
from lmcore.lifecycle.workspace import dvc_lock_hash


def reg_workspace(source: Path, dest: Path, name: str, val_bpb: float, lineage: str, **sections: dict) -> Paths:
    """A private copy of the pretrained workspace, registering as `name`, with a chosen gate metric and lineage
    (the dvc.lock content is what identifies a version's lineage)."""
    root = copy_workspace(source, dest, project={"registered_model": name}, **sections)
    report = json.loads((root / "reports" / "pretrain.json").read_text())
    set_val_bpb(root, report, val_bpb)
    set_lineage(root, lineage)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return Paths.of(root)


def set_val_bpb(root: Path, report: dict, value: float) -> None:
    report = dict(report)
    report["val_bpb"] = value
    (root / "reports" / "pretrain.json").write_text(json.dumps(report, sort_keys=True))


def set_lineage(root: Path, lineage: str) -> None:
    (root / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  pretrain:\n    cmd: lmcycle stage pretrain  # {lineage}\n"
    )


def register(paths: Paths):
    return register_model(paths, load_config(paths.root / "params.yaml"))


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """Registered models materialise in a throw-away cache, not the user's ~/.cache/lmcycle."""
    previous = os.environ.get("LMCYCLE_CACHE")
    os.environ["LMCYCLE_CACHE"] = str(tmp_path_factory.mktemp("lmcycle-cache"))
    yield
    if previous is None:
        os.environ.pop("LMCYCLE_CACHE", None)
    else:
        os.environ["LMCYCLE_CACHE"] = previous


@pytest.fixture
def client():
    return client_for(".")


def test_first_version_becomes_champion_and_reregistering_reuses_it(pretrained_workspace, tmp_path, client):
    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-first", 2.5, "a")
    first = register(paths)
    assert (first.version, first.decision, first.reused) == ("1", "first", False)
    assert str(client.get_model_version_by_alias("reg-first", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("reg-first", "challenger").version) == "1"

    again = register(paths)
    assert (again.version, again.reused, again.decision) == ("1", True, "first")
    assert len(client.search_model_versions("name='reg-first'")) == 1

    tags = client.get_model_version("reg-first", "1").tags

    assert tags["lmcycle.dvc_lock_hash"] == dvc_lock_hash(paths.root)
    assert json.loads(tags["lmcycle.params"])["project"]["registered_model"] == "reg-first"
    assert tags["metric.pretrain.val_bpb"] == "2.5" and tags["lmcycle.gate.value"] == "2.5"
    assert tags["lmcycle.seed"] == "1337" and tags["env.torch"].startswith("2.")
    assert tags["lmcycle.task"] == "llm/v1/chat" and tags["lmcycle.stage"] == "pretrain"
    assert tags["lmcycle.eval_fingerprint"] and tags["lmcycle.git_dirty"] in {"true", "false"}

    # the logged weights are the workspace's file (a hard link), not a third copy
    served = local_model_dir("models:/reg-first@champion")
    assert os.path.samefile(served / "model.safetensors", paths.pretrain / "hf" / "model.safetensors")


def test_gate_rejects_a_worse_challenger_and_promotes_a_better_one(pretrained_workspace, tmp_path, client):
    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-gate", 2.5, "a")
    report = json.loads((paths.root / "reports" / "pretrain.json").read_text())
    assert register(paths).decision == "first"

    set_lineage(paths.root, "b")
    set_val_bpb(paths.root, report, 2.7)
    worse = register(paths)
    assert (worse.version, worse.decision) == ("2", "rejected")
    assert (worse.challenger_value, worse.champion_value, worse.champion_version) == (2.7, 2.5, "1")
    assert str(client.get_model_version_by_alias("reg-gate", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("reg-gate", "challenger").version) == "2"
    assert client.get_model_version("reg-gate", "2").tags["lmcycle.gate.decision"] == "rejected"

    set_lineage(paths.root, "c")
    set_val_bpb(paths.root, report, 2.4)
    better = register(paths)
    assert (better.version, better.decision, better.champion_value) == ("3", "promoted", 2.5)
    assert str(client.get_model_version_by_alias("reg-gate", "champion").version) == "3"
    assert champion_history(client, "reg-gate") == ["1", "3"]

    # the human side: roll back, then promote by hand
    assert rollback(client, "reg-gate") == "1"
    assert str(client.get_model_version_by_alias("reg-gate", "champion").version) == "1"
    promote(client, "reg-gate", "2")
    assert str(client.get_model_version_by_alias("reg-gate", "champion").version) == "2"
    assert rollback(client, "reg-gate") == "1"


def test_gate_rescores_the_champion_when_eval_data_differs(pretrained_workspace, tmp_path, client):
    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-rescore", 9.0, "a")
    config = load_config(paths.root / "params.yaml")
    assert register(paths).decision == "first"

    val = paths.split_file("pretrain", "val")
    lines = val.read_text(encoding="utf-8").splitlines(keepends=True)
    val.write_text("".join(lines[: max(2, len(lines) // 2)]), encoding="utf-8")  # other held-out data
    champion_now = hf_scores.val_bpb(paths.pretrain / "hf", val)  # stock transformers, not the gate's code
    assert rescore_val_bpb(paths.pretrain / "hf", paths, config) == pytest.approx(champion_now, abs=1e-4)
    set_lineage(paths.root, "b")
    set_val_bpb(paths.root, json.loads((paths.root / "reports" / "pretrain.json").read_text()), champion_now - 0.01)
    result = register(paths)

    assert "re-scored" in result.reason
    assert result.champion_value == pytest.approx(champion_now, abs=1e-4)  # not the recorded 9.0
    assert result.decision == "promoted"
    tags = client.get_model_version("reg-rescore", "2").tags
    assert float(tags["lmcycle.gate.champion_value"]) == pytest.approx(champion_now, abs=1e-4)


def write_eval_report(paths: Paths, report: dict, lineage: str) -> None:
    """reports/evaluate.json (flat keys, as the evaluate stage writes them) for a new lineage."""
    (paths.reports / "evaluate.json").write_text(json.dumps(report))
    set_lineage(paths.root, lineage)


def test_gate_rescores_a_chat_champion_with_the_sft_scorer(pretrained_workspace, tmp_path, client):
    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-sft", 2.5, "a")
    shutil.copytree(paths.pretrain / "hf", paths.finetune / "hf")  # a chat model where the fine-tune goes
    write_eval_report(paths, {"sft.loss": 50.0, "sft.data_fingerprint": "held-out-a"}, "a")
    first = register(paths)
    assert (first.decision, first.metric) == ("first", "sft.loss")

    config = load_config(paths.root / "params.yaml")
    champion_now = hf_scores.sft_loss(paths.finetune / "hf", paths.split_file("sft", "val"), 8)
    assert config.evaluate.sft_max_examples == 8
    write_eval_report(paths, {"sft.loss": champion_now + 0.5, "sft.data_fingerprint": "held-out-b"}, "b")
    result = register(paths)
    # against the recorded 50.0 it would win; against the champion re-scored on this data it loses
    assert (result.decision, result.version) == ("rejected", "2") and "re-scored" in result.reason
    assert result.champion_value == pytest.approx(champion_now, abs=1e-4)
    assert str(client.get_model_version_by_alias("reg-sft", "champion").version) == "1"


def test_gate_rescores_a_classifier_champion_by_macro_f1(pretrained_workspace, tmp_path, client):
    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-cls-rescore", 2.5, "a")
    save_classifier(paths)
    write_eval_report(paths, {"classification.macro_f1": 0.99, "classification.data_fingerprint": "a"}, "a")
    assert register(paths).decision == "first"

    champion_now = hf_scores.macro_f1(paths.finetune / "hf", paths.split_file("classification", "val"))
    write_eval_report(
        paths, {"classification.macro_f1": champion_now + 0.05, "classification.data_fingerprint": "b"}, "b"
    )
    result = register(paths)
    # maximize: against the recorded 0.99 it would lose; against the re-scored champion it wins
    assert (result.decision, result.version) == ("promoted", "2") and "re-scored" in result.reason
    assert result.champion_value == pytest.approx(champion_now, abs=1e-9)
    assert str(client.get_model_version_by_alias("reg-cls-rescore", "champion").version) == "2"


def test_a_champion_that_cannot_be_rescored_keeps_the_alias(pretrained_workspace, tmp_path, client):
    register_params = {"gate_metric": "custom.score", "direction": "maximize"}
    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-unscorable", 2.5, "a", register=register_params)
    write_eval_report(paths, {"custom.score": 1.0, "custom.data_fingerprint": "a"}, "a")
    assert register(paths).decision == "first"
    write_eval_report(paths, {"custom.score": 2.0, "custom.data_fingerprint": "b"}, "b")  # better, on other data
    result = register(paths)
    assert (result.decision, result.version, result.champion_value) == ("rejected", "2", None)
    assert result.reason == "champion v1 has no custom.score on this eval data and it cannot be re-scored"
    assert str(client.get_model_version_by_alias("reg-unscorable", "champion").version) == "1"


def test_missing_models_and_aliases_fail_with_one_clear_line(pretrained_workspace, tmp_path, client):
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        resolve(client, "models:/nope@champion")
    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-errors", 2.5, "a")
    register(paths)
    with pytest.raises(RegistryError, match="has no alias 'best'"):
        resolve(client, "models:/reg-errors@best")
    with pytest.raises(RegistryError, match="has no version 7"):
        resolve(client, "models:/reg-errors/7")
    with pytest.raises(RegistryError, match="expected models:/NAME@ALIAS"):
        resolve(client, "models:/reg-errors")

    for args, message in [
        (["models", "promote", "nope", "1"], "error: models:/nope/1: no registered model named 'nope'"),
        (["models", "rollback", "reg-errors"], "error: models:/reg-errors@champion: no earlier champion"),
        (["reproduce", "models:/reg-errors@best"], "error: models:/reg-errors@best: registered model 'reg-errors'"),
        (["models", "list", "nope"], "error: models:/nope: no registered model named 'nope'"),
    ]:
        proc = lmcycle(*args, cwd=paths.root, check=False)
        assert proc.returncode == 1, proc.stderr
        assert message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr

    listing = lmcycle("models", "list", "reg-errors", cwd=paths.root)
    assert "champion" in listing.stdout and "first" in listing.stdout


def test_the_champion_answers_chat_messages_through_mlflow(pretrained_workspace, tmp_path):
    import mlflow
    import torch

    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-chat", 2.5, "a")
    register(paths)
    model = mlflow.pyfunc.load_model("models:/reg-chat@champion")
    out = model.predict({"messages": [{"role": "user", "content": "Who made the heaven?"}], "max_tokens": 6})
    answer = out[0]["choices"][0]["message"]
    assert answer["role"] == "assistant" and answer["content"].strip()  # an answer, not an empty string
    assert out[0]["object"] == "chat.completion"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = local_model_dir("models:/reg-chat@champion")
    tok = AutoTokenizer.from_pretrained(directory)
    assert "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert AutoModelForCausalLM.from_pretrained(directory).generation_config.max_new_tokens < 64
    # within the request's token cap, plus one: MLflow's pipeline tokenizes the already templated prompt with
    # special tokens, so the served prompt carries a second <|bos|>, and its usage count includes it
    assert 1 <= out[0]["usage"]["completion_tokens"] <= 6 + 1

    from lmcore.generate import load_model  # what `lmcycle generate --model models:/…` loads
    from lmcore.lifecycle.registry.uris import resolve_model_path

    transformer, tokenizer = load_model(resolve_model_path("models:/reg-chat@champion"))
    assert transformer.config.vocab_size >= len(tokenizer)
    with pytest.raises(RegistryError, match="no registered model named 'absent'"):
        resolve_model_path("models:/absent@champion")
    out = lmcycle(
        "generate",
        "--model",
        "models:/reg-chat@champion",
        "--prompt",
        "Hello",
        "--chat",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        cwd=paths.root,
    )
    # the answer is stock transformers' greedy answer to the same chat prompt, within the 4-token cap
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    new = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, len(prompt) :].tolist()
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert out.stdout.strip() == tok.decode(new, skip_special_tokens=True).strip() != ""
    missing = lmcycle("generate", "--model", "models:/reg-chat@nope", "--prompt", "x", cwd=paths.root, check=False)
    assert (
        missing.returncode == 1
        and "error: models:/reg-chat@nope: registered model 'reg-chat' has no alias 'nope'" in missing.stderr
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_chat_request(pretrained_workspace, tmp_path):
    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-serve", 2.5, "a")
    register(paths)
    port = _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["mlflow", "models", "serve", "-m", "models:/reg-serve@champion", "--env-manager", "local"]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        choices = answer["predictions"][0]["choices"] if "predictions" in answer else answer[0]["choices"]
        assert choices[0]["message"]["role"] == "assistant"
        assert choices[0]["message"]["content"].strip()  # an answer, not an empty string
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(tmp_path / "ws", ignore_errors=True)


def save_classifier(paths: Paths) -> None:
    """A small random Llama sequence classifier (labels new/old, the KJV testament set) in models/finetune/hf."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "new", 1: "old"},
        label2id={"new": 0, "old": 1},
    )
    model_dir = paths.finetune / "hf"
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def test_a_classifier_registers_as_a_text_classification_model(pretrained_workspace, tmp_path, client):
    import mlflow

    paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-classifier", 2.5, "a")
    save_classifier(paths)
    report = {"classification.macro_f1": 0.61, "classification.data_fingerprint": "abc", "sft.loss": 9.0}
    (paths.reports / "evaluate.json").write_text(json.dumps(report))

    result = register(paths)
    assert (result.decision, result.metric) == ("first", "classification.macro_f1")
    tags = client.get_model_version("reg-classifier", "1").tags
    assert tags["lmcycle.task"] == "text-classification" and tags["lmcycle.gate.direction"] == "maximize"
    assert tags["lmcycle.eval_fingerprint"] == "abc"
    predictions = mlflow.pyfunc.load_model("models:/reg-classifier@champion").predict(["In the beginning God"])
    assert set(predictions["label"]) <= {"new", "old"}


def test_registering_asks_the_hugging_face_hub_nothing(pretrained_workspace, tmp_path):
    """The model is logged under the registered name, which is no hub repository: with the hub reachable (a local
    stand-in on 127.0.0.1 through HF_ENDPOINT, offline mode off) MLflow's transformers flavor would ask it for that
    name's license; the registration must send it nothing."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    hub = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        paths = reg_workspace(pretrained_workspace, tmp_path / "ws", "reg-no-hub", 3.0, "a")
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}"}
        env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", LMCYCLE_CACHE=os.environ["LMCYCLE_CACHE"])
        cmd = ["lmcycle", "register", "--workspace", str(paths.root)]
        proc = subprocess.run(cmd, cwd=paths.root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "models:/reg-no-hub/1" in proc.stdout + proc.stderr
        assert asked == [], asked
    finally:
        hub.shutdown()
        hub.server_close()
