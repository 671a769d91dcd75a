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

from flows.chat import DEVICE_HELP, DTYPE_HELP
from flows.chat import chat as chat_command
from flows.initcmd import code, init, version_callback
from flows.preflight import telemetry_off
from lmcore.errors import LmcycleError
from lmcore.lifecycle.config import STAGES

TRAINING_STAGES = ("pretrain", "finetune")  # the stages that may run as several processes

app = typer.Typer(
    name="lmcycle",
    help="Run the life of a language model: ingest → tokenizer → tokenize → pretrain → finetune → evaluate → register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
    """Run one stage, tracked as an MLflow run (a child of the flow's run when one is given; LMCYCLE_TRACKING=off
    skips tracking and never imports mlflow)."""
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.tracking import stage_run
    from lmcore.reporting import use_reporter

    config = load_config(params)
    paths = Paths.of(workspace)
    module = importlib.import_module(f"lmcore.lifecycle.stages.{name}")
    with stage_run(name, config, paths) as rep, use_reporter(rep):
        return module.run(config, paths)


def launch_plan(name: str, params: Path):
    """The process layout of a training stage (lmcore.train.launch.plan); None for the other stages, and in a worker
    of torchrun (WORLD_SIZE set), which never starts processes of its own."""
    if name not in TRAINING_STAGES or "WORLD_SIZE" in os.environ:
        return None
    from lmcore.lifecycle.config import load_config
    from lmcore.train.launch import plan

    return plan(name, getattr(load_config(params), name))


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    telemetry_off()


app.command()(init)  # lmcycle outside this repository (flows/initcmd.py)
app.command()(code)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")],
    params: Annotated[Path, typer.Option(help="params file")] = Path("params.yaml"),
) -> None:
    """Run one stage in the current workspace (what `dvc repro` calls)."""
    from lmcore.train.launch import guard_worker

    if name not in STAGES:
        raise fail(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}", 2)
    guard_worker()  # a worker started by the branch below dies with its launcher
    try:
        layout = launch_plan(name, params)
        if layout is not None and layout.needs_launch:
            from lmcore.train.launch import launch

            # this process becomes the agent; each worker runs this same command under torchrun's environment
            launch([sys.executable, "-m", "flows.cli", "stage", name, "--params", str(params)], layout)
            return
        summary = run_stage(name, params)
    except LmcycleError as err:
        raise fail(str(err)) from None
    except Exception as err:  # a full disk outside the writers that name their path
        from lmcore.diskspace import disk_full_error

        if (full := disk_full_error(err, None)) is None:
            raise
        raise fail(str(full)) from None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone speaks
        print_summary(f"stage {name}", summary)


@app.command()
def run(
    set_: Annotated[list[str] | None, typer.Option("-S", "--set", help="override section.key=value")] = None,
    until: Annotated[str | None, typer.Option(help="stop after this stage (and the stages it needs)")] = None,
    force: Annotated[list[str] | None, typer.Option(help="rerun this stage even if DVC finds it up to date")] = None,
    register: Annotated[bool, typer.Option(help="register the model and apply the promotion gate")] = True,
    push: Annotated[
        bool | None,
        typer.Option(
            "--push/--no-push",
            help="`dvc push --run-cache` after a successful run [default: when the workspace has a DVC remote]",
            show_default=False,
        ),
    ] = None,
    workspace: Annotated[Path, typer.Option(help="the workspace (DVC repository) to run in")] = Path("."),
) -> None:
    """Run the lifecycle: write overrides into params.yaml, then the Prefect flow `lm-lifecycle` over the DVC
    stages, MLflow tracking, and registration with the promotion gate."""
    from flows.executor import prestarted
    from flows.preflight import RunRequest, prepared_run

    root = workspace.resolve()
    request = RunRequest(root, until, tuple(force or ()), tuple(set_ or ()), push)
    try:
        # every check before anything is written; the flow adopts the plan (and this lock) instead of checking again
        with prepared_run(request, check_api=True), prestarted(root):  # the host imports torch while Prefect starts
            from flows.lifetime import start_tied_prefect_server

            start_tied_prefect_server()  # Prefect's ephemeral API, dying with this process even by SIGKILL
            from flows.lifecycle import lifecycle

            state = lifecycle(
                workspace=str(root),
                until=until,
                force=list(request.force),
                overrides=list(request.overrides),
                register_model=register,
                push=push,
                return_state=True,
            )
    except LmcycleError as err:
        raise fail(str(err)) from None
    if not state.is_completed():
        raise fail(_state_error(state))
    report = state.result()
    rows = {s["name"]: f"{s['state']} ({s['seconds']:.1f} s)" for s in report["stages"]}
    reg = report.get("registration") or {}
    if reg.get("skipped"):
        rows["register"] = f"skipped: {reg['skipped']}"
    elif reg:
        reused = " (reused: same dvc.lock)" if reg.get("reused") else ""
        rows["register"] = f"{reg['uri']}{reused}: {reg['decision']}, {reg['reason']}"
    if report.get("push"):
        rows["push"] = f"{report['push']['pushed']} file(s) to DVC remote {report['push']['remote']!r}"
    print_summary("lm-lifecycle", rows)


def _state_error(state) -> str:
    """One line for a failed flow run: the innermost lmcycle error when there is one."""
    try:
        state.result()
    except LmcycleError as err:
        return str(err)
    except BaseException as err:  # noqa: BLE001 (report whatever ended the run)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return state.message or state.name


@app.command()
def serve(
    cron: Annotated[str | None, typer.Option(help="cron schedule (default: params flow.cron)")] = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "local",
    set_: Annotated[list[str] | None, typer.Option("-S", "--set", help="override applied by every run")] = None,
    start_server: Annotated[
        bool, typer.Option(help="start a local `prefect server` (on 127.0.0.1) for as long as this runs")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="at most this many concurrent runs")] = 1,
    workspace: Annotated[Path, typer.Option(help="the workspace (DVC repository) to run in")] = Path("."),
) -> None:
    """Schedule the lifecycle on this machine. Needs a Prefect server (PREFECT_API_URL, or --start-server):
    the ephemeral API that `lmcycle run` uses cannot schedule."""
    from flows.deploy import serve_lifecycle
    from flows.preflight import check_prefect_api
    from lmcore.lifecycle.config import load_config

    root = workspace.resolve()
    try:
        config = load_config(root / "params.yaml")
        check_prefect_api()  # the configured server, if any (--start-server starts one without auth)
        parameters = {"workspace": str(root), "overrides": list(set_ or [])}
        serve_lifecycle(root, cron or config.flow.cron, name, parameters, start=start_server, limit=limit)
    except LmcycleError as err:
        raise fail(str(err)) from None


@app.command(name="register")
def register_(
    workspace: Annotated[Path, typer.Option(help="the workspace (DVC repository)")] = Path("."),
    parent_run_id: Annotated[str, typer.Option(help="log the registration as a child of this MLflow run")] = "",
    flow_run_id: Annotated[str, typer.Option(help="the Prefect flow run to record on the version")] = "",
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the result here as JSON")] = None,
) -> None:
    """Register the workspace's model in MLflow and apply the promotion gate (the flow's last task)."""
    import json

    from lmcore.lifecycle.config import atomic_write_text, load_config
    from lmcore.lifecycle.paths import Paths
    from lmcore.lifecycle.registry.register import register_model

    try:
        paths = Paths.of(workspace)
        result = register_model(
            paths, load_config(paths.root / "params.yaml"), parent_run_id or None, flow_run_id or None
        )
    except LmcycleError as err:
        raise fail(str(err)) from None
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result.as_dict(), default=str))
    print_summary(f"register {result.uri}", result.as_dict())


models_app = typer.Typer(help="The registry: list versions, promote one, roll the champion back.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _registry_client():
    from lmcore.lifecycle.registry.uris import client_for

    return client_for(Path("."))


@models_app.command("list")
def models_list(name: Annotated[str | None, typer.Argument(help="registered model (default: all)")] = None) -> None:
    """Every registered version with its aliases, gate metric and decision."""
    from rich.console import Console
    from rich.table import Table

    from lmcore.lifecycle.registry.aliases import list_models

    try:
        rows = list_models(_registry_client(), name)
    except LmcycleError as err:
        raise fail(str(err)) from None
    columns = ("name", "version", "aliases", "metric", "value", "decision", "git")
    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(row[k]) for k in columns))
    console = Console()
    console.width = max(console.width, 160)  # never truncate names when piped
    console.print(table)


@models_app.command("promote")
def models_promote(name: str, version: str) -> None:
    """Give the champion alias to NAME VERSION by hand (recorded on the version)."""
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.registry.aliases import promote

    try:
        promote(_registry_client(), name, version, _champion_alias(load_config))
    except LmcycleError as err:
        raise fail(str(err)) from None
    typer.echo(f"models:/{name}@{_champion_alias(load_config)} -> version {version}")


@models_app.command("rollback")
def models_rollback(name: str) -> None:
    """Give the champion alias back to the previous champion."""
    from lmcore.lifecycle.config import load_config
    from lmcore.lifecycle.registry.aliases import rollback

    alias = _champion_alias(load_config)
    try:
        version = rollback(_registry_client(), name, alias)
    except LmcycleError as err:
        raise fail(str(err)) from None
    typer.echo(f"models:/{name}@{alias} -> version {version}")


@models_app.command("verify")
def models_verify(
    uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION")],
    dst: Annotated[Path, typer.Option(help="download the MLflow model here (a new directory) to serve it")],
) -> None:
    """Download a version and check its weights against the SHA-256 recorded on it; then serve that directory
    (`mlflow models serve -m DST`): MLflow's own loading checks nothing."""
    from lmcore.lifecycle.registry.uris import download_verified

    try:
        path = download_verified(_registry_client(), uri, dst)
    except LmcycleError as err:
        raise fail(str(err)) from None
    typer.echo(f"{uri}: weights match the SHA-256 recorded on the version; serve {path}")


def _champion_alias(load_config) -> str:
    try:
        return load_config("params.yaml").register.champion_alias
    except LmcycleError:
        return "champion"


@app.command()
def reproduce(
    uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION (or @ALIAS)")],
    run_: Annotated[bool, typer.Option("--run", help="rebuild it in a fresh git worktree and compare weights")] = False,
    directory: Annotated[Path | None, typer.Option("--dir", help="where to rebuild (default: a new temp dir)")] = None,
) -> None:
    """Print the steps that rebuild a registered version (git commit, params, dvc repro without the run cache)."""
    import tempfile

    import yaml

    from lmcore.lifecycle.registry.reproduce import rebuild, recipe

    try:
        rec = recipe(_registry_client(), uri)
        target = directory or Path(tempfile.mkdtemp(prefix="lmcycle-reproduce-")) / "worktree"
        typer.echo(f"# {uri}: git {rec.commit}{' (built from a DIRTY workspace)' if rec.dirty else ''}")
        for line in rec.steps(str(target)):
            typer.echo(line)
        typer.echo("# params.yaml:")
        typer.echo("\n".join(f"#   {line}" for line in yaml.safe_dump(rec.params, sort_keys=False).splitlines()))
        if rec.dirty:
            typer.echo("warning: the workspace was dirty; only its params are restored, not uncommitted code", err=True)
        import torch  # noqa: F401 - so the environment below names this machine's threads and device

        from lmcore.lifecycle.workspace import environment, rebuild_outlook

        outlook = rebuild_outlook(rec.env, environment(Path(".").resolve()))
        typer.echo(f"# {outlook}")
        if not run_:
            return
        identical, digest = rebuild(Path(".").resolve(), rec, target)
        typer.echo(f"rebuilt in {target}: weights sha256 {digest}")
        if identical:
            typer.echo("bit-identical: yes")
            return
        if "not expected" not in outlook:
            raise fail(f"weights differ from {uri} (registered {rec.weights_sha256})")
        from lmcore.lifecycle.registry.reproduce import within_tolerance
        from lmcore.lifecycle.registry.uris import local_model_dir

        close, detail = within_tolerance(target / rec.model_dir, local_model_dir(uri))
    except LmcycleError as err:
        raise fail(str(err)) from None
    typer.echo(f"bit-identical: no, as expected on this machine; {detail}")
    if not close:
        raise fail(f"weights of the rebuild are beyond the tolerance of {uri}: {detail}")


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="an exported model directory (Hugging Face format) or models:/NAME@ALIAS")],
    prompt: Annotated[str, typer.Option(help="the text to continue (with --chat: the user's message)")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="0 = off")] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="nucleus sampling; 1 = off")] = 0.95,
    repetition_penalty: Annotated[float, typer.Option(min=0.0, help="1 = off")] = 1.0,
    num_samples: Annotated[int, typer.Option(min=1)] = 1,
    seed: Annotated[int | None, typer.Option(help="reproducible sampling")] = None,
    chat: Annotated[bool, typer.Option(help="apply the chat template and stop at the end of the turn")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
) -> None:
    """Sample from a model with its KV cache, streaming the text to the terminal."""
    from lmcore.device import resolve
    from lmcore.engine import SamplingConfig
    from lmcore.generate import generate_text, load_model
    from lmcore.lifecycle.registry.uris import resolve_model_path

    try:
        cfg = SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            num_samples=num_samples,
            seed=seed,
        )
        where = resolve(device, dtype, key="--device")
        transformer, tokenizer = load_model(resolve_model_path(model), where.device, where.dtype_name)
    except (LmcycleError, ValueError) as err:
        raise fail(str(err)) from None

    def show(sample: int, piece: str) -> None:  # one sample streams as it comes; several print when done
        if num_samples == 1:
            sys.stdout.write(piece)
            sys.stdout.flush()

    if num_samples == 1 and not chat:
        typer.echo(prompt, nl=False)
    texts = generate_text(transformer, tokenizer, prompt, cfg, chat=chat, on_text=show)
    if num_samples == 1:
        typer.echo()
        return
    for i, text in enumerate(texts, 1):
        typer.echo(f"--- sample {i} ---")
        typer.echo(text if chat else prompt + text)


app.command(name="chat")(chat_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
