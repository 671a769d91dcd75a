"""What the transformers fallback costs: fine-tune steps/s of one Llama model, native against forced through it.

The same weights (the cpu-demo preset, a 4,096-token vocabulary) run through lmcycle's one training loop
(`lmcore.train.loop.train`, the finetune defaults: batch 16, fp32 on CPU) twice: as lmcore's own Transformer
(`lmcore.export.import_hf`, its hand-written gradients) and as `LlamaForCausalLM` behind `lmcore.hfcausal.HFCausalLM`
(what an architecture lmcore does not run natively gets). Batches are SFT-shaped: `--tokens` positions per row,
every target trained. Runs alternate; the figures are medians of `--rounds`. Prints steps/s and the ratio; asserts
nothing about time.

    python bench/hf_fallback.py [--steps 6] [--rounds 3] [--tokens 256] [--batch 16] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmcore.export import export_hf
from lmcore.model import PRESETS, ModelConfig, Transformer


def llama_dir(root: Path, vocab: int) -> Path:
    """A Llama directory of the cpu-demo preset, with a byte-level tokenizer of `vocab` tokens to pair with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, **PRESETS["cpu-demo"]))
    tok = Tokenizer(models.BPE(vocab={chr(i): i for i in range(256)} | {"<pad>": 256}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")
    fast.save_pretrained(str(root / "tok"))
    return export_hf(model, root / "tok", root / "llama")


def steps_per_s(model: torch.nn.Module, steps: int, batch: int, tokens: int, vocab: int) -> float:
    from lmcore.finetune.sft import sft_loss
    from lmcore.lifecycle.config import FinetuneConfig
    from lmcore.train.distributed import DistEnv
    from lmcore.train.loop import train

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, tokens + 1), generator=gen)
    fixed = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    cfg = FinetuneConfig(steps=steps, batch_size=batch, warmup_steps=1, eval_every=10**6, log_every=10**6)
    start = time.perf_counter()
    train(model, lambda i: fixed, cfg, env=DistEnv(), seed=0, loss_fn=sft_loss, name="bench")
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lmcore.export import import_hf
    from lmcore.hfcausal import load_fallback

    with tempfile.TemporaryDirectory() as tmp:
        directory = llama_dir(Path(tmp), args.vocab)
        loaders = {
            "native": lambda: import_hf(directory)[0],
            "fallback": lambda: load_fallback(directory, "forced for the benchmark"),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, load in loaders.items():
                rates[name].append(steps_per_s(load(), args.steps, args.batch, args.tokens, args.vocab))
    median = {name: statistics.median(r) for name, r in rates.items()}
    shape = f"cpu-demo preset, batch {args.batch} x {args.tokens} tokens, {torch.get_num_threads()} threads"
    print(f"fine-tune steps/s ({shape}):")
    for name, rate in median.items():
        print(f"  {name:9s} {rate:.3f} steps/s  (rounds: {', '.join(f'{r:.3f}' for r in rates[name])})")
    print(f"  the fallback runs at {median['fallback'] / median['native']:.2f}x the native speed")


if __name__ == "__main__":
    main()
