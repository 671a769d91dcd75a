"""Evaluation speed on a GPU in bf16 against the CPU in fp32, on the same model: held-out loss and batched greedy
generation, the two things the evaluate stage spends its time on (`evaluate.device`, `evaluate.dtype`).

One randomly initialised model (scoring speed does not depend on what the weights are) is copied to the CPU in fp32
and to the GPU with bf16 weights (fp32 on a GPU without bf16), as `lmcore.device.resolve("auto", "auto")` places it
on a CUDA machine. Each
side then runs the same work, timed after one untimed warm-up round:
- loss: `Transformer.token_losses` (what `lmcore.metrics.evaluate_lm` sums) over `--loss-batches` batches of
  `--batch`×`--seq` random tokens, under no_grad;
- generation: `lmcore.engine.generate`, greedy, `--prompts` prompts of `--prompt-len` tokens decoded together
  with the KV cache for `--new-tokens` tokens each (no stop token, so every row runs the whole budget).
It prints tokens/s for each side, the GPU/CPU ratios, and how close the bf16 numbers are (loss difference, share of
greedy tokens equal to the fp32 ones). It needs torch and lmcore's model and engine only (no pydantic, MLflow,
Prefect, DVC or transformers), so it runs on a bare GPU machine from a checkout:

    PYTHONPATH=. python bench/gpu_eval.py [--preset gpt2-124m] [--batch 8] [--seq 512] [--loss-batches 4]
        [--prompts 16] [--prompt-len 64] [--new-tokens 64] [--cpu-only]

Without CUDA it says so in one line and exits 0; `--cpu-only --preset cpu-demo` runs the CPU side anywhere (the
smoke test). The CPU side of the 124M preset takes minutes on a few cores: shrink the work with the flags above.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from lmcore.engine import SamplingConfig, generate
from lmcore.model import PRESETS, ModelConfig, Transformer


def timed(device: str, work: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of `work`, with the GPU's queue drained on both sides of the clock."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def losses(model: Transformer, batches: torch.Tensor) -> float:
    """Mean next-token loss over (n, B, T + 1) token windows, as the evaluate stage reads a split."""
    device = model.lm_head.weight.device
    total, count = 0.0, 0
    with torch.no_grad():
        for window in batches:
            window = window.to(device)
            nll = model.token_losses(window[:, :-1], window[:, 1:])
            total += float(nll.double().sum())
            count += nll.numel()
    return total / count


def run_side(model: Transformer, device: str, args: argparse.Namespace, data: dict) -> dict[str, object]:
    """Loss and greedy generation on one device, warm-up round first; tokens/s of each."""
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    prompts = data["prompts"].tolist()
    losses(model, data["loss"][:1])  # warm-up: CUDA context, cuBLAS handles, allocator
    generate(model, prompts[:2], SamplingConfig(max_new_tokens=2, temperature=0.0))
    loss_s, loss = timed(device, lambda: losses(model, data["loss"]))
    gen_s, tokens = timed(device, lambda: generate(model, prompts, cfg))
    scored = data["loss"].shape[0] * data["loss"].shape[1] * (data["loss"].shape[2] - 1)
    generated = sum(len(row) for row in tokens)
    return {
        "loss": loss,
        "tokens": tokens,
        "loss_tok_s": scored / loss_s,
        "gen_tok_s": generated / gen_s,
        "loss_s": loss_s,
        "gen_s": gen_s,
    }


def report(name: str, side: dict[str, object]) -> None:
    print(
        f"{name}: held-out loss {side['loss_tok_s']:,.0f} tok/s ({side['loss_s']:.2f} s), "
        f"greedy generation {side['gen_tok_s']:,.0f} tok/s ({side['gen_s']:.2f} s)"
    )


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy decodings chose the same token (they drift apart after the first miss)."""
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=False)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=50_304)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--loss-batches", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cpu-only", action="store_true", help="time the CPU side only (runs without CUDA)")
    args = parser.parse_args()
    if not args.cpu_only and not torch.cuda.is_available():
        print("gpu_eval: skipped, no CUDA device here (--cpu-only times the CPU side)")
        return

    config = ModelConfig(vocab_size=args.vocab, **PRESETS[args.preset])
    config.context_length = max(args.seq, args.prompt_len + args.new_tokens)
    torch.manual_seed(0)
    cpu_model = Transformer(config).eval()
    generator = torch.Generator().manual_seed(0)
    data = {
        "loss": torch.randint(0, args.vocab, (args.loss_batches, args.batch, args.seq + 1), generator=generator),
        "prompts": torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=generator),
    }
    work = (
        f"{args.preset} ({config.num_params() / 1e6:.1f}M params): loss on {args.loss_batches}×{args.batch}×"
        f"{args.seq} tokens, greedy {args.prompts} prompts × {args.prompt_len} + {args.new_tokens} new tokens"
    )
    print(f"gpu_eval: {work}; CPU {torch.get_num_threads()} threads")
    cpu = run_side(cpu_model, "cpu", args, data)
    report("CPU fp32", cpu)
    if args.cpu_only:
        return

    device = f"cuda:{torch.cuda.current_device()}"
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32  # lmcore.device's `auto`
    gpu_model = copy.deepcopy(cpu_model).to(device=device, dtype=dtype).eval()
    gpu = run_side(gpu_model, device, args, data)
    report(f"{torch.cuda.get_device_name(device)} {str(dtype).removeprefix('torch.')}", gpu)
    print(
        f"GPU/CPU: held-out loss ×{gpu['loss_tok_s'] / cpu['loss_tok_s']:.1f}, "
        f"greedy generation ×{gpu['gen_tok_s'] / cpu['gen_tok_s']:.1f}"
    )
    print(
        f"closeness: loss {gpu['loss']:.5f} vs {cpu['loss']:.5f} (|Δ| {abs(gpu['loss'] - cpu['loss']):.2e}), "
        f"greedy tokens equal at {100 * agreement(gpu['tokens'], cpu['tokens']):.1f}% of positions"
    )


if __name__ == "__main__":
    main()
