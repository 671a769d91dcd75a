"""Fine-tune steps/s on CPU per Llama-family architecture: lmcore's native path against transformers' own class.

For each architecture (plain Llama, Llama with llama3 RoPE scaling, Qwen2 with q/k/v biases and a sliding window
on its upper layers, Mistral with a sliding window shorter than the sequence) a random model is built by
transformers, saved with save_pretrained, and read back by `lmcore.export.import_hf` as the finetune stage reads
`finetune.init_from`. Both models then train on the same batches: fp32, fused AdamW, the same threads; lmcore
with its hand-written gradients (`use_fast_kernels`, as the training loop applies them), eager (the finetune
stage's default, `finetune.compile: false`) and whole (no batch_split); transformers' `…ForCausalLM` with SDPA
attention. Rounds alternate A B A B … in one process so drift of a shared machine hits both alike; figures are
medians over rounds. The first losses are printed side by side (the same weights and batch give the same loss).
Asserts nothing about time.

    python bench/finetune_archs.py [--d-model 256] [--layers 4] [--seq 256] [--batch 8] [--rounds 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmcore.export import import_hf, native_features
from lmcore.kernels import use_fast_kernels


def architectures(seq: int) -> dict[str, tuple[str, dict]]:
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": seq // 4,
    }
    return {
        "llama": ("LlamaConfig", {}),
        "llama3-rope": ("LlamaConfig", {"rope_parameters": llama3}),
        "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": seq // 2, "max_window_layers": 2}),
        "mistral": ("MistralConfig", {"sliding_window": seq // 2}),
    }


def build_pair(name: str, config_class: str, extra: dict, args, root: Path):
    import transformers

    config = getattr(transformers, config_class)(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
        **extra,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-zero biases, as a trained Qwen2 has
        for pname, p in theirs.named_parameters():
            if pname.endswith(".bias"):
                p.normal_(0, 0.1)
    theirs.save_pretrained(root / name)
    ours, mcfg = import_hf(root / name)
    return use_fast_kernels(ours).train(), theirs.train(), native_features(mcfg)


def make_step(model: torch.nn.Module, loss_fn: Callable, batches: list[dict]) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    index = [0]

    def step() -> float:
        batch = batches[index[0] % len(batches)]
        index[0] += 1
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def lmcore_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], batch["targets"])


def hf_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    # targets already shifted: handed over as shift_labels, both models do the same work
    return model(input_ids=batch["input_ids"], labels=batch["targets"], shift_labels=batch["targets"]).loss


def timed(step: Callable[[], float], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model per round")
    parser.add_argument("--threads", type=int, default=0, help="0 = torch default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
        batches.append({"input_ids": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()})
    print(
        f"d_model {args.d_model}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"{'architecture':<13} {'lmcore steps/s':>14} {'transformers':>13} {'ratio':>6}  first loss (lmcore / hf)")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config_class, extra) in architectures(args.seq).items():
            ours, theirs, features = build_pair(name, config_class, extra, args, Path(tmp))
            steps = {"lmcore": make_step(ours, lmcore_loss, batches), "hf": make_step(theirs, hf_loss, batches)}
            first = {label: step() for label, step in steps.items()}  # also the warm-up
            times: dict[str, list[float]] = {label: [] for label in steps}
            for _ in range(args.rounds):
                for label, step in steps.items():
                    times[label].append(timed(step, args.steps))
            rate = {label: 1 / statistics.median(t) for label, t in times.items()}
            print(
                f"{name:<13} {rate['lmcore']:>14.2f} {rate['hf']:>13.2f} {rate['lmcore'] / rate['hf']:>5.2f}x  "
                f"{first['lmcore']:.5f} / {first['hf']:.5f}   ({features})"
            )


if __name__ == "__main__":
    main()
