"""`lmcycle init DIR`, `lmcycle code` and `lmcycle --version`: lmcycle used from pip, outside its repository.

The commands are plain functions registered on the app in flows/cli.py; the work is in lmcore.lifecycle.scaffold
(the project files) and lmcore.lifecycle.codedeps (the per-stage record of the installed code).
"""

from __future__ import annotations

import importlib.metadata
import shlex
from pathlib import Path
from typing import Annotated

import typer

from lmcore.errors import LmcycleError


def installed_version() -> str:
    """The installed distribution's version; the package's own when lmcycle runs from a bare source tree."""
    try:
        return importlib.metadata.version("lmcycle")
    except importlib.metadata.PackageNotFoundError:
        from lmcore import __version__

        return __version__


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"lmcycle {installed_version()}")
        raise typer.Exit()


def init(
    directory: Annotated[Path, typer.Argument(help="the project folder to create (empty or absent)")],
    force: Annotated[
        bool, typer.Option("--force", help="write into a non-empty folder: replaces only the files init owns")
    ] = False,
) -> None:
    """Make a new lmcycle project: params.yaml (the demo defaults), dvc.yaml, prefect.yaml, .gitignore, .dvcignore,
    a git + DVC repository and a first commit. Needs no clone of lmcycle's sources."""
    from lmcore.lifecycle.scaffold import init_project

    try:
        result = init_project(directory, force=force, version=installed_version())
    except LmcycleError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    where = shlex.quote(str(directory))
    typer.echo(f"lmcycle {installed_version()} project in {result.root}")
    if not result.committed:
        typer.echo(
            "not committed: git does not know who you are. Set it, then commit:\n"
            '  git config --global user.name "Your Name"; git config --global user.email you@example.org\n'
            f'  git -C {where} commit -m "lmcycle init"'
        )
    typer.echo(
        "next:\n"
        f"  cd {where}\n"
        "  lmcycle run                          # the whole lifecycle on the demo data (~5 min on 2 CPU cores)\n"
        "  lmcycle run -S pretrain.steps=800    # change a setting (written into params.yaml); then commit\n"
        "  lmcycle models list                  # the registered versions and the champion\n"
        "  dvc repro                            # the same stages without Prefect; up to date after a run"
    )


def code() -> None:
    """Record the installed code each stage runs in .lmcycle/code/STAGE.json (the `code` stage of a project made
    by `lmcycle init`; a stage whose file changes reruns)."""
    from lmcore.lifecycle.codedeps import refresh

    try:
        changed = refresh(Path.cwd())
    except (LmcycleError, OSError, SyntaxError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"code changed for: {', '.join(changed)}" if changed else "code unchanged")
