"""Fine-tuning architectures lmcore does not run natively, through transformers' own class (lmcore.hfcausal).

Two tiny random models built here with transformers (GPT-2 and GPT-NeoX, sharing the workspace tokenizer) go
through the real finetune stage: loss falls and the path taken is said once, a SIGKILLed run resumes to the same
bits, the export loads in stock transformers with the trained module's logits, LoRA trains only its adapters,
greedy decoding matches transformers' own, and the evaluate stage scores the result.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import copy_workspace, lmcycle
from safetensors.torch import load_file
from test_finetune import kill_finetune_at_checkpoint

from lmcore.lifecycle.config import load_config
from lmcore.lifecycle.paths import Paths

SFT = {"steps": 12, "lr": 0.003, "warmup_steps": 2, "eval_every": 6, "checkpoint_every": 4, "log_every": 2}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}


def build(model_type: str, tokenizer) -> torch.nn.Module:
    """A tiny random transformers model of `model_type` over the workspace tokenizer's vocabulary, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    torch.manual_seed(0)
    if model_type == "gpt2":
        cfg = GPT2Config(
            vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg)
    cfg = GPTNeoXConfig(
        vocab_size=len(tokenizer), max_position_embeddings=128, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, hidden_dropout=0.0, attention_dropout=0.0,
        tie_word_embeddings=False, **ids,
    )  # fmt: skip
    return GPTNeoXForCausalLM(cfg)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def base_dir(request, pretrained_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face directory of a non-native architecture carrying the workspace's own tokenizer files."""
    from lmcore.tokenizer import model_tokenizer

    tok_dir = pretrained_workspace / "models" / "tokenizer"
    out = tmp_path_factory.mktemp("base") / request.param
    build(request.param, model_tokenizer(tok_dir)).save_pretrained(str(out), safe_serialization=True)
    for file in tok_dir.iterdir():
        if file.is_file():
            shutil.copy2(file, out / file.name)
    return out


@pytest.fixture
def ws(tmp_path: Path, pretrained_workspace: Path, base_dir: Path):
    def make(name: str = "ws", **finetune) -> Path:
        return copy_workspace(pretrained_workspace, tmp_path / name, finetune={"init_from": str(base_dir)} | finetune)

    return make


def run_finetune(root: Path) -> dict:
    from lmcore.lifecycle.stages.finetune import run

    return run(load_config(root / "params.yaml"), Paths.of(root))


def trained_module(root: Path, base: Path):
    """The trained module as the loop left it: the base model with the final checkpoint's weights loaded."""
    from lmcore.hfcausal import load_causal_lm
    from lmcore.train.checkpoint import load_model_state

    model, _ = load_causal_lm(base)
    load_model_state(model, load_file(str(root / "models/finetune/checkpoint/model.safetensors")))
    return model.eval()


def test_finetune_through_transformers_exports_and_evaluates(ws, base_dir: Path, capfd):
    from transformers import AutoModelForCausalLM

    from lmcore.lifecycle.stages import evaluate

    model_type = base_dir.name
    root = ws(**SFT)
    shutil.rmtree(root / "models" / "pretrain")  # evaluate scores the fine-tune and its base only
    run_finetune(root)
    stderr = capfd.readouterr().err
    line = f"finetune: {model_type} model runs through transformers' {ARCHITECTURES[model_type]} (not native"
    assert stderr.count(line) == 1, stderr
    assert f"model_type '{model_type}'" in stderr  # the native import's reason, named
    losses = [float(r["loss"]) for r in csv.DictReader((root / "reports/finetune/train.csv").open())]
    assert losses[-1] < losses[0] - 0.2, losses

    export = root / "models" / "finetune" / "hf"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == model_type and config["lmcycle"]["stage"] == "finetune"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    assert ARCHITECTURES[model_type] in (export / "README.md").read_text()
    theirs = AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
    ours = trained_module(root, base_dir)
    x = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x).logits)

    evaluate.run(load_config(root / "params.yaml"), Paths.of(root))
    report = json.loads((root / "reports" / "evaluate.json").read_text())
    assert report["sft.loss"] < report["base.sft_loss"]  # scored through transformers, fine-tuned beats its base
    samples = json.loads((root / "reports" / "evaluate" / "samples.json").read_text())
    assert {row["model"] for row in samples} >= {"base", "finetuned"}


def test_greedy_decoding_matches_transformers_generate(base_dir: Path):
    from lmcore.engine import SamplingConfig, generate
    from lmcore.generate import generate_text, load_model

    model, tokenizer = load_model(base_dir)
    with torch.no_grad():  # peaked next-token distributions: clear greedy winners, comparable across code paths
        for p in model.parameters():
            p.mul_(8.0 if p.dim() >= 2 else 1.0)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    text = generate_text(model, tokenizer, "In the beginning", cfg)
    assert text == generate_text(model, tokenizer, "In the beginning", cfg)  # deterministic
    prompts = [tokenizer("In the")["input_ids"], tokenizer("And God said unto Moses")["input_ids"]]
    pad = tokenizer.pad_token_id
    cached = generate(model, prompts, cfg, pad)  # one left-padded batch over transformers' KV cache
    recomputed = generate(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0.0, use_cache=False), pad)
    assert cached == recomputed
    for prompt, ours in zip(prompts, cached, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.hf.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=pad)
        assert ours == out[0, ids.shape[1] :].tolist()


def test_generate_and_chat_commands_answer_with_a_fallback_model(base_dir: Path, tmp_path: Path):
    """The console commands load a non-native directory through transformers and answer greedily, the same twice."""
    args = ["--model", str(base_dir), "--max-new-tokens", "6", "--temperature", "0"]
    runs = [lmcycle("generate", *args, "--prompt", "In the beginning", cwd=tmp_path) for _ in range(2)]
    assert runs[0].stdout.startswith("In the beginning") and runs[0].stdout == runs[1].stdout
    assert "Traceback" not in runs[0].stderr
    turns = "Hello\nAnd who are you?\n/exit\n"
    proc = subprocess.run(["lmcycle", "chat", *args], input=turns, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("assistant> ") == 2 and "Traceback" not in proc.stderr


def test_resume_after_sigkill_ends_bit_identical(ws, capfd):
    # the kill is sent once the step-12 checkpoint is complete, with 12 steps still to go
    short = SFT | {"steps": 24, "eval_every": 24, "checkpoint_every": 12, "log_every": 4}
    straight = ws("straight", **short)
    run_finetune(straight)
    expected = load_file(str(straight / "models/finetune/checkpoint/model.safetensors"))

    killed = ws("killed", **short)
    kill_finetune_at_checkpoint(killed, 12, poll_s=0.01)
    assert not (killed / "models" / "finetune").exists()
    capfd.readouterr()
    run_finetune(killed)
    assert "resuming from" in capfd.readouterr().err
    got = load_file(str(killed / "models/finetune/checkpoint/model.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert (killed / "reports/finetune.json").read_bytes() == (straight / "reports/finetune.json").read_bytes()


def test_lora_trains_only_the_adapters(ws, base_dir: Path):
    from transformers import AutoModelForCausalLM

    root = ws(**SFT | {"steps": 6, "lr": 0.01}, lora={"r": 4, "alpha": 8.0})  # default targets: q/k/v/o_proj
    run_finetune(root)
    report = json.loads((root / "reports" / "finetune.json").read_text())
    assert report["lora_r"] == 4 and 0 < report["params_trainable"] < report["params_total"] / 10
    checkpoint = load_file(str(root / "models/finetune/checkpoint/model.safetensors"))
    modules = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True).state_dict()  # module names
    adapters = {n for n in checkpoint if "lora_" in n}
    assert adapters and any(not torch.equal(checkpoint[n], torch.zeros_like(checkpoint[n])) for n in adapters)
    for name, tensor in checkpoint.items():  # everything but the adapters is the base model's, bit for bit
        if "lora_" not in name:
            plain = name.removeprefix("base_model.model.hf.").replace(".base_layer", "")
            assert torch.equal(tensor, modules[plain]), name
    tuned = load_file(str(root / "models/finetune/hf/model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    assert tuned.keys() == base.keys()  # merged: a plain model, no adapter tensors
    changed = {n for n in tuned if not torch.equal(tuned[n], base[n])}
    attention = ("attn.c_attn", "attn.c_proj", "mlp.c_proj", "query_key_value", "attention.dense")
    assert changed and all(any(part in n for part in attention) for n in changed), changed


def test_classification_on_a_fallback_model_is_refused_in_one_line(ws, base_dir: Path):
    from lmcore.errors import ConfigError

    root = ws(task="classification", steps=2)
    with pytest.raises(ConfigError, match=rf"finetune.task: classification .* {base_dir.name} .*task sft"):
        run_finetune(root)
    assert not (root / "models" / "finetune").exists()


def test_packed_rows_are_computed_as_each_example_alone(base_dir: Path):
    from lmcore.finetune.sft import SftExample, collate, sft_loss
    from lmcore.hfcausal import load_causal_lm

    model, _ = load_causal_lm(base_dir)
    model.eval()
    torch.manual_seed(1)
    examples = [
        SftExample(torch.randint(3, 500, (n,)).tolist(), torch.randint(3, 500, (n,)).tolist()) for n in (5, 9, 4)
    ]
    packed = SftExample(
        [t for ex in examples for t in ex.input_ids],
        [t for ex in examples for t in ex.targets],
        [i + 1 for i, ex in enumerate(examples) for _ in ex.input_ids],
    )
    with torch.no_grad():
        alone = torch.cat([model.token_losses(**_ids(collate([ex], 0))).flatten() for ex in examples])
        together = sft_loss(model, collate([packed], 0))
    torch.testing.assert_close(together, alone.mean(), rtol=1e-5, atol=1e-6)


def _ids(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "targets": batch["targets"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "modeling.Model"}}, r"needs remote code \(auto_map\)"),
        ({"model_type": "no_such_model"}, r"has no causal LM for model_type 'no_such_model'"),
        ("pickled", r"no safetensors weights \(pickled \.bin weights are never loaded\)"),
        ("truncated", r"its weights lack \d+ tensors transformers expects"),
    ],
)
def test_what_neither_path_runs_is_refused_in_one_line(tmp_path: Path, change, message):
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmcore.errors import CheckpointError
    from lmcore.hfcausal import load_causal_lm

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        str(tmp_path)
    )
    if isinstance(change, dict):
        config = json.loads((tmp_path / "config.json").read_text()) | change
        (tmp_path / "config.json").write_text(json.dumps(config))
    elif change == "pickled":
        (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    else:
        weights = load_file(str(tmp_path / "model.safetensors"))
        save_file({k: v for k, v in weights.items() if ".h.0.mlp." not in k}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message) as err:
        load_causal_lm(tmp_path)
    assert "\n" not in str(err.value) and "lmcore cannot run it (config.json: model_type" in str(err.value)
