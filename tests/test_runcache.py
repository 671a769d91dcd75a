"""Every stage comes back from DVC's run cache in a fresh clone whose dvc.lock predates the run: the graph runs once,
`dvc push --run-cache` (flows.remote.push) fills a local-directory remote, and a clone that pulls runs no stage
(real git with a bare origin, real DVC, the real flow). The always-changed ingest is restored by the flow only while
its sources keep the fingerprints its restored report records (lmcore/lifecycle/dvcadapter/runcache.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml
from test_remote import commit, run_cli, sh, stage_states

from flows.remote import dvc_pull_step, push, restore_ingest

SHORT = {  # the whole graph in seconds: what is checked is where outputs come from, not what they are worth
    "pretrain": {"steps": 4, "warmup_steps": 1, "eval_every": 2, "checkpoint_every": 2, "log_every": 1},
    "finetune": {"steps": 2, "warmup_steps": 1, "eval_every": 1, "checkpoint_every": 1},
    "evaluate": {"max_new_tokens": 4, "sft_max_examples": 4},
}


def origin_with_remote(root: Path, tmp_path: Path, corpus_in_repo: bool = False) -> Path:
    """Give the workspace a default local-directory DVC remote (and, with `corpus_in_repo`, its pretraining source
    as a file inside the repository, which a test can edit), commit, and make a bare origin of it: clones of it
    carry no dvc.lock, as a teammate's clone of a branch nothing committed the run to."""
    if corpus_in_repo:
        params = yaml.safe_load((root / "params.yaml").read_text())
        corpus = root / "corpus" / "kjv.jsonl"
        corpus.parent.mkdir()
        shutil.copy(params["data"]["pretrain"][0]["uri"], corpus)
        params["data"]["pretrain"][0]["uri"] = "corpus/kjv.jsonl"
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("dvc", "remote", "add", "-d", "store", str(tmp_path / "store"), cwd=root)
    commit(root, "remote")
    origin = tmp_path / "origin.git"
    sh("git", "clone", "-q", "--bare", str(root), str(origin), cwd=tmp_path)
    return origin


def dvc_repro(root: Path, *args: str) -> str:
    env = {**os.environ, "LMCYCLE_TRACKING": "off"}
    proc = subprocess.run(["dvc", "repro", *args], cwd=root, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"dvc repro {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def fresh_clone(origin: Path, dest: Path) -> Path:
    sh("git", "clone", "-q", str(origin), str(dest), cwd=dest.parent)
    assert not (dest / "dvc.lock").exists()
    dvc_pull_step(str(dest))  # the run-cache entries; dvc.lock names no outputs yet
    return dest


def lock_stages(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_clone_restores_every_stage_from_the_pushed_run_cache(workspace_factory, prefect_api, tmp_path):
    root = workspace_factory(**SHORT)
    origin = origin_with_remote(root, tmp_path)
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])
    dvc_repro(root)  # plain DVC on the first machine
    assert push(root)["pushed"] > 0
    before = lock_stages(root)

    clone = fresh_clone(origin, tmp_path / "clone")
    env = {"PREFECT_API_URL": prefect_api, "LMCYCLE_TRACKING": "off"}
    proc = run_cli("run", "--no-register", cwd=clone, **env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert stage_states(proc.stderr) == dict.fromkeys(stages, "restored"), proc.stderr[-3000:]
    assert not (clone / "checkpoints").exists()  # no trainer started
    assert lock_stages(clone) == before  # dvc.lock written as `dvc repro` writes a restore
    for folder in ("data/ingest", "models/finetune", "reports"):
        assert tree(clone / folder) == tree(root / folder), folder
    assert (clone / "reports/evaluate/samples.json").is_file()  # evaluate's cached outputs, fetched from the remote

    # Plain `dvc repro --pull` restores every stage but the always-changed ingest, which runs and writes the same data.
    plain = fresh_clone(origin, tmp_path / "plain")
    out = dvc_repro(plain, "--pull")
    for name in stages[1:]:
        assert f"Stage '{name}' is cached - skipping run" in out, out[-3000:]
    assert "Stage 'ingest' is cached" not in out and "Running stage 'ingest'" in out
    assert not (plain / "checkpoints").exists() and lock_stages(plain) == before


def test_ingest_is_restored_only_while_its_sources_keep_their_fingerprints(workspace_factory, tmp_path):
    root = workspace_factory()
    origin = origin_with_remote(root, tmp_path, corpus_in_repo=True)
    dvc_repro(root, "ingest")
    push(root)
    assert list((tmp_path / "store" / "runs").rglob("*")), "no run-cache entry for ingest was pushed"

    clone = fresh_clone(origin, tmp_path / "clone")
    assert restore_ingest(clone, pull=True)
    assert tree(clone / "data/ingest") == tree(root / "data/ingest")
    assert lock_stages(clone)["ingest"] == lock_stages(root)["ingest"]

    edited = fresh_clone(origin, tmp_path / "edited")
    corpus = edited / "corpus" / "kjv.jsonl"
    lines = corpus.read_text().splitlines(keepends=True)
    corpus.write_text("".join(lines[:-1]))  # a source changed since the run that was cached
    assert not restore_ingest(edited, pull=True)
    assert not (edited / "dvc.lock").exists()  # nothing recorded: the flow runs the stage
