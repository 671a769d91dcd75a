"""Scoring on a chosen device and dtype: `auto` here (no CUDA) is cpu/float32 and changes no number, bf16 weights
score close to fp32, a CUDA request on a machine without one is refused in one line, and the gate's eval
fingerprint moves only when the device or dtype leave the cpu/float32 default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, copy_workspace, lmcycle

from lmcore.device import resolve
from lmcore.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")


@no_cuda
def test_auto_is_cpu_float32_here_and_a_cuda_request_is_refused_naming_the_key() -> None:
    where = resolve("auto", "auto", key="evaluate.device")
    assert (where.device, where.dtype_name, where.is_default) == ("cpu", "float32", True)
    assert str(resolve("cpu", "bfloat16")) == "cpu bfloat16" and not resolve("cpu", "bfloat16").is_default
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=r"^evaluate\.device: cuda(:1)? requested but this machine has no CUDA"):
            resolve(device, "auto", key="evaluate.device")
    with pytest.raises(ConfigError, match=r"^--dtype: 'half' is not a dtype"):
        resolve("cpu", "half", key="--device")


def test_params_refuse_an_unknown_device_and_dtype_naming_the_key(tmp_path: Path) -> None:
    from lmcore.lifecycle.config import load_config

    params = (REPO / "params.yaml").read_text()
    assert load_config(REPO / "params.yaml").evaluate.device == "cpu"  # left out of params.yaml: the default
    for key, value in (("device", "gpu"), ("dtype", "float16")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(params.replace("  batch_size: 16\n  # Where", f"  batch_size: 16\n  {key}: {value}\n  # Where"))
        with pytest.raises(ConfigError, match=rf"evaluate\.{key}"):
            load_config(path)


def test_auto_scores_identically_to_cpu_and_bf16_close_to_it(pretrained_workspace: Path) -> None:
    from lmcore.finetune import sft
    from lmcore.heldout import sft_scores

    model_dir = pretrained_workspace / "models" / "pretrain" / "hf"
    conversations = sft.load_conversations(pretrained_workspace / "data/ingest/sft/val.jsonl")[:6]
    auto = resolve("auto", "auto")

    def score(device: str, dtype: str) -> tuple[dict, list]:
        return sft_scores(model_dir, conversations, "base", batch_size=4, max_new_tokens=6, device=device, dtype=dtype)

    cpu = score("cpu", "float32")
    assert score(auto.device, auto.dtype_name) == cpu  # every number and every answer, bit for bit
    bf16, rows = score("cpu", "bfloat16")
    assert bf16["assistant_tokens"] == cpu[0]["assistant_tokens"] and len(rows) == 6
    assert bf16["loss"] == pytest.approx(cpu[0]["loss"], rel=5e-3)  # bf16 weights: ~1e-4 apart here
    assert bf16["loss"] != cpu[0]["loss"]  # the weights really were bf16


@no_cuda
def test_the_stage_refuses_cuda_here_in_one_line(pretrained_workspace: Path, tmp_path: Path) -> None:
    root = copy_workspace(pretrained_workspace, tmp_path / "ws", evaluate={"device": "cuda", "prompts": ["Hi"]})
    proc = lmcycle("stage", "evaluate", cwd=root, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: evaluate.device: cuda requested")
    assert not (root / "reports" / "evaluate.json").exists()


def test_the_eval_fingerprint_moves_only_off_the_cpu_float32_default() -> None:
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.registry.gate import settings_fingerprint

    config = load_config(REPO / "params.yaml")
    for section in ("sft", "pretrain", "classification"):
        before = settings_fingerprint("data", section, config)  # reports written before a device could be chosen
        assert settings_fingerprint("data", section, config, {"device": "cpu", "dtype": "float32"}) == before
        on_gpu = settings_fingerprint("data", section, config, {"device": "cuda:0", "dtype": "bfloat16"})
        cpu_bf16 = settings_fingerprint("data", section, config, {"device": "cpu", "dtype": "bfloat16"})
        assert len({before, on_gpu, cpu_bf16}) == 3


def test_generate_runs_on_the_chosen_device_and_refuses_a_missing_one(tiny_hf_dir: Path, tmp_path: Path) -> None:
    args = ["generate", "--model", str(tiny_hf_dir), "--prompt", "In the beginning", "--max-new-tokens", "6"]
    greedy = [*args, "--temperature", "0"]
    assert lmcycle(*greedy, "--device", "auto", cwd=tmp_path).stdout.startswith("In the beginning")
    assert lmcycle(*greedy, "--dtype", "bfloat16", cwd=tmp_path).stdout.startswith("In the beginning")
    if not torch.cuda.is_available():
        refused = lmcycle(*args, "--device", "cuda", cwd=tmp_path, check=False)
        assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
            "error: --device: cuda requested but this machine has no CUDA device (use auto or cpu)"
        ]
