"""Rebuild a registered version from scratch: its recipe (git commit, params, producing stage, weight digest,
environment) read from the version's lineage tags, and a rebuild in a fresh git worktree with `dvc repro
--no-run-cache` (tracking off) whose weights are compared with the recorded SHA-256.

Where the recorded environment says a bit-identical rebuild cannot be expected (another CPU, ISA, kernel set, torch
or thread count: lmcore.lifecycle.workspace.rebuild_outlook), the rebuild is compared with the registered weights
within a stated tolerance instead (`within_tolerance`): each tensor's relative L2 distance to the registered one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.lifecycle.registry.uris import TAG, RegistryError, resolve
from lmcore.lifecycle.weights import weights_digest

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass
class Recipe:
    """How to rebuild a registered version from scratch."""

    uri: str
    commit: str
    dirty: bool
    stage: str
    params: dict[str, Any]
    weights_sha256: str
    model_dir: str
    env: dict[str, str] = field(default_factory=dict)  # where it was registered (env.* tags)

    def steps(self, directory: str = "<dir>") -> list[str]:
        lines = [f"git worktree add --detach {directory} {self.commit}", f"cd {directory}"]
        lines.append("# write the recorded params into params.yaml (lmcycle reproduce --run does this)")
        lines.append(f"LMCYCLE_TRACKING=off dvc repro --no-run-cache {self.stage}")
        lines.append(f"sha256 of {self.model_dir}/*.safetensors must equal {self.weights_sha256}")
        return lines


def recipe(client: MlflowClient, uri: str) -> Recipe:
    version = resolve(client, uri)
    tags = version.tags
    if f"{TAG}git_commit" not in tags:
        raise RegistryError(f"{uri}: version {version.version} was not registered by lmcycle (no lineage tags)")
    return Recipe(
        uri=uri,
        commit=tags[f"{TAG}git_commit"],
        dirty=tags.get(f"{TAG}git_dirty") == "true",
        stage=tags.get(f"{TAG}stage", ""),
        params=json.loads(tags.get(f"{TAG}params", "{}")),
        weights_sha256=tags.get(f"{TAG}weights_sha256", ""),
        model_dir=tags.get(f"{TAG}model_dir", ""),
        env={k.removeprefix("env."): v for k, v in tags.items() if k.startswith("env.")},
    )


def rebuild(root: Path, rec: Recipe, directory: Path) -> tuple[bool, str]:
    """Rebuild a version in a fresh git worktree of `root` at its commit with its params, `dvc repro` without the
    run cache (and without tracking), then compare the weights. Returns (bit-identical, digest of the rebuild)."""
    import subprocess
    import sys

    import yaml

    directory = Path(directory).resolve()
    if directory.exists() and any(directory.iterdir()):
        raise RegistryError(f"{directory}: must be a new or empty directory")
    git = ["git", "-C", str(root), "worktree", "add", "--detach", str(directory), rec.commit]
    proc = subprocess.run(git, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RegistryError(f"{rec.uri}: git worktree add failed: {proc.stderr.strip().splitlines()[-1:]}")
    (directory / "params.yaml").write_text(yaml.safe_dump(rec.params, sort_keys=False), encoding="utf-8")
    env = {
        **os.environ,
        "LMCYCLE_TRACKING": "off",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    cmd = [sys.executable, "-m", "dvc", "repro", "--no-run-cache", rec.stage]
    if subprocess.run(cmd, cwd=directory, env=env).returncode != 0:
        raise RegistryError(f"{rec.uri}: dvc repro failed in {directory}")
    digest = weights_digest(directory / rec.model_dir)
    return digest == rec.weights_sha256, digest


# A stated bound, not a measured cross-CPU figure (no second CPU model was at hand): training elsewhere drifts from
# the first rounding difference on, and a rebuild from other data or params lands far further than this.
WEIGHTS_RTOL = 2e-2


def within_tolerance(rebuilt: Path, registered: Path, rtol: float = WEIGHTS_RTOL) -> tuple[bool, str]:
    """Whether every weight tensor of `rebuilt` is within `rtol` (relative L2) of the same tensor in `registered`,
    and one line saying by how much (the largest distance and its tensor)."""
    from lmcore.weightfiles import read_safetensors

    mine, theirs = read_safetensors(rebuilt), read_safetensors(registered)
    if set(mine) != set(theirs):
        return False, f"other tensors than the registered weights ({len(mine)} vs {len(theirs)})"
    worst, where = 0.0, ""
    for name in sorted(theirs):
        a, b = mine[name].float(), theirs[name].float()
        if a.shape != b.shape:
            return False, f"tensor {name} has shape {tuple(a.shape)}, registered {tuple(b.shape)}"
        distance = float((a - b).norm() / b.norm().clamp_min(1e-12))
        if distance > worst:
            worst, where = distance, name
    verdict = "within" if worst <= rtol else "beyond"
    return (
        worst <= rtol,
        f"largest relative L2 distance {worst:.3g} ({where or 'none'}), {verdict} the tolerance {rtol:g}",
    )
