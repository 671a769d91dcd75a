"""The one seam that knows DVC: its stage graph, its repro, its locks, its lock file and cache, its remotes (and, in
`runcache`, the run cache of an always-changed stage).

Design choices:
- Everything else in lmcycle asks this module, so a DVC upgrade is checked here and nowhere else: the installed
  version must be in `SUPPORTED_DVC` (what pyproject.toml pins and the tests ran), else `check_dvc_version` fails
  with one line before anything runs.
- dvc.yaml is read through DVC (`Repo.index`, and `ProjectFile.resolver` for stage definitions with `${...}`
  filled in from params.yaml exactly as DVC fills them).
- A stage's command is started by the caller (`reproduce_stage(run_command=...)`): DVC has no hook for how a
  command is executed, so for the length of one repro the single private function that starts it,
  `dvc.stage.run._run`, is swapped for one that hands the command line to the caller.
- DVC is imported inside functions: importing it costs about half a second, and most callers need only a path.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmcore.errors import LmcycleError

SUPPORTED_DVC = ((3, 67), (3, 68))  # [low, high): the range pyproject.toml pins and the tests ran

RunCommand = Callable[[list[str] | str, str, dict[str, str]], int]  # (argv, cwd, env) -> exit code


def check_dvc_version() -> None:
    """One line, not a traceback deep in DVC, when the installed DVC is outside the range whose private
    `dvc.stage.run._run` signature `reproduce_stage` was tested against."""
    import dvc

    parts = tuple(int(p) for p in dvc.__version__.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_DVC
    if not (low <= parts < high):
        raise LmcycleError(
            f"dvc {dvc.__version__} is not supported by this lmcycle (needs dvc >={low[0]}.{low[1]},"
            f"<{high[0]}.{high[1]}): pip install 'dvc>={low[0]}.{low[1]},<{high[0]}.{high[1]}'"
        )


def is_repository(root: str | Path) -> bool:
    return (Path(root) / ".dvc").is_dir()


# --- the graph ---------------------------------------------------------------------------------------------


def stage_graph(root: str | Path) -> tuple[list[str], dict[str, set[str]]]:
    """DVC's pipeline stages in run order (upstream first, dvc.yaml order between independent stages) and, for
    each, the stages it depends on directly or not. `.dvc` files (data added with `dvc add`) are not stages."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph
            stages = [s for s in graph.nodes if getattr(s, "cmd", None)]
            position = {s: i for i, s in enumerate(repo.index.stages)}
            sub = graph.subgraph(stages)
            order = list(nx.lexicographical_topological_sort(sub.reverse(), key=lambda s: f"{position.get(s, 0):08d}"))
            upstream = {_address(s, root): {_address(d, root) for d in nx.descendants(sub, s)} for s in stages}
    except DvcException as err:
        raise LmcycleError(f"{Path(root) / 'dvc.yaml'}: {_one_line(err)}") from None
    return [_address(s, root) for s in order], upstream


def _address(stage: Any, root: str | Path) -> str:
    """How `dvc repro` run in `root` names a stage: NAME for the root dvc.yaml, else path/dvc.yaml:NAME."""
    dvcfile = Path(stage.dvcfile.path).resolve()
    if dvcfile == (Path(root).resolve() / "dvc.yaml"):
        return stage.name
    return f"{dvcfile.relative_to(Path(root).resolve()).as_posix()}:{stage.name}"


def _target(root: str | Path, name: str) -> str:
    """A stage address DVC resolves the same whatever this process's working directory is."""
    path, _, stage = name.rpartition(":")
    return f"{Path(root).resolve() / (path or 'dvc.yaml')}:{stage}"


def stage_definitions(root: str | Path) -> dict[str, dict[str, Any]]:
    """The `stages:` of the root dvc.yaml as DVC resolves them (`${section.key}` filled in from params.yaml,
    `foreach`/`matrix` stages expanded as NAME@KEY); {} when there is no dvc.yaml."""
    root = Path(root)
    if not (root / "dvc.yaml").is_file():
        return {}
    from dvc.dvcfile import ProjectFile
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with quiet(), Repo(str(root), uninitialized=not is_repository(root)) as repo:
            resolved = ProjectFile(repo, str(root.resolve() / "dvc.yaml")).resolver.resolve()
    except DvcException as err:
        raise LmcycleError(f"{root / 'dvc.yaml'}: {_one_line(err)}") from None
    return resolved.get("stages") or {}


# --- one stage ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Repro:
    """What `dvc repro --single-item` did: whether DVC reproduced the stage, whether it did so by checking the
    outputs out of its run cache instead of running the command, or why it failed."""

    reproduced: bool
    restored: bool = False
    error: str = ""


def reproduce_stage(
    root: str | Path,
    name: str,
    *,
    run_command: RunCommand,
    on_log: Callable[[str], None],
    run_env: dict[str, str],
    force: bool = False,
    pull: bool = False,
) -> Repro:
    """`dvc repro --single-item NAME` through DVC's API in this process: DVC decides, and writes dvc.lock exactly
    as the CLI does; `run_command(argv, cwd, env)` starts the stage's command (argv is what DVC would have run) and
    returns its exit code. DVC's INFO log lines go to `on_log`."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    ran: list[int] = []

    def run(argv: list[str] | str, cwd: str, env: dict[str, str]) -> int:
        ran.append(1)
        return run_command(argv, cwd, env)

    with _commands_run_by(run, on_log), Repo(str(root)) as repo:
        try:
            reproduced = repo.reproduce(_target(root, name), single_item=True, force=force, run_env=run_env, pull=pull)
        except DvcException as err:
            return Repro(False, error=f"{err}{f': {err.__cause__}' if err.__cause__ else ''}")
    restored = bool(reproduced) and not ran and not any(stage.frozen for stage in reproduced)
    return Repro(bool(reproduced), restored)


@contextlib.contextmanager
def _commands_run_by(run_command: RunCommand, on_log: Callable[[str], None]) -> Iterator[None]:
    """Swap `run_command` in for `dvc.stage.run._run` (same contract: raise StageCmdFailedError on a non-zero
    exit), and send DVC's log to `on_log` instead of its console handlers (which would print every line twice)."""
    import dvc.stage.run as dvc_run
    from dvc.stage.exceptions import StageCmdFailedError

    check_dvc_version()

    def run(executable: str | None, cmd: str, **kwargs: Any) -> None:
        code = run_command(dvc_run._make_cmd(executable, cmd), kwargs["cwd"], kwargs["env"])
        if code != 0:
            raise StageCmdFailedError(cmd, code)

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                for line in record.getMessage().splitlines():
                    if line.strip():
                        on_log(line)

    dvc_logger = logging.getLogger("dvc")
    saved = (dvc_logger.handlers, dvc_logger.level, dvc_logger.propagate)
    original = dvc_run._run
    dvc_run._run = run
    dvc_logger.handlers = [Forward(logging.INFO)]
    dvc_logger.setLevel(logging.INFO)
    dvc_logger.propagate = False
    try:
        yield
    finally:
        dvc_run._run = original
        dvc_logger.handlers, dvc_logger.propagate = saved[0], saved[2]
        dvc_logger.setLevel(saved[1])


def unchanged_but_always_changed(root: str | Path, name: str) -> bool:
    """Whether `name` is an `always_changed` stage whose command, deps, params and outputs DVC finds as in
    dvc.lock (DVC never skips such a stage by itself). False for any other stage, or one DVC cannot read."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with quiet(), Repo(str(root)) as repo, repo.lock:
            (stage,) = repo.stage.collect(_target(root, name))  # whatever the CWD is
            if not stage.always_changed:
                return False
            return not (stage.changed_stage() or stage._changed_deps() or stage.changed_outs())
    except DvcException:  # no such stage, a broken dvc.yaml: DVC's repro says why
        return False


def reproduce_from_scratch(directory: Path, stage: str, env: dict[str, str]) -> bool:
    """`dvc repro --no-run-cache STAGE` (and what it needs) in a fresh checkout, as a process of its own with `env`;
    whether it succeeded. Its output goes to this process's terminal."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dvc", "repro", "--no-run-cache", stage]
    return subprocess.run(cmd, cwd=directory, env=env).returncode == 0


@contextlib.contextmanager
def write_lock(root: Path, path: Path) -> Iterator[None]:
    """Hold DVC's write lock on `path` (its `.dvc/tmp/rwlock`, the lock `dvc repro`, `dvc exp run` and the flow
    take on a stage's deps and outs while its command runs). Writing params.yaml under it means a running stage
    never has its params changed under it, so DVC never records in dvc.lock params its model was not trained with;
    the writer fails in one line instead, and a stage cannot start while the write is under way. A folder that is
    no DVC repository has no such lock."""
    if not is_repository(root):
        yield
        return
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.rwlock import rwlock

    with Repo(str(root)) as repo:
        hardlink = repo.config["core"].get("hardlink_lock", False)
        try:
            with rwlock(repo.tmp_dir, repo.fs, f"lmcycle: write {path.name}", [], [str(path.resolve())], hardlink):
                yield
        except LockError as err:
            holders = [line.strip() for line in str(err).splitlines() if line.strip().startswith("(PID")]
            raise LmcycleError(
                f"{path}: not written: a running stage reads it ({'; '.join(holders) or 'DVC lock'}); "
                "run again when it ends"
            ) from None


# --- dvc.lock and the cache --------------------------------------------------------------------------------


def lock_outs(root: Path) -> dict[str, dict[str, Any]]:
    """Every output recorded in dvc.lock, by path: {'md5': ..., 'size': ..., 'nfiles': ..., 'stage': ...}."""
    path = Path(root) / "dvc.lock"
    lock = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}
    outs = {}
    for stage_name, stage in (lock.get("stages") or {}).items():
        for out in stage.get("outs") or []:
            outs[out["path"]] = {**out, "stage": stage_name}
    return outs


def _cache_dir(root: Path) -> Path:
    import configparser

    cache = Path(root) / ".dvc" / "cache"
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser()
        with contextlib.suppress(configparser.Error, OSError):
            parser.read(Path(root) / ".dvc" / name)
            if parser.has_option("cache", "dir"):
                cache = (Path(root) / ".dvc" / parser.get("cache", "dir").strip('"')).resolve()
    return cache


def output_hash(root: Path, path: str) -> str | None:
    """DVC's hash of a stage output, or of a file/directory inside one, from dvc.lock and the cache manifests.

    This is exactly the md5 `dvc repro` records for that path as a dependency, computed without hashing the data
    again (dvc-data's own Tree digest over the output's `.dir` manifest).
    """
    outs = lock_outs(root)
    if path in outs:
        return outs[path].get("md5")
    for out_path, out in outs.items():
        md5 = str(out.get("md5") or "")
        if not (path.startswith(out_path + "/") and md5.endswith(".dir")):
            continue
        manifest = _cache_dir(root) / "files" / "md5" / md5[:2] / md5[2:]
        if not manifest.is_file():
            return None
        entries = json.loads(manifest.read_text())
        rel = path[len(out_path) + 1 :]
        for entry in entries:
            if entry["relpath"] == rel:
                return entry["md5"]
        inner = [{**e, "relpath": e["relpath"][len(rel) + 1 :]} for e in entries if e["relpath"].startswith(rel + "/")]
        if not inner:
            return None
        from dvc_data.hashfile.tree import Tree

        tree = Tree.from_list(inner)
        tree.digest()
        return tree.hash_info.value
    return None


# --- remotes -----------------------------------------------------------------------------------------------


def default_remote(root: str | Path) -> str | None:
    """The workspace's default DVC remote (`dvc remote add -d NAME URL`), or None."""
    from dvc.config import Config

    dvc_dir = Path(root).resolve() / ".dvc"
    if not dvc_dir.is_dir():
        return None
    return Config(dvc_dir=str(dvc_dir))["core"].get("remote") or None


def read_remote(root: str | Path, remote: str) -> None:
    """One read of the remote (does its root exist); raises whatever DVC or the remote's file system raises."""
    from dvc.repo import Repo

    with quiet(), Repo(str(root)) as repo:
        odb = repo.cloud.get_remote_odb(remote)
        odb.fs.exists(odb.path)


def push(root: str | Path, remote: str | None, always_changed: tuple[str, ...] = ()) -> int:
    """`dvc push --run-cache` plus the run cache's uncached outputs; the number of files pushed. The run-cache
    entries of the `always_changed` stages named are saved first (`runcache`: DVC keeps none for them)."""
    from dvc.repo import Repo

    from lmcore.lifecycle.dvcadapter.runcache import save_entry

    with quiet(), Repo(str(root)) as repo:
        with repo.lock:
            for name in always_changed:
                save_entry(repo, root, name)
        pushed = repo.push(run_cache=True)
        return int(pushed or 0) + _push_run_cache_outputs(repo, remote)


def _push_run_cache_outputs(repo: Any, remote: str | None) -> int:
    """The outputs the run cache refers to that `Repo.push` leaves behind: DVC keeps a stage's uncached outputs
    (metrics, plots: `cache: false`) in the local cache for its run cache, but pushes only the run-cache entries,
    so a clone could not restore those stages. Objects gone from the local cache (`dvc gc`) are skipped."""
    from dvc.stage import PipelineStage, create_stage
    from dvc.stage.loader import StageLoader

    objs: set[Any] = set()
    for path in Path(repo.stage_cache.cache_dir).glob("*/*/*"):
        entry = repo.stage_cache._load_cache(path.parent.name, path.name) if path.is_file() else None
        if not entry:
            continue
        # as StageCache._create_stage, but with an absolute dvc.yaml path: DVC's resolves it against the CWD
        dvcfile = str(Path(repo.root_dir) / "dvc.yaml")
        outs = [out["path"] for out in entry["outs"]]
        stage = create_stage(PipelineStage, repo=repo, path=dvcfile, cmd=entry["cmd"], wdir=repo.root_dir, outs=outs)
        StageLoader.fill_from_lock(stage, entry)
        for used in stage.get_used_objs().values():
            objs.update(used)
    local = [obj for obj in objs if _in_local_cache(repo, obj)]
    if not local:
        return 0
    result = repo.cloud.push(local, remote=remote)
    if result.failed:
        raise LmcycleError(f"{len(result.failed)} run-cache output(s) could not be written to remote {remote!r}")
    return len(result.transferred)


def _in_local_cache(repo: Any, obj: Any) -> bool:
    odb = repo.cache.legacy if obj.name == "md5-dos2unix" else repo.cache.local
    return bool(obj.value) and odb.exists(obj.value)


def pull(root: str | Path, run_cache: bool = True) -> dict[str, int]:
    """`dvc pull [--run-cache] --allow-missing`: {"fetched", "added", "modified"}."""
    from dvc.repo import Repo

    with quiet(), Repo(str(root)) as repo:
        stats = repo.pull(run_cache=run_cache, allow_missing=True).get("stats", {})
    return {k: int(stats.get(k, 0)) for k in ("fetched", "added", "modified")}


def _one_line(err: Any) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """DVC's own console output (progress bars, warnings) stays out of the caller's terminal and logs."""
    logger = logging.getLogger("dvc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
