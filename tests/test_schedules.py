"""Schedules that fire: `tunepipe serve` on the shared finished project and on a copy of it, each against its own
Prefect server; a process work pool running the prefect.yaml deployment. Effects asserted: scheduled flow runs reach
Completed and leave a new MLflow pipeline run in their own project, the two projects never see each other's
deployments or runs, and nothing keeps running afterwards."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import project_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Scheduler settings for seconds, not minutes (names checked against Prefect 3.8.8's settings).
FAST_SCHEDULER = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "3",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME": "PT30S",
    "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    "PREFECT_SERVER_UI_ENABLED": "false",
}


def env_for(project: Path) -> dict[str, str]:
    env = project_env(**FAST_SCHEDULER)
    for key in ("PREFECT_API_URL", "PREFECT_HOME"):  # the test harness's server is not the project's
        env.pop(key, None)
    return env


def pipeline_runs(project: Path) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tunepipe")
    return len(client.search_runs([experiment.experiment_id], "tags.`tunepipe.kind` = 'pipeline'"))


def server_record(project: Path, timeout: float = 240) -> dict:
    """The project's server as `serve` recorded it, once it answers."""
    from flows.server import healthy

    record = project / ".prefect" / "tunepipe-server.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if record.exists():
            data = json.loads(record.read_text())
            if healthy(data["api_url"]):
                return data
        time.sleep(0.5)
    raise AssertionError(f"{record} never appeared, or its server never answered")


async def completed_runs(api_url: str, *, auto_scheduled: bool, timeout: float) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                FlowRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    done = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED]
    run_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=done)),
                               **({"tags": FlowRunFilterTags(all_=["auto-scheduled"])} if auto_scheduled else {}))
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                runs = await client.read_flow_runs(flow_run_filter=run_filter, sort=FlowRunSort.START_TIME_ASC,
                                                   limit=10, offset=0)
                if runs:
                    return runs
                await asyncio.sleep(1)
    raise AssertionError(f"no finished flow run on {api_url} within {timeout:.0f}s")


async def deployments(api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_client() as client:
            return await client.read_deployments(limit=20, offset=0)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def second_project(finished_project, tmp_path) -> Path:
    """A copy of the finished project (outputs, DVC cache and MLflow store included) in another directory."""
    copy = tmp_path / "other-project"
    shutil.copytree(finished_project, copy, symlinks=True, ignore=shutil.ignore_patterns(".prefect"))
    return copy


def test_served_schedules_fire_and_projects_stay_apart(finished_project, second_project):
    projects = [finished_project, second_project]
    before = [pipeline_runs(p) for p in projects]
    serves = [subprocess.Popen([sys.executable, "-m", "tunepipe.cli", "serve", "--interval", "5"], cwd=p,
                               env=env_for(p), stdout=open(p / "serve.log", "w"), stderr=subprocess.STDOUT)
              for p in projects]
    watched: list[psutil.Process] = []
    try:
        records = [server_record(p) for p in projects]
        assert records[0]["api_url"] != records[1]["api_url"]
        for project, record, serve in zip(projects, records, serves):
            runs = asyncio.run(completed_runs(record["api_url"], auto_scheduled=True, timeout=300))
            assert runs[0].state.is_completed(), (project / "serve.log").read_text()[-3000:]
            # every run on this project's server is this project's
            assert {r.parameters["project_dir"] for r in runs} == {str(project)}
            names = [d.name for d in asyncio.run(deployments(record["api_url"]))]
            assert names == [f"{project.name}-nightly"]
            watched += [serve_process := psutil.Process(serve.pid), *descendants(serve.pid)]
            assert serve_process.is_running()
        after = [pipeline_runs(p) for p in projects]
        assert all(a > b for a, b in zip(after, before)), (before, after)  # the scheduled runs ran the pipeline
    finally:
        for serve in serves:
            serve.send_signal(signal.SIGTERM)
        for serve in serves:
            serve.wait(timeout=120)
    # serve stopped the servers it started; nothing of it or theirs is left
    for project, record in zip(projects, records):
        assert not (project / ".prefect" / "tunepipe-server.json").exists()
        assert not psutil.pid_exists(record["pid"]) or psutil.Process(record["pid"]).status() == psutil.STATUS_ZOMBIE
    time.sleep(1)
    assert [p.pid for p in watched if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    status = subprocess.run([sys.executable, "-m", "tunepipe.cli", "serve", "--status"], cwd=finished_project,
                            env=env_for(finished_project), capture_output=True, text=True, timeout=120)
    assert status.returncode == 1 and "no Prefect server running for this project" in status.stdout


def test_prefect_yaml_deployment_runs_on_a_process_worker(finished_project, tmp_path):
    from flows import server

    home = tmp_path / "prefect-home"
    env = env_for(finished_project)
    env["PREFECT_HOME"] = str(home)
    started = server.start(home)
    try:
        env["PREFECT_API_URL"] = started.api_url
        env["TUNEPIPE_PROJECT_DIR"] = str(finished_project)
        prefect = [str(Path(sys.executable).with_name("prefect")), "--no-prompt"]

        def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
            proc = subprocess.run([*prefect, *args], cwd=finished_project, env=env, capture_output=True, text=True,
                                  timeout=timeout)
            assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            return proc

        run("work-pool", "create", "local", "--type", "process")
        run("deploy", "--all")
        run("deployment", "run", "tunepipe-pipeline/nightly")
        run("worker", "start", "--pool", "local", "--type", "process", "--run-once", timeout=600)
        runs = asyncio.run(completed_runs(started.api_url, auto_scheduled=False, timeout=60))
        assert runs[0].state.is_completed() and runs[0].parameters["project_dir"] == str(finished_project)
    finally:
        server.stop(home)
    assert not psutil.pid_exists(started.pid) or psutil.Process(started.pid).status() == psutil.STATUS_ZOMBIE
