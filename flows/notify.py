"""Notifications of `lm-lifecycle` flow runs: Prefect flow hooks post one short, Slack-compatible message to a webhook.

Design choices:
- Where to: LMCYCLE_WEBHOOK_URL, else the Prefect `Secret` block named in LMCYCLE_WEBHOOK_BLOCK; neither set, nothing
  is sent and nothing is written.
- What: the flow writes its report (stages, failure, the failed stage's last lines, registration) to
  `.lmcycle/notify/<flow run id>.json` as it ends, and the hook reads and removes it. A file, not the state's result:
  a failed state carries only the exception, and a crashed run's hooks may run in another process.
- Building a message is pure (`failure_message`, `completion_message`); every string of it passes `redact` last:
  URL userinfo, the values of secret-looking environment variables, `key=value` credentials, the webhook itself.
- Posting never changes a run's outcome: standard library, 5 s timeout, one warning line that names no URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEBHOOK_ENV = "LMCYCLE_WEBHOOK_URL"
BLOCK_ENV = "LMCYCLE_WEBHOOK_BLOCK"
TIMEOUT_S = 5.0
TAIL_LINES = 20
TAIL_CHARS = 2500  # a Slack section block holds 3000 characters
FLOW = "lm-lifecycle"
MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#]+@")
# a secret-named variable has one of these as a `_`-separated word of its name (TOKENIZERS_PARALLELISM has not)
_SECRET_WORDS = {"PASSWORD", "PASSWD", "PASS", "TOKEN", "SECRET", "CREDENTIALS", "CREDENTIAL", "KEY", "APIKEY", "AUTH"}
_SECRET_WORDS |= {"PRIVATE", "PASSPHRASE"}
_NOT_SECRET = {"true", "false", "none", "null", "yes", "off"}
_KEY_VALUE = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key|auth_string)\b[\"']?\s*[=:]\s*)"
    r"(?P<value>[\"']?[^\s\"',;&]+)",
    re.I,
)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]{6,}", re.I)
_RAN = {"ran", "skipped", "restored"}


# --- redaction ---------------------------------------------------------------------------------------------


def secrets_in(env: Mapping[str, str]) -> list[str]:
    """Values that must never leave: secret-named variables (passwords, tokens, keys, the webhook) and the
    userinfo of any URL-valued variable (e.g. MLFLOW_TRACKING_URI=https://user:pass@host)."""
    found = []
    for name, value in env.items():
        if not value:
            continue
        secret_name = name == WEBHOOK_ENV or bool(_SECRET_WORDS & set(name.upper().split("_")))
        if secret_name and len(value) >= 4 and value.lower() not in _NOT_SECRET:
            found.append(value)
        for match in re.finditer(r"://([^/\s@]+)@", value):
            found += [part for part in match.group(1).split(":") if len(part) >= 4]
    return sorted(set(found), key=len, reverse=True)  # longest first: a secret containing another is masked whole


def redact(text: str, env: Mapping[str, str] | None = None, extra: tuple[str, ...] = ()) -> str:
    """`text` without credentials: the secret values of `env` (default os.environ) and `extra` masked, URL userinfo
    stripped, `password=…`-style pairs and bearer tokens masked."""
    for secret in (*[s for s in extra if s], *secrets_in(os.environ if env is None else env)):
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(r"\g<scheme>", text)
    text = _KEY_VALUE.sub(rf"\g<key>{MASK}", text)
    return _BEARER.sub(rf"\1 {MASK}", text)


def redact_payload(payload: Any, env: Mapping[str, str] | None = None, extra: tuple[str, ...] = ()) -> Any:
    """Every string in a JSON-like payload through `redact`."""
    if isinstance(payload, str):
        return redact(payload, env, extra)
    if isinstance(payload, dict):
        return {k: redact_payload(v, env, extra) for k, v in payload.items()}
    if isinstance(payload, list):
        return [redact_payload(v, env, extra) for v in payload]
    return payload


# --- messages (pure) ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """What a message says about the flow run itself."""

    name: str
    id: str
    workspace: str = ""
    url: str = ""  # the run's page in the Prefect UI, when one is configured

    def title(self) -> str:
        return f"{FLOW} run `{self.name}` ({self.id})"

    def footer(self) -> list[str]:
        lines = [f"workspace: `{self.workspace}`"] if self.workspace else []
        return lines + ([f"<{self.url}|open in Prefect>"] if self.url else [])


def failed_stage(report: Mapping[str, Any]) -> str:
    """The stage that did not complete (failed, or running when the run crashed), or '' (a failure outside the
    stages: registration, push, set-up)."""
    stages = report.get("stages", [])
    failed = [s["name"] for s in stages if s.get("state") not in _RAN]
    if failed:
        return failed[-1]
    running = report.get("running", "")
    return running if running and running not in {s["name"] for s in stages} else ""


def last_lines(tail: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    kept = "\n".join(tail.strip("\n").splitlines()[-lines:])
    return kept if len(kept) <= chars else "…" + kept[-chars:]


def _payload(text: str, sections: list[str]) -> dict[str, Any]:
    """Slack's JSON: `text` (what any webhook and a notification shows) plus one mrkdwn section per part."""
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": s[:3000]}} for s in sections if s]
    return {"text": text, "blocks": blocks}


def failure_message(
    run: RunInfo, report: Mapping[str, Any] | None, state_message: str = "", crashed: bool = False
) -> dict[str, Any]:
    """A failed or crashed run: which stage, why, and its last lines. A crash (a signal, a lost process) is said in
    Prefect's words; a failure in the flow's own."""
    report = report or {}
    stage = failed_stage(report)
    why = (state_message if crashed else report.get("failed")) or report.get("failed") or state_message
    verb = "crashed" if crashed else "failed"
    head = f":x: {run.title()} {verb}" + (f" in stage `{stage}`" if stage else "") + f": {why or 'no reason recorded'}"
    tail = last_lines(report.get("tail", ""))
    code = f"Last lines of `{stage or 'output'}`:\n```\n{tail}\n```" if tail else ""
    footer = "\n".join(run.footer())
    return _payload("\n".join(p for p in (head, code, footer) if p), [head, code, footer])


def _value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, int | float) else "none"


def registration_line(reg: Mapping[str, Any]) -> str:
    """The gate's decision and both values: challenger and champion on the same metric."""
    if "skipped" in reg:
        return f"not registered: {reg['skipped']}"
    champion = f"champion v{reg['champion_version']} {_value(reg.get('champion_value'))}"
    if not reg.get("champion_version"):
        champion = "champion none"
    reused = " (reused: same dvc.lock)" if reg.get("reused") else ""
    return (
        f"`{reg.get('uri') or reg.get('name')}`{reused}: gate *{reg.get('decision')}*; "
        f"{reg.get('metric')}: challenger {_value(reg.get('challenger_value'))} vs {champion}. {reg.get('reason', '')}"
    ).strip()


def completion_message(run: RunInfo, report: Mapping[str, Any] | None) -> dict[str, Any]:
    """A completed run: the stages in one line, then the registration and the gate's decision."""
    report = report or {}
    stages = report.get("stages", [])
    counts: dict[str, int] = {}
    for stage in stages:
        counts[stage.get("state", "?")] = counts.get(stage.get("state", "?"), 0) + 1
    done = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no stages"
    reg = report.get("registration")
    icon = ":trophy:" if reg and reg.get("decision") in {"first", "promoted"} else ":white_check_mark:"
    head = f"{icon} {run.title()} completed ({done})"
    body = registration_line(reg) if reg else "nothing registered (--until or --no-register)"
    footer = "\n".join(run.footer())
    return _payload("\n".join(p for p in (head, body, footer) if p), [head, body, footer])


# --- the report the flow leaves for its hooks --------------------------------------------------------------


def configured(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get(WEBHOOK_ENV) or env.get(BLOCK_ENV))


def report_path(root: Path, flow_run_id: str) -> Path:
    return Path(root) / ".lmcycle" / "notify" / f"{flow_run_id}.json"


def save_report(root: Path, report: Mapping[str, Any]) -> None:
    """Called by the flow as it ends: its report, for the hooks (only when a webhook is configured). Never raises."""
    if not configured():
        return
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        from lmcore.files import atomic_write_text

        path = report_path(root, str(flow_run.id or "local"))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, default=str))


def take_report(root: Path, flow_run_id: str) -> dict[str, Any] | None:
    """The report a flow run left, removed once read; None when there is none (it failed before it began)."""
    path = report_path(root, flow_run_id)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    return report


# --- posting -----------------------------------------------------------------------------------------------


def webhook_url(env: Mapping[str, str] | None = None) -> str:
    """The webhook to post to ('' when none is configured); raises with a reason that names no secret."""
    env = os.environ if env is None else env
    if env.get(WEBHOOK_ENV):
        return env[WEBHOOK_ENV]
    block = env.get(BLOCK_ENV)
    if not block:
        return ""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block).get()
    except Exception as err:  # noqa: BLE001 (whatever stops the lookup, the run goes on)
        raise OSError(f"Prefect Secret block {block!r} could not be loaded ({type(err).__name__})") from None
    if not isinstance(value, str) or not value:
        raise OSError(f"Prefect Secret block {block!r} holds no webhook URL")
    return value


def post(url: str, payload: Mapping[str, Any], timeout_s: float = TIMEOUT_S) -> str:
    """POST the JSON payload; '' when the webhook accepted it, else why not (never the URL, never raising)."""
    if not url.lower().startswith(("http://", "https://")):
        return "the webhook URL is not http(s)"
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read(1024)
    except urllib.error.HTTPError as err:
        return f"the webhook answered HTTP {err.code}"
    except urllib.error.URLError as err:
        return f"the webhook is unreachable ({type(err.reason).__name__}: {err.reason})"
    except (OSError, ValueError) as err:  # timeouts, resets, a malformed URL
        return f"the webhook could not be reached ({type(err).__name__})"
    return ""


def send(payload: Mapping[str, Any], warn: Callable[[str], Any]) -> bool:
    """Redact and post `payload` to the configured webhook; a failure is one `warn` line. True when delivered."""
    try:
        url = webhook_url()
    except OSError as err:
        warn(f"notification not sent: {err}")
        return False
    if not url:
        return False
    reason = post(url, redact_payload(payload, extra=(url,)))
    if reason:
        warn(redact(f"notification not sent: {reason}", extra=(url,)))
    return not reason


# --- the hooks (attached to the flow in flows.lifecycle) ---------------------------------------------------


def _run_info(flow_run: Any) -> RunInfo:
    url = ""
    with contextlib.suppress(Exception):
        from prefect.utilities.urls import url_for

        url = url_for(flow_run) or ""
    workspace = str((flow_run.parameters or {}).get("workspace") or ".")
    return RunInfo(str(flow_run.name), str(flow_run.id), Path(workspace).resolve().name, url)


def _hook(flow: Any, flow_run: Any, state: Any, build: Callable[[RunInfo, Any, Any], dict[str, Any]]) -> None:
    if not configured():
        return
    from prefect.logging.loggers import flow_run_logger

    logger = flow_run_logger(flow_run, flow)
    try:
        root = Path(str((flow_run.parameters or {}).get("workspace") or ".")).resolve()
        report = take_report(root, str(flow_run.id))
        payload = build(_run_info(flow_run), report, state)
    except Exception as err:  # noqa: BLE001 (a notification never changes the run's outcome)
        logger.warning("notification not sent: could not build it (%s)", type(err).__name__)
        return
    send(payload, logger.warning)


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure / on_crashed: the failed stage, why, its last lines."""

    def build(run: RunInfo, report: dict[str, Any] | None, st: Any) -> dict[str, Any]:
        return failure_message(run, report, st.message or st.name, crashed=st.is_crashed())

    _hook(flow, flow_run, state, build)


def notify_completion(flow: Any, flow_run: Any, state: Any) -> None:
    """on_completion: the gate's decision and both metric values."""
    _hook(flow, flow_run, state, lambda run, report, st: completion_message(run, report))
