"""Training throughput on CPU: lmcore's Transformer against transformers' LlamaForCausalLM, same weights.

Both models get the same config (the cpu-demo preset by default), the same batch, fp32, the same fused AdamW (what
lmcore.train uses) and the same threads. "lmcore" is the step as the pretrain stage runs it by default: the
transformer blocks compiled, the fused loss eager (`pretrain.compile: auto`, lmcore/train/compile.py), and on an
even thread count each micro-batch split into 2 parts that run at once on threads of their own
(`pretrain.batch_split: auto`, lmcore/train/threadsplit.py; `--split 1` turns it off). When split, "lmcore unsplit" is
timed too; "lmcore eager" is uncompiled and unsplit. `--compile-hf` also times HF under torch.compile and
`--split-hf` HF split the same way, so each of lmcore's gains can be set against the same gain given to HF. Runs
alternate A B A B … in one process so drift of a shared, noisy machine hits all alike; the figures are medians over
rounds. Also measured in the same run: the FLOP/s of one large fp32 matmul (the practical ceiling of these cores)
and the share of it that lmcore's training step achieves (ModelConfig.flops_per_token × tokens/s). Prints ratios;
asserts nothing about time. Compilation time is printed, not counted: it is paid once per run (and mostly cached on
disk after the first).

    python bench/train_throughput.py [--preset cpu-demo] [--batch 16] [--seq 256] [--rounds 3] [--steps 10]
        [--threads N] [--clock wall|cpu] [--compile auto|true|false] [--split auto|N] [--compile-hf] [--split-hf]

On a machine shared with other work, `--threads 1 --clock cpu` compares the CPU time each step costs, which
other processes disturb far less than wall time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmcore.export import hf_config_dict, to_hf_state_dict
from lmcore.kernels import use_fast_kernels
from lmcore.model import PRESETS, ModelConfig, Transformer
from lmcore.train.compile import compile_choice, compile_model
from lmcore.train.threadsplit import SplitBackward, split_choice


def build_pair(config: ModelConfig) -> tuple[Transformer, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = use_fast_kernels(Transformer(config))  # as the training loop trains it
    hf_config = LlamaConfig.from_dict(hf_config_dict(config))
    hf_config._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_config)
    theirs.model.load_state_dict({k.removeprefix("model."): v for k, v in to_hf_state_dict(ours).items()})
    return ours.train(), theirs.train()


Batch = dict[str, torch.Tensor]


def make_step(
    model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor], batch: Batch, parts: int = 1
):
    """One optimizer step on the batch: plain backward, or (parts > 1) as lmcore.train splits it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    split = SplitBackward(parts, torch.get_num_threads(), compiled=True) if parts > 1 else None

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if split is not None:
            loss = split(model, batch, loss_fn, 1.0)
        else:
            loss = loss_fn(model, batch)
            loss.backward()
        optimizer.step()
        return loss.item()

    return step


def lmcore_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch["input_ids"], batch["targets"])


def hf_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    # targets are already shifted: handed over as shift_labels, both models do the same work
    return model(input_ids=batch["input_ids"], labels=batch["targets"], shift_labels=batch["targets"]).loss


def timed(fn: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(repeats):
        fn()
    return (clock() - start) / repeats


def matmul_flops(clock: Callable[[], float], size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    return 2 * size**3 / timed(lambda: a @ b, repeats, clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch default")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: this process's CPU time")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto", help="as pretrain.compile")
    parser.add_argument("--split", default="auto", help="as pretrain.batch_split: auto (default), 1 or N parts")
    parser.add_argument("--compile-hf", action="store_true", help="also time torch.compile(LlamaForCausalLM)")
    parser.add_argument("--split-hf", action="store_true", help="also time LlamaForCausalLM split as lmcore's step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    config = ModelConfig(vocab_size=args.vocab, **PRESETS[args.preset])
    config.context_length = max(config.context_length, args.seq)
    ours, theirs = build_pair(config)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": data[:, :-1].contiguous(), "targets": data[:, 1:].contiguous()}
    setting = {"auto": "auto", "true": True, "false": False}[args.compile]
    compiling, how = compile_choice(setting, "cpu", "bench")  # errors read "bench.compile: …"
    threads = torch.get_num_threads()
    split_setting = "auto" if args.split == "auto" else int(args.split)
    parts, split_how = split_choice(
        split_setting,
        device_type="cpu",
        threads=threads,
        rows=args.batch,
        tokens=lambda: args.batch * args.seq,
        distributed=False,
        model=ours,
        section="bench",
    )
    print(f"lmcore: {how or 'eager (--compile false)'}; {split_how or 'one part (unsplit)'}")

    def copy_of(model: torch.nn.Module, compile_threads: int | None) -> torch.nn.Module:
        """The same weights; compiled (unless None or --compile false) for that many threads (0: the caller's)."""
        twin = copy.deepcopy(model)
        if compile_threads is not None and compiling:
            compile_model(twin, twin, "cpu", compile_threads)
        return twin

    # Each variant its own copy of the same weights; a split model's kernels are compiled for its part's threads.
    steps = {
        "lmcore": make_step(copy_of(ours, threads // parts), lmcore_loss, batch, parts),
        "hf": make_step(theirs, hf_loss, batch),
    }
    if parts > 1 and compiling:
        steps["lmcore unsplit"] = make_step(copy_of(ours, 0), lmcore_loss, batch)
    if parts > 1 or compiling:
        steps["lmcore eager"] = make_step(copy_of(ours, None), lmcore_loss, batch)
    if args.compile_hf:
        hf_model = copy.deepcopy(theirs)
        hf_compiled = torch.compile(hf_model, options={"cpp_wrapper": True})  # as lmcore compiles on CPU
        steps["hf compiled"] = make_step(hf_compiled, hf_loss, batch)
    if args.split_hf and parts > 1:
        steps["hf split"] = make_step(copy.deepcopy(theirs), hf_loss, batch, parts)
    with torch.no_grad():  # the first loss every variant should report
        logits = ours(batch["input_ids"]).flatten(0, 1)
        reference = F.cross_entropy(logits, batch["targets"].flatten()).item()
    first = {}
    for name, step in steps.items():  # same weights, same batch: the same first loss
        start = time.perf_counter()
        first[name] = step()
        if "compiled" in name or (name in ("lmcore", "lmcore unsplit") and compiling):
            print(f"{name}: first step {time.perf_counter() - start:.1f} s (with compilation)")
    print(
        f"threads {torch.get_num_threads()}, clock {args.clock}  {args.preset}: {config.num_params() / 1e6:.2f}M "
        f"params, batch {args.batch}×{args.seq}, first loss "
        + " ".join(f"{n} {v:.6f}" for n, v in first.items())
        + f" (reference {reference:.6f})"
    )
    for step in steps.values():
        for _ in range(args.warmup - 1):
            step()

    tokens = args.batch * args.seq
    rates: dict[str, list[float]] = {name: [] for name in steps}
    ceilings: list[float] = []
    for round_ in range(args.rounds):
        ceilings.append(matmul_flops(clock))
        for name, step in steps.items():
            rates[name].append(tokens / timed(step, args.steps, clock))
        print(
            f"round {round_ + 1}: "
            + "  ".join(f"{n} {r[-1]:,.0f} tok/s" for n, r in rates.items())
            + f"  matmul {ceilings[-1] / 1e9:.1f} GFLOP/s"
        )

    median = {name: statistics.median(r) for name, r in rates.items()}

    def against(name: str, peer: str) -> str:
        paired = statistics.median(a / b for a, b in zip(rates[name], rates[peer], strict=True))
        return f"{median[name] / median[peer]:.2f}× {peer} (median of per-round ratios {paired:.2f}×)"

    print(
        f"lmcore {median['lmcore']:,.0f} tok/s  hf {median['hf']:,.0f} tok/s  "
        f"lmcore = {against('lmcore', 'hf')}; goal ≥ 1.3×"
    )
    for name in ("lmcore unsplit", "lmcore eager"):
        if name in rates:
            print(f"{name} {median[name]:,.0f} tok/s = {against(name, 'hf')}")
    for name in ("hf compiled", "hf split"):
        if name in rates:
            print(f"{name} {median[name]:,.0f} tok/s; lmcore = {against('lmcore', name)}")
    ceiling = statistics.median(ceilings)
    achieved = config.flops_per_token(args.seq) * median["lmcore"]
    print(
        f"lmcore achieves {achieved / 1e9:.1f} GFLOP/s = {achieved / ceiling:.0%} of a 2048³ fp32 matmul "
        f"({ceiling / 1e9:.1f} GFLOP/s) on the same threads (goal ≥ 60%)"
    )


if __name__ == "__main__":
    main()
