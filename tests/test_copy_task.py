"""A task the fine-tune must learn and the evaluation must see: copying the user's words back.

The tiny workspace pretrained on KJV text is fine-tuned on 120 short conversations whose answer is the prompt
itself, then the real evaluate stage scores the greedy answers of the fine-tuned model and of its base on
held-out word pairs the fine-tune never saw. The base model answers with scripture; the fine-tuned one with the
words it was asked to copy, so its token F1 must come out well above the base model's. (At this size and length of
training it copies the first word of an unseen pair far more often than the whole pair: exact match stays near 0.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import copy_workspace, lmcycle, write_jsonl

WORDS = ["red", "blue", "green", "black", "white", "gold", "pink", "gray", "cat", "dog", "sun", "moon"]


def copy_pairs(count: int, seed: int, unseen: set[str] = frozenset()) -> list[dict]:
    """Conversations: the user says 1-2 words, the assistant says them back; never a text in `unseen`."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < count:
        text = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
        if text in unseen:
            continue
        i = len(rows)
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
        rows.append({"id": f"copy-{seed}-{i}", "source": "copy", "messages": messages})
    return rows


@pytest.fixture(scope="module")
def copy_evaluated(tmp_path_factory: pytest.TempPathFactory, pretrained_workspace: Path) -> Path:
    root = copy_workspace(
        pretrained_workspace,
        tmp_path_factory.mktemp("copy-task") / "ws",
        finetune={"steps": 240, "batch_size": 16, "lr": 0.003, "warmup_steps": 10, "eval_every": 100},
        evaluate={"prompts": ["red cat"], "max_new_tokens": 8, "sft_max_examples": 24},
    )
    out = root / "data" / "ingest" / "sft"
    train = copy_pairs(120, seed=1)
    seen = {row["messages"][0]["content"] for row in train}
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", copy_pairs(24, seed=2, unseen=seen))  # held-out texts the fine-tune never saw
    lmcycle("stage", "finetune", cwd=root)
    lmcycle("stage", "evaluate", cwd=root)
    return root


def test_a_model_fine_tuned_to_copy_scores_above_its_base(copy_evaluated: Path) -> None:
    report = json.loads((copy_evaluated / "reports" / "evaluate.json").read_text())
    assert report["sft.examples"] == 24
    assert report["sft.loss"] < report["base.sft_loss"]
    assert report["sft.token_f1"] > report["base.sft_token_f1"] + 0.3, report
    rows = json.loads((copy_evaluated / "reports" / "evaluate" / "predictions.json").read_text())

    def copied(model: str) -> float:
        """Share of answers that begin with the prompt's first word: copying, not a memorised favourite word."""
        answers = [(r["prompt"].split(), r["answer"].split()) for r in rows if r["model"] == model]
        return sum(bool(a) and a[0] == p[0] for p, a in answers) / len(answers)

    assert copied("sft") > 0.4 and copied("base") == 0.0
