"""The cost of pinning CPU numerics: training steps with MKL's and PyTorch's own kernel choice pinned, against the
default (each picks its kernels per CPU), measured in the same run.

Bit-identical training across x86-64 machines needs every kernel to take the same code path on each of them:
MKL's conditional numerical reproducibility (`MKL_CBWR=AVX2`) for the matrix products, and `ATEN_CPU_CAPABILITY=avx2`
for PyTorch's own vectorised kernels. Both are read when the libraries load, so every setting runs in a child
process of its own; rounds alternate the settings (A B C A B C …) so drift of a shared machine hits all alike.
Each child trains lmcore's Transformer for `--steps` optimizer steps from the same seed and reports the CPU time
per step and a digest of the final weights, which also shows whether a setting changes the numbers on this
machine. Prints medians and ratios against the default; asserts nothing about time.

    python bench/pinned_numerics.py [--preset cpu-demo] [--batch 8] [--seq 128] [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SETTINGS = {
    "default": {},
    "MKL_CBWR=AVX2": {"MKL_CBWR": "AVX2"},
    "MKL_CBWR=AVX2 + ATEN_CPU_CAPABILITY=avx2": {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def child(preset: str, batch: int, seq: int, steps: int) -> None:
    """Train and print one JSON line: CPU seconds per step (after one warm-up step) and the weights' digest."""
    import time

    import torch

    from lmcore.model import PRESETS, ModelConfig, Transformer
    from lmcore.train.loop import lm_loss
    from lmcore.train.resume import state_digest

    torch.manual_seed(0)
    config = ModelConfig(**{**PRESETS[preset], "vocab_size": 4096, "context_length": seq})
    model = Transformer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, 4096, (batch, seq + 1), generator=generator)
        start = time.process_time()
        loss = lm_loss(model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step pays one-off allocation
            times.append(time.process_time() - start)
    print(json.dumps({"step_s": statistics.median(times), "digest": state_digest(model.state_dict())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.preset, args.batch, args.seq, args.steps)
        return
    base = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY")}
    command = [sys.executable, __file__, "--child", "--preset", args.preset]
    command += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, extra in SETTINGS.items():
            out = subprocess.run(command, env={**base, **extra}, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    reference = statistics.median(r["step_s"] for r in results["default"])
    digest = results["default"][0]["digest"]
    print(f"{args.preset}, batch {args.batch} × {args.seq} tokens, CPU seconds per training step (median of rounds)")
    for name, rows in results.items():
        step_s = statistics.median(r["step_s"] for r in rows)
        same = "same weights as default" if {r["digest"] for r in rows} == {digest} else "OTHER weights than default"
        print(f"  {name:<42} {step_s:8.4f} s  {step_s / reference:5.2f}× default   {same}")


if __name__ == "__main__":
    main()
