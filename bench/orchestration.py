"""What orchestration costs: `lmcycle run` against calling the same stage functions directly in one process.

On a tiny configuration (the test suite's: a 300-chapter KJV slice, a few thousand-parameter model), measured in
one run, each on a fresh copy of the same workspace:
  direct     every stage's `run(config, paths)` in order, then registration, in this process (no DVC, no Prefect,
             no stage tracking): the same work without orchestration
  embedded   `lmcycle run` with Prefect's ephemeral API (PREFECT_API_URL unset): what a user gets by default
  server     `lmcycle run` against a running `prefect server` (started before timing)
  no-op      `lmcycle run` again on the embedded workspace, everything up to date
  team       (--team) a deployment run through the team topology of tests/team_servers.py (PostgreSQL, Prefect and
             MLflow servers with auth, a process worker): `nightly` deployed from a clone, triggered, timed until
             Completed; the worker clones the repository, runs `dvc pull`, then the flow, MLflow over HTTP
The Prefect database is migrated and each workspace's MLflow database created before timing (steady state).
Goals: overhead ≤ 30 s + 3 % embedded, ≤ 10 s + 3 % with a server; no-op rerun ≤ 20 s embedded; a team
deployment run ≤ 20 s + 5 %.

    python bench/orchestration.py [--keep] [--team]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

ENV = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
}


def slices(base: Path) -> tuple[Path, Path]:
    """The test suite's data: the first 300 KJV chapters and six chatterbot topic files."""
    import json

    import conftest

    kjv = base / "kjv_slice.jsonl"
    chapters: set = set()
    with conftest.KJV.open(encoding="utf-8") as src, kjv.open("w", encoding="utf-8") as dst:
        for line in src:
            rec = json.loads(line)
            chapters.add((rec["book"], rec["chapter"]))
            if len(chapters) > 300:
                break
            dst.write(line)
    chatter = base / "chatter"
    chatter.mkdir()
    for name in ["ai.yml", "greetings.yml", "computers.yml", "food.yml", "science.yml", "conversations.yml"]:
        shutil.copy(conftest.CHATTERBOT_EN / name, chatter / name)
    return kjv, chatter


def workspace(base: Path, name: str, kjv: Path, chatter: Path) -> Path:
    import conftest

    return conftest.make_workspace(base / name, conftest.tiny_params(kjv, chatter))


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def direct(root: Path) -> float:
    """The same work in this process: the stages' own functions in DVC's order, then registration."""
    from lmcore.lifecycle.dvcadapter import stage_graph

    order, _ = stage_graph(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        started = time.perf_counter()
        from lmcore.lifecycle.config import load_config
        from lmcore.lifecycle.paths import Paths

        config, paths = load_config(root / "params.yaml"), Paths.of(root)
        for name in order:
            importlib.import_module(f"lmcore.lifecycle.stages.{name}").run(config, paths)
        from lmcore.lifecycle.registry.register import register_model

        register_model(paths, config)
        return time.perf_counter() - started
    finally:
        os.chdir(cwd)


def create_mlflow_db(root: Path, env: dict[str, str]) -> None:
    code = "from lmcore.lifecycle.tracking import connect; connect('.', 'lmcycle')"
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, capture_output=True)


def team_deployment_run(base: Path, kjv: Path, chatter: Path) -> float:
    """Seconds from triggering the `nightly` deployment (servers, worker and deployment ready) to Completed."""
    import conftest
    import team_servers as ts

    with ts.team_topology(base / "team") as team, ts.process_worker(team, ts.POOL, base / "worker"):
        repo = ts.make_team_repo(base / "team-repo", conftest.tiny_params(kjv, chatter), "main")
        deployment = ts.deploy(team, repo, "nightly")
        started = time.perf_counter()
        flow_run = team.prefect(f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"workspace": "."}})
        final = ts.wait_for(team, flow_run["id"], timeout_s=1800)
        seconds = time.perf_counter() - started
        phases = _phases(team, flow_run["id"], final)
    if final["state"]["type"] != "COMPLETED":
        raise SystemExit(f"the deployment run ended {final['state']['name']}: {final['state']['message']}")
    for name, value in phases:
        print(f"  team run, {name:<44} {value:6.1f} s")
    return seconds


def _phases(team, flow_run_id: str, final: dict) -> list[tuple[str, float]]:
    """Where a deployment run's time goes, from the server's own state history: waiting for the worker to take
    it (Scheduled → Pending), its process start with the pull steps (Pending → Running: git clone, dvc pull,
    imports), and the flow itself (Running → Completed)."""
    from datetime import datetime

    states = team.prefect("/flow_run_states/?flow_run_id=" + flow_run_id) or []
    first = {}
    for state in sorted(states, key=lambda st: st["timestamp"]):
        first.setdefault(state["type"], datetime.fromisoformat(state["timestamp"]))
    marks = [("SCHEDULED", "PENDING", "taken by the worker"), ("PENDING", "RUNNING", "process start and pull steps")]
    marks.append(("RUNNING", "COMPLETED", "the flow itself"))
    phases = [(f"{what}:", (first[b] - first[a]).total_seconds()) for a, b, what in marks if a in first and b in first]
    return phases + _task_phases(team, flow_run_id, first)


def _task_phases(team, flow_run_id: str, first: dict) -> list[tuple[str, float]]:
    """Inside the flow: each task run (a stage, the registration, the push) and the time between them."""
    from datetime import datetime

    runs = team.prefect("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}}) or []
    spans = sorted(
        (datetime.fromisoformat(run["start_time"]), datetime.fromisoformat(run["end_time"]), run["name"])
        for run in runs
        if run.get("start_time") and run.get("end_time")
    )
    if not spans or "RUNNING" not in first or "COMPLETED" not in first:
        return []
    phases, mark = [], first["RUNNING"]
    for start, end, name in spans:
        phases.append(("  before " + name, (start - mark).total_seconds()))
        phases.append(("  task " + name, (end - start).total_seconds()))
        mark = end
    phases.append(("  after the last task", (first["COMPLETED"] - mark).total_seconds()))
    return phases


def verdict(overhead: float, base: float, fixed: float, share: float = 0.03) -> str:
    goal = fixed + share * base
    return f"{overhead:6.1f} s  (goal ≤ {goal:.1f} s: {'met' if overhead <= goal else 'NOT met'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspaces")
    parser.add_argument("--team", action="store_true", help="also time a deployment run through the team topology")
    args = parser.parse_args()
    os.environ.update(ENV)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # every workspace, the direct one too, logs to its own sqlite db
    base = Path(tempfile.mkdtemp(prefix="lmcycle-bench-orch-"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # each workspace logs to its own sqlite database (the default)
    env["PREFECT_HOME"] = str(base / "prefect-home")
    try:
        kjv, chatter = slices(base)
        roots = {name: workspace(base, name, kjv, chatter) for name in ("direct", "embedded", "server")}
        subprocess.run(["prefect", "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True)
        for name in ("direct", "embedded", "server"):
            create_mlflow_db(roots[name], env)

        t_direct = direct(roots["direct"])
        t_embedded = timed(["lmcycle", "run"], roots["embedded"], env)
        t_noop = timed(["lmcycle", "run"], roots["embedded"], env)

        from flows.deploy import start_server, stop_process

        proc, url = start_server(home=base / "prefect-server", log=base / "prefect-server.log")
        try:
            t_server = timed(["lmcycle", "run"], roots["server"], {**env, "PREFECT_API_URL": url})
        finally:
            stop_process(proc)
        t_team = team_deployment_run(base, kjv, chatter) if args.team else None
    finally:
        if args.keep:
            print(f"workspaces kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)

    print(f"stages called directly, one process:      {t_direct:6.1f} s")
    print(f"lmcycle run, embedded (ephemeral API):    {t_embedded:6.1f} s   ratio {t_embedded / t_direct:.2f}x")
    print(f"lmcycle run, against a prefect server:    {t_server:6.1f} s   ratio {t_server / t_direct:.2f}x")
    noop = "met" if t_noop <= 20 else "NOT met"
    print(f"lmcycle run, no-op rerun (embedded):      {t_noop:6.1f} s   (goal ≤ 20 s: {noop})")
    print(f"overhead embedded:                        {verdict(t_embedded - t_direct, t_direct, 30.0)}")
    print(f"overhead with a server:                   {verdict(t_server - t_direct, t_direct, 10.0)}")
    if t_team is not None:
        print(f"team deployment run, trigger → Completed: {t_team:6.1f} s   ratio {t_team / t_direct:.2f}x")
        print(f"overhead of a team deployment run:        {verdict(t_team - t_direct, t_direct, 20.0, 0.05)}")


if __name__ == "__main__":
    main()
