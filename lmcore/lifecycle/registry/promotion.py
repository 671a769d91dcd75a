"""The promotion gate at work on the registry: alias a new version `challenger`, score the champion on the
challenger's eval data, decide (lmcore.lifecycle.registry.gate) and move `champion` on a strict improvement.

Design choices:
- Same data or no comparison: the champion's recorded metric is used when its eval fingerprint equals the
  challenger's; otherwise the champion is re-scored on the current held-out data by the LM library's own scorers
  (lmcore.heldout: the functions the evaluate stage reports with), so both numbers share one definition.
- Every decision and both values are written on the version (`lmcycle.gate.*`), the params hash last: it marks a
  decision complete, so a registration with the same lineage and params reuses it. The decision is also the last
  paragraph of the version's description (`Promotion gate: champion: …` / `not promoted: …`), so the registry page
  says why; a champion the gate replaces gets `champion until vN: …` there.
- The read–compare–set runs under the registered model's lease (lmcore.lifecycle.registry.lease).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmcore.errors import LmcycleError
from lmcore.lifecycle.registry.aliases import alias_version, set_champion
from lmcore.lifecycle.registry.candidate import Candidate, Registration, registration_from_tags
from lmcore.lifecycle.registry.gate import (
    apply_floor,
    baseline_kind,
    decision_summary,
    dethroned_summary,
    gate_decision,
    gate_params_hash,
    gate_record,
)
from lmcore.lifecycle.registry.lease import gate_lease
from lmcore.lifecycle.registry.uris import TAG, local_model_dir

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from lmcore.lifecycle.config import Config
    from lmcore.lifecycle.paths import Paths


def apply_gate(
    client: MlflowClient, paths: Paths, config: Config, version: ModelVersion, cand: Candidate, reused: bool
) -> Registration:
    """Alias the new version `challenger`; move `champion` to it only if it beats the champion on the same data
    and its own trivial baseline (lmcore.lifecycle.registry.gate). Runs under the registered model's gate lease, so two
    registrations at once compare against each other's outcome and neither drops a champion-history entry."""
    gate = config.register
    name, value = version.name, cand.value
    with gate_lease(client, name):
        client.set_registered_model_alias(name, gate.challenger_alias, version.version)
        champion = alias_version(client, name, gate.champion_alias)
        champion_version = str(champion.version) if champion is not None else None
        champion_value: float | None = None
        if champion is not None and str(champion.version) == str(version.version):
            decision, reason = "kept", "this version already holds the champion alias"
            champion_value = value
        else:
            how = ""
            if champion is not None:
                champion_value, how = champion_score(champion, paths, config, cand)
            decision, reason = gate_decision(
                cand.metric, value, cand.direction, gate.min_improvement, champion_version, champion_value, how
            )
            kind = baseline_kind(cand.task, cand.stage)
            decision, reason = apply_floor(decision, reason, gate.quality_floor, kind, cand.metrics)
        if decision in {"first", "promoted"}:
            set_champion(client, name, version.version, gate.champion_alias)
        summary = decision_summary(
            decision, reason, cand.metric, value, cand.direction, champion_version, champion_value
        )
        describe(client, name, str(version.version), summary)
        if decision == "promoted" and champion_version is not None:
            line = dethroned_summary(cand.metric, champion_value, str(version.version), value, cand.direction)
            describe(client, name, champion_version, line)
        record = gate_record(decision, reason, value, champion, champion_value)
        record["params_hash"] = gate_params_hash(config)  # last: marks the decision complete, for reuse
        for key, val in record.items():
            client.set_model_version_tag(name, version.version, f"{TAG}gate.{key}", val)
    return registration_from_tags(client.get_model_version(name, version.version), reused=reused)


GATE_PARAGRAPH = "Promotion gate: "


def describe(client: MlflowClient, name: str, version: str, line: str) -> None:
    """Put `line` as the version description's gate paragraph, in place of any earlier one."""
    current = client.get_model_version(name, version).description or ""
    kept = current.split(GATE_PARAGRAPH)[0].rstrip()
    text = f"{kept}\n\n{GATE_PARAGRAPH}{line}" if kept else f"{GATE_PARAGRAPH}{line}"
    client.update_model_version(name, version, description=text)


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
    """Bits-per-byte of a Hugging Face model directory on this workspace's held-out pretraining text, by the
    library's scorer (the model's own tokenizer, the `tokenize` params' batching, `evaluate.batch_size`)."""
    from lmcore.heldout import text_bpb

    tok = config.tokenize
    return text_bpb(
        model_dir,
        paths.split_file("pretrain", "val"),
        config.evaluate.batch_size,
        num_workers=tok.num_workers,
        encode_batch_size=tok.batch_size,
        shard_tokens=tok.shard_tokens,
        **placement(config),
    )


def placement(config: Config) -> dict[str, str]:
    """Where a champion is re-scored: the evaluate stage's `evaluate.device` and `evaluate.dtype`."""
    from lmcore.device import resolve

    where = resolve(config.evaluate.device, config.evaluate.dtype, key="evaluate.device")
    return {"device": where.device, "dtype": where.dtype_name}


def _rescore_pretrain(metric: str, model_dir: Path, paths: Paths, config: Config) -> float | None:
    return rescore_val_bpb(model_dir, paths, config) if metric == "pretrain.val_bpb" else None


def _rescore_sft(metric: str, model_dir: Path, paths: Paths, config: Config) -> float | None:
    """sft.* of a chat model on this workspace's held-out conversations, by the scorer the evaluate stage uses."""
    from lmcore.finetune import sft
    from lmcore.heldout import sft_scores

    cfg = config.evaluate
    conversations = sft.load_conversations(paths.split_file("sft", "val"))[: cfg.sft_max_examples]
    scores, _ = sft_scores(
        model_dir,
        conversations,
        "sft",
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        metrics=cfg.sft_metrics,
        **placement(config),
    )
    return scores.get(metric.split(".", 1)[1])


def _rescore_classification(metric: str, model_dir: Path, paths: Paths, config: Config) -> float | None:
    """classification.* of a classifier on this workspace's held-out split, by the scorer the evaluate stage uses."""
    from lmcore.finetune import classification as cls
    from lmcore.heldout import classifier_scores

    cfg = config.finetune
    train_path, val_path = (paths.split_file("classification", s) for s in ("train", "val"))
    data = cls.load_classification(train_path, val_path, cfg.text_field, cfg.label_field)
    scored = classifier_scores(model_dir, data, val_path, config.evaluate.batch_size, **placement(config))
    return scored.metrics.get(metric)


RESCORERS = {"pretrain": _rescore_pretrain, "sft": _rescore_sft, "classification": _rescore_classification}
