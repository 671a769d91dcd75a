"""A full disk: the stage fails in one line naming the path, leaves no temporary files, keeps every earlier output
and checkpoint intact, and resumes once space is freed.

Real ENOSPC from a small tmpfs mounted (as root) where the stage writes: the checkpoints directory, the pretrain
model directory, or the data directory, each a symlink from the workspace into the tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import copy_workspace

PAGE = 4096
TEMP_MARKERS = (".tmp", ".old")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """mount(name, bytes) -> a fresh tmpfs of that size; every one is unmounted at teardown, whatever happened."""
    mounted: list[Path] = []

    def mount(name: str, size: int) -> Path:
        directory = tmp_path / f"tmpfs-{name}"
        directory.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            reason = f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root"
            if os.environ.get("LMCYCLE_REQUIRE_TEAM") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], check=False, capture_output=True)


def _resize(directory: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(directory)], check=True, capture_output=True)


def _usage(path: Path) -> int:
    """Bytes a tree takes on a tmpfs: each file rounded up to whole pages."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in files)


def _move_to(source: Path, mount: Path) -> Path:
    """Move `source`'s contents onto the tmpfs at `mount` and leave a symlink in its place."""
    if source.exists():
        for item in source.iterdir():
            shutil.move(str(item), mount / item.name)
        source.rmdir()
    source.symlink_to(mount, target_is_directory=True)
    return mount


def _digests(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _leftovers(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for p in root.rglob("*"):
            if any(marker in p.name for marker in TEMP_MARKERS) or p.name.startswith(".tmp-"):
                found.append(p)
    return found


def _stage(name: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMCYCLE_TRACKING": "off"}
    return subprocess.run(["lmcycle", "stage", name], cwd=cwd, capture_output=True, text=True, env=env)


def _assert_one_line_full(proc: subprocess.CompletedProcess, path: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert line == proc.stderr.rstrip().splitlines()[-1], proc.stderr
    assert line.startswith(f"error: {path}: no space left on device ("), line  # relative to the workspace
    return line


STEPS = {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "log_every": 2}


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resumes(pretrained_workspace, tmp_path, tmpfs):
    from lmcore.train import checkpoint as ckpt

    ws = copy_workspace(pretrained_workspace, tmp_path / "ws", pretrain=STEPS)
    one = _usage(pretrained_workspace / "models" / "pretrain" / "checkpoint")
    mount = tmpfs("ckpt", one * 3 // 2 // PAGE * PAGE)  # step 2 fits; step 4 beside it does not
    _move_to(ws / "checkpoints", mount)
    params = (ws / "params.yaml").read_bytes()
    models = _digests(ws / "models")

    proc = _stage("pretrain", ws)
    line = _assert_one_line_full(proc, "checkpoints/pretrain/step_0000004")
    assert "last good checkpoint checkpoints/pretrain/step_0000002 kept" in line, line
    assert _leftovers(ws, mount) == []
    assert (ws / "params.yaml").read_bytes() == params
    assert _digests(ws / "models") == models  # the previous run's exported model is untouched
    root = ws / "checkpoints" / "pretrain"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002"]
    assert ckpt.verify(root / "step_0000002")["step"] == 2
    assert ckpt.load_weights(root / "step_0000002")

    _resize(mount, one * 4)
    proc = _stage("pretrain", ws)
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "step_0000002 (step 2)" in proc.stderr, proc.stderr
    assert ckpt.verify(root / "step_0000004")["step"] == 4
    assert ckpt.verify(ws / "models" / "pretrain" / "checkpoint")["step"] == 4
    assert _leftovers(ws, mount) == []


def test_full_disk_while_exporting_keeps_the_previous_model(pretrained_workspace, tmp_path, tmpfs):
    ws = copy_workspace(pretrained_workspace, tmp_path / "ws", pretrain=STEPS)
    pretrain = ws / "models" / "pretrain"
    old_hf = _digests(pretrain / "hf")
    shutil.rmtree(pretrain / "checkpoint")
    ckpt_usage = _usage(pretrained_workspace / "models" / "pretrain" / "checkpoint")
    # room for the old export and the new checkpoint copy, not for the new export beside the old one
    mount = tmpfs("models", _usage(pretrain / "hf") + ckpt_usage + 2 * PAGE)
    _move_to(pretrain, mount)
    params = (ws / "params.yaml").read_bytes()

    proc = _stage("pretrain", ws)
    _assert_one_line_full(proc, "models/pretrain/hf")
    assert _leftovers(ws, mount) == []
    assert (ws / "params.yaml").read_bytes() == params
    assert _digests(pretrain / "hf") == old_hf  # the previous export, whole

    _resize(mount, 4 * (_usage(mount) + ckpt_usage))
    proc = _stage("pretrain", ws)
    assert proc.returncode == 0, proc.stderr
    assert "step_0000004 (step 4)" in proc.stderr, proc.stderr  # resumed from the finished run's checkpoint
    assert _digests(pretrain / "hf") != old_hf
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(pretrain / "hf").config.num_hidden_layers == 2
    assert _leftovers(ws, mount) == []


def test_full_disk_while_tokenizing_keeps_the_previous_tokens(pretrained_workspace, tmp_path, tmpfs):
    ws = copy_workspace(pretrained_workspace, tmp_path / "ws")
    data = ws / "data"
    mount = tmpfs("data", _usage(data) + 2 * PAGE)  # the inputs and the old tokens; no room for new tokens
    _move_to(data, mount)
    old_tokens = _digests(data / "tokens")

    proc = _stage("tokenize", ws)
    _assert_one_line_full(proc, "data/tokens")
    assert _leftovers(ws, mount) == []
    assert _digests(data / "tokens") == old_tokens

    _resize(mount, 4 * _usage(mount))
    assert _stage("tokenize", ws).returncode == 0
    assert _digests(data / "tokens") == old_tokens  # same inputs, same tokens
    assert _leftovers(ws, mount) == []


def test_disk_full_error_reads_every_library_shape(tmp_path):
    """OSError without a file name, safetensors' own error, and torch.save's RuntimeError all name the path."""
    from lmcore.diskspace import disk_full_error, writing
    from lmcore.errors import DiskFullError

    try:
        raise RuntimeError("unexpected pos 576 vs 534") from OSError(errno.ENOSPC, "No space left on device")
    except RuntimeError as err:
        assert str(disk_full_error(err, tmp_path / "x")).startswith(f"{tmp_path / 'x'}: no space left on device (")
    assert "disk quota exceeded" in str(disk_full_error(OSError(errno.EDQUOT, "quota"), "y"))
    assert disk_full_error(Exception("I/O error: No space left on device (os error 28)"), "z") is not None
    assert disk_full_error(OSError(errno.EACCES, "denied"), "z") is None
    with pytest.raises(PermissionError), writing(tmp_path):
        raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(DiskFullError, match="kept; free space"), writing(tmp_path, hint="kept; free space"):
        raise OSError(errno.ENOSPC, "No space left on device")
