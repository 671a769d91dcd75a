"""Registered weights are verified against the SHA-256 recorded on their version before they are used: a real tiny
model registered in a real MLflow store, its registered weight file then changed on disk. `lmcycle generate` and
the promotion gate (re-scoring the champion) both stop with one line naming the version and the file, and nothing
is promoted; the untouched file works."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import copy_workspace, lmcycle

from lmcore.lifecycle.config import load_config
from lmcore.lifecycle.paths import Paths
from lmcore.lifecycle.registry.register import register_model
from lmcore.lifecycle.registry.uris import client_for
from lmcore.lifecycle.weights import WeightsIntegrityError, verify_weights, weights_tags
from lmcore.lifecycle.workspace import file_sha256

MISMATCH = "model.safetensors does not match the SHA-256 recorded on the version"


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


def workspace(source: Path, dest: Path, name: str, val_bpb: float, lineage: str) -> Paths:
    """A private copy of the pretrained workspace registering as `name`, with a chosen gate value and lineage."""
    root = copy_workspace(source, dest, project={"registered_model": name})
    set_val_bpb(root, val_bpb)
    set_lineage(root, lineage)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return Paths.of(root)


def set_val_bpb(root: Path, value: float) -> None:
    report = json.loads((root / "reports" / "pretrain.json").read_text())
    report["val_bpb"] = value
    (root / "reports" / "pretrain.json").write_text(json.dumps(report, sort_keys=True))


def set_lineage(root: Path, lineage: str) -> None:
    lock = f"schema: '2.0'\nstages:\n  pretrain:\n    cmd: lmcycle stage pretrain  # {lineage}\n"
    (root / "dvc.lock").write_text(lock)


def registered_weights(name: str, version: str) -> Path:
    """The weight file in the (local) artifact store of a registered version."""
    client = client_for(".")
    source = client.get_model_version(name, version).source
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return Path(location.removeprefix("file://")) / "model" / "model.safetensors"


def tamper(path: Path) -> bytes:
    """Flip one byte of the tensor data in a new file put in place of `path` (a hard link elsewhere stays as it
    was); returns the original bytes."""
    original = path.read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 0x01
    tmp = path.with_name(path.name + ".tampered")
    tmp.write_bytes(bytes(changed))
    os.replace(tmp, path)
    return original


def restore(path: Path, original: bytes) -> None:
    tmp = path.with_name(path.name + ".restored")
    tmp.write_bytes(original)
    os.replace(tmp, path)


def test_generate_uses_verified_weights_and_refuses_tampered_ones(pretrained_workspace, tmp_path):
    from lmcore.generate import load_model
    from lmcore.lifecycle.registry.uris import resolve_model_path

    paths = workspace(pretrained_workspace, tmp_path / "ws", "wi-generate", 2.5, "a")
    register_model(paths, load_config(paths.root / "params.yaml"))
    tags = client_for(".").get_model_version("wi-generate", "1").tags
    workspace_weights = paths.pretrain / "hf" / "model.safetensors"
    assert tags["lmcycle.weights_sha256.model.safetensors"] == file_sha256(workspace_weights)
    assert tags["lmcycle.weights_sha256"] == weights_tags(paths.pretrain / "hf")["lmcycle.weights_sha256"]

    transformer, _ = load_model(resolve_model_path("models:/wi-generate@champion"))  # untouched: loads
    assert transformer.config.n_layer >= 1
    served = tmp_path / "served"  # what `mlflow models serve -m` would be given
    lmcycle("models", "verify", "models:/wi-generate@champion", "--dst", str(served), cwd=paths.root)
    assert (served / "MLmodel").is_file() and file_sha256(served / "model" / "model.safetensors") == file_sha256(
        workspace_weights
    )

    tamper(registered_weights("wi-generate", "1"))
    proc = lmcycle(
        "generate", "--model", "models:/wi-generate@champion", "--prompt", "In the", "--max-new-tokens", "2",
        cwd=paths.root, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: models:/wi-generate/1: {MISMATCH} (recorded "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert file_sha256(workspace_weights) == tags["lmcycle.weights_sha256.model.safetensors"]  # only the copy changed

    refused = tmp_path / "refused"
    proc = lmcycle("models", "verify", "models:/wi-generate/1", "--dst", str(refused), cwd=paths.root, check=False)
    lines = proc.stderr.strip().splitlines()  # (after MLflow's download progress bar)
    assert proc.returncode == 1 and lines[-1].startswith(f"error: models:/wi-generate/1: {MISMATCH} (recorded ")
    assert [line for line in lines if "error" in line.lower()] == lines[-1:]
    assert not refused.exists() and not list(tmp_path.glob(".refused*"))  # nothing half-written


def test_gate_refuses_a_tampered_champion_and_promotes_nothing(pretrained_workspace, tmp_path):
    paths = workspace(pretrained_workspace, tmp_path / "ws", "wi-gate", 9.0, "a")
    assert register_model(paths, load_config(paths.root / "params.yaml")).decision == "first"
    champion_file = registered_weights("wi-gate", "1")
    original = tamper(champion_file)

    # a challenger on other held-out data, so the gate must re-score the champion's weights
    val = paths.split_file("pretrain", "val")
    lines = val.read_text(encoding="utf-8").splitlines(keepends=True)
    val.write_text("".join(lines[: max(2, len(lines) // 2)]), encoding="utf-8")
    set_lineage(paths.root, "b")
    set_val_bpb(paths.root, 0.01)  # it would beat any champion
    proc = lmcycle("register", "--workspace", str(paths.root), cwd=paths.root, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()  # (after the challenger's logging progress bars)
    assert lines[-1].startswith(f"error: models:/wi-gate/1: {MISMATCH} (recorded "), proc.stderr
    assert [line for line in lines if "error" in line.lower()] == lines[-1:] and "Traceback" not in proc.stderr
    client = client_for(".")
    assert str(client.get_model_version_by_alias("wi-gate", "champion").version) == "1"
    assert "lmcycle.gate.decision" not in client.get_model_version("wi-gate", "2").tags

    restore(champion_file, original)  # the same registration with the untouched champion goes through
    result = register_model(paths, load_config(paths.root / "params.yaml"))
    assert (result.version, result.decision) == ("2", "promoted") and "re-scored" in result.reason
    assert str(client.get_model_version_by_alias("wi-gate", "champion").version) == "2"


def version(tags: dict[str, str]):
    from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

    return ModelVersion("wi-unit", "3", 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])


def weights_dir(root: Path, **tensors: float) -> Path:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    for name, value in tensors.items():
        save_file({"w": torch.full((4,), value)}, str(root / f"{name}.safetensors"))
    return root


def test_missing_extra_and_unrecorded_weight_files_are_refused(tmp_path):
    model = weights_dir(tmp_path / "m", **{"model-00001-of-00002": 1.0, "model-00002-of-00002": 2.0})
    recorded = weights_tags(model)
    assert verify_weights(version(recorded), model) == model

    (model / "model-00002-of-00002.safetensors").rename(tmp_path / "aside.safetensors")
    with pytest.raises(WeightsIntegrityError, match=r"^models:/wi-unit/3: model-00002-of-00002.safetensors is missing"):
        verify_weights(version(recorded), model)
    (tmp_path / "aside.safetensors").rename(model / "model-00002-of-00002.safetensors")

    weights_dir(model, extra=3.0)
    with pytest.raises(WeightsIntegrityError, match="extra.safetensors is not among the weight files recorded"):
        verify_weights(version(recorded), model)
    (model / "extra.safetensors").unlink()

    weights_dir(model, **{"model-00002-of-00002": 2.5})  # the second shard changed
    changed = r"^models:/wi-unit/3: model-00002-of-00002.safetensors does not match the SHA-256"
    with pytest.raises(WeightsIntegrityError, match=changed):
        verify_weights(version(recorded), model)
    # a version with the overall digest only names the files it covers
    with pytest.raises(WeightsIntegrityError, match=r"model-00001-of-00002.safetensors, model-00002-of-00002"):
        verify_weights(version({"lmcycle.weights_sha256": recorded["lmcycle.weights_sha256"]}), model)
    with pytest.raises(WeightsIntegrityError, match="no SHA-256 recorded on the version"):
        verify_weights(version({}), model)
