"""The team topology on 127.0.0.1 for tests: PostgreSQL, a Prefect server and an MLflow server with auth, a
process work pool and its worker. Import the fixtures into a test module to reuse them
(`from team_servers import team_fixture, team_worker_fixture`: the fixtures `team` and `team_worker`).

Design choices:
- Every server is a real process in its own process group on a free port, started by a session fixture and
  stopped by signalling that group (then SIGKILL after a grace period) in a finalizer, whatever happens.
- Credentials are generated per session (secrets.token_urlsafe) and travel in environment variables only:
  the database password as PGPASSWORD (libpq and asyncpg read it), so no URL, command line or ini holds it; the
  MLflow admin password as MLFLOW_AUTH_ADMIN_PASSWORD. Local socket connections (in a private temp dir) are
  trusted; TCP needs the password (scram-sha-256).
- PostgreSQL refuses to run as root: as root, initdb and postgres run as the `postgres` system user.
- Without PostgreSQL's binaries the team tests skip with the reason; LMCYCLE_REQUIRE_TEAM=1 makes that a failure.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flows.lifetime import die_with_parent

START_TIMEOUT_S = 180.0
DATABASES = ("prefect", "mlflow", "mlflow_auth")
POOL = "lmcycle"  # the work pool prefect.yaml names


# --- processes ---------------------------------------------------------------------------------------------


MLFLOW_AUTH_CACHE_TTL_S = 60  # as docker/mlflow-auth.ini: a password check per credential and minute, not per request

WORKER_QUERY_SECONDS = "2"  # as docker/compose.yaml: a run waits ~1 s for the worker, not ~5 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """A process leading its own process group, its output appended to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # a killed test session leaves no server behind
        )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
    """Signal the process group `proc` leads; SIGKILL the group if it is not gone after `grace_s`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever the leader left behind in its group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def wait_until(ready: Any, proc: subprocess.Popen, log: Path, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{log_tail(log)}")
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready within {timeout_s:g} s:\n{log_tail(log)}")


def http_status(url: str, auth: tuple[str, str] | None = None, timeout_s: float = 3.0) -> int:
    request = urllib.request.Request(url, headers=basic_auth(auth))
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (127.0.0.1 only)
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0


def basic_auth(auth: tuple[str, str] | None) -> dict[str, str]:
    if auth is None:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()}


def request_json(url: str, body: Any = None, auth: tuple[str, str] | None = None, method: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **basic_auth(auth)}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (127.0.0.1 only)
        raw = response.read()
    return json.loads(raw) if raw else None


# --- PostgreSQL --------------------------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: PATH first, then Debian's versioned folders."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    return None


def require_team_servers() -> Path:
    """The PostgreSQL bin folder, or skip (fail under LMCYCLE_REQUIRE_TEAM=1) with the reason."""
    reason = None
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        reason = "PostgreSQL binaries (initdb, postgres) not found on PATH or in /usr/lib/postgresql/*/bin"
    elif os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
        reason = "running as root, and PostgreSQL refuses root: needs `runuser` and a `postgres` system user"
    if reason is not None:
        if os.environ.get("LMCYCLE_REQUIRE_TEAM") == "1":
            pytest.fail(f"team servers required (LMCYCLE_REQUIRE_TEAM=1): {reason}")
        pytest.skip(reason)
    return bin_dir


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@dataclass
class Postgres:
    port: int
    user: str
    password: str
    folder: Path
    proc: subprocess.Popen

    def url(self, database: str, driver: str) -> str:
        """A SQLAlchemy URL without the password (the processes get PGPASSWORD)."""
        return f"postgresql+{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> Any:
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=database
        )


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start_postgres(bin_dir: Path) -> Postgres:
    """initdb in a private folder, then `postgres` on 127.0.0.1:PORT (socket in the folder) with DATABASES.

    The folder is a fresh one in the system temp dir (removed by `stop_postgres`): pytest's own temp folders are
    private to the user running the tests, so the `postgres` user could not enter them."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lmcycle-postgres-"))
    user, password = "lmcycle", secrets.token_urlsafe(24)
    pwfile = folder / "pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(pwfile, "postgres")
    folder.chmod(0o700)
    data, log = folder / "data", folder / "postgres.log"
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}"]
    initdb += ["--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-instructions"]
    try:
        subprocess.run(_as_postgres(initdb), check=True, capture_output=True, text=True, timeout=120)
    except subprocess.CalledProcessError as err:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({err.returncode}):\n{err.stdout}\n{err.stderr}") from None
    except BaseException:  # interrupted: leave nothing behind
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        pwfile.unlink(missing_ok=True)
    if os.geteuid() == 0:
        log.touch()
        shutil.chown(log, "postgres")
    port = free_port()
    cmd = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder)]
    cmd += ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"]
    proc = start(_as_postgres(cmd), dict(os.environ), log)
    pg = Postgres(port, user, password, folder, proc)
    try:
        wait_until(lambda: _answers(pg), proc, log, "postgres")
        conn = pg.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in DATABASES:
                cur.execute(f"create database {name}")
        conn.close()
    except BaseException:
        stop_postgres(pg)
        raise
    return pg


def _answers(pg: Postgres) -> bool:
    try:
        pg.connect().close()
        return True
    except Exception:
        return False


def stop_postgres(pg: Postgres) -> None:
    try:
        stop(pg.proc, signal.SIGINT)  # SIGINT = fast shutdown (SIGTERM would wait for clients to disconnect)
    finally:
        shutil.rmtree(pg.folder, ignore_errors=True)


# --- Prefect and MLflow servers ----------------------------------------------------------------------------


@dataclass
class Team:
    """The running topology and what a client needs to reach it."""

    postgres: Postgres
    prefect_api: str
    prefect_auth: str  # "user:password", PREFECT_API_AUTH_STRING
    mlflow_uri: str
    mlflow_user: str
    mlflow_password: str
    artifacts: Path  # the folder the MLflow server proxies artifacts to (the "bucket")

    @property
    def prefect_credentials(self) -> tuple[str, str]:
        user, _, password = self.prefect_auth.partition(":")
        return user, password

    @property
    def mlflow_credentials(self) -> tuple[str, str]:
        return self.mlflow_user, self.mlflow_password

    def secrets(self) -> dict[str, str]:
        """Every credential of the session, by name (what must never appear in a log, param, tag or artifact)."""
        return {
            "database password": self.postgres.password,
            "Prefect auth string": self.prefect_auth,
            "Prefect password": self.prefect_credentials[1],
            "MLflow admin password": self.mlflow_password,
        }

    def client_env(self, **changes: str) -> dict[str, str]:
        """The environment of a team member's shell (or the worker's): both servers, with credentials."""
        env = {k: v for k, v in os.environ.items() if k not in {"PREFECT_API_KEY", "PGPASSWORD"}}
        env.update(
            PREFECT_API_URL=self.prefect_api,
            PREFECT_API_AUTH_STRING=self.prefect_auth,
            MLFLOW_TRACKING_URI=self.mlflow_uri,
            MLFLOW_TRACKING_USERNAME=self.mlflow_user,
            MLFLOW_TRACKING_PASSWORD=self.mlflow_password,
        )
        env.update(changes)
        return env

    def prefect(self, path: str, body: Any = None, method: str | None = None) -> Any:
        return request_json(f"{self.prefect_api}{path}", body, self.prefect_credentials, method)

    def mlflow(self, path: str, body: Any = None) -> Any:
        return request_json(f"{self.mlflow_uri}{path}", body, self.mlflow_credentials)


def _server_env(pg: Postgres, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING_"))}
    env.update(
        PGPASSWORD=pg.password,
        PREFECT_HOME=str(home / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_prefect_server(pg: Postgres, folder: Path, auth: str) -> tuple[subprocess.Popen, str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), folder / "prefect-server.log"
    env = _server_env(pg, folder)
    env.update(PREFECT_API_DATABASE_CONNECTION_URL=pg.url("prefect", "asyncpg"), PREFECT_SERVER_API_AUTH_STRING=auth)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return start(cmd, env, log, cwd=folder), f"http://127.0.0.1:{port}/api", log


def start_mlflow_server(pg: Postgres, folder: Path, user: str, password: str) -> tuple[subprocess.Popen, str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    port, log, artifacts = free_port(), folder / "mlflow-server.log", folder / "bucket"
    artifacts.mkdir(exist_ok=True)
    ini = folder / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {pg.url('mlflow_auth', 'psycopg2')}\n"
        f"admin_username = {user}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {MLFLOW_AUTH_CACHE_TTL_S}\n"
    )
    env = _server_env(pg, folder)
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_AUTH_ADMIN_PASSWORD=password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(32),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_BACKEND_STORE_URI=pg.url("mlflow", "psycopg2"),
    )
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--app-name", "basic-auth", "--artifacts-destination", str(artifacts)]
    return start(cmd, env, log, cwd=folder), f"http://127.0.0.1:{port}", log


@contextlib.contextmanager
def team_topology(folder: Path) -> Iterator[Team]:
    """PostgreSQL, then the Prefect and MLflow servers on it (started side by side), all stopped on exit."""
    bin_dir = require_team_servers()
    pg = start_postgres(bin_dir)
    procs: list[subprocess.Popen] = []
    try:
        auth = f"lmcycle:{secrets.token_urlsafe(24)}"
        mlflow_password = secrets.token_urlsafe(24)
        prefect_proc, api, prefect_log = start_prefect_server(pg, folder / "prefect", auth)
        procs.append(prefect_proc)
        mlflow_proc, uri, mlflow_log = start_mlflow_server(pg, folder / "mlflow", "admin", mlflow_password)
        procs.append(mlflow_proc)
        wait_until(lambda: http_status(f"{api}/health") == 200, prefect_proc, prefect_log, "prefect server")
        wait_until(lambda: http_status(f"{uri}/health") == 200, mlflow_proc, mlflow_log, "mlflow server")
        yield Team(pg, api, auth, uri, "admin", mlflow_password, folder / "mlflow" / "bucket")
    finally:
        for proc in reversed(procs):
            stop(proc)
        stop_postgres(pg)


@contextlib.contextmanager
def process_worker(team: Team, pool: str, folder: Path) -> Iterator[subprocess.Popen]:
    """A `process` work pool (created if missing) and `prefect worker start` polling it; stopped with SIGINT
    (a worker may ignore SIGTERM), then SIGKILL of its group after a grace period."""
    folder.mkdir(parents=True, exist_ok=True)
    # it runs in `folder` ($PWD must not name the folder the tests run in), polling as docker/compose.yaml's worker
    env = team.client_env(PWD=str(folder), PREFECT_WORKER_QUERY_SECONDS=WORKER_QUERY_SECONDS)
    found = team.prefect("/work_pools/filter", {"work_pools": {"name": {"any_": [pool]}}})
    if not found:
        create = [sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process"]
        proc = subprocess.run(create, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"work-pool create:\n{proc.stdout}\n{proc.stderr}"
    log = folder / "worker.log"
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    worker = start(cmd + ["--prefetch-seconds", "5"], env, log, cwd=folder)
    try:
        wait_until(lambda: _worker_online(team, pool), worker, log, "prefect worker", timeout_s=120)
        yield worker
    finally:
        stop(worker, signal.SIGINT, grace_s=30)


def _worker_online(team: Team, pool: str) -> bool:
    try:
        workers = team.prefect(f"/work_pools/{pool}/workers/filter", {})
    except (urllib.error.URLError, OSError):
        return False
    return any(w.get("status") == "ONLINE" for w in workers or [])


# --- the team's repository and deployments -----------------------------------------------------------------


@dataclass
class TeamRepo:
    bare: Path  # the team's git remote
    clone1: Path  # the teammate's clone that deploys
    commit: str  # the pushed commit
    branch: str
    dvc_remote: Path  # the workspace's default DVC remote (a local folder)


def git(*args: str, cwd: Path) -> str:
    cmd = ["git", "-c", "user.email=team@lmcycle.local", "-c", "user.name=team", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"git {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout.strip()


def make_team_repo(base: Path, params: dict[str, Any], branch: str) -> TeamRepo:
    """A workspace repository built from this repository's files with `params`, prefect.yaml and a
    local-directory DVC remote (`dvc remote add -d`), pushed to a bare repository; then a fresh clone of it."""
    from conftest import REPO, make_workspace

    author = make_workspace(base / "author", params)
    shutil.copy(REPO / "prefect.yaml", author / "prefect.yaml")
    dvc_remote = base / "dvc-remote"
    dvc_remote.mkdir()
    dvc = [sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(dvc_remote)]
    subprocess.run(dvc, cwd=author, check=True, capture_output=True)
    git("add", "-A", cwd=author)
    git("commit", "-qm", "Team workspace: params, prefect.yaml, DVC remote", cwd=author)
    git("branch", "-M", branch, cwd=author)
    bare = base / "origin.git"
    git("init", "-q", "--bare", str(bare), cwd=base)
    git("push", "-q", str(bare), branch, cwd=author)
    clone1 = base / "clone1"
    git("clone", "-q", "--branch", branch, str(bare), str(clone1), cwd=base)
    return TeamRepo(bare, clone1, git("rev-parse", "HEAD", cwd=clone1), branch, dvc_remote)


def deploy(team: Team, repo: TeamRepo, name: str) -> dict[str, Any]:
    """`prefect deploy -n NAME` run in clone #1, then the Prefect variables the pull steps read (repository,
    branch): set only after deploying, so a run that clones shows they are resolved when it starts. The
    deployment as the server has it."""
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "-n", name]
    env = team.client_env(PWD=str(repo.clone1))  # a shell's $PWD there: what `{{ $PWD }}` in prefect.yaml reads
    proc = subprocess.run(cmd, cwd=repo.clone1, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"prefect deploy:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for variable, value in {"lmcycle_repository": str(repo.bare), "lmcycle_branch": repo.branch}.items():
        existing = team.prefect("/variables/filter", {"variables": {"name": {"any_": [variable]}}})
        if existing:
            team.prefect(f"/variables/name/{variable}", {"value": value}, method="PATCH")
        else:
            team.prefect("/variables/", {"name": variable, "value": value})
    return team.prefect(f"/deployments/name/lm-lifecycle/{name}")


def wait_for(team: Team, flow_run_id: str, timeout_s: float = 900.0) -> dict[str, Any]:
    """Poll the flow run until it reaches a final state (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        flow_run = team.prefect(f"/flow_runs/{flow_run_id}")
        if flow_run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return flow_run
        if time.monotonic() > deadline:
            raise TimeoutError(f"flow run {flow_run_id} still {flow_run['state']['name']} after {timeout_s:g} s")
        time.sleep(1)


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session", name="team")
def team_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """PostgreSQL + Prefect server (basic auth) + MLflow server (basic auth, proxied artifacts) for the session."""
    with team_topology(tmp_path_factory.mktemp("team")) as topology:
        yield topology


@pytest.fixture(scope="session", name="team_worker")
def team_worker_fixture(team: Team, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A process worker on the work pool POOL for the session; the pool's name."""
    with process_worker(team, POOL, tmp_path_factory.mktemp("worker")):
        yield POOL
