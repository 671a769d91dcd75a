"""The pretrain stage end to end, as users run it: `lmcycle stage pretrain`, `dvc repro pretrain`, torchrun.

Exact resume is checked the hard way: a process killed with SIGKILL (or stopped with SIGTERM) midway, then rerun,
must end with weights, reports and plots byte-identical to an uninterrupted run in another workspace.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_same_training, copy_workspace, lmcycle, needs_cpu_compile
from safetensors.torch import load_file

# Tiny matmuls on a shared 2-core machine: one thread is many times faster than two contending ones.
FAST = {"pretrain": {"threads": 1}}
# Long enough that a kill lands midway; dropout on, so resuming must restore the RNG to be exact.
RESUMABLE = {
    "model": {"dropout": 0.1},
    "pretrain": {
        "threads": 1,
        "steps": 240,
        "batch_size": 8,
        "checkpoint_every": 40,
        "eval_every": 80,
        "eval_max_batches": 8,
        "log_every": 20,
    },
}
FINAL = "checkpoints/pretrain/step_0000240/model.safetensors"
REPORTS = ["reports/pretrain.json", "reports/pretrain/train.csv", "reports/pretrain/val.csv"]


@pytest.fixture(scope="module", autouse=True)
def no_tracking():
    """MLflow has its own tests; here it would only cost time (module scope: the reference run too)."""
    previous = os.environ.get("LMCYCLE_TRACKING")
    os.environ["LMCYCLE_TRACKING"] = "off"
    yield
    if previous is None:
        os.environ.pop("LMCYCLE_TRACKING", None)
    else:
        os.environ["LMCYCLE_TRACKING"] = previous


def outputs(ws: Path, files: list[str]) -> dict[str, bytes]:
    return {name: (ws / name).read_bytes() for name in files}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path} appeared:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def start(ws: Path, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ws, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.fixture(scope="module")
def reference(data_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """An uninterrupted run of the RESUMABLE params: its final weights and reports."""
    ws = copy_workspace(data_workspace, tmp_path_factory.mktemp("reference") / "ws", **RESUMABLE)
    lmcycle("stage", "pretrain", cwd=ws)
    return outputs(ws, [FINAL, *REPORTS])


# --- outputs and determinism ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(data_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run of the tiny params (checkpoints included); tests copy it before changing anything."""
    ws = copy_workspace(data_workspace, tmp_path_factory.mktemp("tiny_run") / "ws", **FAST)
    lmcycle("stage", "pretrain", cwd=ws)
    return ws


def test_two_runs_give_identical_outputs_and_a_loadable_hf_model(data_workspace, tiny_run, tmp_path: Path) -> None:
    again = copy_workspace(data_workspace, tmp_path / "again", **FAST)
    lmcycle("stage", "pretrain", cwd=again)
    files = [*REPORTS, "models/pretrain/hf/model.safetensors", "models/pretrain/checkpoint/model.safetensors"]
    assert outputs(tiny_run, files) == outputs(again, files)

    ws = tiny_run
    report = json.loads((ws / "reports/pretrain.json").read_text())
    val_index = json.loads((ws / "data/tokens/val/index.json").read_text())
    assert sorted(report) == sorted(
        ["params", "steps", "tokens_seen", "train_loss", "val_bpb", "val_loss", "val_perplexity", "val_tokens"]
    )
    assert report["steps"] == 20 and report["tokens_seen"] == 20 * 4 * 64
    assert report["val_tokens"] == val_index["tokens"] - 1  # the whole val split, every target once
    assert report["val_perplexity"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-5)
    nats = report["val_loss"] * report["val_tokens"]
    assert report["val_bpb"] == pytest.approx(nats / (math.log(2) * val_index["utf8_bytes"]), rel=1e-5)
    assert (ws / "reports/pretrain/train.csv").read_text().splitlines()[0] == "step,loss,lr,grad_norm"
    assert [line.split(",")[0] for line in (ws / "reports/pretrain/val.csv").read_text().splitlines()] == [
        "step",
        "10",
        "20",
    ]
    assert (ws / "reports/pretrain/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the packaged checkpoint is the final one, byte for byte
    final = ws / "checkpoints/pretrain/step_0000020"
    for name in ("model.safetensors", "meta.json", "trainer.pt"):
        assert (ws / "models/pretrain/checkpoint" / name).read_bytes() == (final / name).read_bytes()

    # stock transformers loads the export and scores a val window as lmcore's own model does
    from transformers import AutoModelForCausalLM

    from lmcore.data.shards import TokenShards
    from lmcore.model import ModelConfig, Transformer
    from lmcore.train.checkpoint import load_model_state, load_weights

    meta = json.loads((final / "meta.json").read_text())
    ours = Transformer(ModelConfig(**meta["model_config"])).eval()
    load_model_state(ours, load_weights(final))
    hf = AutoModelForCausalLM.from_pretrained(ws / "models/pretrain/hf").eval()
    x, y = next(TokenShards(ws / "data/tokens/val").sequential_windows(64, 2))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        hf_loss = torch.nn.functional.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten())
        assert hf_loss.item() == pytest.approx(ours(x, y).item(), abs=1e-4)
    card = (ws / "models/pretrain/hf/README.md").read_text()
    assert "val_bpb" in card and meta["inputs"]["tokenizer"] in card


@needs_cpu_compile
def test_split_compiled_training_repeats_across_processes(data_workspace, tmp_path: Path) -> None:
    """What the CPU default gives demo-sized batches on 2 cores: the blocks compiled and each micro-batch run as 2
    parts on threads of their own (asked for explicitly: `auto` leaves this test's small batches whole). Two fresh
    processes (the second compiling from inductor's disk cache) end with the same weights and reports."""
    params = {"pretrain": {"threads": 2, "compile": True, "batch_split": 2}}
    runs = []
    for name in ("a", "b"):
        ws = copy_workspace(data_workspace, tmp_path / name, **params)
        proc = lmcycle("stage", "pretrain", cwd=ws)
        assert "each micro-batch runs as 2 parts at once, 1 thread(s) each" in proc.stdout + proc.stderr
        runs.append(outputs(ws, [*REPORTS, "models/pretrain/hf/model.safetensors"]))
    assert runs[0] == runs[1]


# --- exact resume --------------------------------------------------------------------------------------------


def test_sigkill_midway_then_rerun_is_bit_identical(data_workspace, reference, tmp_path: Path) -> None:
    ws = copy_workspace(data_workspace, tmp_path / "ws", **RESUMABLE)
    proc = start(ws, "lmcycle", "stage", "pretrain")
    wait_for(ws / "checkpoints/pretrain/step_0000080", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (ws / FINAL).exists() and not (ws / "reports/pretrain.json").exists()

    # damage the newest checkpoint too: the rerun must set it aside and fall back to the one before
    newest = max((ws / "checkpoints/pretrain").glob("step_*"))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rerun = lmcycle("stage", "pretrain", cwd=ws)
    assert "falling back" in rerun.stderr and str(newest.name) in rerun.stderr
    resumed = int(re.search(r"resuming from \S+step_(\d+)", rerun.stderr).group(1))
    assert 0 < resumed < int(newest.name.removeprefix("step_"))
    assert outputs(ws, [FINAL, *REPORTS]) == reference


def test_sigterm_checkpoints_the_current_step_and_exits_nonzero(data_workspace, reference, tmp_path: Path) -> None:
    ws = copy_workspace(data_workspace, tmp_path / "ws", **RESUMABLE)
    proc = start(ws, "lmcycle", "stage", "pretrain")
    wait_for(ws / "checkpoints/pretrain/step_0000040", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    match = re.search(r"error: pretrain: stopped by SIGTERM at step (\d+)/240", err)
    assert match, err
    stopped = int(match.group(1))
    assert 40 <= stopped < 240
    meta = json.loads((ws / f"checkpoints/pretrain/step_{stopped:07d}/meta.json").read_text())
    assert meta["step"] == stopped and meta["tokens_seen"] == stopped * 8 * 64

    rerun = lmcycle("stage", "pretrain", cwd=ws)
    assert f"resuming from {ws / 'checkpoints/pretrain'}/step_{stopped:07d}" in rerun.stderr
    assert outputs(ws, [FINAL, *REPORTS]) == reference


def test_dvc_repro_resumes_after_a_kill(data_workspace, reference, tmp_path: Path) -> None:
    ws = copy_workspace(data_workspace, tmp_path / "ws", **RESUMABLE)
    proc = start(ws, "dvc", "repro", "pretrain")
    wait_for(ws / "checkpoints/pretrain/step_0000040", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage it runs
    proc.communicate()
    assert not (ws / FINAL).exists()

    rerun = subprocess.run(["dvc", "repro", "pretrain"], cwd=ws, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming from" in rerun.stdout + rerun.stderr
    assert outputs(ws, [FINAL, *REPORTS]) == reference
    status = subprocess.run(["dvc", "status", "pretrain"], cwd=ws, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


def test_changed_params_set_old_checkpoints_aside(tiny_run, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(tiny_run, ws)
    again = lmcycle("stage", "pretrain", cwd=ws)  # already done: resumes at the last step and re-exports
    assert re.search(r"resuming from \S+step_0000020", again.stderr)
    assert outputs(ws, [*REPORTS, "models/pretrain/hf/model.safetensors"]) == outputs(
        tiny_run, [*REPORTS, "models/pretrain/hf/model.safetensors"]
    )
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["pretrain"]["lr"] = 0.001
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = lmcycle("stage", "pretrain", cwd=ws)
    assert "resuming" not in changed.stderr
    stale = list((ws / "checkpoints/pretrain/stale").iterdir())
    assert len(stale) == 1 and (stale[0] / "step_0000020/meta.json").is_file()


# --- failures ------------------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_one_line_naming_the_step(data_workspace, tmp_path: Path) -> None:
    ws = copy_workspace(data_workspace, tmp_path / "ws", pretrain={"threads": 1, "lr": 1e4, "checkpoint_every": 1})
    proc = lmcycle("stage", "pretrain", cwd=ws, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: pretrain: non-finite .* at step (\d+) .*last good checkpoint (\S+)", last)
    assert match, proc.stderr
    step, kept = int(match.group(1)), Path(match.group(2))
    assert kept.name == f"step_{step - 1:07d}"
    assert all(torch.isfinite(t).all() for t in load_file(kept / "model.safetensors").values())
    assert not (ws / "models/pretrain").exists() and not (ws / "reports/pretrain.json").exists()


def test_shards_of_another_tokenizer_are_refused(data_workspace, tmp_path: Path) -> None:
    ws = copy_workspace(data_workspace, tmp_path / "ws", tokenizer={"vocab_size": 600}, **FAST)
    lmcycle("stage", "tokenizer", cwd=ws)  # a new tokenizer, but the shards were not rebuilt
    proc = lmcycle("stage", "pretrain", cwd=ws, check=False)
    assert proc.returncode == 1
    assert re.search(r"error: \S+data/tokens/train: shards were made by tokenizer \w+.*rerun the tokenize", proc.stderr)


def test_context_longer_than_the_shards_is_refused(data_workspace, tmp_path: Path) -> None:
    ws = copy_workspace(data_workspace, tmp_path / "ws", model={"context_length": 1_000_000}, **FAST)
    proc = lmcycle("stage", "pretrain", cwd=ws, check=False)
    assert proc.returncode == 1
    assert "error: model.context_length 1000000 is larger than the shards can serve" in proc.stderr


def test_a_batch_larger_than_the_val_split_is_evaluated_whole(data_workspace, tmp_path: Path) -> None:
    params = {"model": {"context_length": 1024}, "pretrain": {"threads": 1, "steps": 2, "batch_size": 64}}
    ws = copy_workspace(data_workspace, tmp_path / "ws", **params)
    proc = lmcycle("stage", "pretrain", cwd=ws)
    assert "fewer than pretrain.batch_size=64; evaluation scores all of them in one smaller batch" in proc.stderr
    report = json.loads((ws / "reports/pretrain.json").read_text())
    assert report["val_tokens"] == json.loads((ws / "data/tokens/val/index.json").read_text())["tokens"] - 1


def test_init_from_a_missing_directory_is_refused(data_workspace, tmp_path: Path) -> None:
    ws = copy_workspace(data_workspace, tmp_path / "ws", pretrain={"init_from": "models/nowhere/hf"})
    proc = lmcycle("stage", "pretrain", cwd=ws, check=False)
    assert proc.returncode == 1
    assert "error: pretrain.init_from: models/nowhere/hf is not a directory" in proc.stderr


def first_logged_loss(ws: Path) -> float:
    return float((ws / "reports/pretrain/train.csv").read_text().splitlines()[1].split(",")[1])


def test_init_from_an_exported_model_continues_pretraining(data_workspace, tiny_run, tmp_path: Path) -> None:
    """From a copy of the exported model saved by transformers in shards: the fingerprint names every shard."""
    import shutil

    from transformers import AutoModelForCausalLM

    from lmcore.weightfiles import init_weights_digest

    base = tiny_run
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base / "models/pretrain/hf").save_pretrained(sharded, max_shard_size="20KB")
    for name in (base / "models/pretrain/hf").iterdir():
        if "token" in name.name:
            shutil.copy(name, sharded / name.name)
    assert (sharded / "model.safetensors.index.json").is_file()
    ws = copy_workspace(data_workspace, tmp_path / "ws", pretrain={"threads": 1, "init_from": str(sharded)})
    lmcycle("stage", "pretrain", cwd=ws)
    first_loss = [first_logged_loss(p) for p in (base, ws)]
    assert first_loss[1] < first_loss[0] - 0.2  # starts where the base model ended, not from scratch
    meta = json.loads((ws / "models/pretrain/checkpoint/meta.json").read_text())
    assert meta["inputs"]["init_from"] == init_weights_digest(sharded)[:16]


# --- data parallel -------------------------------------------------------------------------------------------


def torchrun(ws: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "flows.cli",
        "stage",
        "pretrain",
    ]
    proc = subprocess.run(cmd, cwd=ws, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_ddp_on_two_processes_ends_with_identical_replicas(data_workspace, tmp_path: Path) -> None:
    from lmcore.model import ModelConfig, Transformer
    from lmcore.train.checkpoint import load_model_state, load_weights
    from lmcore.train.resume import state_digest

    params = {"pretrain": {"threads": 1, "grad_accum": 2}}  # accumulation exercises no_sync
    single = copy_workspace(data_workspace, tmp_path / "single", **params)
    lmcycle("stage", "pretrain", cwd=single)
    ddp = copy_workspace(data_workspace, tmp_path / "ddp", **params)
    out = torchrun(ddp)
    assert (out.stdout + out.stderr).count("stage pretrain") == 1  # one summary: rank 0 alone speaks
    final = ddp / "checkpoints/pretrain/step_0000020"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["world_size"] == 2
    rank0, rank1 = meta["replica_weight_sha256"]  # each rank hashed its own weights
    model = Transformer(ModelConfig(**meta["model_config"]))
    load_model_state(model, load_weights(final))
    assert rank0 == rank1 == state_digest(model.state_dict())
    assert_same_training(single, ddp)  # the same global batches as one process

    fsdp = copy_workspace(data_workspace, tmp_path / "fsdp", pretrain={**params["pretrain"], "parallel": "fsdp"})
    torchrun(fsdp)
    sharded = load_file(fsdp / "checkpoints/pretrain/step_0000020/model.safetensors")
    replicated = load_file(final / "model.safetensors")
    assert max((sharded[k] - replicated[k]).abs().max().item() for k in replicated) < 1e-4
    assert (fsdp / "models/pretrain/hf/model.safetensors").is_file()
