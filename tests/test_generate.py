"""Sampling with the KV cache: greedy equals transformers' greedy on the exported model, the cache changes no
token, seeds reproduce, filters mean what transformers' processors mean, stops and the context limit hold, text
streams whole characters, and `lmcycle generate` works end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import lmcycle, tiny_model

from lmcore.engine import SamplingConfig, generate, next_token, stream_tokens
from lmcore.generate import IncrementalDecoder, encode_prompt, generate_text, load_model, stop_tokens

PROMPT = [1, 47, 84, 267, 305, 77]
OTHER = [1, 62, 99, 13]


def greedy(max_new_tokens: int = 20, **kwargs) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, **kwargs)


def test_greedy_equals_transformers_generate(tiny_hf_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    for prompt in (PROMPT, OTHER):
        expected = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=30, eos_token_id=None, pad_token_id=0
        )
        assert generate(tiny_model(), [prompt], greedy(30)) == [expected[0, len(prompt) :].tolist()]


def test_cache_changes_no_token() -> None:
    model = tiny_model()
    for cfg in (greedy(25), SamplingConfig(max_new_tokens=25, top_p=0.9, seed=3, num_samples=2)):
        uncached = SamplingConfig(**{**cfg.__dict__, "use_cache": False})
        assert generate(model, [PROMPT, OTHER], cfg) == generate(model, [PROMPT, OTHER], uncached)


def test_left_padded_batch_equals_prompts_one_by_one() -> None:
    model = tiny_model()
    batch = generate(model, [PROMPT, OTHER], greedy(15))
    assert batch == [generate(model, [p], greedy(15))[0] for p in (PROMPT, OTHER)]


def test_seed_reproduces_and_samples_differ() -> None:
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=50, seed=7, num_samples=3)
    first = generate(model, [PROMPT], cfg)
    assert first == generate(model, [PROMPT], cfg)
    assert len(first) == 3 and len({tuple(s) for s in first}) > 1
    assert first != generate(model, [PROMPT], SamplingConfig(**{**cfg.__dict__, "seed": 8}))


def test_top_k_one_is_greedy() -> None:
    model = tiny_model()
    assert generate(model, [PROMPT], SamplingConfig(max_new_tokens=20, top_k=1, seed=0)) == generate(
        model, [PROMPT], greedy(20)
    )


def test_logits_processing_matches_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor as Penalty
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = logits.clone()
    for processor in (
        Penalty(1.3),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
    ):
        expected = processor(ids, expected)
    allowed = torch.isfinite(expected)
    for seed in range(20):  # every draw lands among the tokens transformers keeps
        token = next_token(logits, ids, cfg, torch.Generator().manual_seed(seed))
        assert allowed[torch.arange(4), token].all()
    penalised = next_token(logits, ids, SamplingConfig(temperature=0, repetition_penalty=1.3), None)
    assert torch.equal(penalised, Penalty(1.3)(ids, logits.clone()).argmax(-1))


def test_stop_tokens_end_a_row() -> None:
    model = tiny_model()
    full = generate(model, [PROMPT], greedy(20))[0]
    stop = full[3]
    cut = full[: full.index(stop)]
    assert generate(model, [PROMPT], greedy(20, stop_token_ids=(stop,))) == [cut]
    steps = list(stream_tokens(model, [PROMPT], greedy(20, stop_token_ids=(stop,))))
    assert len(steps) == len(cut) + 1  # the loop ends once every row has stopped


def test_generation_never_runs_past_the_context() -> None:
    model = tiny_model()  # context 64
    long_prompt = (PROMPT * 20)[:100]
    out = generate(model, [long_prompt], greedy(20))[0]
    assert len(out) == 20  # the prompt keeps its last 44 tokens
    assert out == generate(model, [long_prompt[-44:]], greedy(20))[0]
    assert len(generate(model, [PROMPT], greedy(500))[0]) == 64 - len(PROMPT)


def test_incremental_decoding_streams_whole_characters(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text = "In the beginning — Ἐν ἀρχῇ, 太初有道 ✓ 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # the non-ASCII characters span several byte-level tokens
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_generate_text_streams_what_it_returns(tiny_hf_dir: Path) -> None:
    model, tokenizer = load_model(tiny_hf_dir)
    streamed: dict[int, str] = {0: "", 1: ""}

    def on_text(sample: int, piece: str) -> None:
        streamed[sample] += piece

    cfg = SamplingConfig(max_new_tokens=12, seed=0, num_samples=2)
    texts = generate_text(model, tokenizer, "And God said", cfg, on_text=on_text)
    assert texts == [streamed[0], streamed[1]] and all(texts)
    (chat,) = generate_text(model, tokenizer, "Hello", greedy(12), chat=True)
    stop = stop_tokens(tokenizer, chat=True)
    (ids,) = generate(model, [encode_prompt(tokenizer, "Hello", chat=True)], greedy(12, stop_token_ids=stop))
    assert chat.strip() and 1 <= len(ids) <= 12  # an answer, within the token cap
    assert tokenizer.decode(ids, skip_special_tokens=True) == chat


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny_model(), [[]], greedy())


def test_cli_streams_a_sample(tiny_hf_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_hf_dir), "--max-new-tokens", "8", "--seed", "1"]
    one = lmcycle("generate", *args, "--prompt", "In the beginning", cwd=tmp_path)
    assert one.stdout.startswith("In the beginning") and len(one.stdout.strip()) > len("In the beginning")
    several = lmcycle("generate", *args, "--prompt", "Hello", "--chat", "--num-samples", "2", cwd=tmp_path)
    assert several.stdout.count("--- sample") == 2
    missing = lmcycle("generate", "--model", str(tmp_path / "absent"), "--prompt", "x", cwd=tmp_path, check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "absent" in missing.stderr


def test_sampling_runs_without_dropout_and_restores_the_mode() -> None:
    model = tiny_model(dropout=0.5).train()
    assert generate(model, [PROMPT], greedy(10)) == generate(model, [PROMPT], greedy(10))
    assert model.training
