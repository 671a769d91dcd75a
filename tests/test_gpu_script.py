"""bench/gpu_train.py and bench/gpu_eval.py, the prepared GPU checks, run lmcore's training loop and its scoring
and decoding with nothing but torch, tqdm and lmcore: here on CPU with a small model, every other dependency of the
project made unimportable."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

BLOCKED = ("pydantic", "yaml", "mlflow", "prefect", "dvc", "transformers", "datasets", "peft", "safetensors")

RUN = f"""
import runpy, sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # importing it now raises ImportError
script = sys.argv[1]
sys.argv = [script] + sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", RUN, script, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_gpu_script_trains_with_torch_and_lmcore_alone() -> None:
    args = ["--device", "cpu", "--preset", "cpu-demo", "--vocab", "512", "--batch", "2", "--seq", "64"]
    args += ["--steps", "6", "--log-every", "2", "--no-compile"]
    done = bench("bench/gpu_train.py", *args)
    assert done.returncode == 0, done.stderr
    summary = re.search(r"CPU: cpu-demo \(.*\), batch 2×64, compile False, dtype fp32: ([\d,]+) tok/s", done.stdout)
    assert summary and int(summary.group(1).replace(",", "")) > 0
    assert "gpu_train: step 6/6" in done.stderr


def test_gpu_eval_script_times_the_cpu_side_with_torch_and_lmcore_alone() -> None:
    args = ["--cpu-only", "--preset", "cpu-demo", "--vocab", "512", "--batch", "2", "--seq", "64"]
    args += ["--loss-batches", "1", "--prompts", "2", "--prompt-len", "8", "--new-tokens", "4"]
    done = bench("bench/gpu_eval.py", *args)
    assert done.returncode == 0, done.stderr
    line = re.search(r"CPU fp32: held-out loss ([\d,]+) tok/s .*, greedy generation ([\d,]+) tok/s", done.stdout)
    assert line and all(int(g.replace(",", "")) > 0 for g in line.groups()), done.stdout
    if not torch_cuda_available():
        skipped = bench("bench/gpu_eval.py")
        assert skipped.returncode == 0
        assert skipped.stdout.splitlines() == ["gpu_eval: skipped, no CUDA device here (--cpu-only times the CPU side)"]


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
