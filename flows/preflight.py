"""Before a flow run starts: the run's pre-flight (`prepared_run`), the Prefect API check, telemetry off.

`prepared_run` does every check a run needs before anything is written (params, stage names, the DVC remote, the
tracking server, the Prefect API), then holds the workspace lock, writes the overrides and reads the stage graph:
the flow runs on the validated plan it yields. `lmcycle run` calls it once and the flow adopts its plan; a flow
run that no `lmcycle run` prepared (a deployment, `flow.serve`) calls it itself.

The Prefect API check, one line instead of a 401 traceback mid-flow, is one plain HTTP request with the
credentials exactly as Prefect's client sends them (`PREFECT_API_AUTH_STRING` as HTTP basic auth, else
`PREFECT_API_KEY` as a bearer token) to a route that requires them (`/admin/version`; `/health` is exempt from
auth), so a wrong or missing credential and a server that does not answer are told apart in seconds. The secrets
themselves never appear in a message.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcore.errors import LmcycleError

CHECK_TIMEOUT_S = 5.0
AUTH_ROUTE = "/admin/version"

# Telemetry off unless the user chose otherwise; nothing else about the user's environment is touched.
TELEMETRY_DEFAULTS = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}


def telemetry_off() -> None:
    for key, value in TELEMETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


# --- the run's pre-flight ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRequest:
    """What a flow run was asked to do (the flow's parameters)."""

    root: Path
    until: str | None = None
    force: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    push: bool | None = None


@dataclass(frozen=True)
class RunPlan:
    """A checked request: the config with its overrides written, the stages to run in order, whether to use the
    DVC remote."""

    request: RunRequest
    config: Any
    stages: tuple[str, ...]
    push: bool


_prepared: dict[RunRequest, RunPlan] = {}  # plans of this process's runs, for the flow to adopt


@contextlib.contextmanager
def prepared_run(request: RunRequest, check_api: bool = False) -> Iterator[RunPlan]:
    """Check `request` (and, with `check_api`, the Prefect API) and fail with one line before anything is written;
    then, holding the workspace lock for as long as this lasts, wait for a stage a killed run left, write the
    overrides into params.yaml (under DVC's write lock) and read the stage graph."""
    from flows.lifetime import wait_for_previous_stage
    from flows.remote import should_push
    from lmcore.lifecycle import dvcadapter
    from lmcore.lifecycle.config import apply_overrides, load_config
    from lmcore.lifecycle.tracking import check_tracking, tracking_enabled, tracking_uri
    from lmcore.lifecycle.workspace import workspace_lock

    root, params = request.root, request.root / "params.yaml"
    config = load_config(params)
    graph = _checked_graph(request)
    pushing = should_push(root, request.push)
    if tracking_enabled():  # servers and credentials, before anything is written
        check_tracking(tracking_uri(root))
    if check_api:
        check_prefect_api()
    with workspace_lock(root, config.flow.lock_timeout_s):
        wait_for_previous_stage(root, config.flow.lock_timeout_s)
        with dvcadapter.write_lock(root, params):  # never under a running `dvc repro`
            config = apply_overrides(list(request.overrides), params)
        if request.overrides:
            graph = dvcadapter.stage_graph(root)  # dvc.yaml's `${...}` may depend on what was written
        plan = RunPlan(request, config, tuple(select_stages(*graph, request.until)), pushing)
        _prepared[request] = plan
        try:
            yield plan
        finally:
            _prepared.pop(request, None)


@contextlib.contextmanager
def adopted_or_prepared(request: RunRequest) -> Iterator[RunPlan]:
    """The plan `lmcycle run` prepared for this request in this process (its lock is held there), else a new one."""
    plan = _prepared.get(request)
    if plan is not None:
        yield plan
        return
    with prepared_run(request) as plan:
        yield plan


def _checked_graph(request: RunRequest) -> tuple[list[str], dict[str, set[str]]]:
    """The stage graph, once --until and --force are known to name its stages."""
    from lmcore.lifecycle import dvcadapter

    root = request.root
    if not dvcadapter.is_repository(root) or not (root / "dvc.yaml").is_file():
        raise LmcycleError(f"{root}: not a workspace (needs dvc.yaml in a DVC repository: git init && dvc init)")
    order, upstream = dvcadapter.stage_graph(root)
    for option, name in [("--until", request.until), *(("--force", f) for f in request.force)]:
        if name and name not in upstream:
            raise LmcycleError(f"{option}: unknown stage {name!r}; stages in dvc.yaml: {', '.join(order)}")
    return order, upstream


def select_stages(order: list[str], upstream: dict[str, set[str]], until: str | None) -> list[str]:
    """The stages to run, in order: all, or `until` and the stages it needs."""
    if until is None:
        return list(order)
    if until not in upstream:
        raise LmcycleError(f"--until: unknown stage {until!r}; stages in dvc.yaml: {', '.join(order)}")
    wanted = upstream[until] | {until}
    return [name for name in order if name in wanted]


# --- the Prefect API ---------------------------------------------------------------------------------------


class PrefectAuthError(LmcycleError):
    """The Prefect API does not answer or refuses this client."""


@dataclass(frozen=True)
class PrefectClientSettings:
    url: str | None
    auth_string: str | None
    api_key: str | None

    @classmethod
    def current(cls) -> PrefectClientSettings:
        """What Prefect's client would use: environment, active profile or .env (through Prefect's settings)."""
        from prefect.settings import get_current_settings

        api = get_current_settings().api
        secret = lambda s: s.get_secret_value() if s is not None else None  # noqa: E731
        return cls(str(api.url) if api.url else None, secret(api.auth_string) or None, secret(api.key) or None)

    def headers(self) -> dict[str, str]:
        if self.auth_string:
            return {"Authorization": f"Basic {base64.b64encode(self.auth_string.encode()).decode()}"}
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key}"}
        return {}


def check_prefect_api(settings: PrefectClientSettings | None = None, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Nothing to check without PREFECT_API_URL (the ephemeral API); else fail with one line unless the server
    answers an authenticated request."""
    settings = settings or PrefectClientSettings.current()
    if not settings.url:
        return
    url = settings.url.rstrip("/")
    request = urllib.request.Request(url + AUTH_ROUTE, headers=settings.headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (the user's server)
            json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        raise PrefectAuthError(f"PREFECT_API_URL {url}: {_refused(err.code, settings)}") from None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise PrefectAuthError(
            f"PREFECT_API_URL {url}: no Prefect server answers within {timeout_s:g} s ({reason}); start it, or "
            "unset PREFECT_API_URL to run on the ephemeral API"
        ) from None


def _refused(code: int, settings: PrefectClientSettings) -> str:
    if code == 401 and settings.auth_string and settings.api_key:
        return (
            "the server refused the credentials (401): PREFECT_API_AUTH_STRING and PREFECT_API_KEY are both set; "
            "a self-hosted server with an auth string wants PREFECT_API_KEY unset and PREFECT_API_AUTH_STRING "
            "equal to its PREFECT_SERVER_API_AUTH_STRING"
        )
    if code == 401 and settings.auth_string:
        return (
            "the server refused the credentials (401): check PREFECT_API_AUTH_STRING "
            "(user:password, as the server's PREFECT_SERVER_API_AUTH_STRING)"
        )
    if code == 401 and settings.api_key:
        return "the server refused the credentials (401): check PREFECT_API_KEY"
    if code == 401:
        return "the server requires credentials (401): set PREFECT_API_AUTH_STRING (user:password)"
    if code == 403:
        return "the credentials have no permission on this server (403): check PREFECT_API_AUTH_STRING/PREFECT_API_KEY"
    if code == 404:
        return f"no Prefect API at this URL (404 on {AUTH_ROUTE}); it usually ends in /api"
    return f"the server answered {code} on {AUTH_ROUTE}"
