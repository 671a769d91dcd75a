"""Data and models travel through a DVC remote: a flow run ends with `dvc push --run-cache`, and a fresh clone
that pulls runs no stage (real git with a bare origin, real DVC with a local-directory remote, the real flow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.remote import RemoteError, dvc_pull_step, ingest_up_to_date

STATE = re.compile(r"^\W*(\S+)\s+\W\s+(ran|skipped|restored) \(", re.MULTILINE)


def sh(*args: str, cwd: Path) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def commit(root: Path, message: str) -> None:
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message, cwd=root)


def run_cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["lmcycle", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, timeout=900
    )


def stage_states(stderr: str) -> dict[str, str]:
    """Stage -> ran|skipped|restored, read from the summary table `lmcycle run` prints."""
    return dict(STATE.findall(stderr))


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def files_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def pipeline(tmp_path: Path, remote: Path | None) -> tuple[Path, Path]:
    """A small git + DVC repository (two stages, run and committed with dvc.lock) and a bare clone of it."""
    root = tmp_path / "src"
    root.mkdir()
    sh("git", "init", "-q", cwd=root)
    sh("dvc", "init", "-q", cwd=root)
    stages = {
        "one": {"cmd": "echo one > one.txt", "outs": ["one.txt"]},
        "two": {"cmd": "cat one.txt one.txt > two.txt", "deps": ["one.txt"], "outs": ["two.txt"]},
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    if remote is not None:
        sh("dvc", "remote", "add", "-d", "store", str(remote), cwd=root)
    sh("dvc", "repro", "-q", cwd=root)
    commit(root, "pipeline")
    origin = tmp_path / "origin.git"
    sh("git", "clone", "-q", "--bare", str(root), str(origin), cwd=tmp_path)
    return root, origin


# --- the pull step -----------------------------------------------------------------------------------------


def test_the_pull_step_tolerates_no_remote_and_an_empty_remote(tmp_path):
    _, origin = pipeline(tmp_path, remote=None)
    clone = tmp_path / "no-remote"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert dvc_pull_step(str(clone)) == {
        "directory": str(clone),
        "remote": None,
        "fetched": 0,
        "added": 0,
        "modified": 0,
    }

    for name, store in [("missing-dir", tmp_path / "nothing-here"), ("empty-dir", tmp_path / "empty")]:
        if name == "empty-dir":
            store.mkdir()
        clone = tmp_path / name
        sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
        sh("dvc", "remote", "add", "-d", "store", str(store), cwd=clone)
        result = dvc_pull_step(str(clone))  # dvc.lock names outputs the remote does not have: not an error
        assert result == {"directory": str(clone), "remote": "store", "fetched": 0, "added": 0, "modified": 0}
        assert not (clone / "two.txt").exists()


PULL_STEPS = """
import asyncio, json, sys
import yaml
from prefect.deployments.steps.core import run_steps
steps = yaml.safe_load(sys.stdin.read())["pull"]
print(json.dumps(asyncio.run(run_steps(steps))["pull"]))
"""


def test_the_pull_step_checks_out_what_was_pushed_and_fails_in_one_line_on_a_broken_remote(tmp_path, prefect_api):
    store = tmp_path / "store"
    root, origin = pipeline(tmp_path, remote=store)
    from flows.remote import push

    assert push(root) == {"remote": "store", "pushed": 3}  # two outputs, the run-cache entry of `two`
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    steps = {  # as a deployment's prefect.yaml names it; Prefect's own step runner calls it, as a worker does
        "pull": [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(clone)}},
            {"flows.remote.dvc_pull_step": {"id": "pull", "directory": "."}},
        ]
    }
    proc = subprocess.run(
        [sys.executable, "-c", PULL_STEPS],
        input=yaml.safe_dump(steps),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pulled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pulled["remote"] == "store" and pulled["added"] == 2
    assert (clone / "two.txt").read_text() == "one\none\n"

    broken = tmp_path / "broken"
    sh("git", "clone", "-q", str(origin), str(broken), cwd=tmp_path)
    (tmp_path / "a-file").write_text("not a directory")
    sh("dvc", "remote", "modify", "store", "url", str(tmp_path / "a-file" / "store"), cwd=broken)
    with pytest.raises(RemoteError) as err:
        push(broken)
    assert str(err.value).startswith("dvc push to remote 'store' failed") and "\n" not in str(err.value)
    with pytest.raises(RemoteError) as err:  # a remote that is configured but cannot be read is an error
        dvc_pull_step(str(broken))
    assert str(err.value).startswith("dvc pull from remote 'store' failed") and "\n" not in str(err.value)


def test_no_remote_or_one_that_cannot_be_read_fails_before_anything_runs(workspace_factory):
    root = workspace_factory()
    before = (root / "params.yaml").read_bytes()
    proc = run_cli("run", "--push", "-S", "pretrain.steps=3", cwd=root, LMCYCLE_TRACKING="off")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: --push: {root} has no default DVC remote; add one (`dvc remote add -d NAME URL`) or pass --no-push"
    ]
    # an S3 remote whose endpoint does not answer (nothing listens on that 127.0.0.1 port)
    sh("dvc", "remote", "add", "-d", "s3", "s3://bucket/dvc", cwd=root)
    sh("dvc", "remote", "modify", "s3", "endpointurl", f"http://127.0.0.1:{closed_port()}", cwd=root)
    for key, value in [("access_key_id", "test-key"), ("secret_access_key", "test-secret")]:
        sh("dvc", "remote", "modify", "--local", "s3", key, value, cwd=root)
    proc = run_cli("run", "-S", "pretrain.steps=3", cwd=root, LMCYCLE_TRACKING="off", AWS_EC2_METADATA_DISABLED="true")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: DVC remote 's3' cannot be read (Could not connect to the endpoint URL"), line
    assert "test-secret" not in proc.stderr
    assert not (root / "data").exists() and (root / "params.yaml").read_bytes() == before


def test_ingest_counts_as_up_to_date_only_while_its_sources_keep_their_fingerprints(data_workspace, tmp_path):
    from conftest import copy_workspace

    root = copy_workspace(data_workspace, tmp_path / "ws")
    corpus = root / "corpus" / "kjv.jsonl"  # a source the test can edit, outside DVC's view
    corpus.parent.mkdir()
    params = yaml.safe_load((root / "params.yaml").read_text())
    shutil.copy(params["data"]["pretrain"][0]["uri"], corpus)
    params["data"]["pretrain"][0]["uri"] = "corpus/kjv.jsonl"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "LMCYCLE_TRACKING": "off"}
    proc = subprocess.run(["dvc", "repro", "ingest"], cwd=root, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ingest_up_to_date(root, "ingest")
    assert not ingest_up_to_date(root, "tokenize")  # only the always-changed ingest gets this check

    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[:-1]) + lines[-1].replace("the", "thee", 1))  # same size class, new content
    assert not ingest_up_to_date(root, "ingest")
    corpus.write_text("".join(lines))
    assert ingest_up_to_date(root, "ingest")
    (root / "reports" / "ingest.json").write_text("{}")  # an output that no longer matches dvc.lock
    assert not ingest_up_to_date(root, "ingest")


# --- a flow run pushes; fresh clones pull --------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_pushes_and_a_fresh_clone_that_pulls_runs_no_stage(workspace_factory, prefect_api, tmp_path):
    root = workspace_factory()
    store = tmp_path / "store"
    sh("dvc", "remote", "add", "-d", "store", str(store), cwd=root)
    commit(root, "remote")
    origin = tmp_path / "origin.git"
    sh("git", "clone", "-q", "--bare", str(root), str(origin), cwd=tmp_path)
    sh("git", "remote", "add", "origin", str(origin), cwd=root)
    env = {"PREFECT_API_URL": prefect_api, "LMCYCLE_TRACKING": "off"}
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])

    first = run_cli("run", cwd=root, **env)  # a remote is configured: it pushes by default
    assert first.returncode == 0, first.stderr[-5000:]
    assert stage_states(first.stderr) == dict.fromkeys(stages, "ran")
    assert "to DVC remote 'store'" in first.stderr
    assert files_in(store / "files") and files_in(store / "runs")  # outputs and the run cache
    commit(root, "results")  # dvc.lock, the uncached reports and DVC's .gitignore files, as a team commits them
    sh("git", "push", "-q", "origin", "HEAD", cwd=root)

    clone = tmp_path / "clone"  # another worker: a fresh clone on an empty DVC cache
    sh("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert dvc_pull_step(str(clone))["added"] > 0
    assert ingest_up_to_date(clone, "ingest")
    second = run_cli("run", cwd=clone, **env)
    assert second.returncode == 0, second.stderr[-5000:]
    assert stage_states(second.stderr) == dict.fromkeys(stages, "skipped"), second.stderr[-3000:]
    assert not (clone / "checkpoints").exists()  # no trainer started
    assert sh("git", "status", "--porcelain", cwd=clone) == ""  # dvc.lock and reports as pulled

    older = tmp_path / "older"  # a clone whose dvc.lock predates the run: the run cache restores the stages
    sh("git", "clone", "-q", str(origin), str(older), cwd=tmp_path)
    sh("git", "checkout", "-q", "HEAD~1", cwd=older)
    dvc_pull_step(str(older))
    # with the remote, DVC fetches what its run cache restores; from another directory, as `--workspace` allows
    third = run_cli("run", "--workspace", str(older), cwd=tmp_path, **env)
    assert third.returncode == 0, third.stderr[-5000:]
    # every stage comes out of the run cache: ingest too (lmcore/lifecycle/dvcadapter/runcache.py), its sources'
    # fingerprints unchanged
    assert stage_states(third.stderr) == dict.fromkeys(stages, "restored"), third.stderr[-3000:]
    assert not (older / "checkpoints").exists()
    lock = yaml.safe_load((older / "dvc.lock").read_text())["stages"]
    assert lock == yaml.safe_load((root / "dvc.lock").read_text())["stages"]
