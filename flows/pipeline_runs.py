"""MLflow runs of the pipeline itself: one parent run per flow execution, the stage runs under it.

Stage processes open their own child runs (tunepipe.tracking.runs.stage_run) under the run this module starts; the
flow passes it to them in the environment (`stage_env`) and, after each stage, tags that stage's run with its DVC
hashes from dvc.lock (`tag_stage_run`), so every run that trained or merged points at the exact data and outputs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tunepipe.tracking import store
from tunepipe.tracking.flatten import BATCH, MAX_TAG_VALUE, clean_key, clip_value
from tunepipe.tracking.runs import (DVC_STAGE_TAG, ENV_LINEAGE, ENV_PARENT_RUN_ID, KIND_TAG, STAGE_TAG,
                                    lineage_tags, log_params_flat)

_PIPELINE_URIS: dict[str, str] = {}  # pipeline run id -> store uri (helpers below take only the run id)


def stage_env(project_root: str | Path, parent_run_id: str | None = None,
              lineage: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The environment a flow adds to each stage process: absolute store URI, parent run, lineage."""
    env = {store.ENV_TRACKING_URI: store.tracking_uri(project_root), "MLFLOW_DISABLE_TELEMETRY": "true"}
    if parent_run_id:
        env[ENV_PARENT_RUN_ID] = parent_run_id
    if lineage:
        env[ENV_LINEAGE] = json.dumps(dict(lineage), default=str, sort_keys=True)
    return env


def start_pipeline_run(project_root: str | Path, tags: Mapping[str, Any] | None = None, *,
                       run_name: str = "pipeline", params: Mapping[str, Any] | None = None) -> str:
    """Create the parent run of one pipeline execution (left RUNNING; close it with finish/end_pipeline_run)."""
    client, uri, experiment_id = store.connect(project_root)
    all_tags = {KIND_TAG: "pipeline", **{k: clip_value(v, MAX_TAG_VALUE) for k, v in (tags or {}).items()}}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    _PIPELINE_URIS[run.info.run_id] = uri
    if params:
        log_params_flat(params, run.info.run_id, project_root=project_root)
    return run.info.run_id


def _pipeline_client(run_id: str, project_root: str | Path | None):
    if project_root is not None:
        return store.connect(project_root)
    uri = _PIPELINE_URIS.get(run_id)
    if uri is None:
        raise RuntimeError(f"run {run_id} was not started by start_pipeline_run in this process: pass project_root")
    return store.client(uri), uri, store.ensure_store(uri)


def end_pipeline_run(project_root: str | Path | None, run_id: str, status: str = "FINISHED") -> None:
    """status: FINISHED, FAILED or KILLED."""
    _pipeline_client(run_id, project_root)[0].set_terminated(run_id, status=status)


def finish_pipeline_run(run_id: str, results: Iterable[Mapping[str, Any]], *, failed: bool = False,
                        killed: bool = False, project_root: str | Path | None = None) -> None:
    """Record the flow's per-stage results on the pipeline run ({"name", "status", "seconds"} each: tag
    `stage_status.<name>`, metric `stage_seconds.<name>`) and end it FINISHED or FAILED."""
    from mlflow.entities import Metric, RunTag

    client = _pipeline_client(run_id, project_root)[0]
    now = int(time.time() * 1000)
    tags, metrics = [], []
    for result in results:
        name = clean_key(str(result["name"]))
        tags.append(RunTag(f"stage_status.{name}", str(result.get("status", ""))))
        if isinstance(result.get("seconds"), (int, float)):
            metrics.append(Metric(f"stage_seconds.{name}", float(result["seconds"]), now, 0))
    for start in range(0, max(len(tags), len(metrics)), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH], tags=tags[start:start + BATCH])
    client.set_terminated(run_id, status="KILLED" if killed else "FAILED" if failed else "FINISHED")


def _stage_run_id(client, experiment_id: str, parent_run_id: str, stage: str) -> str:
    """The newest child run of the pipeline run for `stage` (a stage that writes while it works opens its own, e.g.
    training's live metrics), or a new one recorded here."""
    under = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    for key in (f"tags.`{DVC_STAGE_TAG}`", f"tags.`{STAGE_TAG}`", "attributes.run_name"):
        found = client.search_runs([experiment_id], f"{under} and {key} = '{stage}'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
        if found:
            return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=stage, tags={
        "mlflow.parentRunId": parent_run_id, STAGE_TAG: stage, KIND_TAG: "stage", "tunepipe.recorded_by": "flow"})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def tag_stage_run(parent_run_id: str, stage: str, tags: Mapping[str, Any], *,
                  project_root: str | Path | None = None) -> str:
    """Add `lineage.*` tags (e.g. the stage's DVC hashes) to the stage's run under `parent_run_id` (found or
    created, see `_stage_run_id`). Returns the run id."""
    from mlflow.entities import RunTag

    client, _, experiment_id = _pipeline_client(parent_run_id, project_root)
    run_id = _stage_run_id(client, experiment_id, parent_run_id, stage)
    items = [RunTag(k, v) for k, v in lineage_tags(tags).items()]
    for start in range(0, len(items), BATCH):
        client.log_batch(run_id, tags=items[start:start + BATCH])
    return run_id


def record_stage(root: Path, parent_run_id: str, stage, *, lineage: Mapping[str, Any],
                 startup_seconds: float | None = None) -> str:
    """Everything a stage that just ran declared in dvc.yaml, on its run: its params (its plan sections), its own
    metrics files as metrics (this execution's only: nothing another stage wrote), its metrics, plots and
    reports as artifacts, its lineage, its start-up time. `stage` is a flows.pipeline.StageDecl."""
    import yaml

    from tunepipe.io import read_json
    from tunepipe.tracking.runs import log_artifact_file, log_metrics, log_params_flat

    run_id = tag_stage_run(parent_run_id, stage.name, lineage, project_root=root)
    params: dict[str, Any] = {}
    for file, keys in stage.params:
        document = yaml.safe_load((root / file).read_text(encoding="utf-8")) or {}
        for key in keys:
            params.update(document.get(key) or {})
    if params:
        log_params_flat(params, run_id, project_root=root)
    metrics: dict[str, Any] = {}
    for file in stage.metrics:
        if (root / file).exists():
            data = read_json(root / file, missing="metrics file not found")
            metrics.update(data if isinstance(data, Mapping) else {})
    if startup_seconds is not None:
        metrics["startup_seconds"] = startup_seconds
    log_metrics(metrics, run_id, project_root=root)
    for file in [*stage.metrics, *stage.plots, *stage.artifacts]:
        if (root / file).is_file():
            log_artifact_file(root / file, str(Path(file).parent), run_id, project_root=root)
    return run_id


def record_stopped(root: Path, parent_run_id: str, stage: str) -> None:
    """The stage a signal stopped: its own run (training's) is already KILLED by the stage; one the flow would have
    recorded is created KILLED, so the UI shows where the run stopped."""
    client, _, experiment_id = _pipeline_client(parent_run_id, root)
    run_id = _stage_run_id(client, experiment_id, parent_run_id, stage)
    run = client.get_run(run_id)
    if run.info.status in ("RUNNING", "FINISHED") and run.data.tags.get("tunepipe.recorded_by") == "flow":
        client.set_terminated(run_id, status="KILLED")


def kill_runs(root: Path, parent_run_id: str) -> int:
    """Mark a killed pipeline's run and its children still RUNNING as KILLED; returns how many."""
    from mlflow.exceptions import MlflowException

    client, _, experiment_id = store.connect(root)
    killed = 0
    try:
        candidates = [client.get_run(parent_run_id)]
    except MlflowException:
        return 0
    candidates += client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    for run in candidates:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
            killed += 1
    return killed
