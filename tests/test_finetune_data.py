"""Fine-tuning data: SFT loss masking, truncation, packing, batches; classification data and labels; LoRA targets."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import KJV

from lmcore.errors import ConfigError, DataError
from lmcore.finetune import classification as cls
from lmcore.finetune import lora, sft
from lmcore.finetune.data import batch_indices
from lmcore.lifecycle.config import LoraConfig, TokenizerConfig
from lmcore.model import IGNORE_INDEX, ModelConfig, Transformer
from lmcore.tokenizer import END, to_transformers, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    with KJV.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(2000), f, strict=False)]
    return to_transformers(train_tokenizer(texts, TokenizerConfig(vocab_size=600)))


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Who made the heaven?"},
    {"role": "assistant", "content": "God created the heaven and the earth."},
    {"role": "user", "content": "And the light?"},
    {"role": "assistant", "content": "God said, Let there be light."},
]


def test_only_assistant_content_and_end_marker_are_targets(tokenizer):
    ids, trained = sft.encode_conversation(CONVERSATION, tokenizer)
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    trained_text = tokenizer.decode([t for t, keep in zip(ids, trained, strict=True) if keep])
    expected = "".join(m["content"] + END for m in CONVERSATION if m["role"] == "assistant")
    assert trained_text == expected
    example, truncated = sft.build_example(ids, trained, max_length=512)
    assert not truncated
    assert len(example.input_ids) == len(example.targets) == len(ids) - 1
    kept = [t for t in example.targets if t != IGNORE_INDEX]
    assert tokenizer.decode(kept) == expected


def test_prompt_response_rows_become_user_and_assistant_turns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    assert sft.load_conversations(path) == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ]


def test_rows_without_assistant_turn_are_skipped_and_counted(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
    ]
    stats = sft.SftStats()
    conversations = sft.load_conversations(write_jsonl(tmp_path / "t.jsonl", rows), stats)
    assert len(conversations) == 1 and stats.rows == 3 and stats.no_assistant == 2


def test_all_rows_without_assistant_turn_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}] * 3)
    with pytest.raises(DataError, match=r"t\.jsonl: no usable SFT conversations \(all 3 rows lack an assistant"):
        sft.load_conversations(path)


def test_unknown_role_is_an_error_naming_file_and_line(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "narrator", "content": "Once"}, {"role": "assistant", "content": "Hello"}]},
    ]
    with pytest.raises(DataError, match=r"t\.jsonl:2: message 0 has unknown role 'narrator'"):
        sft.load_conversations(write_jsonl(tmp_path / "t.jsonl", rows))


def test_truncation_is_counted_and_fully_cut_answers_dropped(tokenizer):
    long_user = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Yes."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend. " * 10}]
    stats = sft.SftStats()
    examples = sft.build_examples([long_user, short], tokenizer, max_length=32, stats=stats)
    assert stats.truncated == 2 and stats.emptied_by_truncation == 1 and stats.examples == 1
    assert len(examples) == 1 and len(examples[0]) == 32


def test_packing_keeps_examples_whole_and_masks_intact(tokenizer):
    conversations = [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
        for i in range(12)
    ]
    examples = sft.build_examples(conversations, tokenizer, max_length=40)
    packed = sft.pack_examples(examples, max_length=40)
    assert len(packed) < len(examples)
    assert all(len(row) <= 40 for row in packed)
    flat = [t for row in packed for t in row.targets]
    assert flat == [t for ex in examples for t in ex.targets]
    sizes = [len(ex) for ex in examples]  # each token knows its example: 1, 2, … within every row
    runs = [sum(1 for _ in group) for row in packed for _, group in itertools.groupby(row.segments)]
    assert runs == sizes
    assert all(row.segments == sorted(row.segments) and row.segments[0] == 1 for row in packed)
    batch = sft.collate(packed[:2], pad_id=0)
    width = batch["input_ids"].shape[1]
    assert batch["segment_ids"].tolist() == [row.segments + [0] * (width - len(row)) for row in packed[:2]]
    assert "segment_ids" not in sft.collate(examples[:2], pad_id=0)  # unpacked rows need no segments


def test_collate_right_pads_with_ignored_targets():
    examples = [sft.SftExample([5, 6, 7], [6, 7, IGNORE_INDEX]), sft.SftExample([5], [9])]
    batch = sft.collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["targets"].tolist() == [[6, 7, IGNORE_INDEX], [9, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_batches_depend_only_on_seed_and_step_and_split_across_ranks():
    assert batch_indices(10, 4, step=3, seed=1) == batch_indices(10, 4, step=3, seed=1)
    both = batch_indices(10, 2, step=3, seed=1, rank=0, world_size=2) + batch_indices(
        10, 2, step=3, seed=1, rank=1, world_size=2
    )
    assert both == batch_indices(10, 4, step=3, seed=1)
    epoch = [i for step in range(5) for i in batch_indices(10, 2, step, seed=1)]
    assert sorted(epoch) == list(range(10))  # each epoch visits every example once


# --- classification -----------------------------------------------------------------------------------------------


def test_labels_are_sorted_strings_and_balance_is_counted(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": "a", "label": 1},
            {"text": "b", "label": "0"},
            {"text": "c", "label": 1.0},
            {"text": " ", "label": 0},
        ],
    )
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "d", "label": 0}])
    data = cls.load_classification(train, val, "text", "label")
    assert data.labels == ["0", "1"] and data.label2id == {"0": 0, "1": 1}
    assert data.balance("train") == {"0": 1, "1": 2} and data.skipped_empty == {"train": 1, "val": 0}
    assert data.majority_label() == "1"


def test_label_unseen_in_training_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": "z"}])
    with pytest.raises(DataError, match=r"val\.jsonl: label\(s\) \['z'\] never appear in the training split"):
        cls.load_classification(train, val, "text", "label")


def test_missing_label_column_is_an_error_naming_the_params_key(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "sentiment": "x"}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: no label column 'label' \(finetune\.label_field\)"):
        cls.read_split(train, "text", "label")


def test_empty_text_column_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "", "label": "x"}, {"text": "  ", "label": "y"}])
    with pytest.raises(DataError, match=r"all 2 rows have an empty text column 'text'"):
        cls.read_split(train, "text", "label")


def test_classifier_pools_the_last_real_token():
    torch.manual_seed(0)
    model = cls.Classifier(
        Transformer(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, d_model=16, d_ff=32)), 3
    )
    model.eval()
    rows = [[3, 4, 5], [3, 4]]
    batch = cls.collate_ids(rows, pad_id=0)
    with torch.no_grad():
        batched = model(batch["input_ids"], batch["attention_mask"])
        alone = model(torch.tensor([[3, 4]]))
    torch.testing.assert_close(batched[1:], alone)


# --- LoRA ---------------------------------------------------------------------------------------------------------


def tiny_transformer() -> Transformer:
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, d_model=16, d_ff=32, context_length=16)
    )


def test_lora_accepts_hf_names_and_merges_into_plain_weights():
    model = tiny_transformer()
    x = torch.randint(0, 50, (2, 8))
    wrapped = lora.apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".qkv.lora_A" in n for n in trainable) and any(".down.lora_A" in n for n in trainable)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        expected = wrapped(x)
        merged = lora.merge(wrapped)
        assert type(merged) is Transformer
        assert set(merged.state_dict()) == set(tiny_transformer().state_dict())
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)


def test_unknown_lora_target_lists_the_available_modules():
    with pytest.raises(ConfigError, match=r"finetune\.lora\.target_modules: no module 'attention' .* available: down"):
        lora.apply_lora(tiny_transformer(), LoraConfig(r=4, target_modules=["q_proj", "attention"]))


def test_lora_on_a_classifier_trains_the_fresh_head_in_full_and_merges_back():
    torch.manual_seed(0)
    model = cls.Classifier(tiny_transformer(), 3)
    head_before = model.score.weight.detach().clone()
    wrapped = lora.apply_lora(model, LoraConfig(r=2, target_modules=["qkv"]), trainable=("score",))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and all("lora_" in n or "score" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=1.0)
    x = torch.randint(0, 50, (4, 8))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": torch.tensor([0, 1, 2, 0])}
    cls.classification_loss(wrapped, batch).backward()
    optimizer.step()
    with torch.no_grad():
        expected = wrapped(x)
        merged = lora.merge(wrapped)
        assert type(merged) is cls.Classifier and not torch.equal(merged.score.weight, head_before)
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
