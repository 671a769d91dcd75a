"""The `lmcycle` command line: the one place that sees both lmcore and the Prefect flows.

`lmcycle stage NAME` calls lmcore directly (what DVC runs); `lmcycle run` drives the whole graph.
Heavy libraries are imported inside commands so `lmcycle stage ingest` starts in about a second.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lmcore.errors import LmcycleError
from lmcore.stages import STAGES

app = typer.Typer(
    name="lmcycle",
    help="Run the life of a language model: ingest → tokenizer → tokenize → pretrain → finetune → evaluate → register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Telemetry off unless the user chose otherwise; nothing else about the user's environment is touched.
_TELEMETRY_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}


def _telemetry_off() -> None:
    for key, value in _TELEMETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def print_summary(title: str, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict | list):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
        table.add_row(str(key), str(value))
    Console(stderr=True).print(table)


def run_stage(name: str, params: Path = Path("params.yaml"), workspace: Path = Path(".")) -> dict:
    from lmcore.config import load_config
    from lmcore.paths import Paths

    config = load_config(params)
    module = importlib.import_module(f"lmcore.stages.{name}")
    return module.run(config, Paths.of(workspace))


@app.callback()
def main() -> None:
    _telemetry_off()


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")],
    params: Annotated[Path, typer.Option(help="params file")] = Path("params.yaml"),
) -> None:
    """Run one stage in the current workspace (what `dvc repro` calls)."""
    if name not in STAGES:
        raise fail(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}", 2)
    try:
        summary = run_stage(name, params)
    except LmcycleError as err:
        raise fail(str(err)) from None
    print_summary(f"stage {name}", summary)


@app.command()
def run(
    set_: Annotated[list[str] | None, typer.Option("-S", "--set", help="override section.key=value")] = None,
    until: Annotated[str | None, typer.Option(help="stop after this stage")] = None,
    force: Annotated[list[str] | None, typer.Option(help="rerun this stage even if up to date")] = None,
    params: Annotated[Path, typer.Option(help="params file")] = Path("params.yaml"),
) -> None:
    """Validate and write overrides into params.yaml, then reproduce the stage graph."""
    import subprocess

    from lmcore.config import apply_overrides

    try:
        apply_overrides(set_ or [], params)
    except LmcycleError as err:
        raise fail(str(err)) from None
    targets = STAGES[: STAGES.index(until) + 1] if until else []
    if until and until not in STAGES:
        raise fail(f"--until: unknown stage {until!r}", 2)
    for name in force or []:
        code = subprocess.call(["dvc", "repro", "--force", "--single-item", name])
        if code:
            raise typer.Exit(code)
    code = subprocess.call(["dvc", "repro", *targets[-1:]])
    raise typer.Exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
