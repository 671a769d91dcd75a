"""The Prefect API check before a run or a schedule starts: one line instead of a 401 traceback mid-flow.

Design choice: one plain HTTP request with the credentials exactly as Prefect's client sends them
(`PREFECT_API_AUTH_STRING` as HTTP basic auth, else `PREFECT_API_KEY` as a bearer token) to a route that
requires them (`/admin/version`; `/health` is exempt from auth), so a wrong or missing credential and a server
that does not answer are told apart in seconds. The secrets themselves never appear in a message.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from lmcore.errors import LmcycleError

CHECK_TIMEOUT_S = 5.0
AUTH_ROUTE = "/admin/version"


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
