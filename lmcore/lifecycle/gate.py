"""The promotion gate's guards around lmcore.lifecycle.registry's decision: the quality floor, what the gate metric was
computed on, the reuse key of a decision, and a lease that serialises concurrent gates.

Design choices:
- Quality floor: a version that does not beat its trivial baseline (the count-based bigram for a pretrained
  language model, the majority class for a classifier, the base model for a fine-tune; all in
  reports/evaluate.json) never takes the champion alias, whatever the champion scores. Without a baseline in the
  report (no evaluate stage yet) there is nothing to hold it to, and the reason says so.
- Eval fingerprint: the report's data fingerprint of the metric's section, joined with every setting that changes
  that section's numbers (`evaluate.sft_max_examples`, `evaluate.max_new_tokens`, lm-eval's `limit`), so two
  versions are compared on recorded values only when both numbers came from the same data the same way.
- Concurrency: the registry has no transaction, so the read–compare–set of the champion runs under a lease held
  in a registered-model tag (`lmcycle.gate_lease` = owner and expiry): write it, wait, re-read; only the owner
  still named after the wait goes on. It works through any MLflow server, since it only uses tags.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lmcore.errors import LmcycleError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from lmcore.lifecycle.config import Config

LEASE_TAG = "lmcycle.gate_lease"

# What changes each section's numbers besides its data: the evaluate settings that section reads.
SECTION_SETTINGS = {
    "sft": lambda c: {"sft_max_examples": c.evaluate.sft_max_examples, "max_new_tokens": c.evaluate.max_new_tokens},
    "base": lambda c: {"sft_max_examples": c.evaluate.sft_max_examples, "max_new_tokens": c.evaluate.max_new_tokens},
    "lm_eval": lambda c: {"limit": c.evaluate.lm_eval.limit},
}


class GateBusyError(LmcycleError):
    """Another registration held the gate's lease for longer than this one would wait."""


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


def settings_fingerprint(declared: str, section: str, config: Config) -> str:
    """The data fingerprint joined with the settings that change the section's numbers."""
    settings = SECTION_SETTINGS.get(section)
    if settings is None:
        return declared
    text = json.dumps({"data": declared, **settings(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --- the reuse key of a decision ---------------------------------------------------------------------------


def gate_params_hash(config: Config) -> str:
    """What a recorded decision depends on besides the model: the register.* params."""
    text = json.dumps(config.register.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- the lease ---------------------------------------------------------------------------------------------


def _read_lease(client: MlflowClient, name: str) -> tuple[str, float] | None:
    text = client.get_registered_model(name).tags.get(LEASE_TAG, "")
    owner, _, expiry = text.partition("@")
    try:
        return (owner, float(expiry)) if owner else None
    except ValueError:
        return None


def _write_lease(client: MlflowClient, name: str, value: str) -> bool:
    """Write the lease tag; False when a concurrent writer won (a store may refuse two inserts of one tag)."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_tag(name, LEASE_TAG, value)
    except MlflowException:
        return False
    return True


@contextlib.contextmanager
def gate_lease(
    client: MlflowClient, name: str, ttl_s: float = 120.0, settle_s: float = 0.5, wait_s: float = 300.0
) -> Iterator[str]:
    """Hold the registered model's gate lease: write owner@expiry, wait `settle_s`, re-read; a writer that raced
    with us is seen then and one of us backs off (with jitter). An expired lease (a killed holder) is taken over."""
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + wait_s
    while True:
        lease = _read_lease(client, name)
        if (lease is None or lease[1] < time.time()) and _write_lease(client, name, f"{owner}@{time.time() + ttl_s}"):
            time.sleep(settle_s)
            lease = _read_lease(client, name)
            if lease is not None and lease[0] == owner:
                break
        if time.monotonic() > deadline:
            raise GateBusyError(f"models:/{name}: the promotion gate is held by another registration ({LEASE_TAG})")
        time.sleep(settle_s * (1 + 2 * random.random()))
    try:
        yield owner
    finally:
        with contextlib.suppress(Exception):
            lease = _read_lease(client, name)
            if lease is not None and lease[0] == owner:
                client.delete_registered_model_tag(name, LEASE_TAG)


def gate_record(decision: str, reason: str, value: float, champion: Any, champion_value: float | None) -> dict:
    return {
        "decision": decision,
        "reason": reason,
        "challenger_value": repr(value),
        "champion_version": str(champion.version) if champion else "none",
        "champion_value": repr(champion_value) if champion_value is not None else "none",
    }
