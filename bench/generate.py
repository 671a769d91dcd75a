"""Decoding speed on CPU: lmcore with its KV cache against transformers' `generate` and lmcore without a cache.

One set of weights (the cpu-demo preset, context stretched to fit prompt + new tokens) in both libraries; greedy
decoding of a fixed number of new tokens (no EOS), so every run does the same work. Runs alternate in one process
and the figures are medians; also checks that both libraries produced the same tokens. Prints ratios; asserts
nothing about time.

    python bench/generate.py [--new-tokens 256] [--prompt-tokens 32] [--batch 1] [--rounds 3] [--threads N]
        [--clock wall|cpu]

On a machine shared with other work, `--threads 1 --clock cpu` compares the CPU time each run costs, which
other processes disturb far less than wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmcore.engine import SamplingConfig, generate
from lmcore.export import hf_config_dict, to_hf_state_dict
from lmcore.model import PRESETS, ModelConfig, Transformer


def build_pair(config: ModelConfig) -> tuple[Transformer, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = Transformer(config).eval()
    theirs = LlamaForCausalLM(LlamaConfig.from_dict(hf_config_dict(config))).eval()
    theirs.model.load_state_dict({k.removeprefix("model."): v for k, v in to_hf_state_dict(ours).items()})
    theirs.generation_config.eos_token_id = None  # decode the full budget in both libraries
    theirs.generation_config.pad_token_id = 0
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch default")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    config = ModelConfig(vocab_size=args.vocab, **PRESETS[args.preset])
    config.context_length = max(config.context_length, args.prompt_tokens + args.new_tokens)
    ours, theirs = build_pair(config)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    rows = prompt.tolist()
    cached = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0)
    uncached = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0, use_cache=False)
    results: dict[str, list[list[int]]] = {}

    def run_hf() -> None:
        with torch.inference_mode():
            out = theirs.generate(prompt, do_sample=False, max_new_tokens=args.new_tokens, attention_mask=None)
        results["hf"] = out[:, args.prompt_tokens :].tolist()

    runs = {
        "lmcore (KV cache)": lambda: results.__setitem__("lmcore", generate(ours, rows, cached)),
        "hf generate": run_hf,
        "lmcore (no cache)": lambda: results.__setitem__("nocache", generate(ours, rows, uncached)),
    }
    for run in runs.values():  # warm-up
        run()
    same = results["lmcore"] == results["hf"] == results["nocache"]
    print(
        f"threads {torch.get_num_threads()}  {args.preset}: {config.num_params() / 1e6:.2f}M params, batch "
        f"{args.batch}, prompt {args.prompt_tokens} + {args.new_tokens} new tokens, greedy; "
        f"identical tokens in all three: {same}"
    )

    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, run in runs.items():
            start = clock()
            run()
            rates[name].append(args.batch * args.new_tokens / (clock() - start))
        print(f"round {round_ + 1}: " + "  ".join(f"{n} {r[-1]:,.0f} tok/s" for n, r in rates.items()))
    median = {name: statistics.median(r) for name, r in rates.items()}
    ours_rate = median["lmcore (KV cache)"]
    paired = statistics.median(a / b for a, b in zip(rates["lmcore (KV cache)"], rates["hf generate"], strict=True))
    print(
        f"lmcore {ours_rate:,.0f} tok/s  hf {median['hf generate']:,.0f} tok/s  "
        f"ratio lmcore/hf {ours_rate / median['hf generate']:.2f}× (median of per-round ratios {paired:.2f}×; "
        "goal ≥ 1.5×)  "
        f"cache speed-up {ours_rate / median['lmcore (no cache)']:.2f}×"
    )


if __name__ == "__main__":
    main()
