"""The whole lifecycle twice, from two fresh workspaces built alike, gives byte-identical reports/ and dvc.lock:
what bit-for-bit determinism on CPU for a fixed seed promises on one machine. One run uses Prefect's embedded
(ephemeral) API, as `make run` does; the other a running Prefect server, as a team does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import make_workspace, tiny_params


def run_lifecycle(root: Path, api: str | None) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    proc = subprocess.run(["lmcycle", "run"], cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]


def reports(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "reports").rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_two_fresh_workspaces_give_byte_identical_reports_and_dvc_lock(
    tmp_path: Path, kjv_slice: Path, chatter_slice: Path, prefect_api: str
) -> None:
    params = tiny_params(kjv_slice, chatter_slice)
    embedded, served = (make_workspace(tmp_path / name, params) for name in ("embedded", "served"))
    run_lifecycle(embedded, None)
    run_lifecycle(served, prefect_api)
    first, second = reports(embedded), reports(served)
    assert {"reports/pretrain.json", "reports/finetune.json", "reports/evaluate.json"} <= set(first)
    assert first.keys() == second.keys()
    differ = [name for name in first if first[name] != second[name]]
    assert differ == [], f"reports differ between two fresh runs: {differ}"
    assert (embedded / "dvc.lock").read_bytes() == (served / "dvc.lock").read_bytes()
