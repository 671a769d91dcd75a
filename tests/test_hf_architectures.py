"""Llama-family models a user brings run natively in lmcore: tiny random Llama (llama3 RoPE scaling, head_dim apart
from hidden/heads, attention and MLP biases), Qwen2 (q/k/v biases, sliding window from layer 1) and Mistral (a
sliding window shorter than the sequence) directories, saved by transformers itself, compute transformers' logits
(full forward and KV-cache decoding), fine-tune through the real stage (full and LoRA), resume exactly after a
kill, and export back as the same architecture, which stock transformers loads with equal logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import copy_workspace, lmcycle
from test_finetune import assert_same_weights, kill_finetune_at_checkpoint, run_finetune, weights

from lmcore.export import TOKENIZER_FILES, import_hf, native_features

SEQ = 64  # the tiny finetune max_length and the models' context; both windows are shorter
COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=SEQ,
    tie_word_embeddings=False,
)
ROPE_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500_000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so all three bands (kept, interpolated, divided) occur
}
ARCHS = {
    "llama": ("LlamaConfig", dict(head_dim=24, attention_bias=True, mlp_bias=True, rope_parameters=ROPE_LLAMA3)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)),
    "mistral": ("MistralConfig", dict(sliding_window=12)),
}
FEATURES = {
    "llama": "llama model runs natively in lmcore (llama3 RoPE scaling ×8, attention biases (q/k/v, output), "
    "MLP biases, head_dim 24)",
    "qwen2": "qwen2 model runs natively in lmcore (attention biases (q/k/v), sliding window 16 from layer 1)",
    "mistral": "mistral model runs natively in lmcore (sliding window 12)",
}
FINETUNE = {"steps": 12, "lr": 0.005, "warmup_steps": 1, "eval_every": 6, "checkpoint_every": 4, "log_every": 2}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory, pretrained_workspace: Path) -> dict[str, Path]:
    """One directory per architecture, written by transformers' save_pretrained (safetensors), with the workspace
    tokenizer (so the finetune stage accepts it). Biases are made non-zero: zero ones would test nothing."""
    import transformers

    tokenizer_dir = pretrained_workspace / "models" / "pretrain" / "hf"
    # padded past the tokenizer, as released checkpoints are (and transformers reads this tokenizer as a Qwen2
    # one inside a qwen2 directory, which adds an <|endoftext|> token)
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"] + 64
    out = {}
    for i, (arch, (config_class, extra)) in enumerate(ARCHS.items()):
        config = getattr(transformers, config_class)(vocab_size=vocab, **COMMON, **extra)
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
        directory = tmp_path_factory.mktemp("hf-arch") / arch
        model.save_pretrained(directory, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, directory / name)
        out[arch] = directory
    return out


def workspace(pretrained_workspace: Path, hf_dir: Path, dest: Path, **finetune) -> Path:
    """A copy of the pretrained workspace fine-tuning the brought model (copied into models/)."""
    root = copy_workspace(pretrained_workspace, dest, finetune={"init_from": f"models/{hf_dir.name}", **finetune})
    shutil.copytree(hf_dir, root / "models" / hf_dir.name)
    return root


def ids(vocab: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_native_logits_and_cached_decoding_match_transformers(hf_dirs: dict[str, Path], arch: str) -> None:
    from transformers import AutoModelForCausalLM

    from lmcore.engine import Decoder, KVCache

    theirs = AutoModelForCausalLM.from_pretrained(hf_dirs[arch]).eval()
    ours, config = import_hf(hf_dirs[arch])
    ours.eval()
    assert native_features(config) == FEATURES[arch]
    x = ids(config.vocab_size, (2, SEQ))
    with torch.no_grad():
        full = ours(x)
        # fp32, same op order as transformers' eager/SDPA path: equal to float rounding
        torch.testing.assert_close(full, theirs(x).logits, atol=1e-5, rtol=1e-5)
        losses = ours.token_losses(x[:, :-1], x[:, 1:])  # scoring (perplexity, bits per byte) runs the same mask
        reference = torch.nn.functional.cross_entropy(full[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
        torch.testing.assert_close(losses, reference, atol=1e-5, rtol=1e-5)
        # KV cache: a prompt shorter than the window, then single tokens decoded well past it
        prompt = 8
        cache = KVCache(config, 2, SEQ, "cpu", torch.float32)
        ours.hidden_states(x[:, :prompt], cache=cache)
        decode = Decoder(ours, cache, torch.arange(SEQ)[None])
        for column in range(prompt, SEQ):
            torch.testing.assert_close(decode(x[:, column], column), full[:, column], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_finetune_runs_natively_and_exports_the_same_architecture(
    hf_dirs: dict[str, Path], pretrained_workspace: Path, tmp_path: Path, capfd, arch: str, lora: int
) -> None:
    from transformers import AutoModelForCausalLM

    settings = FINETUNE | {"lr": 0.03} if lora else FINETUNE  # adapters start at zero: they need a larger step
    root = workspace(pretrained_workspace, hf_dirs[arch], tmp_path / "ws", **settings, lora={"r": lora, "alpha": 8.0})
    run_finetune(root)
    assert f"finetune: {FEATURES[arch]}\n" in capfd.readouterr().err
    losses = [float(line.split(",")[1]) for line in (root / "reports/finetune/train.csv").read_text().splitlines()[1:]]
    # from near ln(vocab): full training learns the unigram distribution fast; adapters on the body only, slower
    assert len(losses) == 6 and losses[-1] < losses[0] - (0.05 if lora else 0.2), losses

    out = root / "models" / "finetune" / "hf"
    config, source = (json.loads((d / "config.json").read_text()) for d in (out, hf_dirs[arch]))
    assert config["model_type"] == arch and config["architectures"] == source["architectures"]
    for key in ("head_dim", "attention_bias", "mlp_bias", "rope_parameters", "sliding_window", "max_window_layers"):
        assert config.get(key) == source.get(key), key
    tuned, base = weights(out / "model.safetensors"), weights(hf_dirs[arch] / "model.safetensors")
    assert tuned.keys() == base.keys()  # Llama names, biases included; LoRA merged away
    assert any(not torch.equal(tuned[name], base[name]) for name in tuned)

    theirs, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(theirs).__name__ == source["architectures"][0]
    ours, _ = import_hf(out)
    x = ids(ours.config.vocab_size, (2, SEQ), seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_classifier_exports_the_same_architecture(
    hf_dirs: dict[str, Path], pretrained_workspace: Path, tmp_path: Path, arch: str
) -> None:
    from transformers import AutoModelForSequenceClassification

    from lmcore.finetune import classification as cls

    settings = dict(task="classification", steps=4, lr=0.002, batch_size=8, eval_every=4, checkpoint_every=4)
    root = workspace(pretrained_workspace, hf_dirs[arch], tmp_path / "ws", **settings)
    run_finetune(root)
    out = root / "models" / "finetune" / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["architectures"] == [
        f"{ARCHS[arch][0][:-6]}ForSequenceClassification"
    ]
    theirs, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    ours, _ = cls.import_hf_classifier(out)
    x = ids(ours.transformer.config.vocab_size, (3, 40), seed=2).clamp(min=config["pad_token_id"] + 1)
    with torch.no_grad():
        mask = torch.ones_like(x)
        torch.testing.assert_close(ours.eval()(x, mask), theirs.eval()(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_resume_after_sigkill_is_bit_identical(
    hf_dirs: dict[str, Path], pretrained_workspace: Path, tmp_path: Path, arch: str
) -> None:
    """As tests/test_finetune.py's resume test, on each architecture: a run killed once its step-4 checkpoint is
    complete, resumed, ends with the weights and reports of a run never interrupted."""
    long = FINETUNE | {"steps": 60, "eval_every": 30, "log_every": 10, "lr": 0.002}
    straight = workspace(pretrained_workspace, hf_dirs[arch], tmp_path / "straight", **long)
    run_finetune(straight)
    expected = weights(straight / "models/finetune/checkpoint/model.safetensors")

    killed = workspace(pretrained_workspace, hf_dirs[arch], tmp_path / "killed", **long)
    kill_finetune_at_checkpoint(killed, 4)
    resumed = lmcycle("stage", "finetune", cwd=killed)
    assert "resuming from" in resumed.stderr and FEATURES[arch] in resumed.stderr
    assert_same_weights(weights(killed / "models/finetune/checkpoint/model.safetensors"), expected)
    assert (killed / "reports/finetune.json").read_bytes() == (straight / "reports/finetune.json").read_bytes()


def hub_cache(hf_dir: Path, cache: Path, repo_id: str) -> Path:
    """`hf_dir` laid out as huggingface_hub's cache holds a downloaded snapshot (refs/main → snapshots/COMMIT)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_hub_id_in_the_local_cache_fine_tunes_and_an_unknown_one_fails_in_one_line(
    hf_dirs: dict[str, Path], pretrained_workspace: Path, tmp_path: Path
) -> None:
    """`finetune.init_from: org/name` resolves through the Hugging Face cache, offline (nothing is downloaded)."""
    from lmcore.errors import CheckpointError
    from lmcore.hubdir import model_directory

    cache = tmp_path / "hf-cache"
    snapshot = hub_cache(hf_dirs["mistral"], cache, "acme/tiny-mistral")
    assert model_directory("acme/tiny-mistral", tmp_path, "finetune.init_from", cache) == snapshot
    assert model_directory("acme/tiny-mistral@main", tmp_path, "finetune.init_from", cache) == snapshot
    for missing in ("acme/nothing-here", "acme/tiny-mistral@v9"):
        with pytest.raises(CheckpointError, match=r"^finetune.init_from: acme/.* local Hugging Face cache") as err:
            model_directory(missing, tmp_path, "finetune.init_from", cache)
        assert "\n" not in str(err.value)
    (tmp_path / "models").mkdir()
    for local in ("models/none/here", "models/typo"):  # `models/` is here: a local path, never a hub id
        with pytest.raises(CheckpointError, match=r"not a Hugging Face model directory \(run the pretrain stage"):
            model_directory(local, tmp_path, "finetune.init_from", cache)

    brought = {"init_from": "acme/tiny-mistral", **FINETUNE}
    root = copy_workspace(pretrained_workspace, tmp_path / "ws", finetune=brought)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["lmcycle", "stage", "finetune"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert FEATURES["mistral"] in proc.stderr
    assert json.loads((root / "models/finetune/hf/config.json").read_text())["model_type"] == "mistral"

    unknown = copy_workspace(pretrained_workspace, tmp_path / "ws2", finetune={"init_from": "acme/unknown"})
    proc = subprocess.run(["lmcycle", "stage", "finetune"], cwd=unknown, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: finetune.init_from: acme/unknown is not a Hugging Face model directory, nor a")
    assert not (unknown / "models/finetune").exists()
