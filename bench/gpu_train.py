"""GPU training throughput and MFU of lmcore's own training loop: the ~124M preset, bf16 autocast, torch.compile.

Runs `lmcore.train.loop.train`, the loop the pretrain stage runs, on random tokens (throughput does not depend on
what the tokens are) for a fixed number of steps, and prints tokens/s and MFU against the GPU's dense bf16 spec
peak (`lmcore.train.runtime.PEAK_BF16_TFLOPS`): the median over the log windows after the first, which holds the
compilation. It needs torch, tqdm and lmcore's model and train packages only (no pydantic, MLflow, Prefect, DVC or
transformers: the settings below are a plain namespace, which is all the loop reads), so it runs on a bare GPU
machine from a checkout:

    PYTHONPATH=. python bench/gpu_train.py [--preset gpt2-124m] [--batch 16] [--seq 1024] [--steps 60]
        [--vocab 50304] [--no-compile] [--device auto|cuda|cpu]

`--device cpu --preset cpu-demo --steps 4` is the smoke test that CI runs (tests/test_bench.py). The vocabulary
defaults to GPT-2's 50,257 rounded up to a multiple of 128 (50,304), as GPU tensor cores prefer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from types import SimpleNamespace

import torch

from lmcore.model import PRESETS, ModelConfig, Transformer
from lmcore.train.distributed import DistEnv
from lmcore.train.loop import TrainCallback, train
from lmcore.train.runtime import peak_flops


class Rates(TrainCallback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append(metrics)


def settings(args: argparse.Namespace) -> SimpleNamespace:
    """Every setting the loop reads, chosen for a throughput run: no evaluation, no checkpoints."""
    return SimpleNamespace(
        steps=args.steps,
        batch_size=args.batch,
        grad_accum=1,
        lr=6e-4,
        min_lr_ratio=0.1,
        warmup_steps=min(10, args.steps - 1),
        schedule="cosine",
        decay_fraction=0.2,
        weight_decay=0.1,
        beta1=0.9,
        beta2=0.95,
        grad_clip=1.0,
        eval_every=args.steps + 1,
        log_every=args.log_every,
        checkpoint_every=args.steps + 1,
        keep_checkpoints=1,
        compile=args.compile,
        device=args.device,
        dtype="auto",  # bf16 autocast on a GPU that has it, fp32 on CPU
        threads=0,
        batch_split="auto",  # as pretrain: a GPU runs the batch whole
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=50_304)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda, else skip")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        if args.device == "auto":  # `make bench` on a machine without a GPU
            print("gpu_train: skipped, no CUDA device here (--device cpu runs the smoke test)")
            return
        sys.exit("gpu_train: --device cuda, but no CUDA device is available here")
    args.device = "cpu" if args.device == "cpu" else "cuda"

    config = ModelConfig(vocab_size=args.vocab, **PRESETS[args.preset])
    config.context_length = args.seq
    env = DistEnv(device=args.device)
    torch.manual_seed(0)
    model = Transformer(config).to(env.device)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (64, args.batch, args.seq + 1), generator=generator)

    def batch_fn(index: int) -> dict[str, torch.Tensor]:
        window = tokens[index % len(tokens)].to(env.device, non_blocking=True)
        return {"input_ids": window[:, :-1], "targets": window[:, 1:]}

    rates = Rates()
    cfg = settings(args)
    train(
        model,
        batch_fn,
        cfg,
        env=env,
        seed=0,
        flops_per_token=config.flops_per_token(args.seq),
        callbacks=[rates],
        name="gpu_train",
    )
    steady = rates.rows[1:] or rates.rows
    tokens_per_s = statistics.median(row["tokens_per_s"] for row in steady)
    peak = peak_flops(env.device_type)
    device_name = torch.cuda.get_device_name() if env.device_type == "cuda" else "CPU"
    print(
        f"{device_name}: {args.preset} ({config.num_params() / 1e6:.1f}M params), batch {args.batch}×{args.seq}, "
        f"compile {args.compile}, dtype {'bf16' if env.device_type == 'cuda' else 'fp32'}: "
        f"{tokens_per_s:,.0f} tok/s, {config.flops_per_token(args.seq) * tokens_per_s / 1e12:.1f} TFLOP/s"
    )
    if peak:
        mfu = config.flops_per_token(args.seq) * tokens_per_s / peak[0]
        print(f"MFU {100 * mfu:.1f}% of the {peak[1]} (goal ≥ 50%)")
    else:
        print("MFU: no bf16 peak listed for this device")


if __name__ == "__main__":
    main()
