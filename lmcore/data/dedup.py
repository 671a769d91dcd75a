"""Exact de-duplication in bounded memory: the keys already seen live in an SQLite file, not in a Python set.

A Python set of 8-byte keys costs about 80 bytes per document, so memory would grow with the corpus; SQLite keeps
the keys in a B-tree on disk and holds only its page cache (`CACHE_KIB`) in memory, whatever the number of keys.
The answer is exact (no sketch, no false positive), so the records kept and their order are those a set gives.
The file is a scratch file: no journal, no fsync, one writer; it is deleted by `close`. SQLite comes with Python.
SQLite reports a full disk as its own error (SQLITE_FULL); it is raised as OSError(ENOSPC) naming the file, so the
stage's `writing` guard turns it into the one-line full-disk error like any other write.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path

CACHE_KIB = 2 * 1024  # SQLite's page cache: the memory the set may use, whatever the number of keys
COMMIT_EVERY = 50_000  # inserts per transaction (dirty pages beyond the cache spill to the file anyway)


class SeenSet:
    """A set of 64-bit keys (8-byte strings) on disk; `add` says whether the key is new."""

    def __init__(self, path: Path, cache_kib: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit, below
        kib = CACHE_KIB if cache_kib is None else cache_kib
        for pragma in (
            "journal_mode=OFF",
            "synchronous=OFF",
            "locking_mode=EXCLUSIVE",
            "mmap_size=0",  # mapped pages would count as this process's memory
            "temp_store=FILE",
            f"cache_size=-{kib}",
        ):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE seen (key INTEGER PRIMARY KEY)")  # the rowid itself: 8 bytes a key
        self.db.execute("BEGIN")
        self.pending = 0

    def add(self, key: bytes) -> bool:
        """Insert `key` (8 bytes); True when it was not in the set before."""
        value = int.from_bytes(key, "big", signed=True)
        with self._full_disk():
            new = self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (value,)).rowcount == 1
            self.pending += new
            if self.pending >= COMMIT_EVERY:
                self.db.execute("COMMIT")
                self.db.execute("BEGIN")
                self.pending = 0
        return new

    @contextlib.contextmanager
    def _full_disk(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as err:
            if err.sqlite_errorcode == sqlite3.SQLITE_FULL:
                raise OSError(errno.ENOSPC, "no space left on device", str(self.path)) from err
            raise

    def close(self) -> None:
        """Close and delete the file (safe to call twice)."""
        self.db.close()
        self.path.unlink(missing_ok=True)
