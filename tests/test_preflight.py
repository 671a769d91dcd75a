"""The run's pre-flight happens once: `lmcycle run` prepares the plan (checks, lock, overrides, stage graph) and
the flow adopts it instead of checking again; a flow run nobody prepared (a deployment) prepares its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import make_workspace, tiny_params

from flows.preflight import RunRequest, adopted_or_prepared, prepared_run
from lmcore.errors import LmcycleError


@pytest.fixture
def workspace(tmp_path: Path, kjv_slice: Path, chatter_slice: Path) -> Path:
    root = make_workspace(tmp_path / "ws", tiny_params(kjv_slice, chatter_slice))
    stages = {
        "a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
        "b": {"cmd": "cat a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
        "c": {"cmd": "echo c > c.txt", "outs": ["c.txt"]},
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    git = dict(cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], **git)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "stages"], **git)
    return root


def test_the_flow_adopts_the_plan_prepared_for_its_request(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LMCYCLE_TRACKING", "off")
    request = RunRequest(workspace, until="b", overrides=("pretrain.lr=0.002",))
    with prepared_run(request) as plan:
        assert plan.stages == ("a", "b")
        assert plan.config.pretrain.lr == 0.002
        assert "lr: 0.002" in (workspace / "params.yaml").read_text()
        (workspace / "dvc.yaml").rename(workspace / "gone.yaml")  # a second pre-flight would fail on this
        with adopted_or_prepared(request) as adopted:
            assert adopted is plan
        other = RunRequest(workspace, until="c")  # another request is checked on its own
        with pytest.raises(LmcycleError, match="not a workspace"), adopted_or_prepared(other):
            pass
    with pytest.raises(LmcycleError, match="not a workspace"), adopted_or_prepared(request):  # once done: not adopted
        pass


def test_stage_names_are_checked_before_anything_is_written(workspace: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LMCYCLE_TRACKING", "off")
    before = (workspace / "params.yaml").read_bytes()
    for request, message in [
        (RunRequest(workspace, until="nope", overrides=("pretrain.lr=0.002",)), r"^--until: unknown stage 'nope'"),
        (RunRequest(workspace, force=("a", "zz"), overrides=("pretrain.lr=0.002",)), r"^--force: unknown stage 'zz'"),
    ]:
        with pytest.raises(LmcycleError, match=message), prepared_run(request):
            pass
    assert (workspace / "params.yaml").read_bytes() == before
    with prepared_run(RunRequest(workspace)) as plan:  # the graph's order, all stages
        assert plan.stages == ("a", "b", "c")
