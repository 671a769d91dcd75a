"""`lmcycle init DIR`: a new lmcycle project for someone who installed lmcycle with pip, with no clone of its sources.

The project gets the repository's own params.yaml (the demo defaults, with their comments; its data sources are
`package:` URIs to data inside installed packages, so nothing else is needed), the repository's dvc.yaml with each
stage's source-file dependencies replaced by `.lmcycle/code/<stage>.json` (lmcore/lifecycle/codedeps.py) and a
`code` stage that rewrites those files, a prefect.yaml whose entrypoint is a module path, .gitignore and .dvcignore;
then `git init`, `dvc init`, and a first commit when git knows who you are. The templates ship inside the package
(lmcore/lifecycle/templates; params.yaml, dvc.yaml.in and dvcignore are the repository's own files).

Nothing is ever half-written: a new DIR is built in a temporary folder beside it and renamed into place; with
`force` into an existing folder, only the files init owns are replaced, each by a rename.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lmcore.errors import LmcycleError
from lmcore.lifecycle import codedeps
from lmcore.lifecycle.config import STAGES

TEMPLATES = Path(__file__).resolve().parent / "templates"
CODE_STAGE = "code"
# File written -> template it comes from (dotfiles have plain names inside the package).
OWNED = {
    "params.yaml": "params.yaml",
    "prefect.yaml": "prefect.yaml",
    ".gitignore": "gitignore",
    ".dvcignore": "dvcignore",
}
# As this repository's .dvc/config: no telemetry, and outputs linked to the cache instead of copied.
DVC_CONFIG = """\
[core]
    analytics = false
    check_update = false
[cache]
    type = "reflink,hardlink,copy"
"""
_STAGE_LINE = re.compile(r"^  ([A-Za-z0-9_-]+):\s*$")
_SOURCE_DEP = re.compile(r"^\s+- lmcore(/\S*)?\s*$")

CODE_STAGE_YAML = """\
  {name}:
    cmd: lmcycle code
    # lmcycle is an installed package here, not source files: each stage depends on .lmcycle/code/STAGE.json, the
    # SHA-256 of every installed module it imports. Always run (it takes a second), so after `pip install -U lmcycle`
    # exactly the stages whose code changed rerun. The files are small and committed, like dvc.lock.
    always_changed: true
    outs:
{outs}
"""


@dataclass
class InitResult:
    root: Path
    committed: bool
    written: list[str] = field(default_factory=list)


def project_dvc_yaml(source: str) -> str:
    """The repository's dvc.yaml for a project without sources: every `lmcore/...` dependency (and the comment lines
    inside a deps list, which talk about them) replaced by the stage's `.lmcycle/code/<stage>.json`, and the `code`
    stage that writes those files first. Line-based, so every other comment stays."""
    out: list[str] = []
    stage, in_deps = None, False
    for line in source.splitlines():
        if match := _STAGE_LINE.match(line):
            stage, in_deps = match.group(1), False
        elif line.startswith("    ") and not line.startswith("     "):
            in_deps = line.strip() == "deps:"
            if in_deps:
                out.append(line)
                out.append(f"      - {(codedeps.CODE_DIR / f'{stage}.json').as_posix()}")
                continue
        if in_deps and (_SOURCE_DEP.match(line) or line.strip().startswith("#")):
            continue
        out.append(line)
        if line.rstrip() == "stages:":
            outs = "\n".join(
                f"      - {(codedeps.CODE_DIR / f'{s}.json').as_posix()}:\n          cache: false" for s in STAGES
            )
            out.extend(CODE_STAGE_YAML.format(name=CODE_STAGE, outs=outs).splitlines())
            out.append("")
    return "\n".join(out) + "\n"


def _check_dvc_yaml(text: str) -> None:
    """The rewritten graph must be whole: every lmcycle stage, none still naming a source path, each on its file."""
    import yaml

    stages = yaml.safe_load(text)["stages"]
    for name in STAGES:
        deps = [str(d) for d in stages.get(name, {}).get("deps", [])]
        if name not in stages or any(d.startswith("lmcore") for d in deps):
            raise LmcycleError(f"dvc.yaml template: stage {name} missing or still names source files")
        if (codedeps.CODE_DIR / f"{name}.json").as_posix() not in deps:
            raise LmcycleError(f"dvc.yaml template: stage {name} lacks its code dependency")


def render(folder: Path) -> list[str]:
    """Write init's files into `folder` (which exists); returns their paths relative to it."""
    for name, template in OWNED.items():
        shutil.copyfile(TEMPLATES / template, folder / name)
    dvc_yaml = project_dvc_yaml((TEMPLATES / "dvc.yaml.in").read_text(encoding="utf-8"))
    _check_dvc_yaml(dvc_yaml)
    (folder / "dvc.yaml").write_text(dvc_yaml, encoding="utf-8")
    codedeps.refresh(folder)
    code = [(codedeps.CODE_DIR / f"{s}.json").as_posix() for s in STAGES]
    return [*OWNED, "dvc.yaml", *code]


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise LmcycleError(f"{what}: {cmd[0]} not found on PATH") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LmcycleError(f"{what} failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
    return proc.stdout


def _git_identity(cwd: Path) -> bool:
    for key in ("user.name", "user.email"):
        proc = subprocess.run(["git", "config", key], cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0 or not proc.stdout.strip():
            return False
    return True


def _repositories(folder: Path, files: list[str], version: str) -> bool:
    """git init and dvc init where missing; commit init's files when git knows who you are. Returns committed."""
    if not (folder / ".git").exists():
        _run(["git", "init", "-q"], folder, "git init")
    if not (folder / ".dvc").exists():
        _run([sys.executable, "-m", "dvc", "init", "-q"], folder, "dvc init")
        (folder / ".dvc" / "config").write_text(DVC_CONFIG, encoding="utf-8")  # dvc init leaves it empty
    _run(["git", "add", "--", *files, ".dvc/config", ".dvc/.gitignore", ".dvcignore"], folder, "git add")
    if not _git_identity(folder):
        return False
    staged = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=folder)
    if staged.returncode == 0:  # nothing new (init --force over its own files)
        return True
    _run(["git", "commit", "-q", "-m", f"lmcycle init (lmcycle {version})"], folder, "git commit")
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def init_project(target: str | Path, force: bool = False, version: str = "") -> InitResult:
    """Make `target` an lmcycle project (see the module docstring); LmcycleError in one line when it cannot."""
    target = Path(target).expanduser().absolute()
    exists = target.exists()
    if exists and not target.is_dir():
        raise LmcycleError(f"{target}: exists and is not a folder")
    if exists and any(target.iterdir()) and not force:
        raise LmcycleError(f"{target}: exists and is not empty (--force writes lmcycle's files into it)")
    if not target.parent.is_dir():
        raise LmcycleError(f"{target.parent}: no such folder")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.init-", dir=target.parent))
    except OSError as err:
        raise LmcycleError(f"{target.parent}: cannot write here ({err.strerror or err})") from None
    try:
        files = render(staging)
        if exists:
            for name in files:  # one rename per file: each is either the old or the new one, never half
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, target / name)
            root = target
        else:
            root = staging
        committed = _repositories(root, files, version)
        if not exists:
            if target.exists():  # made by someone else meanwhile
                raise LmcycleError(f"{target}: appeared while init ran; nothing written there")
            os.rename(staging, target)
            target.chmod(0o777 & ~_umask())  # mkdtemp made it private
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return InitResult(target, committed, files)
