"""Small file helpers the library and the lifecycle layer share: writes that readers never see half done.

`atomic_write_text` writes a file beside its target and renames it; `atomic_directory` (lmcore/tokenizer.py keeps
the directory form for now) does the same for a folder. A full disk is reported as a DiskFullError naming the path.
"""

from __future__ import annotations

import os
import tempfile
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
