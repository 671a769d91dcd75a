"""A full disk as one clear error: `writing(path)` turns "no space left on device" into a DiskFullError naming path.

Libraries report a full disk in different shapes: Python raises OSError(ENOSPC) often without a file name,
safetensors raises its own error carrying "os error 28", and torch.save raises a RuntimeError whose context is the
OSError. Each writer wraps its write in `writing(path)`, where it knows which file or directory it was writing;
the caller's temporary-then-rename cleanup runs first, so nothing half-written stays behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from lmcore.errors import DiskFullError

NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# How Rust's std::io (safetensors, tokenizers) spells the two errors in its messages.
_RUST_MARKERS = {f"(os error {code})": code for code in NO_SPACE}


def space_errno(err: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT when `err` (or an exception it was raised from or during) is a full-disk error."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return err.errno
        text = str(err)
        for marker, code in _RUST_MARKERS.items():
            if marker in text:
                return code
        err = err.__cause__ or err.__context__
    return None


def disk_full_error(err: BaseException, path: str | os.PathLike | None, hint: str = "") -> DiskFullError | None:
    """The DiskFullError to raise for `err` while writing `path`, or None when `err` is something else."""
    if isinstance(err, DiskFullError):
        return err
    code = space_errno(err)
    if code is None:
        return None
    where = shown(path if path is not None else getattr(err, "filename", None) or ".")
    detail = f"{NO_SPACE[code]} ({_free(where)} free once the partial write was removed{'; ' + hint if hint else ''})"
    return DiskFullError(f"{where}: {detail}")


def shown(path: str | os.PathLike) -> str:
    """`path` relative to the working directory when it lies under it (the workspace, for a stage), else as is."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _free(path: str | os.PathLike) -> str:
    """Free space on the file system holding `path` (its nearest existing parent), in human units."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return "unknown"
    size = float(st.f_bavail * st.f_frsize)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "unknown"


@contextlib.contextmanager
def writing(path: str | os.PathLike, hint: str = "free space and rerun") -> Iterator[None]:
    """Re-raise a full-disk error inside the block as DiskFullError naming `path`; other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        full = disk_full_error(err, path, hint)
        if full is None or full is err:
            raise
        raise full from None
