"""What lmcycle knows about the workspace it runs in: its root, its lineage (git, dvc.lock) and its lock.

The workspace is the DVC repository checkout. Two design choices live here:
- `original_root` looks through DVC's temporary experiment copies (`dvc exp run --temp/--queue` run a stage in
  `.dvc/tmp/exps/...`; DVC exports the parent repository as DVC_ROOT), so tracking stays anchored to the real
  workspace wherever DVC runs a stage.
- `workspace_lock` is an `fcntl` lock on `.lmcycle/lock`: the kernel drops it when its holder dies, so a crashed
  run never leaves a stale lock behind. It is re-entrant within one process.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from lmcore.errors import LmcycleError
from lmcore.lifecycle.dvcadapter import lock_outs
from lmcore.lifecycle.dvcadapter import output_hash as dvc_hash  # noqa: F401 (lmcore.lifecycle.registry's name)
from lmcore.lifecycle.dvcadapter import stage_definitions as dvc_stages  # noqa: F401 (as dvc_hash)

LOCK_FILE = Path(".lmcycle") / "lock"
EXPS_TMP = (".dvc", "tmp", "exps")


class LockTimeout(LmcycleError):
    """Another lmcycle run holds the workspace lock."""


# --- where -------------------------------------------------------------------------------------------------


def original_root(path: str | Path = ".") -> Path:
    """The workspace a stage belongs to, even when DVC runs it in a temporary experiment copy."""
    path = Path(path).resolve()
    parts = path.parts
    for i in range(len(parts) - len(EXPS_TMP) + 1):
        if parts[i : i + len(EXPS_TMP)] == EXPS_TMP:
            return Path(*parts[:i])
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and os.environ.get("DVC_EXP_NAME"):
        return Path(dvc_root).resolve()
    return path


def lmcycle_dir(root: Path) -> Path:
    return Path(root) / ".lmcycle"


# --- lineage -----------------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(root: Path) -> str:
    return _git(root, "rev-parse", "HEAD") or "unknown"


def git_dirty(root: Path) -> bool:
    """True when tracked files differ from HEAD (untracked and DVC-ignored outputs do not count)."""
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return bool(status)


def file_sha256(path: Path) -> str | None:
    """The file's SHA-256, or None when there is no such file."""
    from lmcore.files import file_sha256 as sha256

    return sha256(path) if Path(path).is_file() else None


def dvc_lock_hash(root: Path) -> str:
    """The lineage of everything the stages produced: sha256 of dvc.lock ('none' before the first repro)."""
    return file_sha256(Path(root) / "dvc.lock") or "none"


def requirements_lock_path(root: Path) -> Path | None:
    for candidate in (Path(root) / "requirements.lock", Path(__file__).resolve().parents[1] / "requirements.lock"):
        if candidate.is_file():
            return candidate
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def entry_paths(entries: list[Any] | None) -> list[str]:
    """Paths of dvc.yaml `deps`/`outs`/`metrics`/`plots` entries (plain strings or single-key mappings)."""
    paths = []
    for entry in entries or []:
        if isinstance(entry, str):
            paths.append(entry)
        elif isinstance(entry, dict):
            paths.extend(str(k) for k in entry)
    return paths


def stage_param_keys(stage: dict[str, Any]) -> list[str]:
    """The params.yaml keys a dvc.yaml stage declares (`params: [data, tokenizer.vocab_size, {file: [k]}]`)."""
    keys: list[str] = []
    for entry in stage.get("params") or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            for file, file_keys in entry.items():
                if str(file).endswith("params.yaml"):
                    keys.extend(file_keys or [])
    return keys


def data_fingerprints(root: Path) -> dict[str, str]:
    """DVC's hash of every stage output under data/ and models/ (the lineage of a model's data)."""
    return {
        path: str(out.get("md5") or out.get("hash") or "")
        for path, out in lock_outs(root).items()
        if path.split("/")[0] in {"data", "models"}
    }


# --- environment -------------------------------------------------------------------------------------------


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def environment(root: Path) -> dict[str, str]:
    """What ran: versions, torch build, device and threads, and the hash of the install lock file.

    torch is described only if the process already imported it (asking would cost seconds in light stages).
    """
    import lmcore

    lock = requirements_lock_path(root)
    env = {
        "lmcycle": lmcore.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": _dist_version("torch"),
        "requirements_lock_sha256": (file_sha256(lock) or "none") if lock else "none",
        "cpu_count": str(os.cpu_count()),
        **cpu_numerics(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = getattr(torch.version, "cuda", None)
        env["torch"] = torch.__version__
        env["torch_build"] = f"cuda {cuda}" if cuda else "cpu"
        env["threads"] = str(torch.get_num_threads())
        env["aten_cpu"] = torch.backends.cpu.get_cpu_capability()  # PyTorch's own kernels (ATEN_CPU_CAPABILITY pins)
        if torch.cuda.is_available():
            env["device"] = f"cuda ({torch.cuda.get_device_name(0)}) x{torch.cuda.device_count()}"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            env["device"] = "mps"
        else:
            env["device"] = "cpu"
    return env


# What decides whether two CPUs give bit-identical training: the same kernels on the same ISA through the same
# BLAS, on the same thread count (MKL picks its code path per CPU unless MKL_CBWR pins one; PyTorch picks its own
# vectorised kernels per CPU unless ATEN_CPU_CAPABILITY pins them: bench/pinned_numerics.py).
NUMERICS_KEYS = ("cpu_model", "cpu_isa", "mkl_cbwr", "aten_cpu", "torch", "threads", "device")


def cpu_numerics() -> dict[str, str]:
    """The CPU model and its vector ISA as the kernels see them, and MKL's reproducibility mode."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if model and flags:
                break
    isa = [f for f in ("avx512_bf16", "avx512f", "avx2", "fma", "avx", "sse4_2", "asimd", "sve") if f in flags]
    return {"cpu_model": model, "cpu_isa": " ".join(isa) or "unknown", "mkl_cbwr": os.environ.get("MKL_CBWR", "")}


def rebuild_outlook(recorded: dict[str, str], here: dict[str, str]) -> str:
    """One line: whether a bit-identical rebuild can be expected here, from the environment recorded at
    registration (`env.*` tags without the prefix) and this machine's."""
    known = [k for k in NUMERICS_KEYS if k in recorded]
    if not {"cpu_model", "cpu_isa"} <= set(known):
        return "bit-identical rebuild here: unknown (the version records no CPU model or ISA)"
    differ = [f"{k} {recorded[k]!r} there, {here.get(k, '?')!r} here" for k in known if recorded[k] != here.get(k)]
    if differ:
        return "bit-identical rebuild here: not expected (" + "; ".join(differ) + ")"
    return "bit-identical rebuild here: expected (same CPU model, ISA, MKL mode, torch kernels, threads and device)"


# --- lock --------------------------------------------------------------------------------------------------

_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth) for re-entrance within a process


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(path.read_text() or "{}")
        return f"pid {info.get('pid')} since {info.get('since')}"
    return "another process"


@contextlib.contextmanager
def workspace_lock(root: Path, timeout_s: float = 0.0) -> Iterator[Path]:
    """Hold the workspace lock: wait up to `timeout_s` for another run to finish, then fail with a clear message."""
    path = (lmcycle_dir(root) / "lock").resolve()
    key = str(path)
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise LockTimeout(
                    f"{path}: another lmcycle run holds this workspace ({_holder(path)}); waited {timeout_s:g} s "
                    "(flow.lock_timeout_s)"
                ) from None
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    os.write(fd, json.dumps({"pid": os.getpid(), "since": since}).encode())
    _held[key] = (fd, 1)
    try:
        yield path
    finally:
        del _held[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
