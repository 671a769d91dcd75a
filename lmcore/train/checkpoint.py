"""Training checkpoints: atomic directories that a rerun resumes from exactly, and refuses when they do not fit.

Layout, under `checkpoints/<stage>/` (outside every DVC output on purpose: `dvc repro` deletes a stage's outputs
before running it, which would wipe the very checkpoints a rerun after a crash needs):

    step_0000200/
      model.safetensors   full weights (tied tensors stored once), loadable with safetensors alone
      trainer.pt          optimizer state and every rank's RNG state (read back with weights_only=True)
      history.json        the logged train/val series so far, so resumed reports equal uninterrupted ones
      meta.json           step, tokens seen, model config, fingerprint, and size + sha256 of each file above
    stale/<fingerprint>/  newest checkpoint of runs whose params or inputs differed (resumed if they match again)
    corrupt/              checkpoints that failed verification, kept for inspection, never resumed

A checkpoint is written into a hidden temporary directory and renamed into place, meta.json last, so a crash
mid-write leaves either the previous state or a complete checkpoint. Replacing an existing step takes two renames
(the old one aside to .old-step_X, the new one in); after a crash between them the resume puts the old one back.
Resuming verifies meta.json and every file's size and hash; a checkpoint that fails is moved aside with a warning
and the previous one is tried, so training never starts from garbage. State dicts are always full (unsharded) and
keyed by parameter name, so one format serves one device, DDP and FSDP alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.errors import CheckpointError
from lmcore.files import file_sha256

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE, TRAINER_FILE, HISTORY_FILE, META_FILE = "model.safetensors", "trainer.pt", "history.json", "meta.json"
STALE_DIR, CORRUPT_DIR, TMP_PREFIX, OLD_PREFIX = "stale", "corrupt", ".tmp-", ".old-"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_"):
        return None
    try:
        return int(name.removeprefix("step_"))
    except ValueError:
        return None


def fingerprint(payload: dict[str, Any]) -> str:
    """A short stable hash of JSON-able params and input hashes."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- state dicts (every rank takes part; FSDP gathers the full tensors) --------------------------------------


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: canonical name} for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32-or-native CPU tensors by parameter name, tied aliases dropped (safetensors stores each once)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    aliases = tied_aliases(model)
    return {k: v.detach().contiguous() for k, v in state.items() if k not in aliases}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = dict(state)
    for alias, canonical in tied_aliases(model).items():
        if alias not in state and canonical in state:
            state[alias] = state[canonical]
    try:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"weights do not fit this model: {str(err).splitlines()[0]}") from None


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# --- writing (rank 0) ----------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    trainer: dict[str, Any],
    history: dict[str, Any],
    meta: dict[str, Any],
) -> Path:
    """Write step_XXXXXXX/ atomically under `root` and return its path."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})  # one key: the header is byte-stable
        with (tmp / TRAINER_FILE).open("wb") as f:  # a Python file: a full disk shows as OSError(ENOSPC)
            torch.save(trainer, f)
        (tmp / HISTORY_FILE).write_text(json.dumps(history, sort_keys=True), encoding="utf-8")
        files = {}
        for name in (MODEL_FILE, TRAINER_FILE, HISTORY_FILE):
            path = tmp / name
            with path.open("rb") as f:
                os.fsync(f.fileno())
            files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        full_meta = {"format": FORMAT_VERSION, "step": step, **meta, "files": files}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True), encoding="utf-8")
        _fsync_dir(tmp)
        if final.exists():  # e.g. a stop signal at a step that was just checkpointed: replace it whole
            old = root / f"{OLD_PREFIX}{final.name}"  # a kill before the next rename: find_resumable puts it back
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints directly under `root`."""
    steps = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# --- finding and verifying (rank 0) --------------------------------------------------------------------------


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {META_FILE} (an interrupted write?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{meta_path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "files" not in meta:
        raise CheckpointError(f"{meta_path}: not a format-{FORMAT_VERSION} checkpoint")
    return meta


def verify(path: Path) -> dict[str, Any]:
    """meta.json of a complete, uncorrupted checkpoint; CheckpointError naming the first problem otherwise."""
    meta = read_meta(path)
    for name, expected in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, expected {expected['bytes']} (truncated?)")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from {META_FILE} (corrupt)")
    return meta


def _move_aside(path: Path, dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / path.name
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(path, dest)
    return dest


def _checkpoints_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


@dataclass
class Found:
    path: Path
    meta: dict[str, Any]


def find_resumable(root: Path, fingerprint_: str) -> Found | None:
    """The newest verified checkpoint under `root` made with `fingerprint_`, tidying the directory on the way.

    Leftover temporary directories are deleted; checkpoints of other fingerprints move to stale/<fp>/ (only the
    newest of each is kept); corrupt ones move to corrupt/ with a warning. A matching checkpoint set aside
    earlier in stale/ is moved back and used.
    """
    if not root.is_dir():
        return None
    _restore_replaced(root)
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for path in _checkpoints_in(root):
        try:
            meta = read_meta(path)
        except CheckpointError as err:
            log.warning(f"warning: {err}; moved to {CORRUPT_DIR}/, not resumed")
            _move_aside(path, root / CORRUPT_DIR)
            continue
        if meta.get("fingerprint") != fingerprint_:
            _set_stale(root, path, str(meta.get("fingerprint")))
    stale = root / STALE_DIR / fingerprint_
    for path in _checkpoints_in(stale):
        _move_aside(path, root)
    if stale.is_dir() and not any(stale.iterdir()):
        stale.rmdir()
    for path in _checkpoints_in(root):
        try:
            meta = verify(path)
        except CheckpointError as err:
            log.warning(f"warning: {err}; moved to {CORRUPT_DIR}/, falling back to an earlier checkpoint")
            _move_aside(path, root / CORRUPT_DIR)
            continue
        return Found(path, meta)
    return None


def _restore_replaced(root: Path) -> None:
    """A checkpoint set aside to be replaced goes back if the write was killed before its replacement moved in;
    once the replacement is in place it is only garbage."""
    for old in root.glob(f"{OLD_PREFIX}*"):
        final = root / old.name.removeprefix(OLD_PREFIX)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            log.warning(f"warning: {final.name} was being replaced when its writer stopped; the previous one is kept")
            os.rename(old, final)


def _set_stale(root: Path, path: Path, other: str) -> None:
    dest_dir = root / STALE_DIR / other
    existing = _checkpoints_in(dest_dir)
    if existing and step_of(existing[0]) >= step_of(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    for older in existing:
        shutil.rmtree(older, ignore_errors=True)
    _move_aside(path, dest_dir)


# --- reading (every rank) ------------------------------------------------------------------------------------


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path / MODEL_FILE}: unreadable ({err})") from None


def load_trainer(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad pickle
        raise CheckpointError(f"{path / TRAINER_FILE}: unreadable ({str(err).splitlines()[0]})") from None


def load_history(path: Path) -> dict[str, Any]:
    return json.loads((path / HISTORY_FILE).read_text(encoding="utf-8"))
