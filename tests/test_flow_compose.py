"""The team setup in docker/, checked statically (no container engine here): the compose file, its Dockerfiles and
config files reference each other consistently — hosts and ports, databases, buckets, the work pool, the files
the images copy, and the versions pinned by requirements.lock — and it is locked down: no credential in any file
of the repository (each comes from docker/.env, which compose requires), ports on 127.0.0.1 by default, MinIO's
console unpublished, basic auth on Prefect and MLflow, a non-root worker that runs the workspace's own code.
The worker's `lmcycle` launcher and its DVC remote config are run for real (Python, DVC)."""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
# environment keys that carry a credential (or the name that goes with one)
SECRET_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY|_USER$|^PGUSER$")


@pytest.fixture(scope="module")
def compose_text() -> str:
    return (DOCKER / "compose.yaml").read_text()


@pytest.fixture(scope="module")
def compose(compose_text) -> dict:
    return yaml.safe_load(compose_text)


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_example(DOCKER / ".env.example")


def read_env_example(path: Path) -> dict[str, str]:
    """NAME=value lines; each must follow a comment line (the variable's documentation)."""
    values: dict[str, str] = {}
    previous = ""
    for line in path.read_text().splitlines():
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line):
            name, value = line.split("=", 1)
            assert previous.startswith("#") or previous in values, f".env.example: {name} has no comment above it"
            values[name] = value
            previous = name
        else:
            previous = line.strip() if line.strip() else ""
    return values


def resolved(value: object) -> str:
    """A compose value as it reads with nothing set in the environment: defaults applied, required values
    replaced by their variable's name."""
    return VAR.sub(lambda m: m["arg"] if m["op"] in {":-", "-"} else f"<{m['name']}>", str(value))


def service_text(service: dict) -> str:
    """Everything a service says about other services: its command, entrypoint and environment values."""
    parts = [str(service.get("command", "")), str(service.get("entrypoint", ""))]
    parts += [str(v) for v in (service.get("environment") or {}).values()]
    parts += [str(v) for v in ((service.get("healthcheck") or {}).get("test") or [])]
    return resolved(" ".join(parts))


def published(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port, with defaults applied."""
    out = []
    for entry in service.get("ports") or []:
        parts = resolved(entry).split(":")
        assert len(parts) == 3, f"port {entry!r} names no host address (it would bind every interface)"
        out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def listening_port(service: dict) -> set[int]:
    """Ports a service listens on inside the network: --port flags and published container ports."""
    ports = {int(p) for p in re.findall(r"--port[ =](\d+)", service_text(service))}
    return ports | {container for _, _, container in published(service)}


def lock_version(dist: str) -> str:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{dist}=="):
            return line.split("==")[1].strip()
    raise AssertionError(f"{dist} not in requirements.lock")


def env_var(service: dict, key: str) -> str:
    """The variable a service's environment entry takes its value from (it must be exactly `${VAR...}`)."""
    value = str((service.get("environment") or {}).get(key, ""))
    match = VAR.fullmatch(value)
    assert match, f"{key}={value!r}: expected ${{VAR:?...}}"
    return match["name"]


def tracked_docker_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "docker"], cwd=REPO, capture_output=True, text=True, check=True)
    files = [REPO / line for line in listed.stdout.split()]
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "docker"], cwd=REPO, capture_output=True, text=True
    )
    return [f for f in files + [REPO / line for line in untracked.stdout.split()] if f.is_file()]


# config files a service reads besides its compose entry: MLflow's auth ini, the worker image's DVC config
MOUNTED_CONFIG = {
    "mlflow": lambda: (DOCKER / "mlflow-auth.ini").read_text(),
    "worker": lambda: (DOCKER / "dvc" / "config").read_text(),
}


# --- consistency ----------------------------------------------------------------------------------------------


def test_services_depend_only_on_services_that_exist(compose):
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for target in depends if isinstance(depends, list) else depends.keys():
            assert target in services, f"{name} depends on unknown service {target}"


def test_every_host_port_reference_points_at_a_service_listening_there(compose):
    services = compose["services"]
    seen = 0
    for name, service in services.items():
        env = service.get("environment") or {}
        text = service_text(service) + " " + MOUNTED_CONFIG.get(name, lambda: "")()
        pairs = re.findall(r"[a-z][a-z0-9+]*://(?:[^@/\s]*@)?([a-z][a-z0-9-]*):(\d+)", text)
        if "PREFECT_SERVER_DATABASE_HOST" in env:
            pairs.append((env["PREFECT_SERVER_DATABASE_HOST"], env["PREFECT_SERVER_DATABASE_PORT"]))
        for host, port in pairs:
            if host in {"localhost"}:
                continue
            assert host in services, f"{name} talks to unknown host {host}"
            assert int(port) in listening_port(services[host]) or host == "postgres" and port == "5432", (
                f"{name} talks to {host}:{port}, which does not listen there"
            )
            seen += 1
    assert seen >= 8


def test_databases_and_buckets_used_are_created(compose):
    services = compose["services"]
    init_sql = (DOCKER / "postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", init_sql)) | {services["postgres"]["environment"]["POSTGRES_DB"]}
    auth = configparser.ConfigParser()
    auth.read(DOCKER / "mlflow-auth.ini")
    texts = [service_text(s) for s in services.values()] + [auth["mlflow"]["database_uri"]]
    used = {
        db for text in texts for db in re.findall(r"postgres(?:ql)?(?:\+\w+)?://(?:[^@\s]+@)?postgres:5432/(\w+)", text)
    }
    used.add(services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_NAME"])
    assert used == {"prefect", "mlflow", "mlflow_auth"} and used <= created

    setup = str(services["minio-setup"]["entrypoint"])
    buckets = set(re.findall(r"mc mb --ignore-existing store/([\w-]+)", setup))
    used_buckets = set(re.findall(r"s3://([\w-]+)", " ".join(service_text(s) for s in services.values())))
    dvc = configparser.ConfigParser()
    dvc.read(DOCKER / "dvc" / "config")
    used_buckets |= set(re.findall(r"s3://([\w-]+)", dvc["'remote \"store\"'"]["url"]))
    assert used_buckets == {"mlflow", "dvc"} and used_buckets <= buckets


def test_credentials_agree_across_services(compose):
    """Each credential comes from one variable, and every service that needs it reads that same variable."""
    s = compose["services"]
    pg_user, pg_password = env_var(s["postgres"], "POSTGRES_USER"), env_var(s["postgres"], "POSTGRES_PASSWORD")
    assert (env_var(s["mlflow"], "PGUSER"), env_var(s["mlflow"], "PGPASSWORD")) == (pg_user, pg_password)
    prefect = s["prefect-server"]
    assert env_var(prefect, "PREFECT_SERVER_DATABASE_USER") == pg_user
    assert env_var(prefect, "PREFECT_SERVER_DATABASE_PASSWORD") == pg_password
    for name in ("mlflow", "worker"):
        assert env_var(s[name], "AWS_ACCESS_KEY_ID") == env_var(s["minio-setup"], "S3_ACCESS_KEY")
        assert env_var(s[name], "AWS_SECRET_ACCESS_KEY") == env_var(s["minio-setup"], "S3_SECRET_KEY")
    for key in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert env_var(s["minio-setup"], key) == env_var(s["minio"], key)
        assert key not in (s["mlflow"].get("environment") or {}) and key not in s["worker"]["environment"]
    setup = str(s["minio-setup"]["entrypoint"])
    assert '"$$MINIO_ROOT_USER" "$$MINIO_ROOT_PASSWORD"' in setup
    assert 'user add store "$$S3_ACCESS_KEY" "$$S3_SECRET_KEY"' in setup
    assert env_var(s["worker"], "MLFLOW_TRACKING_USERNAME") == env_var(s["mlflow"], "MLFLOW_AUTH_ADMIN_USERNAME")
    assert env_var(s["worker"], "MLFLOW_TRACKING_PASSWORD") == env_var(s["mlflow"], "MLFLOW_AUTH_ADMIN_PASSWORD")


def test_mlflow_server_uses_postgres_s3_and_basic_auth(compose):
    mlflow = compose["services"]["mlflow"]
    args = shlex.split(resolved(mlflow["command"]))
    assert args[:2] == ["mlflow", "server"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert args[args.index("--app-name") + 1] == "basic-auth"
    mount = next(v for v in mlflow["volumes"] if "mlflow-auth.ini" in v)
    assert mount.split(":")[1] == mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert 'pip install "mlflow[auth]==' in (DOCKER / "mlflow.Dockerfile").read_text()  # the auth app needs it


def test_worker_serves_the_pool_prefect_yaml_deploys_to(compose):
    worker = compose["services"]["worker"]
    pool = shlex.split(worker["command"])
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {pool[pool.index("--pool") + 1]}
    assert pool[pool.index("--type") + 1] == "process"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["working_dir"] == "/workspace" and "..:/workspace" in worker["volumes"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "WORKDIR /workspace" in dockerfile and f'"--pool", "{pool[pool.index("--pool") + 1]}"' in dockerfile


def test_builds_exist_copy_real_files_and_pin_the_locked_versions(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if not build:
            assert ":" in service["image"], f"{name}: pin an image tag"
            continue
        context = (DOCKER / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in [w for w in line.split()[1:-1] if not w.startswith("--")]:
                    assert (context / source).exists(), f"{dockerfile.name} copies missing {source}"
    assert f"prefecthq/prefect:{lock_version('prefect')}-" in compose["services"]["prefect-server"]["image"]
    assert f"ARG MLFLOW_VERSION={lock_version('mlflow')}" in (DOCKER / "mlflow.Dockerfile").read_text()


def test_named_volumes_are_declared_and_bind_mounts_exist(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


# --- locked down ----------------------------------------------------------------------------------------------


def test_no_credential_in_any_file_under_docker():
    literal = re.compile(r"(?i)(password|secret|token|auth_string|access_key)\w*[ \t]*[=:][ \t]*[^\s$\"'{]")
    userinfo = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
    files = tracked_docker_files()
    assert DOCKER / "compose.yaml" in files and DOCKER / ".env.example" in files
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            line = VAR.sub("${}", line)  # a reference to a variable is not a literal
            where = f"{file.relative_to(REPO)}:{number}"
            assert not userinfo.search(line), f"{where}: a URL with a password"
            assert not literal.search(line), f"{where}: a literal credential"


def test_every_credential_is_a_required_variable(compose, compose_text):
    required = set()
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_KEY.search(key):
                match = VAR.fullmatch(str(value))
                assert match and match["op"] == ":?" and match["arg"].strip(), (
                    f"{name}.{key}: expected ${{VAR:?message}} (compose must refuse to start without it)"
                )
                required.add(match["name"])
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "PREFECT_AUTH_STRING"} <= required
    for match in VAR.finditer(compose_text):  # never a default for them anywhere else
        assert match["name"] not in required or match["op"] == ":?", f"{match[0]}: a credential with a default"


def test_published_ports_bind_to_loopback_by_default(compose):
    ports = [p for service in compose["services"].values() for p in published(service)]
    assert {host_port for _, host_port, _ in ports} == {4200, 5000, 9000}
    for address, host_port, _ in ports:
        assert address == "127.0.0.1", f"port {host_port} binds {address} by default"


def test_minio_console_is_not_published(compose):
    minio = compose["services"]["minio"]
    console = re.search(r'--console-address "?[^:"\s]*:(\d+)', minio["command"])
    assert console, "name MinIO's console port, so it is known and stays unpublished"
    assert int(console[1]) not in {container for _, _, container in published(minio)}


def test_prefect_api_requires_basic_auth(compose, compose_text):
    server, worker = compose["services"]["prefect-server"], compose["services"]["worker"]
    auth = env_var(server, "PREFECT_SERVER_API_AUTH_STRING")
    assert env_var(worker, "PREFECT_API_AUTH_STRING") == auth
    assert "PREFECT_API_KEY" not in compose_text  # it would win over the auth string (and give 401)
    # the healthcheck sends no credentials: /api/health is the one route the server leaves open
    assert "/api/health" in " ".join(server["healthcheck"]["test"])


def test_mlflow_secrets_come_from_the_environment_not_the_ini(compose, monkeypatch):
    mlflow = compose["services"]["mlflow"]
    env_var(mlflow, "MLFLOW_FLASK_SERVER_SECRET_KEY")
    user, password = env_var(mlflow, "MLFLOW_AUTH_ADMIN_USERNAME"), env_var(mlflow, "MLFLOW_AUTH_ADMIN_PASSWORD")
    assert user != password
    ini = configparser.ConfigParser()
    ini.read(DOCKER / "mlflow-auth.ini")
    assert not {"admin_username", "admin_password"} & set(ini["mlflow"])
    # the MLflow pinned here reads the admin from the environment, and the ini adds nothing to it
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(DOCKER / "mlflow-auth.ini"))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "someone")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    config = read_auth_config()
    assert (config.admin_username, config.admin_password) == ("someone", "from-the-environment")
    assert config.database_uri == "postgresql+psycopg2://postgres:5432/mlflow_auth"
    # a password check per credential and minute, not per request (PBKDF2: ~0.25 s each on a 2-core host)
    assert 0 < config.auth_cache_ttl_seconds <= 300
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD")
    assert read_auth_config().admin_password is None  # no fallback password in the file


def test_env_file_is_git_ignored_and_the_example_is_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored("docker/.env") and ignored(".env")
    assert not ignored("docker/.env.example")


def test_env_example_documents_exactly_the_variables_compose_uses(compose_text, env_example):
    used: dict[str, set[str]] = {}
    for match in VAR.finditer(compose_text):
        used.setdefault(match["name"], set()).add(match["op"] or "")
    assert set(env_example) == set(used)
    for name, ops in used.items():
        if ":?" in ops:
            assert env_example[name] == "", f".env.example: {name} is a credential; leave it empty"
        else:
            defaults = {m["arg"] for m in VAR.finditer(compose_text) if m["name"] == name}
            assert defaults == {env_example[name]}, f".env.example: {name} differs from compose's default"


def test_worker_runs_as_a_non_root_user_the_workspace_code(compose):
    dockerfile = (DOCKER / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in {"root", "0"} and not users[-1].startswith("0:")
    worker_user = resolved(compose["services"]["worker"]["user"])
    assert worker_user.split(":")[0] not in {"root", "0"}
    assert "git config --system --add safe.directory /workspace" in dockerfile  # for whichever uid runs it
    # no copy of the project in the image: only its dependencies
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    sources = {s for c in copies for s in c if not s.startswith("--")}
    assert not sources & {".", "lmcore", "flows", "./lmcore", "./flows"}, sources
    for install in re.findall(r"pip install ([^\n&]*)", dockerfile):
        args = install.split()
        assert "-e" not in args and "." not in args and "/workspace" not in args, install
    assert "PYTHONPATH" not in dockerfile  # the code comes from the checkout a command runs in, not a fixed path
    # `lmcycle` in the image is the launcher, which runs pyproject's entry point
    assert "COPY --chmod=0755 docker/lmcycle.py /usr/local/bin/lmcycle" in dockerfile
    scripts = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, attr = scripts["lmcycle"].split(":")
    assert f"from {module} import {attr}" in (DOCKER / "lmcycle.py").read_text()


def run_launcher(cwd: Path, *args: str, installed: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if installed:  # a copy of the project on the path, as an image that installed one would have
        env["PYTHONPATH"] = str(installed)
    return subprocess.run(
        [sys.executable, str(DOCKER / "lmcycle.py"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def fake_project(root: Path, says: str) -> Path:
    (root / "flows").mkdir(parents=True)
    (root / "lmcore").mkdir()
    (root / "lmcore" / "__init__.py").write_text("")
    (root / "flows" / "__init__.py").write_text("")
    program = f"import sys\n\ndef app(prog_name):\n    print({says!r}, prog_name, *sys.argv[1:])\n    return 0\n"
    (root / "flows" / "cli.py").write_text(program)
    return root


def test_launcher_runs_the_code_of_the_checkout_it_runs_in(tmp_path):
    checkout = fake_project(tmp_path / "checkout", "checkout")
    installed = fake_project(tmp_path / "installed", "installed-copy")
    (checkout / "data" / "ingest").mkdir(parents=True)
    done = run_launcher(checkout / "data" / "ingest", "stage", "ingest", installed=installed)  # as DVC may run it
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["checkout", "lmcycle", "stage", "ingest"]

    outside = run_launcher(tmp_path, "stage", "ingest")
    assert outside.returncode == 2 and outside.stderr.startswith("error: ") and len(outside.stderr.splitlines()) == 1

    real = run_launcher(REPO, "--help")
    assert real.returncode == 0 and "Usage: lmcycle" in real.stdout


def test_worker_dvc_remote_is_the_object_store_without_credentials(compose, tmp_path):
    dockerfile = (DOCKER / "Dockerfile").read_text()
    system_dir = re.search(r"DVC_SYSTEM_CONFIG_DIR=(\S+)", dockerfile)[1]
    assert f"COPY docker/dvc/config {system_dir}/config" in dockerfile
    config = (DOCKER / "dvc" / "config").read_text()
    assert not re.search(r"(?im)^\s*(access_key_id|secret_access_key|session_token|credentialpath)\b", config)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(compose["services"]["worker"]["environment"])
    # what DVC itself makes of it, in a fresh repository
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    env |= {"DVC_SYSTEM_CONFIG_DIR": str(DOCKER / "dvc"), "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=env, check=True)

    def dvc(*args: str) -> str:
        return subprocess.run(["dvc", *args], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout

    assert dvc("remote", "default").strip() == "store"
    assert dvc("config", "remote.store.url").strip() == "s3://dvc"
    assert dvc("config", "remote.store.endpointurl").strip() == "http://minio:9000"


def test_kubernetes_gpu_job_template_is_prefects_default_plus_a_gpu_limit():
    import json

    import prefect

    text = (DOCKER / "k8s-gpu-job-template.json").read_text()
    template = json.loads(text)
    declared = set(template["variables"]["properties"])
    assert set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"]))) <= declared
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"].pop("nvidia.com/gpu") == "{{ gpus }}"
    gpus = template["variables"]["properties"].pop("gpus")
    assert gpus["type"] == "integer" and gpus["default"] >= 1
    # everything else is the default template of the Kubernetes worker that this Prefect knows
    bundled = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    default = json.loads(bundled.read_text())["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    assert template == default
