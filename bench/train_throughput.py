"""Training throughput on CPU: lmcore's Transformer against transformers' LlamaForCausalLM, same weights.

Both models get the same config (the cpu-demo preset by default), the same batch, fp32, the same fused AdamW
(what lmcore.train uses) and the same threads. "lmcore" is the step as the pretrain stage runs it by default
(`pretrain.compile: auto`: the transformer blocks compiled, the fused loss eager; see lmcore/train/compile.py);
"lmcore eager" is the same model uncompiled. `--compile-hf` also times HF under torch.compile, so the comparison
can be made compiled against compiled. Runs alternate A B A B … in one process so drift of a shared, noisy
machine hits all alike; the figures are medians over rounds. Also measured in the same run: the FLOP/s of one
large fp32 matmul (the practical ceiling of these cores) and the share of it that lmcore's training step achieves
(ModelConfig.flops_per_token × tokens/s). Prints ratios; asserts nothing about time. Compilation time is
printed, not counted: it is paid once per run (and mostly cached on disk after the first).

    python bench/train_throughput.py [--preset cpu-demo] [--batch 16] [--seq 256] [--rounds 3] [--steps 10]
        [--threads N] [--clock wall|cpu] [--compile auto|true|false] [--compile-hf]

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
from lmcore.model import PRESETS, ModelConfig, Transformer
from lmcore.train.compile import compile_choice, compile_model


def build_pair(config: ModelConfig) -> tuple[Transformer, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = Transformer(config)
    hf_config = LlamaConfig.from_dict(hf_config_dict(config))
    hf_config._attn_implementation = "sdpa"
    theirs = LlamaForCausalLM(hf_config)
    theirs.model.load_state_dict({k.removeprefix("model."): v for k, v in to_hf_state_dict(ours).items()})
    return ours.train(), theirs.train()


def make_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


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
    parser.add_argument("--compile-hf", action="store_true", help="also time torch.compile(LlamaForCausalLM)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    config = ModelConfig(vocab_size=args.vocab, **PRESETS[args.preset])
    config.context_length = max(config.context_length, args.seq)
    ours, theirs = build_pair(config)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    setting = {"auto": "auto", "true": True, "false": False}[args.compile]
    compiling, how = compile_choice(setting, "cpu", "bench")  # errors read "bench.compile: …"
    print(f"lmcore: {how or 'eager (--compile false)'}")
    eager_model = Transformer(config).train()
    eager_model.load_state_dict(ours.state_dict())
    if compiling:
        compile_model(ours, ours, "cpu")
    steps = {
        "lmcore": make_step(ours, lambda: ours(inputs, targets)),
        # targets are already shifted: handed over as shift_labels, both models do the same work
        "hf": make_step(theirs, lambda: theirs(input_ids=inputs, labels=targets, shift_labels=targets).loss),
    }
    if compiling:
        steps["lmcore eager"] = make_step(eager_model, lambda: eager_model(inputs, targets))
    if args.compile_hf:
        hf_model = copy.deepcopy(theirs)
        hf_compiled = torch.compile(hf_model, options={"cpp_wrapper": True})  # as lmcore compiles on CPU
        steps["hf compiled"] = make_step(
            hf_model, lambda: hf_compiled(input_ids=inputs, labels=targets, shift_labels=targets).loss
        )

    with torch.no_grad():
        reference = F.cross_entropy(eager_model(inputs).flatten(0, 1), targets.flatten()).item()
    first = {}
    for name, step in steps.items():  # same weights, same batch: the same first loss
        start = time.perf_counter()
        first[name] = step()
        if "compiled" in name or (name == "lmcore" and compiling):
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
    if "lmcore eager" in rates:
        print(f"lmcore eager {median['lmcore eager']:,.0f} tok/s = {against('lmcore eager', 'hf')}")
    if "hf compiled" in rates:
        print(f"hf compiled {median['hf compiled']:,.0f} tok/s; lmcore = {against('lmcore', 'hf compiled')}")
    ceiling = statistics.median(ceilings)
    achieved = config.flops_per_token(args.seq) * median["lmcore"]
    print(
        f"lmcore achieves {achieved / 1e9:.1f} GFLOP/s = {achieved / ceiling:.0%} of a 2048³ fp32 matmul "
        f"({ceiling / 1e9:.1f} GFLOP/s) on the same threads (goal ≥ 60%)"
    )


if __name__ == "__main__":
    main()
