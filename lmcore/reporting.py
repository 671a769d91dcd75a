"""How stages and the training loop report what happens, without knowing who listens.

Code calls `reporter().log_metrics(...)`; by default that goes nowhere (a bare GPU host, a unit test). The CLI
installs an MLflow-backed reporter (lmcore.lifecycle.tracking) around a stage with `use_reporter(...)`. This keeps the
training loop free of MLflow, Prefect and DVC.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any


class Reporter:
    """The listening interface. The base class ignores everything."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_input(self, name: str, digest: str, source: str, context: str = "training") -> None:
        """A dataset a stage read: its name, content digest (DVC/our hash) and where it came from."""

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


_NULL = Reporter()
_current: ContextVar[Reporter | None] = ContextVar("lmcycle_reporter", default=None)


def reporter() -> Reporter:
    return _current.get() or _NULL


@contextlib.contextmanager
def use_reporter(rep: Reporter) -> Iterator[Reporter]:
    token = _current.set(rep)
    try:
        yield rep
    finally:
        _current.reset(token)
