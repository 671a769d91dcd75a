"""The promotion gate's rules, pure functions of numbers and params: does a challenger beat the champion, the
quality floor, what a gate metric was computed on, and the reuse key of a decision.

Design choices:
- Decision: one metric, a direction and a minimum improvement; `champion` moves only on a strict improvement
  (`better`), and `gate_decision` says why in one line. Pure, so every boundary is unit-tested and `make mutate`
  runs its mutants against those tests.
- Quality floor: a version that does not beat its trivial baseline (the count-based bigram for a pretrained
  language model, the majority class for a classifier, the base model for a fine-tune; all in
  reports/evaluate.json) never takes the champion alias, whatever the champion scores. Without a baseline in the
  report (no evaluate stage yet) there is nothing to hold it to, and the reason says so.
- Eval fingerprint: the report's data fingerprint of the metric's section, joined with every setting that changes
  that section's numbers (`evaluate.sft_max_examples`, `evaluate.max_new_tokens`, `evaluate.sft_metrics`,
  lm-eval's `limit`, and the device and dtype scored on unless they are the bit-repeatable cpu/float32), so two
  versions are compared on recorded values only when both numbers came from the same data the same way.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcore.lifecycle.config import Config


# What changes each section's numbers besides its data: the evaluate settings that section reads.
def _sft_settings(config: Config) -> dict[str, Any]:
    cfg = config.evaluate
    return {
        "sft_max_examples": cfg.sft_max_examples,
        "max_new_tokens": cfg.max_new_tokens,
        "sft_metrics": sorted(cfg.sft_metrics),
    }


DEFAULT_PLACEMENT = {"device": "cpu", "dtype": "float32"}
SECTION_SETTINGS = {
    "sft": _sft_settings,
    "base": _sft_settings,
    "lm_eval": lambda c: {"limit": c.evaluate.lm_eval.limit},
}


# --- the decision -----------------------------------------------------------------------------------------


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


def decision_summary(
    decision: str,
    reason: str,
    metric: str,
    value: float,
    direction: str,
    champion_version: str | None,
    champion_value: float | None,
) -> str:
    """The decision in one line for the version's description on the registry page: `champion: …` or
    `not promoted: …`. Pure."""
    order = "lower is better" if direction == "minimize" else "higher is better"
    if decision == "promoted":
        return f"champion: {metric} {value:.4g} vs champion v{champion_version} {champion_value:.4g} ({order})"
    if decision == "first":
        return f"champion: {metric} {value:.4g} ({order}); the first version, no champion before"
    if decision == "kept":
        return f"champion: {metric} {value:.4g} ({order}); it already held the champion alias"
    return f"not promoted: {reason}"


def dethroned_summary(metric: str, old_value: float | None, new_version: str, new_value: float, direction: str) -> str:
    """The line a champion's description gets when the gate hands the alias to a better version. Pure."""
    order = "lower is better" if direction == "minimize" else "higher is better"
    old = "" if old_value is None else f" vs this version's {old_value:.4g}"
    return f"champion until v{new_version}: {metric} {new_value:.4g}{old} ({order})"


# --- the quality floor -------------------------------------------------------------------------------------


def baseline_kind(task: str, stage: str) -> str:
    """Which trivial baseline a model is held to: classification, finetune or pretrain."""
    if task == "text-classification":
        return "classification"
    return "finetune" if stage == "finetune" else "pretrain"


def quality_floor(kind: str, metrics: dict[str, float]) -> tuple[bool | None, str]:
    """(beats its baseline, why): None when the report holds no baseline to compare with. Pure."""
    if kind == "classification":
        acc, majority = metrics.get("classification.accuracy"), metrics.get("classification.majority_accuracy")
        if acc is None or majority is None:
            return None, "no majority-class baseline in the report"
        verdict = "beats" if acc > majority else "does not beat"
        return acc > majority, f"accuracy {acc:.4g} {verdict} the majority class {majority:.4g}"
    if kind == "finetune":
        loss, base = metrics.get("sft.loss"), metrics.get("base.sft_loss")
        if loss is None or base is None:
            return None, "no base-model score in the report"
        verdict = "beats" if loss < base else "does not beat"
        return loss < base, f"sft.loss {loss:.4g} {verdict} the base model's {base:.4g}"
    bpb, bigram = metrics.get("pretrain.val_bpb"), metrics.get("pretrain.bigram_bpb")
    if bpb is None or bigram is None:
        return None, "no bigram baseline in the report"
    verdict = "beats" if bpb < bigram else "does not beat"
    return bpb < bigram, f"val_bpb {bpb:.4g} {verdict} the bigram baseline {bigram:.4g}"


def apply_floor(decision: str, reason: str, enabled: bool, kind: str, metrics: dict[str, float]) -> tuple[str, str]:
    """The gate's (decision, reason) after the quality floor: a version below its baseline is rejected."""
    if not enabled:
        return decision, reason
    beats, why = quality_floor(kind, metrics)
    if beats is False:
        return "rejected", f"below the quality floor: {why}; not made champion (register.quality_floor)"
    return decision, reason


# --- what a gate metric was computed on --------------------------------------------------------------------


def settings_fingerprint(declared: str, section: str, config: Config, placement: dict[str, str] | None = None) -> str:
    """The data fingerprint joined with the settings that change the section's numbers, and with `placement`
    ({device, dtype} the report was scored on) unless that is cpu/float32, so the default keeps its fingerprint."""
    settings = SECTION_SETTINGS.get(section)
    placement = placement if placement and placement != DEFAULT_PLACEMENT else {}
    if settings is None and not placement:
        return declared
    text = json.dumps({"data": declared, **(settings(config) if settings else {}), **placement}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- the reuse key of a decision ---------------------------------------------------------------------------


def gate_params_hash(config: Config) -> str:
    """What a recorded decision depends on besides the model: the register.* params."""
    text = json.dumps(config.register.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def gate_record(decision: str, reason: str, value: float, champion: Any, champion_value: float | None) -> dict:
    return {
        "decision": decision,
        "reason": reason,
        "challenger_value": repr(value),
        "champion_version": str(champion.version) if champion else "none",
        "champion_value": repr(champion_value) if champion_value is not None else "none",
    }
