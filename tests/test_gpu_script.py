"""bench/gpu_train.py, the prepared GPU throughput check, runs lmcore's training loop with nothing but torch, tqdm
and lmcore: here on CPU with a small model, every other dependency of the project made unimportable."""

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
sys.argv = ["gpu_train"] + sys.argv[1:]
runpy.run_path("bench/gpu_train.py", run_name="__main__")
"""


def test_gpu_script_trains_with_torch_and_lmcore_alone() -> None:
    args = ["--device", "cpu", "--preset", "cpu-demo", "--vocab", "512", "--batch", "2", "--seq", "64"]
    args += ["--steps", "6", "--log-every", "2", "--no-compile"]
    done = subprocess.run(
        [sys.executable, "-c", RUN, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    summary = re.search(r"CPU: cpu-demo \(.*\), batch 2×64, compile False, dtype fp32: ([\d,]+) tok/s", done.stdout)
    assert summary and int(summary.group(1).replace(",", "")) > 0
    assert "gpu_train: step 6/6" in done.stderr
