"""DVC's run cache for an `always_changed` stage (ingest), so a fresh clone restores it instead of running it.

Part of the DVC adapter (the only code that imports DVC). Design choices:
- DVC never saves nor consults a run-cache entry for an `always_changed` stage, and ingest must stay one for plain
  `dvc repro`: its sources (installed packages, HF datasets, URLs) lie outside what DVC can hash. The entry's key
  (command, code, params) therefore leaves the sources out; what pins them is the stage's report, an output of the
  entry, which the caller checks after a restore (`still_valid`).
- Saving: for a stage whose outputs match dvc.lock, DVC's own `StageCache.save` on the stage with `always_changed`
  lifted, so the entry (and the uncached report it refers to) is an ordinary one that `dvc push --run-cache` and
  `dvc pull --run-cache` carry. The flow saves after it runs the stage, and `push` before every push.
- Restoring (the flow only; plain `dvc repro` still runs the stage): `StageCache.restore` on the same lifted stage,
  then `still_valid()`. True: the stage is recorded in dvc.lock as `dvc repro` records a restore. False: the stage
  runs as usual (DVC removes the restored outputs first).
- DVC resolves an entry's stage against the working directory (`StageCache._create_stage`), so saving and
  restoring change into the workspace for their length.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _always_changed_stage(repo: Any, root: Path, name: str) -> Any:
    """dvc.yaml's stage `name` (with its dvc.lock entry), or None when there is no always-changed one."""
    from dvc.exceptions import DvcException

    try:
        (stage,) = repo.stage.collect(f"{root / 'dvc.yaml'}:{name}")  # whatever the CWD is
    except (DvcException, ValueError):
        return None
    return stage if stage.always_changed else None


def save_entry(repo: Any, root: str | Path, name: str) -> bool:
    """Record the workspace's stage `name` (code, params and outputs as in dvc.lock) in the local run cache; False
    when there is nothing to record (no lock entry, or outputs or code changed since). The caller holds DVC's lock."""
    root = Path(root).resolve()
    stage = _always_changed_stage(repo, root, name)
    if stage is None or stage.changed_stage() or stage._changed_deps() or stage.changed_outs():
        return False
    stage.always_changed = False
    with contextlib.chdir(root):
        repo.stage_cache.save(stage)  # a no-op when the entry exists; commits the uncached report for the entry
    return True


def save(root: str | Path, name: str) -> bool:
    """`save_entry` in its own DVC repository handle, under DVC's lock."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from lmcore.lifecycle.dvcadapter import quiet

    try:
        with quiet(), Repo(str(root)) as repo, repo.lock:
            return save_entry(repo, root, name)
    except (DvcException, OSError):  # the stage runs, and DVC says what is wrong if it matters
        return False


def restore(root: str | Path, name: str, still_valid: Callable[[], bool], pull: bool = False) -> bool:
    """Check stage `name`'s outputs out of the run cache (fetching the entry's data from the default remote with
    `pull`) when an entry for its code and params exists and `still_valid()` holds for what was restored; then
    write its dvc.lock entry. True when restored; False when the stage has to run."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage.cache import RunCacheNotFoundError, RunCacheNotSupported

    from lmcore.lifecycle.dvcadapter import quiet

    root = Path(root).resolve()
    try:
        with quiet(), contextlib.chdir(root), Repo(str(root)) as repo, repo.lock:
            stage = _always_changed_stage(repo, root, name)
            if stage is None:
                return False
            if pull:
                try:
                    repo.stage_cache.pull(None)  # as `dvc repro --pull` does before its first stage
                except RunCacheNotSupported:
                    return False
            stage.always_changed = False
            try:
                repo.stage_cache.restore(stage, pull=pull)
            except RunCacheNotFoundError:
                return False
            if not still_valid():
                return False
            stage.save(run_cache=False)
            stage.commit()
            stage.dump(update_pipeline=False)
    except (DvcException, OSError):  # the stage runs, and DVC says what is wrong if it matters
        return False
    return True
