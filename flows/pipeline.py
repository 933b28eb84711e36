"""The pipeline flow: run the project's DVC stages in dependency order, one Prefect task per stage.

DVC owns the DAG and decides what is stale (content hashes of data, params and code; dvc.lock); this flow only
knows stage names, which it reads from dvc.yaml through DVC's own index. Prefect adds what DVC lacks: retries,
per-stage logs and timings, artifacts (stage table, metrics, registry decision), schedules and work pools.
MLflow gets one parent run per execution (flows/pipeline_runs.py); each stage process opens its child run under it
(TUNEPIPE_PARENT_RUN_ID) and the flow tags it with the stage's DVC hashes from dvc.lock afterwards.

Before anything runs, dvc.yaml is regenerated from params.yaml and the code (stages/dag.py, from each stage module's
declaration); stages.common gives the dvc.lock hashes and the paths the stages declare (metrics_file). Those are the
flow's only imports from stages/: the stages themselves it knows only by the names in dvc.yaml.

    tunepipe run [--force STAGE ...] [--json]      # ephemeral Prefect, nothing to start
    tunepipe serve --cron "0 2 * * *"               # a local Prefect server + a scheduled deployment
    prefect deploy / a worker                        # prefect.yaml: entrypoint flows/pipeline.py:pipeline
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from flows import lifecycle, pipeline_runs
from flows.lifecycle import PipelineStopped, project_lock
from stages import dag
from stages.common import dvc_lock_hashes, metrics_file
from tunepipe.errors import PipelineBusy  # noqa: F401  (re-exported: what a busy project raises)
from tunepipe.tracking import registry, store

# skipped: DVC found the stage up to date; not run: an earlier stage failed or the run was stopped
RAN, SKIPPED, FAILED, STOPPED, NOT_RUN = "ran", "skipped", "failed", "stopped", "not run"
STARTUP = re.compile(r"\] start-up ([\d.]+) s")  # the line stages/common.py `work_begins` logs
EXITED = re.compile(r"exited with (-?\d+)")  # DVC's "failed to run: <cmd>, exited with 2" (DVC itself exits 255)


class StageFailed(RuntimeError):
    """A stage process failed: its own exit status (2 = a user error, one line) and its error line."""

    def __init__(self, name: str, code: int, message: str):
        self.name, self.code, self.message = name, code, message
        super().__init__(f"stage {name} failed (exit {code}): {message}")

    def __reduce__(self):  # Prefect may pickle a task's exception
        return StageFailed, (self.name, self.code, self.message)


_LOCK: dict[str, lifecycle.ProjectLock] = {}  # the running flow's lock, so a stage task can record its process group


@dataclass
class StageDecl:
    """What dvc.yaml declares of a stage, which is all this flow knows of it."""

    name: str
    params: list[tuple[str, list[str]]] = field(default_factory=list)  # (params file, its keys/sections)
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)  # `meta: {artifacts: [...]}`: reports worth keeping


def stage_order(root: Path) -> list[StageDecl]:
    """The stages of dvc.yaml in dependency order (DVC's index graph: edges point to dependencies)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        order = reversed(list(nx.topological_sort(repo.index.graph)))
        return [StageDecl(name=stage.name,
                          params=[(str(d.def_path), list(d.params)) for d in stage.deps if hasattr(d, "params")],
                          metrics=[str(o.def_path) for o in stage.outs if o.metric],
                          plots=[str(o.def_path) for o in stage.outs if o.plot],
                          artifacts=list((stage.meta or {}).get("artifacts", [])))
                for stage in order if not str(stage.addressing).endswith(".dvc")]


def start_status(root: Path) -> subprocess.Popen:
    """`dvc status --json`, started now and read by `up_to_date` later (it runs while the flow sets up MLflow)."""
    return subprocess.Popen([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def up_to_date(status: subprocess.Popen) -> bool:
    """`dvc status` says nothing is stale (it cannot say *what* will rerun downstream, only whether anything is)."""
    out, _ = status.communicate()
    return status.returncode == 0 and json.loads(out or "{}") == {}


def _stage_env(root: Path, parent_run_id: str | None, lineage: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    # DVC runs `python -m stages.*` through the shell: make that `python` this interpreter (the project's venv)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1")
    env.update(pipeline_runs.stage_env(root, parent_run_id, lineage))
    return env


def _transient(task, task_run, state) -> bool:
    """Retry only what a retry can fix: DVC's lock contention, not a failing training run."""
    try:
        state.result()
    except Exception as err:  # the task's exception
        return any(text in str(err) for text in ("Unable to acquire lock", "is busy", "database is locked"))
    return False


@task(name="dvc-stage", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient, task_run_name="{name}")
def run_stage(root: str, name: str, force: bool, env: dict[str, str]) -> dict[str, Any]:
    """`dvc repro --single-item <stage>`: DVC decides whether it runs; its output goes to the Prefect log."""
    logger = get_run_logger()
    args = ["repro", "--single-item", name] + (["--force"] if force else [])
    started = time.perf_counter()
    # its own session: a Ctrl-C in the terminal reaches only the flow, which then stops the stage in order
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    if "lock" in _LOCK:
        _LOCK["lock"].update(stage=name, stage_pgid=proc.pid)
    ran, tail, startup = False, [], None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            ran |= line.startswith(f"Running stage '{name}'")
            found = STARTUP.search(line)
            startup = float(found.group(1)) if found else startup
            tail = (tail + [line])[-40:]
            logger.info("%s | %s", name, line)
    except PipelineStopped:
        killed = lifecycle.stop_group(proc.pid)
        proc.wait()
        logger.warning("%s | %s", name, "killed after %.0f s" % lifecycle.STOP_TIMEOUT if killed else "stopped")
        raise
    code = proc.wait()
    if "lock" in _LOCK:
        _LOCK["lock"].update(stage=None, stage_pgid=None)
    seconds = round(time.perf_counter() - started, 2)
    if code != 0:
        # the stage's own one-line error says what is wrong; DVC's "failed to reproduce" line only says where
        message = next((l for l in reversed(tail) if l.startswith("error:")), None) or next(
            (l for l in reversed(tail) if l.startswith("ERROR:")), tail[-1] if tail else "")
        exited = next((int(m.group(1)) for l in reversed(tail) if (m := EXITED.search(l))), code)
        raise StageFailed(name, exited, message.removeprefix("error: "))
    return {"name": name, "status": RAN if ran else SKIPPED, "seconds": seconds, "startup_seconds": startup}


def _git_commit(root: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _summary_markdown(results: list[dict[str, Any]], decision: dict[str, Any] | None) -> str:
    lines = ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in results]
    if decision:
        lines += ["", f"**registry**: version {decision.get('version')} → {', '.join(decision.get('aliases', []))}"
                  f" ({'promoted' if decision.get('promoted') else 'not promoted'}: "
                  f"{'; '.join(decision.get('reasons', []))})"]
    return "\n".join(lines)


@flow(name="tunepipe-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", force: list[str] | None = None, wait: bool = False) -> dict[str, Any]:
    """Run the project's DVC pipeline stage by stage. Returns {"stages": [...], "model": {...} | None}, plus
    "stopped": <signal number> when a signal stopped it."""
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    force = list(force or [])
    with project_lock(root, wait=wait) as lock, lifecycle.stop_on_signals():
        _LOCK["lock"] = lock
        try:
            return _run(root, force, lock, logger)
        finally:
            _LOCK.pop("lock", None)


def _run(root: Path, force: list[str], lock: lifecycle.ProjectLock, logger) -> Any:
    lifecycle.clean_orphans(root, lock.left)
    if dag.sync(root):
        logger.info("dvc.yaml regenerated from params.yaml (enabled stages changed)")
    with start_status(root) as status:  # dvc status runs while DVC's index and MLflow are opened here
        stages = stage_order(root)
        order = [stage.name for stage in stages]
        unknown = [s for s in force if s not in order]
        if unknown:
            raise ValueError(f"unknown stage(s) to force: {', '.join(unknown)}; stages: {', '.join(order)}")
        store.ensure_store(store.tracking_uri(root))
        commit = _git_commit(root)
        parent = pipeline_runs.start_pipeline_run(root, tags={"git_commit": commit or "", "forced": ",".join(force)})
        lock.update(mlflow_run=parent)
        env = _stage_env(root, parent, {"git_commit": commit})
        stale = bool(force) or not up_to_date(status)

    results: list[dict[str, Any]] = []
    stopped: PipelineStopped | None = None
    if not stale:
        logger.info("dvc status: everything is up to date, nothing to run")
        results = [{"name": name, "status": SKIPPED, "seconds": 0.0} for name in order]
    else:
        for stage in stages:
            name = stage.name
            try:
                result = run_stage(str(root), name, name in force, env)
            except PipelineStopped as stop:
                stopped = stop
                results.append({"name": name, "status": STOPPED, "seconds": 0.0, "error": str(stop)})
                pipeline_runs.record_stopped(root, parent, name)
            except Exception as err:
                results.append({"name": name, "status": FAILED, "seconds": 0.0, "error": str(err),
                                "exit_code": err.code if isinstance(err, StageFailed) else 1})
            else:
                results.append(result)
                if result["status"] == RAN:
                    hashes = dvc_lock_hashes(root).get(name, {})
                    pipeline_runs.record_stage(root, parent, stage, lineage={"dvc": hashes},
                                               startup_seconds=result.get("startup_seconds"))
                continue
            results += [{"name": n, "status": NOT_RUN, "seconds": 0.0} for n in order[len(results):]]
            break

    failed = [r for r in results if r["status"] in (FAILED, STOPPED)]
    decision = None
    register = root / metrics_file("register")  # the paths the stages declare (stages/common.py)
    if not failed and register.exists():
        decision = json.loads(register.read_text())
    registered = any(r["name"] == "register" and r["status"] == RAN for r in results)
    pipeline_runs.finish_pipeline_run(parent, results, failed=bool(failed), killed=stopped is not None,
                                      noop=not stale, decision=decision if registered else None)
    lock.update(mlflow_run=None)
    if stopped is not None:  # no artifacts: stop within seconds, as asked
        return Failed(message=str(stopped), data={"stages": results, "model": None, "stopped": stopped.signum})
    create_table_artifact(key="stage-results", table=[{k: r[k] for k in ("name", "status", "seconds")}
                                                      for r in results], description="tunepipe stages")
    evaluate = root / metrics_file("evaluate")
    if evaluate.exists():
        create_markdown_artifact(key="metrics", markdown="```json\n" + evaluate.read_text() + "\n```")
    create_markdown_artifact(key="pipeline-summary", markdown=_summary_markdown(results, decision))
    if failed:  # a failed flow run that still carries the per-stage table for the CLI
        return Failed(message=failed[0]["error"], data={"stages": results, "model": None})
    model = None
    if decision:
        model = {"name": decision.get("name"), "version": decision.get("version"),
                 "promoted": bool(decision.get("promoted")),
                 "aliases": registry.current_aliases(root, decision.get("name"), decision.get("version"))}
    return {"stages": results, "model": model}


def schedule_deployment(*, project_dir: str, name: str, cron: str | None = None, interval: float | None = None,
                        timezone: str | None = None):
    """The deployment `tunepipe serve` serves: this flow on a cron or interval schedule (needs a Prefect server)."""
    from datetime import timedelta

    from prefect.schedules import Cron, Interval

    if interval:
        schedule = Interval(timedelta(seconds=interval))
    else:
        schedule = Cron(cron, timezone=timezone) if timezone else Cron(cron)
    return pipeline.to_deployment(name=name, schedules=[schedule], parameters={"project_dir": project_dir},
                                  concurrency_limit=1, description="tunepipe pipeline on a schedule")


async def deployment_summary(api_url: str, runs: int = 5) -> list[str]:
    """One line per deployment on the server (schedule, paused), then its latest runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    lines = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            for deployment in await client.read_deployments(limit=50, offset=0):
                schedules = ", ".join(str(getattr(s.schedule, "cron", None) or getattr(s.schedule, "interval", ""))
                                      for s in deployment.schedules) or "no schedule"
                lines.append(f"deployment {deployment.name}: {schedules}"
                             f"{' (paused)' if deployment.paused else ''}")
                for run in await client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                        sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=runs, offset=0):
                    when = run.expected_start_time.strftime("%Y-%m-%d %H:%M:%S") if run.expected_start_time else "-"
                    lines.append(f"  {when}  {run.state_name or '-':<10}  {run.name}")
    return lines or ["no deployments"]


def status_line(result: dict[str, Any]) -> str:
    width = max((len(r["name"]) for r in result["stages"]), default=5)
    lines = [f"{r['name']:<{width}}  {r['status']:<7}  {r['seconds']:>7.1f}s" for r in result["stages"]]
    model = result.get("model")
    if model:
        lines.append(f"model {model['name']} version {model['version']}: {', '.join(model['aliases']) or '-'}")
    return "\n".join(lines)

