"""MLflow runs of the pipeline itself: one parent run per flow execution, the stage runs under it.

The flow records each stage that ran (`record_stage`) from what dvc.yaml declares of it: a child run with its plan
section as params, its own metrics files as metrics, its plots and reports as artifacts and its DVC hashes as
lineage tags. Train and register open their child run themselves while they work (live metric history, the
registry); the flow finds it (by `tunepipe.dvc_stage`) and adds the rest. A stage DVC skipped gets a child run
marked skipped that names the run its outputs come from (`tunepipe.reused_run_id`), so every stage of an
execution is visible; an execution with nothing to run is one run marked no-op.

The parent run is named for a person scanning the list: `12-01 08:05 · 5 ran · v2 → champion`,
`12-01 09:00 · no-op`, `12-01 09:30 · failed at prepare-dpo · 1 ran` (local time of its start).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tunepipe.tracking import store
from tunepipe.tracking.flatten import BATCH, MAX_TAG_VALUE, clean_key, clip_value, flatten
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


STATUS_TAG = "tunepipe.status"  # of a stage run: ran | skipped; of the pipeline run: ran | no-op | failed
REUSED_TAG = "tunepipe.reused_run_id"  # a skipped stage: the latest run of that stage that ran
DECISION_TAG = "tunepipe.decision"  # the pipeline run: what the register stage decided, e.g. "v2 → champion"


def _started(start_time_ms: int) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(start_time_ms / 1000))


def start_pipeline_run(project_root: str | Path, tags: Mapping[str, Any] | None = None, *,
                       run_name: str | None = None, params: Mapping[str, Any] | None = None) -> str:
    """Create the parent run of one pipeline execution (left RUNNING; close it with finish/end_pipeline_run).
    Named `<MM-DD HH:MM> · running` until finish_pipeline_run names it for what happened."""
    client, uri, experiment_id = store.connect(project_root)
    all_tags = {KIND_TAG: "pipeline", **{k: clip_value(v, MAX_TAG_VALUE) for k, v in (tags or {}).items()}}
    run = client.create_run(experiment_id, run_name=run_name or f"{_started(int(time.time() * 1000))} · running",
                            tags=all_tags)
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


def decision_text(decision: Mapping[str, Any] | None) -> str:
    """`v2 → champion`, `v3 → candidate`, `v2 unchanged` from metrics/register.json ("" without one)."""
    if not decision or decision.get("version") is None:
        return ""
    version = f"v{decision['version']}"
    outcome = decision.get("outcome") or ("champion" if decision.get("promoted") else "candidate")
    return f"{version} unchanged" if outcome == "unchanged" else f"{version} → {outcome}"


def pipeline_run_name(start_time_ms: int, results: list[Mapping[str, Any]], *, noop: bool = False,
                      decision: Mapping[str, Any] | None = None) -> str:
    """`12-01 08:05 · 5 ran · v2 → champion` / `· no-op` / `· failed at prepare-dpo · 1 ran`."""
    parts = [_started(start_time_ms)]
    failed = [r["name"] for r in results if r.get("status") == "failed"]
    ran = sum(r.get("status") == "ran" for r in results)
    if failed:
        parts += [f"failed at {failed[0]}", f"{ran} ran"]
    elif noop or not ran:
        parts.append("no-op")
    else:
        parts.append(f"{ran} ran")
    if decision_text(decision) and not failed:
        parts.append(decision_text(decision))
    return " · ".join(parts)


def finish_pipeline_run(run_id: str, results: Iterable[Mapping[str, Any]], *, failed: bool = False,
                        killed: bool = False, noop: bool = False, decision: Mapping[str, Any] | None = None,
                        project_root: str | Path | None = None) -> None:
    """Record the flow's per-stage results on the pipeline run ({"name", "status", "seconds"} each: tag
    `stage_status.<name>`, metric `stage_seconds.<name>`), a skipped child run for each stage DVC skipped before any
    failure (none for a no-op execution), name the run for what happened (`decision`: this execution's
    metrics/register.json, when register ran) and end it FINISHED or FAILED."""
    from mlflow.entities import Metric, RunTag

    client, _, experiment_id = _pipeline_client(run_id, project_root)
    results = list(results)
    now = int(time.time() * 1000)
    tags, metrics = [], []
    for result in results:
        name = clean_key(str(result["name"]))
        tags.append(RunTag(f"stage_status.{name}", str(result.get("status", ""))))
        if isinstance(result.get("seconds"), (int, float)):
            metrics.append(Metric(f"stage_seconds.{name}", float(result["seconds"]), now, 0))
    status = "failed" if failed else "no-op" if noop else "ran"
    tags.append(RunTag(STATUS_TAG, status))
    if decision_text(decision) and not failed:
        tags.append(RunTag(DECISION_TAG, decision_text(decision)))
    for start in range(0, max(len(tags), len(metrics)), BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + BATCH], tags=tags[start:start + BATCH])
    if not noop:
        for result in results:
            if result.get("status") in ("failed", "stopped"):
                break
            if result.get("status") == "skipped":
                _record_skipped(client, experiment_id, run_id, str(result["name"]))
    name = pipeline_run_name(client.get_run(run_id).info.start_time, results, noop=noop, decision=decision)
    client.update_run(run_id, name=name)
    client.set_terminated(run_id, status="KILLED" if killed else "FAILED" if failed else "FINISHED")


def _record_skipped(client, experiment_id: str, parent_run_id: str, stage: str) -> str:
    """A finished child run `<stage> · skipped` pointing at the latest run of that stage that did run."""
    found = client.search_runs([experiment_id], f"tags.`{DVC_STAGE_TAG}` = '{stage}' and tags.`{STATUS_TAG}` = 'ran'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    tags = {"mlflow.parentRunId": parent_run_id, STAGE_TAG: stage, DVC_STAGE_TAG: stage, KIND_TAG: "stage",
            STATUS_TAG: "skipped", "tunepipe.recorded_by": "flow"}
    if found:
        tags[REUSED_TAG] = found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{stage} · skipped", tags=tags)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


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
        "mlflow.parentRunId": parent_run_id, STAGE_TAG: stage, DVC_STAGE_TAG: stage, KIND_TAG: "stage",
        "tunepipe.recorded_by": "flow"})
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
    """Everything a stage that just ran declared in dvc.yaml, on its run: its params (its plan sections: its own
    unprefixed, any other it reads as `<section>.<key>`), its own metrics files as metrics (this execution's only:
    nothing another stage wrote), its metrics, plots and reports as artifacts, its lineage, its start-up time.
    What the stage logged on its run itself wins (train's metric history, register's params).
    `stage` is a flows.pipeline.StageDecl."""
    import yaml

    from tunepipe.io import read_json
    from tunepipe.tracking.runs import log_artifact_file, log_metrics, log_params_flat

    run_id = tag_stage_run(parent_run_id, stage.name, lineage, project_root=root)
    client = store.connect(root)[0]
    client.set_tag(run_id, STATUS_TAG, "ran")
    logged = client.get_run(run_id).data
    params: dict[str, Any] = {}
    for file, keys in stage.params:
        document = yaml.safe_load((root / file).read_text(encoding="utf-8")) or {}
        for key in keys:
            section = document.get(key) or {}
            params.update(section if key == stage.name or len(keys) == 1 else {key: section})
    params = {k: v for k, v in flatten(params).items() if k not in logged.params}
    if params:
        log_params_flat(params, run_id, project_root=root)
    metrics: dict[str, Any] = {}
    for file in stage.metrics:
        if (root / file).exists():
            data = read_json(root / file, missing="metrics file not found")
            metrics.update(data if isinstance(data, Mapping) else {})
    if startup_seconds is not None:
        metrics["startup_seconds"] = startup_seconds
    log_metrics({k: v for k, v in flatten(metrics).items() if k not in logged.metrics}, run_id, project_root=root)
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
