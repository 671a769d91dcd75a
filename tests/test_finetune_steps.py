"""Defaults that adapt to the data: `finetune.steps: auto` / `finetune.epochs`, balanced class weights, and the
evaluate verdict on a classifier that does not beat the majority class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import conftest
import pytest
import torch
from conftest import REPO, write_jsonl

from lmcore.errors import ConfigError
from lmcore.finetune.schedule import balanced_class_weights, resolve_steps
from lmcore.lifecycle.config import apply_overrides, load_config
from lmcore.lifecycle.paths import Paths

# --- steps ----------------------------------------------------------------------------------------------------------


def test_auto_is_one_epoch_rounded_up_and_capped() -> None:
    plan = resolve_steps("auto", None, rows=3000, rows_per_step=16, max_auto_steps=2000)
    assert (plan.steps, plan.capped) == (188, False)  # ceil(3000 / 16): the last, short batch counts
    assert plan.line() == (
        "steps auto = 188 (one epoch of 3000 rows at 16 per step, under the cap of 2000: finetune.max_auto_steps)"
    )
    capped = resolve_steps("auto", None, rows=3000, rows_per_step=16, max_auto_steps=100)
    assert (capped.steps, capped.capped) == (100, True)
    assert "capped at 100" in capped.line()
    assert resolve_steps("auto", None, rows=1, rows_per_step=64, max_auto_steps=2000).steps == 1
    # batch_size × grad_accum rows make one step
    assert resolve_steps("auto", None, rows=3000, rows_per_step=16 * 4, max_auto_steps=2000).steps == 47


def test_epochs_and_explicit_steps() -> None:
    plan = resolve_steps("auto", 2.5, rows=600, rows_per_step=16, max_auto_steps=10)
    assert plan.steps == 94 and plan.rule == "epochs"  # ceil(2.5 × 600 / 16); the auto cap does not apply
    assert plan.record() == {"steps_resolved": {"rule": "epochs", "rows": 600, "rows_per_step": 16, "epochs": 2.5}}
    explicit = resolve_steps(60, None, rows=600, rows_per_step=16, max_auto_steps=10)
    assert explicit.steps == 60 and explicit.line() == "" and explicit.record() == {}


@pytest.fixture
def params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return path


def test_epochs_beside_an_explicit_steps_is_one_line_naming_the_key(params: Path) -> None:
    before = params.read_bytes()
    with pytest.raises(ConfigError) as err:
        apply_overrides(["finetune.epochs=2"], params)  # the demo's params set steps: 60
    message = str(err.value)
    assert message.startswith("finetune.epochs: ") and "not both" in message and "\n" not in message
    assert params.read_bytes() == before
    config = apply_overrides(["finetune.steps=auto", "finetune.epochs=2"], params)
    assert (config.finetune.steps, config.finetune.epochs) == ("auto", 2.0)


def test_the_schema_default_is_auto_and_the_demo_keeps_its_number() -> None:
    from lmcore.lifecycle.config import FinetuneConfig

    assert FinetuneConfig().steps == "auto" and FinetuneConfig().class_weights == "none"
    assert load_config(REPO / "params.yaml").finetune.steps == 60


# --- class weights --------------------------------------------------------------------------------------------------


def test_balanced_weights_match_the_formula_and_change_the_loss() -> None:
    from lmcore.finetune.classification import classification_loss

    labels = [0] * 6 + [1] * 3 + [2] * 1  # n_samples / (n_classes × count_c)
    weights = balanced_class_weights(labels, 3)
    assert weights == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    assert balanced_class_weights([0, 0, 1, 1], 2) == [1.0, 1.0]  # balanced data: today's loss

    class Fixed(torch.nn.Module):  # a "model" whose logits are the batch's own, so the loss is torch's alone
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return input_ids.float()

    torch.manual_seed(0)
    batch = {"input_ids": torch.randn(10, 3), "attention_mask": torch.ones(10, 3), "labels": torch.tensor(labels)}
    plain = classification_loss(Fixed(), batch)
    weighted = classification_loss(Fixed(), batch, weight=torch.tensor(weights))
    assert plain == pytest.approx(torch.nn.functional.cross_entropy(batch["input_ids"], batch["labels"]).item())
    per_row = torch.nn.functional.cross_entropy(batch["input_ids"], batch["labels"], reduction="none")
    w = torch.tensor(weights)[batch["labels"]]
    assert weighted.item() == pytest.approx(((per_row * w).sum() / w.sum()).item())
    assert abs(weighted.item() - plain.item()) > 1e-3


def test_auto_steps_and_balanced_weights_in_the_stage(
    workspace_factory, tiny_hf_dir: Path, tmp_path: Path, capsys
) -> None:
    """A real fine-tune: one epoch of an imbalanced training split, recorded, and an exact resume."""
    from lmcore.lifecycle.stages.finetune import run

    finetune = {"task": "classification", "steps": "auto", "init_from": str(tiny_hf_dir), "tokenizer": None}
    finetune |= {"class_weights": "balanced", "eval_every": 100, "checkpoint_every": 100, "log_every": 1}
    root = workspace_factory(dvc=False, finetune=finetune)
    rows = conftest.testament_rows(24)
    old, new = [r for r in rows if r["label"] == "old"], [r for r in rows if r["label"] == "new"]
    folder = root / "data" / "ingest" / "classification"
    write_jsonl(folder / "train.jsonl", old[:18] + new[:6])  # 24 rows, 3:1
    write_jsonl(folder / "val.jsonl", old[18:] + new[18:])
    config = load_config(root / "params.yaml")

    summary = run(config, Paths.of(root))
    err = capsys.readouterr().err
    line = "finetune: steps auto = 6 (one epoch of 24 rows at 4 per step, under the cap of 2000"
    assert line in err
    report = json.loads((root / "reports" / "finetune.json").read_text())
    assert report["steps"] == 6 and summary["steps"] == 6
    assert report["steps_resolved"] == {"rule": "auto", "rows": 24, "rows_per_step": 4, "cap": 2000, "capped": False}
    assert report["data"]["class_weights"] == {"new": 2.0, "old": pytest.approx(24 / 36, abs=1e-6)}
    meta = json.loads((root / "models" / "finetune" / "checkpoint" / "meta.json").read_text())
    assert meta["params"]["finetune"]["steps"] == 6 and meta["params"]["finetune"]["class_weights"] == "balanced"

    again = run(config, Paths.of(root))  # the same resolved number: the fingerprint matches, nothing retrains
    assert again["resumed_from_step"] == 6 and again["steps"] == 6

    # the same run without weights (today's loss) trains differently (a batch of one class weighs the same either
    # way: torch's weighted mean divides by the summed weights)
    plain = tmp_path / "plain"
    shutil.copytree(root, plain, ignore=shutil.ignore_patterns("checkpoints", "models", "reports"))
    none = config.model_copy(update={"finetune": config.finetune.model_copy(update={"class_weights": "none"})})
    assert run(none, Paths.of(plain))["steps"] == 6
    assert "class_weights" not in json.loads((plain / "reports" / "finetune.json").read_text())["data"]
    curves = [(ws / "reports" / "finetune" / "train.csv").read_text().splitlines() for ws in (root, plain)]
    assert len(curves[0]) == len(curves[1]) == 7 and curves[0] != curves[1]


# --- the evaluate verdict -------------------------------------------------------------------------------------------


def test_a_classifier_answering_the_majority_everywhere_is_called_out() -> None:
    from lmcore.lifecycle.stages.evaluate import classifier_verdict
    from lmcore.scoring import classification_metrics, majority_baseline

    labels = ["neg", "pos"]
    actual = [1] * 66 + [0] * 34
    always_pos = classification_metrics(actual, [1] * 100, labels)
    base = majority_baseline(actual, 1, labels)
    metrics = {f"classification.{k}": v for k, v in always_pos.items()} | {
        "classification.majority_label": "pos",
        "classification.majority_accuracy": base["accuracy"],
        "classification.majority_macro_f1": base["macro_f1"],
    }
    verdict = classifier_verdict(metrics)
    assert verdict.startswith("does not beat the majority class ('pos' for every row): accuracy 0.660 vs 0.660")
    assert "finetune.class_weights: balanced" in verdict and "\n" not in verdict

    better = classification_metrics(actual, [1] * 60 + [0] * 6 + [0] * 30 + [1] * 4, labels)
    metrics |= {f"classification.{k}": v for k, v in better.items()}
    assert classifier_verdict(metrics).startswith("beats the majority-class baseline (accuracy 0.900 vs 0.660")
