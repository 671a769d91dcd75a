"""A task the fine-tune must learn and the evaluation must see: copying the user's words back.

The tiny pretrained workspace (read-only KJV text) is fine-tuned on a few dozen conversations whose answer is the
prompt itself, then the real evaluate stage scores the greedy answers of the fine-tuned model and of its base on
held-out pairs the fine-tune never saw. The base model answers with scripture; the fine-tuned one with the words
it was asked to copy, so its exact match and token F1 must come out above the base model's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import copy_workspace, lmcycle, write_jsonl

WORDS = ["red", "blue", "green", "black", "white", "gold", "pink", "gray", "cat", "dog", "sun", "moon"]


def copy_pairs(count: int, seed: int) -> list[dict]:
    """Conversations: the user says 1-2 words, the assistant says them back."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        text = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
        rows.append({"id": f"copy-{seed}-{i}", "source": "copy", "messages": messages})
    return rows


@pytest.fixture(scope="module")
def copy_evaluated(tmp_path_factory: pytest.TempPathFactory, pretrained_workspace: Path) -> Path:
    root = copy_workspace(
        pretrained_workspace,
        tmp_path_factory.mktemp("copy-task") / "ws",
        finetune={"steps": 200, "batch_size": 16, "lr": 0.003, "warmup_steps": 10, "eval_every": 100},
        evaluate={"prompts": ["red cat"], "max_new_tokens": 8, "sft_max_examples": 24},
    )
    out = root / "data" / "ingest" / "sft"
    write_jsonl(out / "train.jsonl", copy_pairs(48, seed=1))
    write_jsonl(out / "val.jsonl", copy_pairs(24, seed=2))
    lmcycle("stage", "finetune", cwd=root)
    lmcycle("stage", "evaluate", cwd=root)
    return root


def test_a_model_fine_tuned_to_copy_scores_above_its_base(copy_evaluated: Path) -> None:
    report = json.loads((copy_evaluated / "reports" / "evaluate.json").read_text())
    assert report["sft.examples"] == 24
    assert report["sft.loss"] < report["base.sft_loss"]
    print(json.dumps({k: v for k, v in report.items() if k.startswith(("sft.", "base."))}))
    assert report["sft.token_f1"] > report["base.sft_token_f1"] + 0.3, report
    assert report["sft.exact_match"] > report["base.sft_exact_match"], report
