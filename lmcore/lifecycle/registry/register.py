"""Register a workspace's model in MLflow with its lineage, then hand it to the promotion gate.

Design choices:
- The registry is MLflow's (`models:/NAME@champion`); registering is not a DVC stage, because switching
  MLFLOW_TRACKING_URI must still register. It is idempotent by lineage: a version whose `lmcycle.dvc_lock_hash`
  equals the workspace's dvc.lock hash is reused, never registered twice.
- The model is logged with MLflow's transformers flavor from its Hugging Face directory (a byte copy of what the
  stage exported): `llm/v1/chat` for language models (chat messages in, the tokenizer's chat template applied,
  OpenAI-style answers out, so `mlflow models serve` answers chat requests) and `text-classification` for
  classifiers. With a local artifact store the copied weights are then hard-linked to the workspace file (itself
  a link into DVC's cache): the weights exist once on disk.
- The lineage tags (git commit, dvc.lock hash, params, data fingerprints, environment, weight digests, metrics)
  go in with the version itself, so a kill cannot leave an untagged version behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.lifecycle.registry.candidate import Candidate, Registration, candidate, registration_from_tags
from lmcore.lifecycle.registry.gate import gate_params_hash
from lmcore.lifecycle.registry.promotion import apply_gate
from lmcore.lifecycle.registry.uris import TAG
from lmcore.lifecycle.weights import weights_tags
from lmcore.lifecycle.workspace import (
    data_fingerprints,
    dvc_lock_hash,
    environment,
    file_sha256,
    git_commit,
    git_dirty,
    original_root,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from lmcore.lifecycle.config import Config
    from lmcore.lifecycle.paths import Paths


def pip_requirements() -> list[str]:
    """Pinned to what runs here; always given, so MLflow neither infers them (slow) nor pins torchvision."""
    import importlib.metadata

    reqs = []
    for dist in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "accelerate"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
    return reqs


def find_by_lineage(client: MlflowClient, name: str, lock_hash: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'", max_results=10_000)
    except MlflowException:
        return None
    for version in sorted(versions, key=lambda v: int(v.version)):
        if version.tags.get(f"{TAG}dvc_lock_hash") == lock_hash:
            return version
    return None


def register_model(
    paths: Paths,
    config: Config,
    parent_run_id: str | None = None,
    flow_run_id: str | None = None,
) -> Registration:
    """Register the workspace's model (or reuse the version with the same lineage), then run the gate."""
    from lmcore.lifecycle.tracking import connect

    root = original_root(paths.root)
    client, experiment_id = connect(root, config.project.experiment)
    name = config.project.registered_model
    lock_hash = dvc_lock_hash(paths.root)
    existing = find_by_lineage(client, name, lock_hash) if lock_hash != "none" else None  # no dvc.lock: no lineage
    if existing is not None and existing.tags.get(f"{TAG}gate.params_hash") == gate_params_hash(config):
        return registration_from_tags(existing, reused=True)  # same model, same gate: the recorded decision
    cand = candidate(paths, config)
    version = existing or _log_and_register(client, experiment_id, paths, config, cand, parent_run_id, flow_run_id)
    return apply_gate(client, paths, config, version, cand, reused=existing is not None)


def _log_and_register(
    client: MlflowClient,
    experiment_id: str,
    paths: Paths,
    config: Config,
    cand: Candidate,
    parent_run_id: str | None,
    flow_run_id: str | None,
) -> ModelVersion:
    import mlflow

    from lmcore.lifecycle.tracking import MLflowReporter, environment_tags, lineage_tags

    name = config.project.registered_model
    tags = version_tags(paths, config, cand, flow_run_id)
    run_tags = {**lineage_tags(paths.root), **environment_tags(paths.root), "lmcycle.stage": "register"}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name="register", tags=run_tags)
    rep = MLflowReporter(client, run.info.run_id)
    rep.log_params(config.register.model_dump(mode="json"))
    rep.log_metrics(cand.metrics)
    with tempfile.TemporaryDirectory() as tmp:
        lineage = Path(tmp) / "lineage.json"
        lineage.write_text(json.dumps(tags, indent=2, sort_keys=True))
        rep.log_artifact(lineage)
        for file in ("params.yaml", "dvc.lock"):
            rep.log_artifact(paths.root / file)
    status = "FAILED"
    try:
        with mlflow.start_run(run_id=run.info.run_id), hub_offline():
            info = mlflow.transformers.log_model(
                transformers_model=served_as(load_components(cand.model_dir, cand.task), name),
                name="model",
                task=cand.task,
                pip_requirements=pip_requirements(),
                input_example=input_example(cand.task),
                model_card=_model_card(cand.model_dir),
            )
        _link_weights(client, info, cand.model_dir)
        # the lineage tags go in with the version itself: a kill cannot leave an untagged version behind
        tags = {**tags, f"{TAG}run_id": run.info.run_id}
        version = mlflow.register_model(info.model_uri, name, await_registration_for=60, tags=tags)
        client.update_model_version(name, version.version, description=_description(cand, tags))
        status = "FINISHED"
        return client.get_model_version(name, version.version)
    finally:
        client.set_terminated(run.info.run_id, status)


def version_tags(paths: Paths, config: Config, cand: Candidate, flow_run_id: str | None) -> dict[str, str]:
    tags = {
        f"{TAG}git_commit": git_commit(paths.root),
        f"{TAG}git_dirty": str(git_dirty(paths.root)).lower(),
        f"{TAG}dvc_lock_hash": dvc_lock_hash(paths.root),
        f"{TAG}params": json.dumps(config.model_dump(mode="json"), sort_keys=True),
        f"{TAG}seed": str(config.project.seed),
        f"{TAG}flow_run_id": flow_run_id or "none",
        f"{TAG}stage": cand.stage,
        f"{TAG}task": cand.task,
        f"{TAG}model_dir": cand.model_dir.relative_to(paths.root).as_posix(),
        **weights_tags(cand.model_dir),  # lmcycle.weights_sha256 and one per weight file
        f"{TAG}eval_fingerprint": cand.eval_fingerprint,
        f"{TAG}gate.metric": cand.metric,
        f"{TAG}gate.direction": cand.direction,
        f"{TAG}gate.value": repr(cand.value),
    }
    tags |= {f"{TAG}data.{path}": digest for path, digest in data_fingerprints(paths.root).items()}
    tags |= {f"env.{k}": v for k, v in environment(paths.root).items()}
    tags |= {f"metric.{k}": repr(v) for k, v in cand.metrics.items()}
    return tags


def input_example(task: str) -> Any:
    if task == "llm/v1/chat":
        return {"messages": [{"role": "user", "content": "Hello, who are you?"}], "max_tokens": 16}
    if task == "text-generation":
        return (["In the beginning"], {"max_new_tokens": 16, "do_sample": False})
    return ["In the beginning God created the heaven and the earth."]


def _model_card(model_dir: Path) -> Any:
    readme = model_dir / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard(readme.read_text(encoding="utf-8"))


def load_components(model_dir: Path, task: str) -> dict[str, Any]:
    """Model and tokenizer as stock transformers loads them, ready for MLflow's transformers flavor.

    Generation is capped below the context window (pipelines otherwise run past it on long prompts).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModelForCausalLM
    model = auto.from_pretrained(str(model_dir))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if task != "text-classification" and model.generation_config is not None:
        cap = max(1, min(256, context // 2)) if context else 64
        current = model.generation_config.max_new_tokens
        model.generation_config.max_new_tokens = min(current, cap) if current else cap
    return {"model": model, "tokenizer": tokenizer}


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """No Hugging Face hub calls while the model is logged. MLflow's transformers flavor asks the hub for the license
    (and, without a README, the card) of the repository the model's `name_or_path` names, which is our registered
    model's name (`served_as`): the question would send that name to huggingface.co, and offline it cost ~25 s of
    retries. huggingface_hub reads the flag at each request (`constants.is_offline_mode`)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def served_as(components: dict[str, Any], name: str) -> dict[str, Any]:
    """Name the model and tokenizer after the registered model: MLflow records their `name_or_path` (the local
    directory they were loaded from) in the MLmodel file and answers it as `model` in every OpenAI-style reply."""
    for part in components.values():
        part.name_or_path = name
    return components


def _link_weights(client: MlflowClient, info: Any, model_dir: Path) -> int:
    """With a local artifact store, replace logged weight files that are byte-identical to the workspace's by
    hard links to it (itself a link into DVC's cache, whose files are read-only): one copy on disk. Returns the
    number of files linked; remote stores and re-serialised weights keep their copy."""
    import urllib.parse

    try:
        artifact_uri = client.get_logged_model(info.model_id).artifact_location
    except Exception:
        return 0
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme not in {"", "file"} or not artifact_uri:
        return 0
    logged = Path(urllib.parse.unquote(parsed.path)) / "model"
    linked = 0
    for weights in model_dir.glob("*.safetensors"):
        copy = logged / weights.name
        if not copy.is_file() or copy.stat().st_size != weights.stat().st_size:
            continue
        if os.path.samefile(copy, weights) or file_sha256(copy) != file_sha256(weights):
            continue
        tmp = copy.with_name(f".{copy.name}.link")
        try:
            os.link(weights.resolve(), tmp)
            os.replace(tmp, copy)
            linked += 1
        except OSError:
            tmp.unlink(missing_ok=True)
    return linked


def _description(cand: Candidate, tags: dict[str, str]) -> str:
    dirty = " (dirty workspace)" if tags[f"{TAG}git_dirty"] == "true" else ""
    return (
        f"{cand.task} model from stage `{cand.stage}` at git {tags[f'{TAG}git_commit'][:12]}{dirty}, "
        f"dvc.lock {tags[f'{TAG}dvc_lock_hash'][:12]}; {tags[f'{TAG}gate.metric']} = {tags[f'{TAG}gate.value']}. "
        f"Rebuild it with `lmcycle reproduce models:/NAME/VERSION`."
    )
