"""What a workspace would register and what the gate reads: the candidate model, its eval metrics, the gate
metric and direction (`register.gate_metric: auto` resolved), what that metric was computed on, and the
`Registration` a registered version's tags describe.

- The candidate is the fine-tuned model when there is one, else the pretrained one; its task (an MLflow
  transformers task) comes from its config and tokenizer: `text-classification`, `llm/v1/chat` when it carries a
  chat template, else `text-generation`.
- The eval metrics come from one function, `eval_metrics`: reports/evaluate.json, else the training reports.
- `auto` gate metric = the registered model's own held-out score: sft.loss, classification.macro_f1, or
  pretrain.val_bpb before a fine-tune exists.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.lifecycle.registry.gate import settings_fingerprint
from lmcore.lifecycle.registry.uris import TAG, RegistryError
from lmcore.lifecycle.workspace import dvc_hash, dvc_stages, entry_paths, file_sha256

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from lmcore.lifecycle.config import Config
    from lmcore.lifecycle.paths import Paths


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
    text of each section) with the settings that change that section's numbers (registry.gate), else DVC's hash of
    the held-out pretraining text (bits-per-byte does not depend on the tokenizer, so only the text matters)."""
    section = metric.split(".")[0]
    declared = flat.get(f"{section}.data_fingerprint")
    if isinstance(declared, str):
        placement = {"device": flat.get("evaluate.device", "cpu"), "dtype": flat.get("evaluate.dtype", "float32")}
        return settings_fingerprint(declared, section, config, placement)
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


def registration_from_tags(version: ModelVersion, reused: bool) -> Registration:
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
