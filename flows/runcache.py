"""The always-changed `ingest` stage through DVC's run cache, so a fresh clone restores it instead of running it.

Design choices:
- DVC never saves nor consults a run-cache entry for an `always_changed` stage, and ingest must stay one for plain
  `dvc repro`: its sources (installed packages, HF datasets, URLs) lie outside what DVC can hash. The run-cache key
  (command, code, params) therefore leaves the sources out; what pins them is reports/ingest.json, an output of the
  entry, which records every source's fingerprint (lmcore.data.sources).
- Saving: for an ingest whose outputs match dvc.lock, DVC's own `StageCache.save` on the stage with
  `always_changed` lifted, so the entry (and the uncached report it refers to) is an ordinary one that
  `dvc push --run-cache` and `dvc pull --run-cache` carry. The flow saves after it runs ingest and before a push.
- Restoring (the flow only; plain `dvc repro` still runs ingest): DVC's `StageCache.restore` on the same lifted
  stage, then the sources' fingerprints now are compared with the restored report. Equal: the stage is recorded in
  dvc.lock as `dvc repro` records a restore. Different: the stage runs as usual (DVC removes the restored outputs
  first), as a run from these sources gives other outputs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from flows.remote import INGEST_STAGE, _quiet_dvc, sources_unchanged


def _ingest_stage(repo: Any, root: Path) -> Any:
    """dvc.yaml's ingest stage (with its dvc.lock entry), or None when there is no always-changed one."""
    from dvc.exceptions import DvcException

    try:
        (stage,) = repo.stage.collect(f"{root / 'dvc.yaml'}:{INGEST_STAGE}")  # whatever the CWD is
    except (DvcException, ValueError):
        return None
    return stage if stage.always_changed else None


def save_ingest_entry(repo: Any, root: str | Path) -> bool:
    """Record the workspace's ingest (code, params and outputs as in dvc.lock) in the local run cache; False when
    there is nothing to record (no lock entry, or outputs or code changed since)."""
    root = Path(root).resolve()
    stage = _ingest_stage(repo, root)
    if stage is None or stage.changed_stage() or stage._changed_deps() or stage.changed_outs():
        return False
    stage.always_changed = False
    with contextlib.chdir(root):  # DVC resolves the entry's stage against the CWD (StageCache._create_stage)
        repo.stage_cache.save(stage)  # a no-op when the entry exists; commits the uncached report for the entry
    return True


def save_ingest_run_cache(root: str | Path) -> bool:
    """`save_ingest_entry` in its own DVC repository handle, under DVC's lock."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with _quiet_dvc(), Repo(str(root)) as repo, repo.lock:
            return save_ingest_entry(repo, root)
    except (DvcException, OSError):  # the stage runs, and DVC says what is wrong if it matters
        return False


def restore_ingest(root: str | Path, pull: bool = False) -> bool:
    """Check ingest's outputs out of the run cache (fetching the entry's data from the default remote with `pull`)
    when an entry for its code and params exists and its report's source fingerprints are those of the sources
    now; then write its dvc.lock entry. True when restored; False when the stage has to run."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage.cache import RunCacheNotFoundError, RunCacheNotSupported

    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths

    root = Path(root).resolve()
    try:
        # In the workspace: DVC resolves the entry's stage against the CWD (StageCache._create_stage).
        with _quiet_dvc(), contextlib.chdir(root), Repo(str(root)) as repo, repo.lock:
            stage = _ingest_stage(repo, root)
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
            paths = Paths.of(root)
            if not sources_unchanged(load_config(paths.root / "params.yaml"), paths):
                return False
            stage.save(run_cache=False)
            stage.commit()
            stage.dump(update_pipeline=False)
    except (DvcException, OSError):  # the stage runs, and DVC says what is wrong if it matters
        return False
    return True
