"""MLflow tracking: the store, runs, lineage tags, the model registry and promotion by alias.

This module knows nothing of DVC or Prefect: callers pass a project root, run ids and lineage dicts.

Store. `tracking_uri(root)` is `MLFLOW_TRACKING_URI` when set (must be absolute), else
`sqlite:///<abs root>/mlflow.db`; artifacts of the `tunepipe` experiment go to `<db dir>/mlartifacts` (absolute,
set when the experiment is created). `ensure_store(uri)` creates/migrates the DB and the experiment under a file
lock (`<db>.lock`), because several processes migrating a fresh SQLite DB at once crash (`duplicate column name`).

Runs. One parent run per pipeline execution (`start_pipeline_run`; the flow then calls `tag_stage_run` after each
stage with its DVC hashes and `finish_pipeline_run` at the end), one child run per stage process (`stage_run`, a
context manager). Environment contract between the flow and the stage processes:

    MLFLOW_TRACKING_URI      absolute store URI (the flow sets it; `stage_env()` builds the whole dict)
    TUNEPIPE_PARENT_RUN_ID   the pipeline run; a stage run without it is still recorded, as a top-level run
    TUNEPIPE_LINEAGE         JSON object, e.g. {"git_commit": "<sha>", "git_dirty": false,
                             "params_sha256": "...", "dvc": {"outputs/models/dpo": "<md5>.dir", ...}};
                             nested keys are flattened with dots into `lineage.*` tags on every stage run and on
                             the registered model version

Registry. `register_and_promote` (what the register stage calls) uploads the model first (slow, invisible to the
registry), then under a lock reads the champion, decides, creates the version and moves an alias last:
`champion` only when every gate passes and the new model is strictly better on compare_metric, else `candidate`.
Every champion change is appended to the registered-model tag `tunepipe.champion_history` (JSON list of
versions), which `rollback` pops. Metrics live on each version as `metric.<key>` tags. Aliases are always read with
get_registered_model / get_model_version (search results carry empty alias lists).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunepipe.errors import ConfigError, TunepipeError

log = logging.getLogger(__name__)

EXPERIMENT = "tunepipe"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_PARENT_RUN_ID = "TUNEPIPE_PARENT_RUN_ID"
ENV_LINEAGE = "TUNEPIPE_LINEAGE"
PARENT_RUN_ENV, LINEAGE_ENV = ENV_PARENT_RUN_ID, ENV_LINEAGE  # aliases used by flows/pipeline.py

STAGE_TAG = "tunepipe.stage"
DVC_STAGE_TAG = "tunepipe.dvc_stage"  # $DVC_STAGE of the stage process, when its runner exports one
KIND_TAG = "tunepipe.kind"  # "pipeline" | "stage"
CHAMPION = "champion"
CANDIDATE = "candidate"
HISTORY_TAG = "tunepipe.champion_history"
DECISION_TAG = "tunepipe.decision"
REASONS_TAG = "tunepipe.reasons"
STORE_TAG = "tunepipe.store"
MODEL_DIR_TAG = "tunepipe.model_dir"
METRIC_PREFIX = "metric."
LINEAGE_PREFIX = "lineage."
HISTORY_KEEP = 200

# MLflow limits (mlflow.utils.validation, 3.17)
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
BATCH = 100
_KEY_BAD_CHARS = re.compile(r"[^\w\-. :/]")

_READY: dict[str, str] = {}  # uri -> experiment id, per process
_PIPELINE_URIS: dict[str, str] = {}  # pipeline run id -> store uri (flow-side helpers take only the run id)
_READY_LOCK = threading.Lock()


class RegistryError(TunepipeError):
    """A registry request that cannot be done (unknown version, nothing to roll back to, ...)."""


# ----------------------------------------------------------------------------------------------------------- store
def _quiet_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MLflow's transformers helpers look up model cards otherwise


def tracking_uri(project_root: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set (a relative SQLite path is refused), else the project's absolute SQLite DB."""
    uri = os.environ.get(ENV_TRACKING_URI, "").strip()
    if uri:
        _check_absolute(uri)
        return uri
    return f"sqlite:///{Path(project_root).resolve() / DB_NAME}"


def _check_absolute(uri: str) -> None:
    db = _sqlite_path(uri)
    if db is not None:
        relative = db != Path(":memory:") and not db.is_absolute()
    else:  # a bare path is a file store; "databricks"-style names are remote
        relative = "://" not in uri and ":" not in uri and not uri.startswith("/") and uri != "databricks"
    if relative:
        raise ConfigError(f"{uri!r} is relative to the current directory, so every stage process would use a "
                          f"different store; use an absolute URI such as sqlite:////abs/path/mlflow.db",
                          key=ENV_TRACKING_URI)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def artifact_root(uri: str) -> str | None:
    """Where the experiment keeps artifacts: `<db dir>/mlartifacts` for SQLite, the server's choice otherwise."""
    db = _sqlite_path(uri)
    return (db.parent / ARTIFACTS_DIR).as_uri() if db is not None and db.is_absolute() else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock shared by every process using this SQLite store (no-op for other stores)."""
    db = _sqlite_path(uri)
    if db is None or not db.is_absolute():
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_store(uri: str) -> str:
    """Create/migrate the store and the `tunepipe` experiment once; returns the experiment id.

    Safe to call from several processes at once (file lock around creation and migration) and cheap to call
    again in the same process."""
    _quiet_env()
    with _READY_LOCK:
        if uri in _READY:
            return _READY[uri]
        with _store_lock(uri):
            client = _client(uri)  # the SqlAlchemyStore migrates a fresh DB here
            client.search_registered_models(max_results=1)  # and the registry store on the same DB
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                experiment_id = client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri))
            else:
                experiment_id = experiment.experiment_id
                if experiment.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment_id)
        _READY[uri] = experiment_id
        return experiment_id


def prepare_for_fork() -> None:
    """For a process that forks workers (tunepipe.warm): open the store named by MLFLOW_TRACKING_URI once —
    created or migrated, SQLAlchemy mappers configured, MLflow's store objects cached — so a forked stage starts
    tracking at once, then close every pooled connection: an SQLite connection must never be shared across fork."""
    uri = os.environ.get(ENV_TRACKING_URI)
    if not uri:
        return
    ensure_store(uri)
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for store_class in (TrackingStore, RegistryStore):
        for engine in getattr(store_class, "_engine_map", {}).values():
            engine.dispose()


def connect(project_root: str | Path):
    """(MlflowClient, uri, experiment id) for a project, store ready."""
    uri = tracking_uri(project_root)
    experiment_id = ensure_store(uri)
    return _client(uri), uri, experiment_id


# ------------------------------------------------------------------------------------------------ flatten helpers
def flatten(data: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts (and pydantic models) -> {"a.b.c": leaf}; lists stay leaves."""
    if hasattr(data, "model_dump"):
        data = data.model_dump()
    if not isinstance(data, Mapping):
        return {prefix: data} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric leaves of a (nested) metrics dict, flattened with dots; bools, strings, lists are skipped."""
    return {key: float(value) for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _key(key: str) -> str:
    return _KEY_BAD_CHARS.sub("_", key)[:MAX_KEY]


def _value(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(
        value, (list, tuple, dict)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_client(run_id: str | None, project_root: str | Path | None):
    """A client for `project_root`'s store, else for the process's current tracking URI (set by stage_run)."""
    import mlflow

    client = connect(project_root)[0] if project_root is not None else _client(mlflow.get_tracking_uri())
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("no run_id given and no active MLflow run")
        run_id = active.info.run_id
    return client, run_id


# ----------------------------------------------------------------------------------------------------------- runs
def log_params_flat(params: Mapping[str, Any] | Any, run_id: str | None = None, *, prefix: str = "",
                    project_root: str | Path | None = None) -> dict[str, str]:
    """Log nested params as `a.b.c` params (values over MLflow's 6000-char limit are truncated)."""
    from mlflow.entities import Param

    client, run_id = _run_client(run_id, project_root)
    flat = {_key(k): _value(v, MAX_PARAM_VALUE) for k, v in flatten(params, prefix).items()}
    items = [Param(k, v) for k, v in flat.items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[start:start + BATCH])
    return flat


def log_metrics(metrics: Mapping[str, Any], run_id: str | None = None, *, prefix: str = "", step: int = 0,
                project_root: str | Path | None = None) -> dict[str, float]:
    """Log the numeric leaves of a nested metrics dict as `a.b.c` metrics."""
    from mlflow.entities import Metric

    client, run_id = _run_client(run_id, project_root)
    flat = {_key(f"{prefix}{k}"): v for k, v in numeric_metrics(metrics).items()}
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in flat.items()]
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start:start + 1000])
    return flat


def log_metrics_file(path: str | Path, run_id: str | None = None, *, prefix: str = "", step: int = 0,
                     project_root: str | Path | None = None) -> dict[str, float]:
    """Log a metrics JSON file (e.g. metrics/evaluate.json) flattened into metrics; returns what was logged."""
    from tunepipe.io import read_json

    data = read_json(path, missing="metrics file not found")
    return log_metrics(data if isinstance(data, Mapping) else {}, run_id, prefix=prefix, step=step,
                       project_root=project_root)


def log_artifact_file(path: str | Path, artifact_path: str | None = None, run_id: str | None = None, *,
                      project_root: str | Path | None = None) -> None:
    client, run_id = _run_client(run_id, project_root)
    client.log_artifact(run_id, str(path), artifact_path)


def log_artifact_dir(path: str | Path, artifact_path: str | None = None, run_id: str | None = None, *,
                     project_root: str | Path | None = None) -> None:
    client, run_id = _run_client(run_id, project_root)
    client.log_artifacts(run_id, str(path), artifact_path)


def set_lineage(run_id: str, lineage: Mapping[str, Any], *, project_root: str | Path | None = None) -> dict[str, str]:
    """Tag a run with `lineage.<flat key>` tags (git commit, DVC hashes, params hash, ...)."""
    from mlflow.entities import RunTag

    client, run_id = _run_client(run_id, project_root)
    tags = lineage_tags(lineage)
    if lineage.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(lineage["git_commit"])
    items = [RunTag(k, v) for k, v in tags.items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, tags=items[start:start + BATCH])
    return tags


def lineage_tags(lineage: Mapping[str, Any]) -> dict[str, str]:
    return {_key(LINEAGE_PREFIX + k): _value(v, MAX_TAG_VALUE) for k, v in flatten(lineage).items()}


def read_lineage_env() -> dict[str, Any]:
    """The flow's lineage (`TUNEPIPE_LINEAGE`, a JSON object); {} when unset."""
    raw = os.environ.get(ENV_LINEAGE, "").strip()
    if not raw:
        return {}
    try:
        lineage = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"not valid JSON ({err.msg} at column {err.colno})", key=ENV_LINEAGE) from None
    if not isinstance(lineage, dict):
        raise ConfigError(f"expected a JSON object, got {type(lineage).__name__}", key=ENV_LINEAGE)
    return lineage


def git_lineage(project_root: str | Path) -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of the project's checkout; {} outside a git repository."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(project_root), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


def stage_env(project_root: str | Path, parent_run_id: str | None = None,
              lineage: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The environment a flow adds to each stage process: absolute store URI, parent run, lineage."""
    env = {ENV_TRACKING_URI: tracking_uri(project_root), "MLFLOW_DISABLE_TELEMETRY": "true"}
    if parent_run_id:
        env[ENV_PARENT_RUN_ID] = parent_run_id
    if lineage:
        env[ENV_LINEAGE] = json.dumps(dict(lineage), default=str, sort_keys=True)
    return env


def start_pipeline_run(project_root: str | Path, tags: Mapping[str, Any] | None = None, *,
                       run_name: str = "pipeline", params: Mapping[str, Any] | None = None) -> str:
    """Create the parent run of one pipeline execution (left RUNNING; close it with finish/end_pipeline_run)."""
    client, uri, experiment_id = connect(project_root)
    all_tags = {KIND_TAG: "pipeline", **{k: _value(v, MAX_TAG_VALUE) for k, v in (tags or {}).items()}}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    _PIPELINE_URIS[run.info.run_id] = uri
    if params:
        log_params_flat(params, run.info.run_id, project_root=project_root)
    return run.info.run_id


def _pipeline_client(run_id: str, project_root: str | Path | None):
    if project_root is not None:
        return connect(project_root)
    uri = _PIPELINE_URIS.get(run_id)
    if uri is None:
        raise RuntimeError(f"run {run_id} was not started by start_pipeline_run in this process: pass project_root")
    return _client(uri), uri, ensure_store(uri)


def end_pipeline_run(project_root: str | Path | None, run_id: str, status: str = "FINISHED") -> None:
    """status: FINISHED, FAILED or KILLED."""
    _pipeline_client(run_id, project_root)[0].set_terminated(run_id, status=status)


def finish_pipeline_run(run_id: str, results: Iterable[Mapping[str, Any]], *, failed: bool = False,
                        project_root: str | Path | None = None) -> None:
    """Record the flow's per-stage results on the pipeline run ({"name", "status", "seconds"} each: tag
    `stage_status.<name>`, metric `stage_seconds.<name>`) and end it FINISHED or FAILED."""
    from mlflow.entities import Metric, RunTag

    client = _pipeline_client(run_id, project_root)[0]
    now = int(time.time() * 1000)
    tags, metrics = [], []
    for result in results:
        name = _key(str(result["name"]))
        tags.append(RunTag(f"stage_status.{name}", str(result.get("status", ""))))
        if isinstance(result.get("seconds"), (int, float)):
            metrics.append(Metric(f"stage_seconds.{name}", float(result["seconds"]), now, 0))
    for start in range(0, max(len(tags), len(metrics)), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH], tags=tags[start:start + BATCH])
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def tag_stage_run(parent_run_id: str, stage: str, tags: Mapping[str, Any], *,
                  project_root: str | Path | None = None) -> str:
    """Add `lineage.*` tags (e.g. the stage's DVC hashes) to the newest child run of `parent_run_id` for `stage`
    (matched on tunepipe.dvc_stage, then tunepipe.stage, then run name). A stage that opened no run of its own
    gets one here, so every executed stage shows up under the pipeline run. Returns the run id."""
    from mlflow.entities import RunTag

    client, _, experiment_id = _pipeline_client(parent_run_id, project_root)
    under = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    run_id = None
    for key in (f"tags.`{DVC_STAGE_TAG}`", f"tags.`{STAGE_TAG}`", "attributes.run_name"):
        found = client.search_runs([experiment_id], f"{under} and {key} = '{stage}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            run_id = found[0].info.run_id
            break
    if run_id is None:
        run = client.create_run(experiment_id, run_name=stage, tags={
            "mlflow.parentRunId": parent_run_id, STAGE_TAG: stage, KIND_TAG: "stage", "tunepipe.recorded_by": "flow"})
        run_id = run.info.run_id
        client.set_terminated(run_id, status="FINISHED")
    items = [RunTag(k, v) for k, v in lineage_tags(tags).items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, tags=items[start:start + BATCH])
    return run_id


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (a cancelled Prefect task, a killed DVC stage) ends the run as KILLED instead of leaving it RUNNING."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


@contextlib.contextmanager
def stage_run(project_root: str | Path, stage: str, parent_run_id: str | None = None,
              params: Mapping[str, Any] | Any | None = None, tags: Mapping[str, Any] | None = None):
    """A run for one stage process, child of `parent_run_id` (default: $TUNEPIPE_PARENT_RUN_ID).

    Without a parent (or with one that no longer exists) the run is still recorded, at top level. The run is the
    process's active MLflow run (transformers' MLflowCallback logs into it), tagged `tunepipe.stage=<stage>` and
    with the lineage of $TUNEPIPE_LINEAGE; it ends FINISHED, FAILED (exception) or KILLED (Ctrl-C, SIGTERM)."""
    import mlflow

    client, uri, experiment_id = connect(project_root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ[ENV_TRACKING_URI] = uri  # same absolute store for libraries and child processes
    parent = parent_run_id or os.environ.get(ENV_PARENT_RUN_ID) or None
    all_tags = {STAGE_TAG: stage, KIND_TAG: "stage", **{k: _value(v, MAX_TAG_VALUE) for k, v in (tags or {}).items()}}
    if os.environ.get("DVC_STAGE"):
        all_tags[DVC_STAGE_TAG] = os.environ["DVC_STAGE"]
    if parent and not _run_exists(client, parent):
        log.warning("parent run %s not found in %s; recording %s as a top-level run", parent, uri, stage)
        all_tags["tunepipe.missing_parent_run_id"] = parent
        parent = None
    lineage = read_lineage_env()
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags=all_tags)
    status = "FAILED"
    try:
        with _sigterm_as_exit():
            if lineage:
                set_lineage(run.info.run_id, lineage)
            if params is not None:
                log_params_flat(params, run.info.run_id)
            yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SystemExit as exit_:
        status = "FINISHED" if exit_.code in (0, None) else "KILLED" if exit_.code in (130, 143) else "FAILED"
        raise
    finally:
        mlflow.end_run(status)


# -------------------------------------------------------------------------------------------------------- registry
@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    gate_results: list[dict[str, Any]] = field(default_factory=list)


def _gate(gate: Any) -> tuple[str, float | None, float | None]:
    if isinstance(gate, Mapping):
        return gate["metric"], gate.get("min"), gate.get("max")
    return gate.metric, gate.min, gate.max


def _field(gate: Any, name: str) -> Any:
    return gate.get(name) if isinstance(gate, Mapping) else getattr(gate, name, None)


def _baseline_gate(gate: Any, flat: Mapping[str, float]) -> tuple[dict[str, Any], str]:
    """A no-regression gate: `metric` against another key of the same metrics (`baseline`, e.g. sft.pref_accuracy):
    pass iff metric >= baseline - max_drop (higher is better) and/or metric <= baseline * max_ratio (lower is
    better). A missing or NaN value on either side fails."""
    name, baseline = _field(gate, "metric"), _field(gate, "baseline")
    drop, ratio = _field(gate, "max_drop"), _field(gate, "max_ratio")
    value, base = flat.get(name), flat.get(baseline)
    passed = _usable(value) and _usable(base)
    bounds = []
    if drop is not None:
        bounds.append(f">= {baseline} - {drop:g}")
        passed = passed and value >= base - drop
    if ratio is not None:
        bounds.append(f"<= {ratio:g} x {baseline}")
        passed = passed and value <= base * ratio
    result = {"metric": name, "value": value, "baseline": baseline, "baseline_value": base, "max_drop": drop,
              "max_ratio": ratio, "passed": bool(passed)}
    label = _field(gate, "name")
    reason = (f"gate {label + ': ' if label else ''}{name} {' and '.join(bounds) or 'vs ' + baseline}: {_fmt(value)}"
              f" vs {_fmt(base)} {'passed' if passed else 'FAILED'}")
    return result, reason


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6g}"


def _usable(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def decide_promotion(metrics: Mapping[str, Any], gates: Iterable[Any], champion_metrics: Mapping[str, Any] | None,
                     compare_metric: str, higher_is_better: bool = True, *,
                     champion_version: int | str | None = None) -> Decision:
    """Promote iff every gate passes AND (there is no champion OR strictly better than it on compare_metric).

    A gate is a bound (`min` / `max` on a metric) or a no-regression check against another metric of the same model
    set (`baseline` with `max_drop` and/or `max_ratio`, e.g. dpo.pref_accuracy vs sft.pref_accuracy).

    `metrics` and `champion_metrics` may be nested ({"final": {"reward_accuracy": 0.8}}) or flat
    ({"final.reward_accuracy": 0.8}); `champion_metrics=None` means there is no champion. A gate or compare metric
    that is missing or NaN fails."""
    flat = numeric_metrics(metrics)
    reasons: list[str] = []
    results: list[dict[str, Any]] = []
    for gate in gates:
        if _field(gate, "baseline") is not None:
            result, reason = _baseline_gate(gate, flat)
            results.append(result)
            reasons.append(reason)
            continue
        name, low, high = _gate(gate)
        value = flat.get(name)
        passed = _usable(value) and (low is None or value >= low) and (high is None or value <= high)
        bounds = " and ".join(part for part in (f">= {low:g}" if low is not None else "",
                                                f"<= {high:g}" if high is not None else "") if part) or "present"
        results.append({"metric": name, "value": value, "min": low, "max": high, "passed": bool(passed)})
        reasons.append(f"gate {name} {bounds}: {_fmt(value)} {'passed' if passed else 'FAILED'}")
    gates_ok = all(r["passed"] for r in results)

    value = flat.get(compare_metric)
    champ_name = f"champion v{champion_version}" if champion_version is not None else "champion"
    if not _usable(value):
        reasons.append(f"{compare_metric} is {_fmt(value)} in the new model's metrics: cannot compare")
        better = False
    elif champion_metrics is None:
        reasons.append(f"no champion yet ({compare_metric} {_fmt(value)})")
        better = True
    else:
        champ = numeric_metrics(champion_metrics).get(compare_metric)
        if not _usable(champ):
            reasons.append(f"{champ_name} has no {compare_metric}: cannot compare (promote manually)")
            better = False
        else:
            better = value > champ if higher_is_better else value < champ
            op = ">" if value > champ else "<" if value < champ else "=="
            verdict = "better" if better else "not better"
            reasons.append(f"{compare_metric} {_fmt(value)} {op} {champ_name} {_fmt(champ)} "
                           f"({'higher' if higher_is_better else 'lower'} is better: {verdict})")
    return Decision(promote=gates_ok and better, reasons=reasons, gate_results=results)


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
    tags = {_key(METRIC_PREFIX + k): repr(v) for k, v in numeric_metrics(metrics).items()}
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
    with _store_lock(uri):
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
    client.set_model_version_tag(name, str(version), REASONS_TAG, _value("; ".join(decision.reasons), MAX_TAG_VALUE))
    if decision.promote:
        _move_champion(client, name, version)
    else:
        client.set_registered_model_alias(name, CANDIDATE, str(version))
    return _aliases_of(client, name, version)


def apply_decision(project_root: str | Path, name: str, version: int | str, decision: Decision) -> list[str]:
    """Move `champion` to `version` when decision.promote (recorded in the history), else `candidate`.
    Returns the version's aliases afterwards."""
    client, uri, _ = connect(project_root)
    with _store_lock(uri):
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
                         artifact_path: str = "model") -> Registration:
    """Upload, then (under the store lock) read the champion, decide, create the version, move an alias last."""
    client, uri, _ = connect(project_root)
    model_dir = Path(model_dir)
    source = _upload(client, model_dir, run_id, store, artifact_path)
    with _store_lock(uri):
        current = _champion(client, name)
        decision = decide_promotion(metrics, list(gates), current["metrics"] if current else None, compare_metric,
                                    higher_is_better, champion_version=current["version"] if current else None)
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
    with _store_lock(uri):
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
    with _store_lock(uri):
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


# ------------------------------------------------------------------------------------------------------------- ui
def ui_command(project_root: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow ui` command line for this project's store (bound to 127.0.0.1 unless told otherwise)."""
    uri = tracking_uri(project_root)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               "--workers", "1"]
    db = _sqlite_path(uri)
    if db is not None:  # experiments created from the UI keep their artifacts beside the DB too
        command += ["--artifacts-destination", str(db.parent / ARTIFACTS_DIR)]
    return command

