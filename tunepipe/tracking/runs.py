"""The MLflow run of one stage process, and what it records.

`stage_run(root, name)` opens the run of a stage (child of $TUNEPIPE_PARENT_RUN_ID, the pipeline run, when set) as
the process's active MLflow run and ends it FINISHED, FAILED (exception) or KILLED (Ctrl-C, SIGTERM). The log_*
helpers add params, metrics and artifacts to it, flattened with dots. Environment contract with the caller that
starts stage processes (the flow):

    MLFLOW_TRACKING_URI      absolute store URI
    TUNEPIPE_PARENT_RUN_ID   the pipeline run; a stage run without it is still recorded, as a top-level run
    TUNEPIPE_LINEAGE         JSON object, e.g. {"git_commit": "<sha>", "git_dirty": false}; nested keys are flattened
                             with dots into `lineage.*` tags on every stage run and on the registered model version
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tunepipe.errors import ConfigError
from tunepipe.tracking import store
from tunepipe.tracking.flatten import (BATCH, MAX_PARAM_VALUE, MAX_TAG_VALUE, clean_key, clip_value, flatten,
                                       numeric_metrics)

log = logging.getLogger(__name__)

ENV_PARENT_RUN_ID = "TUNEPIPE_PARENT_RUN_ID"
ENV_LINEAGE = "TUNEPIPE_LINEAGE"
STAGE_TAG = "tunepipe.stage"
DVC_STAGE_TAG = "tunepipe.dvc_stage"  # $DVC_STAGE of the stage process, when its runner exports one
KIND_TAG = "tunepipe.kind"  # "pipeline" | "stage"
LINEAGE_PREFIX = "lineage."


def _run_client(run_id: str | None, project_root: str | Path | None):
    """A client for `project_root`'s store, else for the process's current tracking URI (set by stage_run)."""
    import mlflow

    client = store.connect(project_root)[0] if project_root is not None else store.client(mlflow.get_tracking_uri())
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise RuntimeError("no run_id given and no active MLflow run")
        run_id = active.info.run_id
    return client, run_id



def log_params_flat(params: Mapping[str, Any] | Any, run_id: str | None = None, *, prefix: str = "",
                    project_root: str | Path | None = None) -> dict[str, str]:
    """Log nested params as `a.b.c` params (values over MLflow's 6000-char limit are truncated)."""
    from mlflow.entities import Param

    client, run_id = _run_client(run_id, project_root)
    flat = {clean_key(k): clip_value(v, MAX_PARAM_VALUE) for k, v in flatten(params, prefix).items()}
    items = [Param(k, v) for k, v in flat.items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[start:start + BATCH])
    return flat


def log_metrics(metrics: Mapping[str, Any], run_id: str | None = None, *, prefix: str = "", step: int = 0,
                project_root: str | Path | None = None) -> dict[str, float]:
    """Log the numeric leaves of a nested metrics dict as `a.b.c` metrics."""
    from mlflow.entities import Metric

    client, run_id = _run_client(run_id, project_root)
    flat = {clean_key(f"{prefix}{k}"): v for k, v in numeric_metrics(metrics).items()}
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
    return {clean_key(LINEAGE_PREFIX + k): clip_value(v, MAX_TAG_VALUE) for k, v in flatten(lineage).items()}


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

    client, uri, experiment_id = store.connect(project_root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ[store.ENV_TRACKING_URI] = uri  # same absolute store for libraries and child processes
    parent = parent_run_id or os.environ.get(ENV_PARENT_RUN_ID) or None
    all_tags = {STAGE_TAG: stage, KIND_TAG: "stage",
                **{k: clip_value(v, MAX_TAG_VALUE) for k, v in (tags or {}).items()}}
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


