"""The aliases of a registered model and the human side of the registry: who holds `champion`, its history,
promote by hand, roll back, and the table `lmcycle models` prints.

A champion history (a registered-model tag, oldest first, at most 100 versions) is appended to whenever the
champion alias moves, by the gate or by hand, so `rollback` can give the alias back to the previous champion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmcore.lifecycle.registry.uris import HISTORY_TAG, TAG, RegistryError, resolve

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_history(client: MlflowClient, name: str) -> list[str]:
    model = client.get_registered_model(name)
    text = model.tags.get(HISTORY_TAG, "")
    return [v for v in text.split(",") if v]


def set_champion(client: MlflowClient, name: str, version: str, alias: str = "champion") -> None:
    client.set_registered_model_alias(name, alias, str(version))
    history = champion_history(client, name)
    if not history or history[-1] != str(version):
        history.append(str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[-100:]))


def promote(client: MlflowClient, name: str, version: str, alias: str = "champion") -> None:
    resolve(client, f"models:/{name}/{version}")
    set_champion(client, name, version, alias)
    client.set_model_version_tag(name, str(version), f"{TAG}gate.manual", "promoted by hand")


def rollback(client: MlflowClient, name: str, alias: str = "champion") -> str:
    """Give the champion alias back to the previous champion; returns that version."""
    resolve(client, f"models:/{name}@{alias}")
    history = champion_history(client, name)
    current = str(client.get_model_version_by_alias(name, alias).version)
    while history and history[-1] == str(current):
        history.pop()
    if not history:
        raise RegistryError(f"models:/{name}@{alias}: no earlier champion to roll back to")
    previous = history[-1]
    client.set_registered_model_alias(name, alias, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history))
    return previous


def list_models(client: MlflowClient, name: str | None = None) -> list[dict[str, Any]]:
    """One row per version: name, version, aliases, gate metric value, decision, git commit, created."""
    from mlflow.exceptions import MlflowException

    rows = []
    try:
        models = [client.get_registered_model(name)] if name else client.search_registered_models(max_results=1000)
    except MlflowException:
        raise RegistryError(f"models:/{name}: no registered model named {name!r}") from None
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in client.search_model_versions(f"name='{model.name}'", max_results=10_000):
            tags = version.tags
            rows.append(
                {
                    "name": model.name,
                    "version": int(version.version),
                    "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                    "metric": tags.get(f"{TAG}gate.metric", ""),
                    "value": tags.get(f"{TAG}gate.value", ""),
                    "decision": tags.get(f"{TAG}gate.decision", ""),
                    "git": tags.get(f"{TAG}git_commit", "")[:12],
                    "created": version.creation_timestamp,
                }
            )
    return sorted(rows, key=lambda r: (r["name"], r["version"]))
