"""The finetune and evaluate stages in the real DVC graph: an experiment on finetune params reruns only them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest


def dvc(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    return {
        stage
        for stage in ("ingest", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate")
        if f"Running stage '{stage}'" in output
    }


@pytest.mark.slow
def test_exp_run_on_finetune_params_reruns_only_finetune_and_evaluate(workspace_factory):
    root = workspace_factory(evaluate={"prompts": ["In the beginning"], "max_new_tokens": 4, "sft_max_examples": 4})
    first = dvc("repro", cwd=root)
    assert ran(first) == {"ingest", "tokenizer", "tokenize", "pretrain", "finetune", "evaluate"}
    before = json.loads((root / "reports" / "evaluate.json").read_text())
    assert {"pretrain.val_bpb", "sft.loss", "base.sft_loss", "eval_data_fingerprint"} <= before.keys()
    git = dict(cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline"], **git)

    assert ran(dvc("repro", cwd=root)) == {"ingest"}  # always_changed, and nothing downstream moves

    experiment = dvc("exp", "run", "-S", "finetune.lr=0.001", cwd=root)
    assert ran(experiment) == {"ingest", "finetune", "evaluate"}
    diff = dvc("metrics", "diff", "--json", cwd=root)
    changed = json.loads(diff)
    assert "sft.loss" in changed["reports/evaluate.json"]
    assert "pretrain.val_bpb" not in changed["reports/evaluate.json"]  # the pretrained model did not move
    assert "val_loss" in changed["reports/finetune.json"]
