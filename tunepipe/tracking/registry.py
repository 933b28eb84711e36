"""The model registry: versions of the final model, the `champion` and `candidate` aliases, promote and rollback.

`register_and_promote` (what the register stage calls) uploads the model first (slow, invisible to the registry),
then under the store lock reads the champion, decides (tunepipe.tracking.promotion), creates the version and moves
an alias last: `champion` only when every gate passes and the new model is strictly better on compare_metric, else
`candidate`. Every champion change is appended to the registered-model tag `tunepipe.champion_history` (JSON list
of versions), which `rollback` pops. Metrics live on each version as `metric.<key>` tags. Aliases are always read
with get_registered_model / get_model_version (search results carry empty alias lists).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunepipe.errors import ConfigError, TunepipeError
from tunepipe.tracking.store import connect, lock
from tunepipe.tracking.flatten import MAX_TAG_VALUE, clean_key, clip_value, numeric_metrics
from tunepipe.tracking.promotion import Decision, decide_promotion
from tunepipe.tracking.runs import lineage_tags

CHAMPION = "champion"
CANDIDATE = "candidate"
HISTORY_TAG = "tunepipe.champion_history"
DECISION_TAG = "tunepipe.decision"
REASONS_TAG = "tunepipe.reasons"
STORE_TAG = "tunepipe.store"
MODEL_DIR_TAG = "tunepipe.model_dir"
METRIC_PREFIX = "metric."
HISTORY_KEEP = 200


class RegistryError(TunepipeError):
    """A registry request that cannot be done (unknown version, nothing to roll back to, ...)."""


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _history(client, name: str) -> list[int]:
    tags = client.get_registered_model(name).tags or {}
    try:
        return [int(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    except (ValueError, TypeError):
        return []


def _set_history(client, name: str, history: list[int]) -> None:
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))


def _alias_version(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as err:
        if _not_found(err):
            return None
        raise
    return int(aliases[alias]) if alias in aliases else None


def _version_metrics(tags: Mapping[str, str]) -> dict[str, float]:
    metrics = {}
    for key, value in tags.items():
        if key.startswith(METRIC_PREFIX):
            with contextlib.suppress(ValueError):
                metrics[key[len(METRIC_PREFIX):]] = float(value)
    return metrics


def _champion(client, name: str) -> dict[str, Any] | None:
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        return None
    mv = client.get_model_version(name, str(version))
    return {"version": version, "metrics": _version_metrics(mv.tags or {})}


def champion(project_root: str | Path, name: str) -> dict[str, Any] | None:
    """{"version", "metrics"} of the current champion, or None."""
    return _champion(connect(project_root)[0], name)


def _upload(client, model_dir: Path, run_id: str, store: str, artifact_path: str) -> str:
    if store == "copy":
        client.log_artifacts(run_id, str(model_dir), artifact_path)
        return f"runs:/{run_id}/{artifact_path}"
    if store == "reference":
        return str(model_dir.resolve())
    raise ConfigError(f"expected copy or reference, got {store!r}", key="registry.store")


def _create_version(client, name: str, source: str, run_id: str, metrics: Mapping[str, Any],
                    lineage: Mapping[str, Any], store: str, model_dir: Path) -> int:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise
        client.create_registered_model(name, tags={HISTORY_TAG: "[]"},
                                       description="Registered by tunepipe's register stage.")
    tags = {clean_key(METRIC_PREFIX + k): repr(v) for k, v in numeric_metrics(metrics).items()}
    tags.update(lineage_tags(lineage))
    tags.update({STORE_TAG: store, MODEL_DIR_TAG: str(model_dir.resolve())})
    mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return int(mv.version)


def register_model(project_root: str | Path, model_dir: str | Path, *, name: str, run_id: str,
                   metrics: Mapping[str, Any], lineage: Mapping[str, Any], store: str = "copy",
                   artifact_path: str = "model") -> int:
    """Register `model_dir` as a new version of `name` (no alias). store="copy" logs its files as artifacts of
    `run_id` (source runs:/<run>/model); "reference" records its absolute path. Returns the version number."""
    client, uri, _ = connect(project_root)
    model_dir = Path(model_dir)
    source = _upload(client, model_dir, run_id, store, artifact_path)
    with lock(uri):
        return _create_version(client, name, source, run_id, metrics, lineage, store, model_dir)


def _move_champion(client, name: str, version: int) -> int | None:
    """Set the champion alias (then the history: a kill in between leaves rollback pointing at the old one)."""
    previous = _alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    history = _history(client, name)
    if not history or history[-1] != version:
        _set_history(client, name, history + [version])
    candidate = _alias_version(client, name, CANDIDATE)
    if candidate is not None and candidate <= version:  # superseded (or just promoted)
        client.delete_registered_model_alias(name, CANDIDATE)
    return previous


def _aliases_of(client, name: str, version: int) -> list[str]:
    aliases = client.get_registered_model(name).aliases or {}
    return sorted(alias for alias, v in aliases.items() if int(v) == version)


def _apply(client, name: str, version: int, decision: Decision) -> list[str]:
    client.set_model_version_tag(name, str(version), DECISION_TAG, CHAMPION if decision.promote else CANDIDATE)
    client.set_model_version_tag(name, str(version), REASONS_TAG, clip_value("; ".join(decision.reasons), MAX_TAG_VALUE))
    if decision.promote:
        _move_champion(client, name, version)
    else:
        client.set_registered_model_alias(name, CANDIDATE, str(version))
    return _aliases_of(client, name, version)


def apply_decision(project_root: str | Path, name: str, version: int | str, decision: Decision) -> list[str]:
    """Move `champion` to `version` when decision.promote (recorded in the history), else `candidate`.
    Returns the version's aliases afterwards."""
    client, uri, _ = connect(project_root)
    with lock(uri):
        return _apply(client, name, int(version), decision)


@dataclass
class Registration:
    version: int
    aliases: list[str]
    decision: Decision
    previous_champion: int | None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "aliases": self.aliases, "promoted": self.decision.promote,
                "reasons": self.decision.reasons, "gate_results": self.decision.gate_results,
                "previous_champion": self.previous_champion}


def register_and_promote(project_root: str | Path, model_dir: str | Path, *, name: str, run_id: str,
                         metrics: Mapping[str, Any], lineage: Mapping[str, Any], gates: Iterable[Any],
                         compare_metric: str, higher_is_better: bool = True, store: str = "copy",
                         artifact_path: str = "model", missing: Mapping[str, str] | None = None) -> Registration:
    """Upload, then (under the store lock) read the champion, decide, create the version, move an alias last."""
    client, uri, _ = connect(project_root)
    model_dir = Path(model_dir)
    source = _upload(client, model_dir, run_id, store, artifact_path)
    with lock(uri):
        current = _champion(client, name)
        decision = decide_promotion(metrics, list(gates), current["metrics"] if current else None, compare_metric,
                                    higher_is_better, champion_version=current["version"] if current else None,
                                    missing=missing)
        version = _create_version(client, name, source, run_id, metrics, lineage, store, model_dir)
        aliases = _apply(client, name, version, decision)
    return Registration(version, aliases, decision, current["version"] if current else None)


def _require_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if _not_found(err):
            raise RegistryError(f"no registered model named {name!r} (run the pipeline first)") from None
        raise


def promote(project_root: str | Path, name: str, version: int | str) -> int | None:
    """Make `version` the champion by hand (recorded in the history). Returns the previous champion."""
    from mlflow.exceptions import MlflowException

    client, uri, _ = connect(project_root)
    try:
        version = int(version)
    except ValueError:
        raise RegistryError(f"version must be a number, got {version!r}") from None
    with lock(uri):
        _require_model(client, name)
        try:
            client.get_model_version(name, str(version))
        except MlflowException as err:
            if _not_found(err):
                known = sorted(v["version"] for v in _list(client, name))
                raise RegistryError(f"{name!r} has no version {version} (versions: "
                                    f"{', '.join(map(str, known)) or 'none'})") from None
            raise
        client.set_model_version_tag(name, str(version), DECISION_TAG, f"{CHAMPION} (manual)")
        return _move_champion(client, name, version)


def rollback(project_root: str | Path, name: str) -> tuple[int, int | None]:
    """Move `champion` back to the previous champion in the history. Returns (new champion, old champion)."""
    from mlflow.exceptions import MlflowException

    client, uri, _ = connect(project_root)
    with lock(uri):
        _require_model(client, name)
        current = _alias_version(client, name, CHAMPION)
        history = _history(client, name)
        while history and history[-1] == current:
            history.pop()
        while history:  # skip versions deleted since
            try:
                client.get_model_version(name, str(history[-1]))
                break
            except MlflowException as err:
                if not _not_found(err):
                    raise
                history.pop()
        if not history:
            raise RegistryError(f"{name!r} has no previous champion to roll back to "
                                f"(current champion: {f'v{current}' if current else 'none'})")
        target = history[-1]
        client.set_registered_model_alias(name, CHAMPION, str(target))
        _set_history(client, name, history)
        if current is not None:
            client.set_model_version_tag(name, str(current), DECISION_TAG, "rolled back")
        return target, current


def _list(client, name: str) -> list[dict[str, Any]]:
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as err:
        if _not_found(err):
            return []
        raise
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(int(version), []).append(alias)
    quote = '"' if "'" in name else "'"
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name={quote}{name}{quote}", page_token=token)
        versions += list(page)
        token = page.token
        if not token:
            break
    rows = []
    for mv in sorted(versions, key=lambda mv: int(mv.version)):
        tags = dict(mv.tags or {})
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(by_version.get(int(mv.version), [])),
            "metrics": _version_metrics(tags),
            "tags": {k: v for k, v in tags.items() if not k.startswith(METRIC_PREFIX)},
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC)
            .isoformat(timespec="seconds"),
            "run_id": mv.run_id,
            "source": mv.source,
        })
    return rows


def list_versions(project_root: str | Path, name: str) -> list[dict[str, Any]]:
    """[{version, aliases, metrics, tags, created, run_id, source}] oldest first; [] if the model doesn't exist."""
    return _list(connect(project_root)[0], name)


def current_aliases(project_root: str | Path, name: str | None, version: int | str | None) -> list[str]:
    """The aliases `version` of `name` holds now ([] when either is None or unknown)."""
    from mlflow.exceptions import MlflowException

    if not name or version is None:
        return []
    try:
        return _aliases_of(connect(project_root)[0], name, int(version))
    except MlflowException as err:
        if _not_found(err):
            return []
        raise


def champion_history(project_root: str | Path, name: str) -> list[int]:
    client = connect(project_root)[0]
    _require_model(client, name)
    return _history(client, name)
