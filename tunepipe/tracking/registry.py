"""The model registry: versions of the final model, the `champion` and `candidate` aliases, promote and rollback.

`register_and_promote` (what the register stage calls) first looks for a version holding the same model bytes
(`tunepipe.model_sha256` tag, same `store`). None: it logs the model as an MLflow pyfunc model (logged_model.py; the
slow upload, invisible to the registry) with the evaluation as the logged model's metrics, then under the store lock
reads the champion, decides (tunepipe.tracking.promotion), creates the version and moves an alias last: `champion`
only when every gate passes and the new model is strictly better on compare_metric, else `candidate`. Found: nothing
is uploaded or created; that version is the champion already ("unchanged"), or it is decided again against the
champion with this execution's metrics and gates. Every champion change is appended to the registered-model tag
`tunepipe.champion_history` (JSON list of versions), which `rollback` pops. Aliases are always read with
get_registered_model / get_model_version (search results carry empty alias lists).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunepipe.errors import TunepipeError
from tunepipe.tracking import logged_model
from tunepipe.tracking.store import connect, lock
from tunepipe.tracking.flatten import MAX_TAG_VALUE, clip_value, numeric_metrics
from tunepipe.tracking.promotion import Decision, check_gates, decide_promotion
from tunepipe.tracking.runs import lineage_tags

CHAMPION = "champion"
CANDIDATE = "candidate"
HISTORY_TAG = "tunepipe.champion_history"
DECISION_TAG = "tunepipe.decision"
REASONS_TAG = "tunepipe.reasons"
STORE_TAG = "tunepipe.store"
MODEL_DIR_TAG = "tunepipe.model_dir"
DIGEST_TAG = "tunepipe.model_sha256"
LEGACY_METRIC_PREFIX = "metric."  # versions registered before metrics lived on the logged model
HISTORY_KEEP = 200
DVC_LINEAGE = "lineage.dvc."


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


def _version_metrics(client, mv) -> dict[str, float]:
    """A version's metrics: its logged model's (latest value per key); `metric.*` tags of older versions."""
    model_id = logged_model.model_id_of(mv.source)
    if model_id is not None:
        return logged_model.logged_model_metrics(client, model_id)
    metrics = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(LEGACY_METRIC_PREFIX):
            with contextlib.suppress(ValueError):
                metrics[key[len(LEGACY_METRIC_PREFIX):]] = float(value)
    return metrics


def _champion(client, name: str) -> dict[str, Any] | None:
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        return None
    return {"version": version, "metrics": _version_metrics(client, client.get_model_version(name, str(version)))}


def champion(project_root: str | Path, name: str) -> dict[str, Any] | None:
    """{"version", "metrics"} of the current champion, or None."""
    return _champion(connect(project_root)[0], name)


def _quoted(text: str) -> str:
    return f'"{text}"' if "'" in text else f"'{text}'"


def _same_model(client, name: str, digest: str, store: str):
    """The newest version of `name` holding exactly these model bytes in the same store mode, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name={_quoted(name)} and tags.`{DIGEST_TAG}` = '{digest}'")
    except MlflowException as err:
        if _not_found(err):
            return None
        raise
    same = [mv for mv in found if (mv.tags or {}).get(STORE_TAG) == store]
    return max(same, key=lambda mv: int(mv.version)) if same else None


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise
        client.create_registered_model(name, tags={HISTORY_TAG: "[]"},
                                       description="Registered by tunepipe's register stage.")


def version_lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    """The lineage tags a version shows: all but the DVC hashes of code and data files (the md5 of every dvc.lock
    path, ~100 tags that would fill the registry's version table); those of pipeline outputs stay. The logged model
    and the register run carry every hash."""
    return {key: value for key, value in lineage_tags(lineage).items()
            if not key.startswith(DVC_LINEAGE) or key.startswith(DVC_LINEAGE + "outputs/")}


def _create_version(client, uri: str, name: str, info, run_id: str, lineage: Mapping[str, Any], store: str,
                    model_dir: Path, digest: str) -> int:
    """A version whose source is the logged model (`models:/<model id>`), linked both ways as mlflow.register_model
    links them."""
    import mlflow

    _ensure_registered_model(client, name)
    tags = version_lineage_tags(lineage)
    tags.update({STORE_TAG: store, MODEL_DIR_TAG: str(model_dir.resolve()), DIGEST_TAG: digest})
    mlflow.set_tracking_uri(uri)  # the SQL registry store resolves models:/ sources with a default client
    mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)
    versions = json.loads(client.get_logged_model(info.model_id).tags.get("mlflow.modelVersions") or "[]")
    client.set_logged_model_tags(info.model_id, {"mlflow.modelVersions": json.dumps(
        versions + [{"name": name, "version": mv.version}])})
    return int(mv.version)


def _log_model(client, model_dir: Path, *, name: str, run_id: str, metrics: Mapping[str, Any],
               lineage: Mapping[str, Any], store: str, digest: str, model_params: Mapping[str, Any] | None):
    """Upload (or reference) the model as a logged model with the evaluation as its metrics."""
    tags = {**lineage_tags(lineage), STORE_TAG: store, DIGEST_TAG: digest}
    info = logged_model.log_chat_model(model_dir, name=name, run_id=run_id, store=store, params=model_params,
                                       tags=tags)
    logged_model.log_model_metrics(client, run_id, info.model_id, metrics)
    return info


def register_model(project_root: str | Path, model_dir: str | Path, *, name: str, run_id: str,
                   metrics: Mapping[str, Any], lineage: Mapping[str, Any], store: str = "copy",
                   model_params: Mapping[str, Any] | None = None) -> int:
    """Register `model_dir` as a new version of `name` (no alias): a pyfunc logged model of the active run `run_id`
    (store="copy": the directory is its artifact; "reference": its absolute path is recorded). Returns the version."""
    client, uri, _ = connect(project_root)
    model_dir = Path(model_dir)
    digest = logged_model.model_digest(model_dir)
    info = _log_model(client, model_dir, name=name, run_id=run_id, metrics=metrics, lineage=lineage, store=store,
                      digest=digest, model_params=model_params)
    with lock(uri):
        return _create_version(client, uri, name, info, run_id, lineage, store, model_dir, digest)


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
    reasons = clip_value("; ".join(decision.reasons), MAX_TAG_VALUE)
    client.set_model_version_tag(name, str(version), REASONS_TAG, reasons)
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


NEW, REDECIDED, UNCHANGED = "new", "re-decided", "unchanged"


@dataclass
class Registration:
    version: int
    aliases: list[str]
    decision: Decision
    previous_champion: int | None
    model: str = NEW  # new version | same bytes as `version`, decided again | same bytes, already the champion
    model_sha256: str = ""

    @property
    def outcome(self) -> str:
        """What a person reads: `champion`, `candidate` or `unchanged`."""
        return UNCHANGED if self.model == UNCHANGED else CHAMPION if self.decision.promote else CANDIDATE

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "aliases": self.aliases, "promoted": self.decision.promote,
                "outcome": self.outcome, "model": self.model, "model_sha256": self.model_sha256,
                "reasons": self.decision.reasons, "gate_results": self.decision.gate_results,
                "previous_champion": self.previous_champion}


def _redecide(client, name: str, mv, current: dict[str, Any] | None, metrics: Mapping[str, Any], run_id: str,
              decide) -> tuple[str, Decision, list[str]]:
    """The same bytes as version `mv`: keep it if it is the champion, else decide it again (this execution's
    metrics become its latest metrics when they differ)."""
    version = int(mv.version)
    same = f"same model as v{version} (sha256 {(mv.tags or {}).get(DIGEST_TAG, '')[:12]}): no new version"
    if current is not None and current["version"] == version:
        results, reasons = check_gates(metrics, decide.gates)
        return UNCHANGED, Decision(False, [same, "already the champion", *reasons], results), \
            _aliases_of(client, name, version)
    model_id = logged_model.model_id_of(mv.source)
    if model_id is not None and _version_metrics(client, mv) != numeric_metrics(metrics):
        logged_model.log_model_metrics(client, run_id, model_id, metrics)
    decision = decide(current)
    decision.reasons.insert(0, same)
    return REDECIDED, decision, _apply(client, name, version, decision)


@dataclass
class _Decide:
    metrics: Mapping[str, Any]
    gates: list[Any]
    compare_metric: str
    higher_is_better: bool
    missing: dict[str, str]

    def __call__(self, current: dict[str, Any] | None) -> Decision:
        return decide_promotion(self.metrics, self.gates, current["metrics"] if current else None,
                                self.compare_metric, self.higher_is_better,
                                champion_version=current["version"] if current else None, missing=self.missing)


def register_and_promote(project_root: str | Path, model_dir: str | Path, *, name: str, run_id: str,
                         metrics: Mapping[str, Any], lineage: Mapping[str, Any], gates: Iterable[Any],
                         compare_metric: str, higher_is_better: bool = True, store: str = "copy",
                         model_params: Mapping[str, Any] | None = None,
                         missing: Mapping[str, str] | None = None) -> Registration:
    """Find or upload the model, then (under the store lock) read the champion, decide, create the version if the
    bytes are new, move an alias last. `run_id` must be the active MLflow run (the logged model's source run).
    `missing`: why a metric is known to be absent (see tunepipe.tracking.promotion.check_gates)."""
    client, uri, _ = connect(project_root)
    model_dir = Path(model_dir)
    digest = logged_model.model_digest(model_dir)
    decide = _Decide(metrics, list(gates), compare_metric, higher_is_better, dict(missing or {}))
    existing = _same_model(client, name, digest, store)
    info = None
    if existing is None:
        info = _log_model(client, model_dir, name=name, run_id=run_id, metrics=metrics, lineage=lineage,
                          store=store, digest=digest, model_params=model_params)
    with lock(uri):
        current = _champion(client, name)
        if existing is not None:
            version = int(existing.version)
            model, decision, aliases = _redecide(client, name, existing, current, metrics, run_id, decide)
        else:
            decision = decide(current)
            version = _create_version(client, uri, name, info, run_id, lineage, store, model_dir, digest)
            model, aliases = NEW, _apply(client, name, version, decision)
    return Registration(version, aliases, decision, current["version"] if current else None, model, digest)


def _require_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if _not_found(err):
            raise RegistryError(f"no registered model named {name!r} (run the pipeline first)") from None
        raise


def promote(project_root: str | Path, name: str, version: int | str, *, gates: Iterable[Any] = (),
            force: bool = False) -> int | None:
    """Make `version` the champion by hand (recorded in the history). Returns the previous champion.

    The current champion is left as it is (nothing written). A version whose metrics fail one of `gates` (the
    project's registry.gates) is refused, naming the failed gates, unless `force`."""
    from mlflow.exceptions import MlflowException

    client, uri, _ = connect(project_root)
    try:
        version = int(version)
    except ValueError:
        raise RegistryError(f"version must be a number, got {version!r}") from None
    with lock(uri):
        _require_model(client, name)
        try:
            mv = client.get_model_version(name, str(version))
        except MlflowException as err:
            if _not_found(err):
                known = sorted(v["version"] for v in _list(client, name))
                raise RegistryError(f"{name!r} has no version {version} (versions: "
                                    f"{', '.join(map(str, known)) or 'none'})") from None
            raise
        previous = _alias_version(client, name, CHAMPION)
        if previous == version:
            return previous
        results, reasons = check_gates(_version_metrics(client, mv), gates)
        failed = [reason for result, reason in zip(results, reasons) if not result["passed"]]
        if failed and not force:
            raise RegistryError(f"{name} v{version} fails its gates ({'; '.join(failed)}): "
                                "pass --force to promote it anyway")
        client.set_model_version_tag(name, str(version), DECISION_TAG,
                                     f"{CHAMPION} (manual{', gates forced' if failed else ''})")
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
            "metrics": _version_metrics(client, mv),
            "tags": {k: v for k, v in tags.items() if not k.startswith(LEGACY_METRIC_PREFIX)},
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
