"""The code each stage runs, recorded as one small file per stage for a project made by `lmcycle init`.

In this repository dvc.yaml lists the source files a stage imports. A project made by `lmcycle init` has no sources:
lmcycle is an installed package. There each stage depends on `.lmcycle/code/<stage>.json` instead, which names every
installed module of the stage's import closure with its SHA-256 and a digest over them all. The `code` stage of that
project's dvc.yaml (always changed, like ingest) rewrites these files before any other stage is checked, so after
`pip install -U lmcycle` exactly the stages whose code changed rerun, in `dvc repro` and in `lmcycle run` alike.
The lmcycle version is deliberately left out: a release that changes no module a stage imports reruns nothing.

The closure is read from the installed files with `ast` (every import, also inside functions, plus the packages
above each module, whose `__init__` runs on import), so it needs no import of the stage code and no extra library.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from pathlib import Path

from lmcore.errors import LmcycleError
from lmcore.files import atomic_write_text
from lmcore.lifecycle.config import STAGES

ROOT_PACKAGE = "lmcore"
CODE_DIR = Path(".lmcycle") / "code"


def package_dir() -> Path:
    """The folder of the `lmcore` package this interpreter imports (site-packages when installed)."""
    spec = importlib.util.find_spec(ROOT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LmcycleError(f"cannot locate the installed {ROOT_PACKAGE} package")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def module_file(base: Path, module: str) -> Path | None:
    """The file of `module` (dotted, under lmcore) below `base`, the folder holding the lmcore package."""
    path = base.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names a module imports (absolute and relative), and `from X import name` as X.name too."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                prefix = ".".join(parts[:keep])
                base = f"{prefix}.{node.module}" if node.module else prefix
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n == ROOT_PACKAGE or n.startswith(ROOT_PACKAGE + ".")}


def closure(module: str, base: Path) -> dict[str, Path]:
    """Every lmcore module `module` imports, directly or not (itself included), with its file."""
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            candidate = ".".join(parts[:i])
            if candidate in found:
                continue
            path = module_file(base, candidate)
            if path is None:  # `from lmcore.x import function`: a name, not a module
                continue
            found[candidate] = path
            tree = ast.parse(path.read_bytes(), filename=str(path))
            todo.extend(_imports(tree, candidate, path.name == "__init__.py"))
    return found


def stage_record(stage: str, base: Path | None = None) -> dict:
    """What `.lmcycle/code/<stage>.json` holds: the stage module, each file's SHA-256, and one digest over them."""
    base = (base or package_dir()).parent
    files = {
        path.relative_to(base).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in closure(f"{ROOT_PACKAGE}.lifecycle.stages.{stage}", base).values()
    }
    files = dict(sorted(files.items()))
    digest = hashlib.sha256("".join(f"{name}\0{sha}\n" for name, sha in files.items()).encode()).hexdigest()
    return {"stage": stage, "module": f"{ROOT_PACKAGE}.lifecycle.stages.{stage}", "digest": digest, "files": files}


def code_file(root: Path, stage: str) -> Path:
    return root / CODE_DIR / f"{stage}.json"


def refresh(root: str | Path, base: Path | None = None) -> list[str]:
    """Rewrite `.lmcycle/code/<stage>.json` for every stage whose installed code differs from the file; returns
    the stages whose file changed. Unchanged files are not touched (DVC then sees nothing new)."""
    root = Path(root)
    changed = []
    for stage in STAGES:
        text = json.dumps(stage_record(stage, base), indent=2) + "\n"
        path = code_file(root, stage)
        try:
            if path.read_text(encoding="utf-8") == text:
                continue
        except OSError:
            pass
        atomic_write_text(path, text)
        changed.append(stage)
    return changed
