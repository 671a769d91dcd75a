"""The model registry side of the lifecycle: register a version with its lineage, the promotion gate, aliases.

Design choices:
- The registry is MLflow's (`models:/NAME@champion`); registering is not a DVC stage, because switching
  MLFLOW_TRACKING_URI must still register. It is idempotent by lineage: a version whose `lmcycle.dvc_lock_hash`
  equals the workspace's dvc.lock hash is reused, never registered twice.
- The model is logged with MLflow's transformers flavor from its Hugging Face directory (a byte copy of what the
  stage exported): `llm/v1/chat` for language models (chat messages in, the tokenizer's chat template applied,
  OpenAI-style answers out, so `mlflow models serve` answers chat requests) and `text-classification` for
  classifiers. With a local artifact store the copied weights are then hard-linked to the workspace file (itself
  a link into DVC's cache): the weights exist once on disk.
- The gate compares one metric (params `register.gate_metric`, direction, minimum improvement; `auto` = the
  registered model's own held-out score: sft.loss, classification.macro_f1, or pretrain.val_bpb before a fine-tune
  exists) between the new version and the version holding the champion alias, on the same eval data: when their
  eval-data fingerprints differ, the champion is re-scored on the current data first, by the evaluate stage's
  own scorers. `champion` moves only on a strict improvement; every decision and both values are written on the
  version. A champion history on the registered model makes `rollback` possible.
- The eval metrics come from one function, `eval_metrics`: reports/evaluate.json, else the training reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import CheckpointError, LmcycleError
from lmcore.lifecycle.gate import apply_floor, baseline_kind, gate_lease, gate_params_hash, gate_record
from lmcore.lifecycle.weights import verify_weights, weights_digest, weights_tags
from lmcore.lifecycle.workspace import (
    data_fingerprints,
    dvc_hash,
    dvc_lock_hash,
    dvc_stages,
    entry_paths,
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

TAG = "lmcycle."
HISTORY_TAG = "lmcycle.champion_history"
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


class RegistryError(LmcycleError):
    """A registered model, version or alias that does not exist, or a registry that cannot be used."""


# --- addresses ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> ModelRef:
    match = MODEL_URI.match(uri.strip())
    if not match:
        raise RegistryError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return ModelRef(match["name"], match["alias"], match["version"])


def client_for(root: str | Path = ".") -> MlflowClient:
    from mlflow import MlflowClient

    from lmcore.lifecycle.tracking import check_tracking, tracking_uri

    uri = tracking_uri(root)
    check_tracking(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve(client: MlflowClient, uri: str) -> ModelVersion:
    """The version a models:/ URI names, or one clear line saying which part does not exist."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(uri)
    try:
        client.get_registered_model(ref.name)
    except MlflowException:
        raise RegistryError(f"{uri}: no registered model named {ref.name!r}") from None
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException:
        what = f"alias {ref.alias!r}" if ref.alias else f"version {ref.version}"
        raise RegistryError(f"{uri}: registered model {ref.name!r} has no {what}") from None


def model_cache_dir() -> Path:
    base = os.environ.get("LMCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmcycle"
    )
    return Path(base) / "models"


def local_model_dir(uri: str, root: str | Path = ".") -> Path:
    """A Hugging Face directory (weights, config, tokenizer) of a registered version, in the lmcycle cache.

    MLflow keeps the model and its tokenizer in two folders (`model/`, `components/tokenizer/`); the cache joins
    them in one directory, with symlinks when the artifact store is local (nothing copied), else downloaded once.
    """
    client = client_for(root)
    version = resolve(client, uri)
    key = hashlib.sha256(f"{client.tracking_uri}|{version.name}|{version.version}".encode()).hexdigest()[:16]
    target = model_cache_dir() / f"{_safe(version.name)}-v{version.version}-{key}"
    if (target / "config.json").exists():
        return verify_weights(version, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
    try:
        artifacts = _local_artifacts(client, version)
        if artifacts is None:
            import mlflow

            mlflow.set_tracking_uri(client.tracking_uri)
            artifacts = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{version.name}/{version.version}", dst_path=str(tmp / "download")
                )
            )
        joined = tmp / "hf"
        joined.mkdir()
        for folder in (artifacts / "components" / "tokenizer", artifacts / "model"):
            for file in sorted(folder.glob("*")) if folder.is_dir() else []:
                dst = joined / file.name
                dst.unlink(missing_ok=True)
                if file.is_relative_to(tmp):
                    os.replace(file, dst)
                else:
                    dst.symlink_to(file.resolve())
        if not (joined / "config.json").exists():
            raise RegistryError(f"{uri}: version {version.version} holds no Hugging Face model directory")
        with contextlib.suppress(FileExistsError, OSError):
            os.replace(joined, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return verify_weights(version, target)


def _local_artifacts(client: MlflowClient, version: ModelVersion) -> Path | None:
    """The model's artifact folder when the store is a local path (MLflow 3 sources are `models:/m-<id>`)."""
    import urllib.parse

    source = version.source or ""
    try:
        if source.startswith("models:/m-"):
            source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    except Exception:
        return None
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme not in {"", "file"}:
        return None
    path = Path(urllib.parse.unquote(parsed.path))
    return path if (path / "model" / "config.json").is_file() else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# --- what to register --------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """The model a workspace would register, and what it was evaluated on."""

    model_dir: Path
    task: str  # an MLflow transformers task: llm/v1/chat, text-generation or text-classification
    stage: str  # the DVC stage that produced it
    metrics: dict[str, float]  # flat eval metrics (evaluate.json, else the training stage's report)
    metrics_file: Path | None
    eval_fingerprint: str  # what the gate metric was computed on
    metric: str  # the gate metric, resolved (register.gate_metric may be auto)
    direction: str  # minimize | maximize, resolved

    @property
    def value(self) -> float:
        return self.metrics[self.metric]


def model_to_register(paths: Paths, config: Config) -> Path | None:
    """The fine-tuned model when there is one, else the pretrained one; None before any model exists."""
    for candidate in (paths.finetune / "hf", paths.pretrain / "hf"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def producing_stage(root: Path, path: Path) -> str:
    rel = path.resolve().relative_to(Path(root).resolve()).as_posix()
    for name, stage in dvc_stages(root).items():
        for out in entry_paths(stage.get("outs")):
            if rel == out or rel.startswith(out.rstrip("/") + "/"):
                return name
    return "unknown"


def model_task(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    if any("SequenceClassification" in a for a in architectures):
        return "text-classification"
    tokenizer_config = model_dir / "tokenizer_config.json"
    has_template = (model_dir / "chat_template.jinja").is_file() or (
        tokenizer_config.is_file() and "chat_template" in json.loads(tokenizer_config.read_text())
    )
    return "llm/v1/chat" if has_template else "text-generation"


def flat_report(path: Path, prefix: str = "") -> dict[str, Any]:
    from lmcore.lifecycle.tracking import flatten

    data = json.loads(path.read_text())
    return flatten(data, prefix) if prefix else flatten(data)


def eval_metrics(paths: Paths) -> tuple[dict[str, float], Path | None, dict[str, Any]]:
    """The gate's view of a workspace's evaluation: (numeric metrics, the report, every flat value).

    reports/evaluate.json (one flat namespace like `pretrain.val_bpb`) when it exists; until then the training
    stages' own reports, namespaced by stage (`pretrain.val_bpb`). This is the one place to repoint.
    """
    from lmcore.lifecycle.tracking import numeric

    evaluate = paths.report("evaluate")
    if evaluate.is_file():
        flat = flat_report(evaluate)
        return numeric(flat), evaluate, flat
    flat: dict[str, Any] = {}
    found = None
    for stage in ("pretrain", "finetune"):
        report = paths.report(stage)
        if report.is_file():
            flat.update(flat_report(report, stage))
            found = found or report
    return numeric(flat), found, flat


def eval_fingerprint(paths: Paths, flat: dict[str, Any], metric: str, config: Config) -> str:
    """What a metric was computed on: the report's `<section>.data_fingerprint` (evaluate.json hashes the held-out
    text of each section) with the settings that change that section's numbers (lmcore.lifecycle.gate), else DVC's
    hash of the held-out pretraining text (bits-per-byte does not depend on the tokenizer, so only the text matters)."""
    from lmcore.lifecycle.gate import settings_fingerprint

    section = metric.split(".")[0]
    declared = flat.get(f"{section}.data_fingerprint")
    if isinstance(declared, str):
        return settings_fingerprint(declared, section, config)
    val = paths.split_file("pretrain", "val")
    rel = val.relative_to(paths.root).as_posix()
    return dvc_hash(paths.root, rel) or (file_sha256(val) or "none")[:32]


# Preferred gate metrics for `register.gate_metric: auto`, by what the registered model is: its own held-out score.
AUTO_METRICS = {
    "classification": ["classification.macro_f1", "classification.accuracy"],
    "finetune": ["sft.loss", "finetune.val_loss"],
    "pretrain": ["pretrain.val_bpb"],
}


def resolve_gate(config: Config, task: str, stage: str, metrics: dict[str, float], where: Any) -> tuple[str, str]:
    """(metric, direction) of the gate, with `auto` resolved; a clear error when the metric is not reported."""
    gate = config.register
    if gate.gate_metric == "auto":
        kind = "classification" if task == "text-classification" else stage
        wanted = AUTO_METRICS.get(kind, AUTO_METRICS["pretrain"])
        metric = next((m for m in wanted if m in metrics), None)
        if metric is None:
            raise RegistryError(f"register.gate_metric: auto found none of {', '.join(wanted)} in {where}")
    else:
        metric = gate.gate_metric
        if metric not in metrics:
            raise RegistryError(f"register.gate_metric: {metric!r} is not in {where}")
    direction = gate.direction
    if direction == "auto":
        last = metric.rsplit(".", 1)[-1]
        direction = "minimize" if any(w in last for w in ("loss", "bpb", "perplexity", "error")) else "maximize"
    return metric, direction


def candidate(paths: Paths, config: Config) -> Candidate:
    model_dir = model_to_register(paths, config)
    if model_dir is None:
        raise RegistryError(f"{paths.root}: no model to register (models/finetune/hf or models/pretrain/hf)")
    metrics, report, flat = eval_metrics(paths)
    task, stage = model_task(model_dir), producing_stage(paths.root, model_dir)
    metric, direction = resolve_gate(config, task, stage, metrics, report or paths.reports)
    return Candidate(
        model_dir=model_dir,
        task=task,
        stage=stage,
        metrics=metrics,
        metrics_file=report,
        eval_fingerprint=eval_fingerprint(paths, flat, metric, config),
        metric=metric,
        direction=direction,
    )


# --- registering -------------------------------------------------------------------------------------------


@dataclass
class Registration:
    """What `register` did; small enough to be a Prefect task result and a flow artifact row."""

    name: str
    version: str
    reused: bool
    decision: str  # promoted | rejected | first | kept (a reused version keeps its earlier decision)
    reason: str
    metric: str
    challenger_value: float | None
    champion_version: str | None
    champion_value: float | None
    run_id: str
    uri: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "tags"}


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
        return _registration_from_tags(existing, reused=True)  # same model, same gate: the recorded decision
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
        with mlflow.start_run(run_id=run.info.run_id):
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


def served_as(components: dict[str, Any], name: str) -> dict[str, Any]:
    """Name the model and tokenizer after the registered model: MLflow records their `name_or_path` (the local
    directory they were loaded from) in the MLmodel file and answers it as `model` in every OpenAI-style reply."""
    for part in components.values():
        part.name_or_path = name
    return components


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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


# --- the gate ----------------------------------------------------------------------------------------------


def better(challenger: float, champion: float, direction: str, min_improvement: float) -> bool:
    if direction == "minimize":
        return challenger < champion - min_improvement
    return challenger > champion + min_improvement


def gate_decision(
    metric: str,
    value: float,
    direction: str,
    min_improvement: float,
    champion_version: str | None,
    champion_value: float | None,
    how: str,
) -> tuple[str, str]:
    """(decision, reason) of the gate for a challenger scoring `value` against the champion's score on the same
    data (None when it could not be scored, `how` then says why): pure, so every boundary is unit-tested."""
    if champion_version is None:
        return "first", "no champion yet: the first version becomes champion"
    if champion_value is None:
        return "rejected", how
    if better(value, champion_value, direction, min_improvement):
        return "promoted", f"{metric} {value:.6g} beats champion v{champion_version} {champion_value:.6g} ({how})"
    return "rejected", (
        f"{metric} {value:.6g} does not beat champion v{champion_version} {champion_value:.6g} "
        f"by more than {min_improvement:g} ({direction}; {how})"
    )


def apply_gate(
    client: MlflowClient, paths: Paths, config: Config, version: ModelVersion, cand: Candidate, reused: bool
) -> Registration:
    """Alias the new version `challenger`; move `champion` to it only if it beats the champion on the same data
    and its own trivial baseline (lmcore.lifecycle.gate). Runs under the registered model's gate lease, so two
    registrations at once compare against each other's outcome and neither drops a champion-history entry."""
    gate = config.register
    name, value = version.name, cand.value
    with gate_lease(client, name):
        client.set_registered_model_alias(name, gate.challenger_alias, version.version)
        champion = _alias_version(client, name, gate.champion_alias)
        champion_value: float | None = None
        if champion is not None and str(champion.version) == str(version.version):
            decision, reason = "kept", "this version already holds the champion alias"
            champion_value = value
        else:
            how = ""
            if champion is not None:
                champion_value, how = champion_score(champion, paths, config, cand)
            champion_version = str(champion.version) if champion is not None else None
            decision, reason = gate_decision(
                cand.metric, value, cand.direction, gate.min_improvement, champion_version, champion_value, how
            )
            kind = baseline_kind(cand.task, cand.stage)
            decision, reason = apply_floor(decision, reason, gate.quality_floor, kind, cand.metrics)
        if decision in {"first", "promoted"}:
            set_champion(client, name, version.version, gate.champion_alias)
        record = gate_record(decision, reason, value, champion, champion_value)
        record["params_hash"] = gate_params_hash(config)  # last: marks the decision complete, for reuse
        for key, val in record.items():
            client.set_model_version_tag(name, version.version, f"{TAG}gate.{key}", val)
    return _registration_from_tags(client.get_model_version(name, version.version), reused=reused)


def champion_score(champion: ModelVersion, paths: Paths, config: Config, cand: Candidate) -> tuple[float | None, str]:
    """The champion's gate metric on the challenger's eval data: its recorded value when the data matches,
    else a fresh score. (None, reason) when it cannot be compared."""
    metric = cand.metric
    recorded = champion.tags.get(f"metric.{metric}")
    if recorded and champion.tags.get(f"{TAG}eval_fingerprint") == cand.eval_fingerprint:
        return float(recorded), "same eval data"
    section = metric.split(".")[0]
    rescorer = RESCORERS.get(section)
    if rescorer is None:
        return None, f"champion v{champion.version} has no {metric} on this eval data and it cannot be re-scored"
    model_dir = local_model_dir(f"models:/{champion.name}/{champion.version}", paths.root)
    try:
        score = rescorer(metric, model_dir, paths, config)
    except LmcycleError as err:
        return None, f"champion v{champion.version} could not be re-scored on this eval data: {err}"
    if score is None:
        return None, f"champion v{champion.version} has no {metric} on this eval data and it cannot be re-scored"
    return score, "champion re-scored on this eval data"


def rescore_val_bpb(model_dir: Path, paths: Paths, config: Config) -> float:
    """Bits-per-byte of a Hugging Face model directory on this workspace's held-out pretraining text, through
    the same code as the evaluate stage: the model's own tokenizer, lmcore's shards and `evaluate_lm` over the
    whole split (tokenized afresh, so a champion with another tokenizer is scored on the same text)."""
    import torch

    from lmcore.data.shards import TokenShards
    from lmcore.export import import_hf
    from lmcore.lifecycle.stages.tokenize import tokenize_split
    from lmcore.metrics import evaluate_lm
    from lmcore.tokenizer import read_tokenizer, tokenizer_fingerprint

    model, mcfg = import_hf(model_dir)
    model.eval()
    tok = read_tokenizer(model_dir)
    fingerprint = tokenizer_fingerprint(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "val"
        tokenize_split(tok, paths.split_file("pretrain", "val"), out, fingerprint, config.tokenize)
        shards = TokenShards(out, expected_fingerprint=fingerprint)
        with torch.no_grad():
            scores = evaluate_lm(model, shards, mcfg.context_length, config.evaluate.batch_size)
    return float(scores["bpb"])


def _rescore_pretrain(metric: str, model_dir: Path, paths: Paths, config: Config) -> float | None:
    return rescore_val_bpb(model_dir, paths, config) if metric == "pretrain.val_bpb" else None


def _rescore_sft(metric: str, model_dir: Path, paths: Paths, config: Config) -> float | None:
    """sft.* of a chat model on this workspace's held-out conversations, by the evaluate stage's own scorer."""
    from lmcore.finetune import sft
    from lmcore.lifecycle.stages.evaluate import sft_scores

    conversations = sft.load_conversations(paths.split_file("sft", "val"))[: config.evaluate.sft_max_examples]
    scores, _ = sft_scores(config, model_dir, conversations, "sft")
    return scores.get(metric.split(".", 1)[1])


def _rescore_classification(metric: str, model_dir: Path, paths: Paths, config: Config) -> float | None:
    """classification.* of a classifier on this workspace's held-out split, by the evaluate stage's own code."""
    from lmcore.lifecycle.stages.evaluate import evaluate_classification

    with tempfile.TemporaryDirectory() as tmp:
        return evaluate_classification(config, paths, model_dir, Path(tmp)).get(metric)


RESCORERS = {"pretrain": _rescore_pretrain, "sft": _rescore_sft, "classification": _rescore_classification}


def _alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _registration_from_tags(version: ModelVersion, reused: bool) -> Registration:
    tags = version.tags

    def number(key: str) -> float | None:
        value = tags.get(key)
        return float(value) if value not in (None, "none") else None

    champion = tags.get(f"{TAG}gate.champion_version")
    return Registration(
        name=version.name,
        version=str(version.version),
        reused=reused,
        decision=tags.get(f"{TAG}gate.decision", "none"),
        reason=tags.get(f"{TAG}gate.reason", ""),
        metric=tags.get(f"{TAG}gate.metric", ""),
        challenger_value=number(f"{TAG}gate.challenger_value"),
        champion_version=None if champion in (None, "none") else champion,
        champion_value=number(f"{TAG}gate.champion_value"),
        run_id=tags.get(f"{TAG}run_id", version.run_id or ""),
        uri=f"models:/{version.name}/{version.version}",
        tags=dict(tags),
    )


# --- the human side: list, promote, rollback ---------------------------------------------------------------


def champion_history(client: MlflowClient, name: str) -> list[str]:
    model = client.get_registered_model(name)
    text = model.tags.get(HISTORY_TAG, "")
    return [v for v in text.split(",") if v]


def set_champion(client: MlflowClient, name: str, version: str, alias: str = "champion") -> None:
    client.set_registered_model_alias(name, alias, str(version))
    history = champion_history(client, name)
    if not history or history[-1] != str(version):
        history.append(str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[-100:]))


def promote(client: MlflowClient, name: str, version: str, alias: str = "champion") -> None:
    resolve(client, f"models:/{name}/{version}")
    set_champion(client, name, version, alias)
    client.set_model_version_tag(name, str(version), f"{TAG}gate.manual", "promoted by hand")


def rollback(client: MlflowClient, name: str, alias: str = "champion") -> str:
    """Give the champion alias back to the previous champion; returns that version."""
    resolve(client, f"models:/{name}@{alias}")
    history = champion_history(client, name)
    current = str(client.get_model_version_by_alias(name, alias).version)
    while history and history[-1] == str(current):
        history.pop()
    if not history:
        raise RegistryError(f"models:/{name}@{alias}: no earlier champion to roll back to")
    previous = history[-1]
    client.set_registered_model_alias(name, alias, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    return previous


def list_models(client: MlflowClient, name: str | None = None) -> list[dict[str, Any]]:
    """One row per version: name, version, aliases, gate metric value, decision, git commit, created."""
    from mlflow.exceptions import MlflowException

    rows = []
    try:
        models = [client.get_registered_model(name)] if name else client.search_registered_models(max_results=1000)
    except MlflowException:
        raise RegistryError(f"models:/{name}: no registered model named {name!r}") from None
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name='{model.name}'", max_results=10_000):
            tags = version.tags
            rows.append(
                {
                    "name": model.name,
                    "version": int(version.version),
                    "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                    "metric": tags.get(f"{TAG}gate.metric", ""),
                    "value": tags.get(f"{TAG}gate.value", ""),
                    "decision": tags.get(f"{TAG}gate.decision", ""),
                    "git": tags.get(f"{TAG}git_commit", "")[:12],
                    "created": version.creation_timestamp,
                }
            )
    return sorted(rows, key=lambda r: (r["name"], r["version"]))


# --- reproduce ---------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """How to rebuild a registered version from scratch."""

    uri: str
    commit: str
    dirty: bool
    stage: str
    params: dict[str, Any]
    weights_sha256: str
    model_dir: str
    env: dict[str, str] = field(default_factory=dict)  # where it was registered (env.* tags)

    def steps(self, directory: str = "<dir>") -> list[str]:
        lines = [f"git worktree add --detach {directory} {self.commit}", f"cd {directory}"]
        lines.append("# write the recorded params into params.yaml (lmcycle reproduce --run does this)")
        lines.append(f"LMCYCLE_TRACKING=off dvc repro --no-run-cache {self.stage}")
        lines.append(f"sha256 of {self.model_dir}/*.safetensors must equal {self.weights_sha256}")
        return lines


def recipe(client: MlflowClient, uri: str) -> Recipe:
    version = resolve(client, uri)
    tags = version.tags
    if f"{TAG}git_commit" not in tags:
        raise RegistryError(f"{uri}: version {version.version} was not registered by lmcycle (no lineage tags)")
    return Recipe(
        uri=uri,
        commit=tags[f"{TAG}git_commit"],
        dirty=tags.get(f"{TAG}git_dirty") == "true",
        stage=tags.get(f"{TAG}stage", ""),
        params=json.loads(tags.get(f"{TAG}params", "{}")),
        weights_sha256=tags.get(f"{TAG}weights_sha256", ""),
        model_dir=tags.get(f"{TAG}model_dir", ""),
        env={k.removeprefix("env."): v for k, v in tags.items() if k.startswith("env.")},
    )


def rebuild(root: Path, rec: Recipe, directory: Path) -> tuple[bool, str]:
    """Rebuild a version in a fresh git worktree of `root` at its commit with its params, `dvc repro` without the
    run cache (and without tracking), then compare the weights. Returns (bit-identical, digest of the rebuild)."""
    import subprocess
    import sys

    import yaml

    directory = Path(directory).resolve()
    if directory.exists() and any(directory.iterdir()):
        raise RegistryError(f"{directory}: must be a new or empty directory")
    git = ["git", "-C", str(root), "worktree", "add", "--detach", str(directory), rec.commit]
    proc = subprocess.run(git, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"{rec.uri}: git worktree add failed: {proc.stderr.strip().splitlines()[-1:]}")
    (directory / "params.yaml").write_text(yaml.safe_dump(rec.params, sort_keys=False), encoding="utf-8")
    env = {
        **os.environ,
        "LMCYCLE_TRACKING": "off",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    cmd = [sys.executable, "-m", "dvc", "repro", "--no-run-cache", rec.stage]
    if subprocess.run(cmd, cwd=directory, env=env).returncode != 0:
        raise RegistryError(f"{rec.uri}: dvc repro failed in {directory}")
    digest = weights_digest(directory / rec.model_dir)
    return digest == rec.weights_sha256, digest


def resolve_model_path(model: str | Path) -> Path:
    """The local directory a `--model` argument names: a registry URI (models:/NAME@ALIAS or models:/NAME/VERSION)
    is downloaded and verified; anything else is a directory."""
    if str(model).startswith("models:/"):
        return local_model_dir(str(model))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{model}: no such model directory")
    return path
