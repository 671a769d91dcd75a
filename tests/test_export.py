"""Hugging Face export and import: stock transformers loads the directory (no remote code) and computes the same
logits; sampling, pipelines and the tokenizer work; export → import gives back identical weights; and directories
lmcore cannot use are refused with one line naming the file or key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from lmcore.errors import CheckpointError
from lmcore.export import export_hf, import_hf, read_hf_config


def test_directory_holds_what_transformers_needs(tiny_hf_dir: Path) -> None:
    names = {p.name for p in tiny_hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= names
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["attention_bias"], config["mlp_bias"], config["tie_word_embeddings"]) == (False, False, True)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    generation = json.loads((tiny_hf_dir / "generation_config.json").read_text())
    assert 0 < generation["max_new_tokens"] < config["max_position_embeddings"]
    card = (tiny_hf_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "| val_loss | 6.1 |" in card and "AutoModelForCausalLM" in card and "lmcycle generate" in card
    assert not list(tiny_hf_dir.parent.glob(".*tmp"))  # no leftovers of the atomic write


def test_transformers_computes_the_same_logits(tiny_hf_dir: Path, capfd: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert "MISSING" not in capfd.readouterr().err  # transformers' load report names missing tensors
    x = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, tiny_model()(x), atol=1e-5, rtol=1e-6)


def test_tokenizer_sampling_and_pipeline_work_in_stock_transformers(tiny_hf_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    ids = tokenizer("In the beginning God created", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id == 1
    assert tokenizer.model_max_length == 64
    assert "<|assistant|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    torch.manual_seed(0)
    out = model.generate(ids, do_sample=True, top_k=50, top_p=0.95, max_length=50, num_return_sequences=2)
    assert out.shape[0] == 2 and ids.shape[1] < out.shape[1] <= 50

    generator = pipeline("text-generation", model=str(tiny_hf_dir))
    text = generator("And God said", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("And God said") and len(text) > len("And God said")


@pytest.mark.parametrize("tied", [True, False])
def test_export_then_import_gives_identical_weights(tiny_tokenizer_dir: Path, tmp_path: Path, tied: bool) -> None:
    model = tiny_model(tie_embeddings=tied)
    out = export_hf(model, tiny_tokenizer_dir, tmp_path / "hf")
    back, config = import_hf(out)
    assert config == model.config
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))
    assert (back.lm_head.weight is back.embed.weight) == tied


def test_import_of_a_model_saved_by_transformers(tmp_path: Path) -> None:
    """A Llama a user brings: written by transformers itself, sharded, separate LM head, no tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_theta=500_000.0,
    )
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "llama", max_shard_size="100KB")  # sharded, with an index
    assert (tmp_path / "llama" / "model.safetensors.index.json").is_file()
    model, ours = import_hf(tmp_path / "llama")
    assert (ours.n_head, ours.n_kv_head, ours.rope_theta, ours.tie_embeddings) == (8, 2, 500_000.0, False)
    x = torch.randint(0, 300, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), hf(x).logits, atol=1e-5, rtol=1e-6)


def test_init_weights_digest_names_every_shard(tmp_path: Path) -> None:
    """One model.safetensors: its own SHA-256 (as checkpoints always recorded); shards: every shard counts."""
    import hashlib

    from transformers import LlamaConfig, LlamaForCausalLM

    from lmcore.errors import CheckpointError
    from lmcore.weightfiles import init_weights_digest

    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    hf.save_pretrained(tmp_path / "one")
    one = tmp_path / "one" / "model.safetensors"
    assert init_weights_digest(tmp_path / "one") == hashlib.sha256(one.read_bytes()).hexdigest()
    hf.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    shards = sorted((tmp_path / "shards").glob("model-*.safetensors"))
    assert len(shards) > 2
    before = init_weights_digest(tmp_path / "shards")
    assert before != init_weights_digest(tmp_path / "one")
    last = shards[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 1  # one bit of the last shard's last tensor
    last.write_bytes(bytes(data))
    assert init_weights_digest(tmp_path / "shards") != before
    last.unlink()
    with pytest.raises(CheckpointError, match=f"{last.name}: missing"):
        init_weights_digest(tmp_path / "shards")


def _copy(src: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text()) | config_changes
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_pickled_weights_are_refused(tiny_hf_dir: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_hf_dir, tmp_path / "bin")
    (bad / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickled weights are not loaded"):
        import_hf(bad)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters"),
        ({"rope_scaling": {"type": "linear"}}, r"rope_scaling\.factor is missing"),
        ({"rope_scaling": {"type": "linear", "factor": "x"}}, r"rope_scaling\.factor 'x' is not a number"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt2"}, "model_type"),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]},
            "layer_types",
        ),
    ],
)
def test_architectures_lmcore_cannot_run_are_refused_naming_the_key(
    tiny_hf_dir: Path, tmp_path: Path, change: dict, key: str
) -> None:
    bad = _copy(tiny_hf_dir, tmp_path / "bad", **change)
    with pytest.raises(CheckpointError, match=rf"config\.json: {key}"):
        read_hf_config(bad)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_name_the_file(tiny_hf_dir: Path, tmp_path: Path, damage: str) -> None:
    bad = _copy(tiny_hf_dir, tmp_path / "bad")
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors"):
        import_hf(bad)


def test_weights_that_do_not_fit_the_config_are_refused(tiny_hf_dir: Path, tmp_path: Path) -> None:
    bad = _copy(tiny_hf_dir, tmp_path / "bad", intermediate_size=128)
    with pytest.raises(CheckpointError, match="gate_up.weight has shape"):
        import_hf(bad)
    missing = _copy(tiny_hf_dir, tmp_path / "missing", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\..* is missing"):
        import_hf(missing)


def test_failed_export_leaves_the_previous_directory(
    tiny_hf_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    out = shutil.copytree(tiny_hf_dir, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        export_hf(tiny_model(seed=1), tmp_path / "no-tokenizer", out)
    with pytest.raises(AttributeError):  # fails while writing, after the weights: the model card is last
        export_hf(tiny_model(seed=1), tiny_tokenizer_dir, out, card={"metrics": "not a table"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
