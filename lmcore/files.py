"""Small file helpers the library and the lifecycle layer share, each written once: writes that readers never see
half done, and a file's SHA-256.

`atomic_write_text` writes a file beside its target and renames it; `atomic_directory` does the same for a folder.
A full disk is reported as a DiskFullError naming the path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmcore.diskspace import writing


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see a half-written file."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it replaces `target` in one rename.

    On error the temporary directory is removed and `target` is left as it was; a full disk is reported as a
    DiskFullError naming `target`. Replacing an existing `target` takes two renames (it goes aside to .NAME.old
    first); a write killed between them leaves .NAME.old, which the next write into `target` puts back before it
    starts (and removes temporary directories of writers that died).
    """
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        old = target.with_name(f".{target.name}.old")
        if old.exists():  # an earlier write was killed between its two renames: put back what it set aside
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, target)
        for leftover in target.parent.glob(f".{target.name}.*.tmp"):  # of writers that died (pid in the name)
            pid = leftover.name.removeprefix(f".{target.name}.").split(".")[0]
            if pid.isdigit() and not _process_exists(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp"))
        try:
            yield tmp
            if target.exists():
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                if old.exists() and not target.exists():
                    os.replace(old, target)  # put the previous version back
                raise
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
