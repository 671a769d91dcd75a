"""A workspace's DVC remote: push after a flow run, pull before one, and when the always-changed ingest can skip.

Design choices:
- Through DVC's Python API (`Repo.push` / `Repo.pull`, called by lmcore.lifecycle.dvcadapter), with the run cache
  (`run_cache=True`) and the outputs its entries refer to: a clone whose dvc.lock in git is older than the remote
  still gets its stages restored from the run cache by `dvc repro --pull` (the flow reproduces with `pull` when a
  remote is configured).
- Pulling is tolerant by design (`dvc_pull_step`, a Prefect deployment pull step): no remote, an empty remote or
  a remote that lacks some outputs is not an error, since the stages that miss data recompute it.
- `ingest` is `always_changed` in dvc.yaml (its sources may live outside the repository) and DVC never uses the run
  cache or a lock entry to skip such a stage (lmcore/lifecycle/dvcadapter/runcache.py keeps and restores a run-cache
  entry for it, `restore_ingest` checking the restored report's fingerprints; a push saves it first). The flow
  skips it when DVC finds everything else of the stage unchanged (command, code, params, outputs as in dvc.lock)
  and the sources' fingerprints (file digests, package versions, dataset fingerprints; lmcore.data.sources) equal
  those recorded in its report by the run that wrote the outputs: the same inputs give byte-identical outputs
  (lmcore/lifecycle/stages/ingest.py), so running it would change nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmcore.errors import LmcycleError

INGEST_STAGE = "ingest"


class RemoteError(LmcycleError):
    """The DVC remote cannot be used."""


def should_push(root: str | Path, push: bool | None) -> bool:
    """Whether a flow run uses the remote (pulls what it misses, pushes at the end): as asked, else (None) when the
    workspace has a default remote. A push without a remote, or to a remote that cannot be read, is an error
    raised before any stage runs."""
    from lmcore.lifecycle.dvcadapter import default_remote

    remote = default_remote(root)
    if push and remote is None:
        raise RemoteError(
            f"--push: {Path(root).resolve()} has no default DVC remote; add one (`dvc remote add -d NAME URL`) "
            "or pass --no-push"
        )
    using = bool(remote) if push is None else push
    if using:
        check_remote(root, remote)
    return using


def check_remote(root: str | Path, remote: str) -> None:
    """One read of the remote (does its root exist), so a wrong URL, endpoint or credential fails in one line
    before any stage runs rather than at the push. A remote that does not exist yet is fine (the push creates it)."""
    from lmcore.lifecycle.dvcadapter import read_remote

    try:
        read_remote(root, remote)
    except Exception as err:  # noqa: BLE001 (as in push)
        raise RemoteError(
            f"DVC remote {remote!r} cannot be read ({_one_line(err)}): check its URL and credentials "
            "(`dvc remote modify`), or pass --no-push to run without it"
        ) from None


def push(root: str | Path) -> dict[str, Any]:
    """`dvc push --run-cache`: every cached output of the workspace and the run cache, to the default remote."""
    from lmcore.lifecycle import dvcadapter

    remote = dvcadapter.default_remote(root)
    try:
        pushed = dvcadapter.push(root, remote, always_changed=(INGEST_STAGE,))
    except Exception as err:  # noqa: BLE001 (DVC errors, and OSError or a cloud SDK's own from the file systems)
        cause = f": {_one_line(err.__cause__)}" if err.__cause__ else ""
        raise RemoteError(
            f"dvc push to remote {remote!r} failed ({_one_line(err)}{cause}); the outputs are still in the local "
            "cache: once the remote works, run again (every stage is up to date, so it only pushes)"
        ) from None
    return {"remote": remote, "pushed": int(pushed or 0)}


def dvc_pull_step(directory: str = ".", run_cache: bool = True) -> dict[str, Any]:
    """A Prefect deployment pull step: `dvc pull --run-cache` in `directory`, tolerating a missing or empty remote.

    Use it after `set_working_directory` in prefect.yaml:
        - flows.remote.dvc_pull_step: {directory: "{{ $PWD }}"}
    Returns {"directory", "remote", "fetched", "added", "modified"} (remote None when none is configured; the
    directory, so the flow runs in the clone whichever step comes last); raises RemoteError
    with one line only when the remote is configured but cannot be read (wrong path, credentials, network).
    """
    from lmcore.lifecycle import dvcadapter

    remote = dvcadapter.default_remote(directory)
    if remote is None:
        return {"directory": directory, "remote": None, "fetched": 0, "added": 0, "modified": 0}
    try:
        stats = dvcadapter.pull(directory, run_cache=run_cache)
    except Exception as err:  # noqa: BLE001 (as in push)
        raise RemoteError(f"dvc pull from remote {remote!r} failed: {_one_line(err)}") from None
    return {"directory": directory, "remote": remote, **stats}


def ingest_up_to_date(root: str | Path, name: str) -> bool:
    """Whether the flow may skip the always-changed ingest stage `name` (see the module docstring)."""
    if name != INGEST_STAGE:
        return False
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.dvcadapter import unchanged_but_always_changed
    from lmcore.lifecycle.paths import Paths

    if not unchanged_but_always_changed(root, name):
        return False
    paths = Paths.of(root)
    return sources_unchanged(load_config(paths.root / "params.yaml"), paths)


def sources_unchanged(config: Any, paths: Any) -> bool:
    """Whether every data source still has the fingerprint recorded in reports/ingest.json."""
    from lmcore.data.sources import resolve
    from lmcore.lifecycle.config import DATA_KINDS as KINDS

    try:
        report = json.loads(paths.report(INGEST_STAGE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    for kind in KINDS:
        sources = getattr(config.data, kind)
        recorded = (report.get(kind) or {}).get("sources", [])
        if len(recorded) != len(sources):
            return False
        for index, (source, seen) in enumerate(zip(sources, recorded, strict=True)):
            if seen.get("uri") != source.uri:
                return False
            try:
                now = resolve(source, f"data.{kind}[{index}]", paths.root).fingerprint
            except Exception:  # noqa: BLE001 (a source that cannot be read now: let the stage say why)
                return False
            if json.loads(json.dumps(now, sort_keys=True, default=str)) != seen.get("fingerprint"):
                return False
    return True


def _one_line(err: Any) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def restore_ingest(root: str | Path, pull: bool = False) -> bool:
    """Restore the always-changed ingest from the run cache when its entry's report records the sources'
    fingerprints of now (lmcore.lifecycle.dvcadapter.runcache); True when restored, False when it has to run."""
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.dvcadapter import runcache
    from lmcore.lifecycle.paths import Paths

    paths = Paths.of(Path(root).resolve())
    return runcache.restore(
        paths.root, INGEST_STAGE, lambda: sources_unchanged(load_config(paths.root / "params.yaml"), paths), pull=pull
    )


def save_ingest_run_cache(root: str | Path) -> bool:
    """Keep a run-cache entry for the ingest that just ran (DVC keeps none for an always-changed stage)."""
    from lmcore.lifecycle.dvcadapter import runcache

    return runcache.save(root, INGEST_STAGE)
