"""The team setup in docker/, checked statically (no container engine here): the compose file, its Dockerfiles and
config files reference each other consistently — hosts and ports, databases, buckets, the work pool, the files
the images copy, and the versions pinned by requirements.lock."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def service_text(service: dict) -> str:
    """Everything a service says about other services: its command, entrypoint and environment values."""
    parts = [str(service.get("command", "")), str(service.get("entrypoint", ""))]
    parts += [str(v) for v in (service.get("environment") or {}).values()]
    parts += [str(v) for v in ((service.get("healthcheck") or {}).get("test") or [])]
    return " ".join(parts)


def listening_port(service: dict) -> set[int]:
    """Ports a service listens on inside the network: --port flags and published container ports."""
    ports = {int(p) for p in re.findall(r"--port[ =](\d+)", service_text(service))}
    ports |= {int(str(p).split(":")[-1]) for p in service.get("ports") or []}
    return ports


def lock_version(dist: str) -> str:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{dist}=="):
            return line.split("==")[1].strip()
    raise AssertionError(f"{dist} not in requirements.lock")


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
        for host, port in re.findall(r"(?:https?://|@)([a-z][a-z0-9-]*):(\d+)", service_text(service)):
            if host in {"localhost"}:
                continue
            assert host in services, f"{name} talks to unknown host {host}"
            assert int(port) in listening_port(services[host]) or host == "postgres" and port == "5432", (
                f"{name} talks to {host}:{port}, which does not listen there"
            )
            seen += 1
    assert seen >= 6


def test_databases_and_buckets_used_are_created(compose):
    services = compose["services"]
    init_sql = (DOCKER / "postgres-init.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", init_sql)) | {services["postgres"]["environment"]["POSTGRES_DB"]}
    auth = configparser.ConfigParser()
    auth.read(DOCKER / "mlflow-auth.ini")
    texts = [service_text(s) for s in services.values()] + [auth["mlflow"]["database_uri"]]
    used = {db for text in texts for db in re.findall(r"postgres(?:ql)?(?:\+\w+)?://[^@\s]+@postgres:5432/(\w+)", text)}
    assert used == {"prefect", "mlflow", "mlflow_auth"} and used <= created

    setup = str(services["minio-setup"]["entrypoint"])
    buckets = set(re.findall(r"mc mb --ignore-existing store/([\w-]+)", setup))
    used_buckets = set(re.findall(r"s3://([\w-]+)", " ".join(service_text(s) for s in services.values())))
    assert used_buckets and used_buckets <= buckets


def test_credentials_agree_across_files(compose):
    services = compose["services"]
    env = {name: service.get("environment") or {} for name, service in services.items()}
    pg = env["postgres"]
    for text in [service_text(s) for s in services.values()]:
        for user, password in re.findall(r"postgres(?:ql)?(?:\+\w+)?://(\w+):([\w-]+)@", text):
            assert (user, password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
    minio = env["minio"]
    for name in ("mlflow", "worker"):
        assert env[name]["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert env[name]["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert f"{minio['MINIO_ROOT_USER']} {minio['MINIO_ROOT_PASSWORD']}" in str(services["minio-setup"]["entrypoint"])
    auth = configparser.ConfigParser()
    auth.read(DOCKER / "mlflow-auth.ini")
    assert env["worker"]["MLFLOW_TRACKING_USERNAME"] == auth["mlflow"]["admin_username"]
    assert env["worker"]["MLFLOW_TRACKING_PASSWORD"] == auth["mlflow"]["admin_password"]


def test_mlflow_server_uses_postgres_s3_and_basic_auth(compose):
    mlflow = compose["services"]["mlflow"]
    args = shlex.split(mlflow["command"])
    assert args[:2] == ["mlflow", "server"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")
    assert args[args.index("--app-name") + 1] == "basic-auth"
    mount = next(v for v in mlflow["volumes"] if "mlflow-auth.ini" in v)
    assert mount.split(":")[1] == mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


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
                for source in line.split()[1:-1]:
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
