"""Every stage declares the code it runs: the import closure of `lmcore.lifecycle.stages.NAME` inside the package
must be covered by that stage's `deps` in dvc.yaml (a file, or a folder above it), so an edit to any module a stage
imports makes DVC rerun that stage. A drifted dvc.yaml once left `reports/evaluate/samples.json` stale after a
decoder edit while `dvc repro` called evaluate up to date."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grimp
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def stage_commands() -> dict[str, str]:
    """dvc.yaml stage name -> the lmcore stage module its command runs (`lmcycle stage NAME`)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        words = str(stage["cmd"]).split()
        assert words[:2] == ["lmcycle", "stage"], f"dvc.yaml stage {name}: unexpected command {stage['cmd']!r}"
        out[name] = words[2]
    return out


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("lmcore", include_external_packages=False)


def module_file(module: str) -> str:
    path = Path(*module.split("."))
    if (REPO / path).is_dir():
        return (path / "__init__.py").as_posix()
    return path.with_suffix(".py").as_posix()


def covered(file: str, deps: list[str]) -> bool:
    return any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", list(stage_commands()))
def test_dvc_yaml_declares_every_module_a_stage_imports(stage: str, graph: grimp.ImportGraph) -> None:
    module = f"lmcore.lifecycle.stages.{stage_commands()[stage]}"
    closure = {module} | graph.find_upstream_modules(module)
    deps = [str(d) for d in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]]
    missing = sorted(module_file(m) for m in closure if not covered(module_file(m), deps))
    assert not missing, f"dvc.yaml stage {stage} does not declare the code it imports: {missing}"


def test_closure_check_sees_an_undeclared_module(graph: grimp.ImportGraph) -> None:
    """The check itself can fail: evaluate's closure is not covered by tokenize's deps."""
    closure = {"lmcore.lifecycle.stages.evaluate"} | graph.find_upstream_modules("lmcore.lifecycle.stages.evaluate")
    deps = [str(d) for d in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["tokenize"]["deps"]]
    assert any(not covered(module_file(m), deps) for m in closure)


def run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_a_model_file_edit_makes_evaluate_stale(tmp_path: Path) -> None:
    """The stale-evaluate scenario with real DVC: record evaluate in dvc.lock (`dvc commit` over stand-in inputs
    and outputs: what is under test is DVC's view of the code deps, not the stage's work), edit the decoder
    (lmcore/engine.py), and `dvc status` must call evaluate changed."""
    from conftest import make_workspace

    root = make_workspace(tmp_path / "ws", {})
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["evaluate"]
    for dep in stage["deps"]:
        path = root / dep
        if not path.exists():
            path.mkdir(parents=True)
            (path / "stand-in.txt").write_text(dep)
    for entry in [*stage["metrics"], *stage["plots"], *stage["outs"]]:
        out = root / (entry if isinstance(entry, str) else next(iter(entry)))  # `- path` or `- path: {options}`
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")
    run(["dvc", "commit", "-f", "evaluate"], root)
    assert "up to date" in run(["dvc", "status", "evaluate"], root).lower()
    with (root / "lmcore" / "engine.py").open("a") as f:
        f.write("\n# an edit to the decoder\n")
    status = run(["dvc", "status", "evaluate"], root)
    assert "evaluate:" in status and "lmcore/engine.py" in status, status


def test_dvc_outside_the_tested_range_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import dvc

    from lmcore.errors import LmcycleError
    from lmcore.lifecycle.dvcadapter import check_dvc_version

    check_dvc_version()  # the installed DVC is the tested one
    monkeypatch.setattr(dvc, "__version__", "3.99.0")
    with pytest.raises(LmcycleError, match=r"^dvc 3\.99\.0 is not supported .*pip install") as err:
        check_dvc_version()
    assert "\n" not in str(err.value)
