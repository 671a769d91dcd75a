"""The promotion gate's decision, on its boundaries: a tie, a gain at, below and above `register.min_improvement`,
both directions, no champion yet, and a champion that could not be scored on the challenger's data.

The pure tests (no MLflow, no model) are the ones `make mutate` runs against the decision function; the tests
marked slow run the whole gate on a real registry: the quality floor, re-scoring when evaluate settings change,
the reuse key of a decision, a registration killed half-way, and two registrations racing on one store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import copy_workspace, deep_update, lmcycle

from lmcore.lifecycle.config import load_config
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.registry.aliases import champion_history
from lmcore.lifecycle.registry.gate import apply_floor, better, gate_decision, quality_floor, settings_fingerprint
from lmcore.lifecycle.registry.register import register_model

HOW = "same eval data"


def decide(value: float, champion: float | None, direction: str = "minimize", min_improvement: float = 0.0):
    return gate_decision("m.x", value, direction, min_improvement, "3", champion, HOW)


@pytest.mark.parametrize(
    ("value", "champion", "direction", "min_improvement", "expected"),
    [
        # minimize (losses, bits per byte): lower wins, by strictly more than min_improvement
        (2.4, 2.5, "minimize", 0.0, True),
        (2.5, 2.5, "minimize", 0.0, False),  # a tie keeps the champion
        (2.6, 2.5, "minimize", 0.0, False),
        (2.45, 2.5, "minimize", 0.1, False),  # a gain below the minimum
        (2.375, 2.5, "minimize", 0.125, False),  # a gain of exactly the minimum (exact in binary)
        (2.25, 2.5, "minimize", 0.125, True),
        # maximize (classification macro-F1): higher wins
        (0.7, 0.6, "maximize", 0.0, True),
        (0.6, 0.6, "maximize", 0.0, False),
        (0.5, 0.6, "maximize", 0.0, False),
        (0.65, 0.6, "maximize", 0.1, False),
        (0.625, 0.5, "maximize", 0.125, False),
        (0.75, 0.5, "maximize", 0.125, True),
    ],
)
def test_better_is_a_strict_improvement_by_more_than_the_minimum(value, champion, direction, min_improvement, expected):
    assert better(value, champion, direction, min_improvement) is expected
    assert decide(value, champion, direction, min_improvement)[0] == ("promoted" if expected else "rejected")


def test_a_challenger_is_first_when_there_is_no_champion():
    assert gate_decision("m.x", 9.0, "minimize", 0.0, None, None, "") == (
        "first",
        "no champion yet: the first version becomes champion",
    )


def test_a_champion_that_cannot_be_scored_rejects_the_challenger_saying_why():
    why = "champion v3 has no m.x on this eval data and it cannot be re-scored"
    assert gate_decision("m.x", 0.0, "minimize", 0.0, "3", None, why) == ("rejected", why)
    assert gate_decision("m.x", 1e9, "maximize", 0.0, "3", None, why) == ("rejected", why)


def test_the_reasons_name_both_values_the_minimum_and_how_the_champion_was_scored():
    assert decide(2.4, 2.5) == ("promoted", "m.x 2.4 beats champion v3 2.5 (same eval data)")
    assert decide(2.45, 2.5, min_improvement=0.1) == (
        "rejected",
        "m.x 2.45 does not beat champion v3 2.5 by more than 0.1 (minimize; same eval data)",
    )
    assert decide(0.5, 0.6, "maximize") == (
        "rejected",
        "m.x 0.5 does not beat champion v3 0.6 by more than 0 (maximize; same eval data)",
    )


# --- the quality floor, pure --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "metrics", "expected"),
    [
        ("pretrain", {"pretrain.val_bpb": 3.9, "pretrain.bigram_bpb": 4.0}, True),
        ("pretrain", {"pretrain.val_bpb": 4.0, "pretrain.bigram_bpb": 4.0}, False),  # a tie is not beating it
        ("pretrain", {"pretrain.val_bpb": 4.1, "pretrain.bigram_bpb": 4.0}, False),
        ("classification", {"classification.accuracy": 0.6, "classification.majority_accuracy": 0.5}, True),
        ("classification", {"classification.accuracy": 0.5, "classification.majority_accuracy": 0.5}, False),
        ("finetune", {"sft.loss": 2.0, "base.sft_loss": 2.5}, True),
        ("finetune", {"sft.loss": 2.5, "base.sft_loss": 2.5}, False),
        ("pretrain", {"pretrain.val_bpb": 9.0}, None),  # no baseline reported: nothing to hold it to
    ],
)
def test_quality_floor_compares_with_the_trivial_baseline(kind, metrics, expected):
    assert quality_floor(kind, metrics)[0] is expected
    decision, reason = apply_floor("first", "no champion yet", True, kind, metrics)
    assert decision == ("rejected" if expected is False else "first")
    assert ("quality floor" in reason) is (expected is False)
    assert apply_floor("first", "no champion yet", False, kind, metrics)[0] == "first"  # switched off


def test_the_fingerprint_changes_with_every_setting_that_changes_the_numbers():
    from conftest import REPO

    from lmcore.lifecycle.config import load_config

    base = load_config(REPO / "params.yaml")

    def with_evaluate(**change):
        return base.model_copy(update={"evaluate": base.evaluate.model_copy(update=change)})

    limited = base.evaluate.lm_eval.model_copy(update={"limit": 7})
    for section, config in [
        ("sft", with_evaluate(sft_max_examples=3)),
        ("sft", with_evaluate(max_new_tokens=5)),
        ("lm_eval", with_evaluate(lm_eval=limited)),
    ]:
        assert settings_fingerprint("data", section, config) != settings_fingerprint("data", section, base)
    assert settings_fingerprint("other", "sft", base) != settings_fingerprint("data", "sft", base)
    assert settings_fingerprint("data", "pretrain", base) == "data"  # bits per byte: only the text matters


# --- the gate on a real registry (MLflow on sqlite, a real tiny pretrained model) ----------------------------


def gate_workspace(source: Path, dest: Path, name: str, lineage: str, **sections: dict) -> Paths:
    """A private copy of a workspace registering as `name`, with its own lineage (dvc.lock content)."""
    root = copy_workspace(source, dest, project={"registered_model": name}, **sections)
    set_lineage(root, lineage)
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return Paths.of(root)


def set_lineage(root: Path, lineage: str) -> None:
    lock = f"schema: '2.0'\nstages:\n  pretrain:\n    cmd: lmcycle stage pretrain  # {lineage}\n"
    (root / "dvc.lock").write_text(lock)


def set_report(root: Path, **values: float | str) -> None:
    path = root / "reports" / "evaluate.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(report | values, sort_keys=True))


def set_params(root: Path, **sections: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(deep_update(params, sections), sort_keys=False))


def register(paths: Paths):
    return register_model(paths, load_config(paths.root / "params.yaml"))


def alias(client, name: str, which: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, which).version)
    except Exception:
        return None


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


@pytest.fixture(scope="module")
def evaluated_workspace(pretrained_workspace, tmp_path_factory) -> Path:
    """The tiny pretrained workspace after the real evaluate stage (bigram baseline included)."""
    root = copy_workspace(pretrained_workspace, tmp_path_factory.mktemp("evaluated") / "ws")
    lmcycle("stage", "evaluate", cwd=root)
    return root


@pytest.fixture
def client():
    from lmcore.lifecycle.registry.uris import client_for

    return client_for(".")


@pytest.mark.slow
def test_a_pretrain_worse_than_its_bigram_is_challenger_never_champion(evaluated_workspace, tmp_path, client):
    report = json.loads((evaluated_workspace / "reports" / "evaluate.json").read_text())
    bpb, bigram = report["pretrain.val_bpb"], report["pretrain.bigram_bpb"]
    paths = gate_workspace(evaluated_workspace, tmp_path / "ws", "gate-floor-lm", "a")
    if bpb < bigram:  # the tiny run beat its bigram after all: make it the undertrained one
        set_report(paths.root, **{"pretrain.val_bpb": bigram + 0.5})

    result = register(paths)
    assert (result.version, result.decision) == ("1", "rejected")
    assert "quality floor" in result.reason and "bigram" in result.reason
    assert alias(client, "gate-floor-lm", "challenger") == "1"
    assert alias(client, "gate-floor-lm", "champion") is None
    assert client.get_model_version("gate-floor-lm", "1").tags["lmcycle.gate.decision"] == "rejected"
    assert description(client, "gate-floor-lm", "1").endswith(f"Promotion gate: not promoted: {result.reason}")

    set_lineage(paths.root, "b")  # a version that beats its bigram becomes the first champion
    set_report(paths.root, **{"pretrain.val_bpb": bigram - 0.25})
    better = register(paths)
    assert (better.version, better.decision) == ("2", "first")
    assert alias(client, "gate-floor-lm", "champion") == "2"


@pytest.mark.slow
def test_a_classifier_no_better_than_the_majority_class_never_becomes_champion(evaluated_workspace, tmp_path, client):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    paths = gate_workspace(evaluated_workspace, tmp_path / "ws", "gate-floor-cls", "a")
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
    LlamaForSequenceClassification(config).save_pretrained(paths.finetune / "hf")
    tokenizer.save_pretrained(paths.finetune / "hf")
    # what the evaluate stage writes for a classifier that always answers the majority class
    majority = {"classification.accuracy": 0.5, "classification.majority_accuracy": 0.5}
    set_report(paths.root, **majority, **{"classification.macro_f1": 0.33, "classification.data_fingerprint": "x"})

    result = register(paths)
    assert result.decision == "rejected" and "majority class" in result.reason
    assert alias(client, "gate-floor-cls", "challenger") == "1"
    assert alias(client, "gate-floor-cls", "champion") is None

    set_lineage(paths.root, "b")
    set_report(paths.root, **{"classification.accuracy": 0.7, "classification.macro_f1": 0.69})
    assert register(paths).decision == "first"
    assert alias(client, "gate-floor-cls", "champion") == "2"


@pytest.mark.slow
def test_changing_sft_max_examples_rescores_the_champion(evaluated_workspace, tmp_path, client):
    gate = {"gate_metric": "sft.loss", "direction": "minimize", "quality_floor": False}  # a pretrain under its bigram
    paths = gate_workspace(evaluated_workspace, tmp_path / "ws", "gate-sft-n", "a", register=gate)
    set_report(paths.root, **{"sft.loss": 9.0, "sft.data_fingerprint": "same-file"})
    assert register(paths).decision == "first"

    set_lineage(paths.root, "b")  # same val file, but the loss now averages over fewer examples
    set_params(paths.root, evaluate={"sft_max_examples": 3})
    set_report(paths.root, **{"sft.loss": 0.5})
    result = register(paths)
    assert "re-scored" in result.reason
    assert result.champion_value is not None and result.champion_value != 9.0  # not the recorded value


def below_bigram(root: Path, by: float) -> float:
    """Set the report's val_bpb `by` bits under the real bigram baseline (above the floor); returns it."""
    report = json.loads((root / "reports" / "evaluate.json").read_text())
    value = report["pretrain.bigram_bpb"] - by
    set_report(root, **{"pretrain.val_bpb": value})
    return value


@pytest.mark.slow
def test_a_changed_gate_decides_again_instead_of_reusing_the_old_decision(evaluated_workspace, tmp_path, client):
    paths = gate_workspace(evaluated_workspace, tmp_path / "ws", "gate-reuse", "a")
    first_bpb = below_bigram(paths.root, 0.5)
    assert register(paths).decision == "first"
    assert description(client, "gate-reuse", "1").endswith(
        f"Promotion gate: champion: pretrain.val_bpb {first_bpb:.4g} (lower is better); the first version, "
        "no champion before"
    )

    set_lineage(paths.root, "b")
    second_bpb = below_bigram(paths.root, 0.7)  # better by 0.2, less than the minimum
    set_params(paths.root, register={"min_improvement": 0.5})
    assert (register(paths).version, register(paths).decision) == ("2", "rejected")
    rejected = description(client, "gate-reuse", "2")
    assert "Rebuild it with" in rejected  # the registration's own description stays, the decision follows it
    assert rejected.endswith(
        f"Promotion gate: not promoted: pretrain.val_bpb {second_bpb:.6g} does not beat champion v1 "
        f"{first_bpb:.6g} by more than 0.5 (minimize; same eval data)"
    )

    set_params(paths.root, register={"min_improvement": 0.0})  # same model and lineage, another gate
    again = register(paths)
    assert (again.version, again.reused, again.decision) == ("2", True, "promoted")
    assert alias(client, "gate-reuse", "champion") == "2"
    assert len(client.search_model_versions("name='gate-reuse'")) == 2
    promoted = description(client, "gate-reuse", "2")
    assert promoted.count("Promotion gate:") == 1 and "Rebuild it with" in promoted  # replaced, not appended
    assert promoted.endswith(
        f"Promotion gate: champion: pretrain.val_bpb {second_bpb:.4g} vs champion v1 {first_bpb:.4g} (lower is better)"
    )
    assert description(client, "gate-reuse", "1").endswith(
        f"Promotion gate: champion until v2: pretrain.val_bpb {second_bpb:.4g} vs this version's {first_bpb:.4g} "
        "(lower is better)"
    )


def description(client, name: str, version: str) -> str:
    """What the registry page shows under the version."""
    return client.get_model_version(name, version).description or ""


@pytest.mark.slow
def test_a_registration_stopped_after_creating_the_version_is_completed_not_duplicated(
    evaluated_workspace, tmp_path, client, monkeypatch
):
    from mlflow import MlflowClient

    paths = gate_workspace(evaluated_workspace, tmp_path / "ws", "gate-killed", "a")
    below_bigram(paths.root, 0.5)

    def killed(*args, **kwargs):  # the process dies at its first write after the version exists
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_model_version_tag", killed)
        with pytest.raises(KeyboardInterrupt):
            register(paths)
    versions = client.search_model_versions("name='gate-killed'")
    assert len(versions) == 1 and "lmcycle.gate.decision" not in versions[0].tags
    assert versions[0].tags["lmcycle.dvc_lock_hash"]  # born with its lineage: the next run finds it

    result = register(paths)
    assert (result.version, result.reused) == ("1", True)
    assert result.decision == "kept"  # the alias had moved before the stop; the gate's record is now complete
    assert client.get_model_version("gate-killed", "1").tags["lmcycle.gate.decision"] == "kept"
    assert len(client.search_model_versions("name='gate-killed'")) == 1
    assert alias(client, "gate-killed", "champion") == "1"


REGISTER_SCRIPT = """
import sys, time
from pathlib import Path
from lmcore.lifecycle.config import load_config
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.registry.candidate import candidate
from lmcore.lifecycle.registry.register import _log_and_register, register_model
from lmcore.lifecycle.tracking import connect
paths = Paths.of(sys.argv[1])
config = load_config(paths.root / "params.yaml")
client, experiment_id = connect(paths.root, config.project.experiment)
_log_and_register(client, experiment_id, paths, config, candidate(paths, config), None, None)  # the slow part
Path(sys.argv[1], "ready").touch()
while not Path(sys.argv[2]).exists():  # both gates start together
    time.sleep(0.005)
result = register_model(paths, config)  # finds its version by lineage and runs the gate
print(result.version, result.decision)
"""


@pytest.mark.slow
def test_two_registrations_at_once_leave_the_better_one_champion_and_the_history_whole(
    evaluated_workspace, tmp_path, client
):
    """Two real processes register two versions of different quality on one sqlite store at once, two rounds."""
    import sys
    import time

    name = "gate-race"
    rounds = [(0.5, 1.0), (1.3, 1.2)]  # bits under the bigram: larger is better
    best = 0.0
    for number, margins in enumerate(rounds):
        workspaces = []
        for i, margin in enumerate(margins):
            paths = gate_workspace(evaluated_workspace, tmp_path / f"ws{number}{i}", name, f"{number}-{i}")
            below_bigram(paths.root, margin)
            workspaces.append(paths.root)
        go = tmp_path / f"go{number}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", REGISTER_SCRIPT, str(root), str(go)], stdout=subprocess.PIPE, text=True
            )
            for root in workspaces
        ]
        try:
            while not all((root / "ready").exists() for root in workspaces) and all(p.poll() is None for p in procs):
                time.sleep(0.05)
            go.touch()
            outputs = [proc.communicate(timeout=600)[0] for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert all(proc.returncode == 0 for proc in procs), outputs
        best = max(best, *margins)
        versions = client.search_model_versions(f"name='{name}'")
        bigram = json.loads((evaluated_workspace / "reports" / "evaluate.json").read_text())["pretrain.bigram_bpb"]
        by_margin = {round(bigram - float(v.tags["lmcycle.gate.value"]), 6): str(v.version) for v in versions}
        champion = alias(client, name, "champion")
        assert champion == by_margin[round(best, 6)], (outputs, by_margin)
        history = champion_history(client, name)
        promoted = {str(v.version) for v in versions if v.tags["lmcycle.gate.decision"] in {"first", "promoted"}}
        assert set(history) == promoted and history[-1] == champion
        assert "lmcycle.gate_lease" not in client.get_registered_model(name).tags  # released
