"""tunepipe.tracking: the store (absolute URI, migration race), runs (pipeline parent, stage children), logging.

Fast by construction: one SQLite DB is migrated once per session (`mlflow_template`) and every test copies it into
its own tmp project (`project`), with MLFLOW_TRACKING_URI pointing there — the real project's mlflow.db is never
opened. Migrating a fresh DB costs seconds; copying the migrated one costs milliseconds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tunepipe.tracking import flatten, runs, store
from flows import pipeline_runs
from tunepipe.errors import ConfigError

_TEMPLATE: dict[str, Path] = {}


def migrated_template(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite DB (no experiment: each copy creates its own with its own artifact dir)."""
    if "db" not in _TEMPLATE:
        from mlflow import MlflowClient

        db = tmp_path_factory.mktemp("mlflow-template") / store.DB_NAME
        client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
        client.search_experiments()
        client.search_registered_models(max_results=1)
        _TEMPLATE["db"] = db
    return _TEMPLATE["db"]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    return migrated_template(tmp_path_factory)


@pytest.fixture
def project(tmp_path, mlflow_template, monkeypatch) -> Path:
    """A tmp project root with a pre-migrated mlflow.db; MLFLOW_TRACKING_URI points at it."""
    import mlflow

    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(mlflow_template, root / store.DB_NAME)
    monkeypatch.setenv(store.ENV_TRACKING_URI, f"sqlite:///{root / store.DB_NAME}")
    for name in (runs.ENV_PARENT_RUN_ID, runs.ENV_LINEAGE):
        monkeypatch.delenv(name, raising=False)
    yield root
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(autouse=True)
def _real_store_untouched():
    real = ROOT / store.DB_NAME
    before = real.stat().st_mtime_ns if real.exists() else None
    yield
    assert (real.stat().st_mtime_ns if real.exists() else None) == before, "a test touched the project's mlflow.db"


def client_for(root: Path):
    return store.connect(root)[0]


# ------------------------------------------------------------------------------------------------------------ store
def test_default_uri_is_absolute_sqlite_under_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv(store.ENV_TRACKING_URI, "x")
    monkeypatch.delenv(store.ENV_TRACKING_URI)
    monkeypatch.chdir(tmp_path)
    uri = store.tracking_uri(".")
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db" and uri.startswith("sqlite:////")
    assert store.artifact_root(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "mlruns", "./mlruns"])
def test_relative_env_uri_is_refused(uri, monkeypatch):
    monkeypatch.setenv(store.ENV_TRACKING_URI, uri)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI.*absolute"):
        store.tracking_uri("/anywhere")


def test_env_uri_wins(monkeypatch):
    monkeypatch.setenv(store.ENV_TRACKING_URI, "http://127.0.0.1:5000")
    assert store.tracking_uri("/anywhere") == "http://127.0.0.1:5000"
    assert store.artifact_root("http://127.0.0.1:5000") is None


def test_ensure_store_creates_experiment_with_absolute_artifact_location(project):
    uri = store.tracking_uri(project)
    experiment_id = store.ensure_store(uri)
    assert store.ensure_store(uri) == experiment_id  # cached
    experiment = client_for(project).get_experiment(experiment_id)
    assert experiment.name == store.EXPERIMENT
    assert experiment.artifact_location == (project / "mlartifacts").as_uri()


def _ensure_in_child(uri: str, barrier) -> None:
    barrier.wait(timeout=60)
    store.ensure_store(uri)


def test_concurrent_ensure_store_on_a_fresh_db(tmp_path):
    """Three processes first-touching a fresh DB at once: without the lock MLflow's migrations race."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = multiprocessing.get_context("spawn")  # fork after the session's Prefect harness threads is unsafe
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_ensure_in_child, args=(uri, barrier)) for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=180)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    from mlflow import MlflowClient

    experiments = [e for e in MlflowClient(uri).search_experiments() if e.name == store.EXPERIMENT]
    assert len(experiments) == 1


# ------------------------------------------------------------------------------------------------------------- runs
def test_stage_run_under_pipeline_run_is_its_child(project):
    parent = pipeline_runs.start_pipeline_run(project, tags={"trigger": "test"})
    with runs.stage_run(project, "sft", parent_run_id=parent, params={"lr": 1e-3}) as run:
        child = run.info.run_id
    client = client_for(project)
    data = client.get_run(child).data
    assert data.tags["mlflow.parentRunId"] == parent
    assert data.tags[runs.STAGE_TAG] == "sft" and data.tags["mlflow.runName"] == "sft"
    assert data.params == {"lr": "0.001"}
    assert client.get_run(child).info.status == "FINISHED"
    assert client.get_run(parent).data.tags[runs.KIND_TAG] == "pipeline"
    assert client.get_run(parent).info.status == "RUNNING"
    pipeline_runs.end_pipeline_run(project, parent, "FINISHED")
    assert client.get_run(parent).info.status == "FINISHED"


def test_parent_run_id_and_lineage_come_from_the_environment(project, monkeypatch):
    parent = pipeline_runs.start_pipeline_run(project)
    env = pipeline_runs.stage_env(project, parent, {"git_commit": "abc123", "dvc": {"outputs/models/sft": "f00.dir"}})
    assert env[store.ENV_TRACKING_URI].startswith("sqlite:////")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with runs.stage_run(project, "merge") as run:
        pass
    tags = client_for(project).get_run(run.info.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["lineage.git_commit"] == "abc123" == tags["mlflow.source.git.commit"]
    assert tags["lineage.dvc.outputs/models/sft"] == "f00.dir"


def test_flow_helpers_tag_stage_runs_and_finish_the_pipeline_run(project, monkeypatch):
    parent = pipeline_runs.start_pipeline_run(project)
    monkeypatch.setenv("DVC_STAGE", "train-sft")  # DVC exports it to stage commands
    with runs.stage_run(project, "sft", parent_run_id=parent) as run:
        pass
    monkeypatch.delenv("DVC_STAGE")
    hashes = {"dvc.outs.outputs/adapters/sft": "abc.dir"}
    assert pipeline_runs.tag_stage_run(parent, "train-sft", hashes) == run.info.run_id
    made = pipeline_runs.tag_stage_run(parent, "prepare-sft", {"dvc.outs.outputs/data/sft": "d0.dir"})  # opened no run
    pipeline_runs.finish_pipeline_run(parent, [{"name": "prepare-sft", "status": "ran", "seconds": 1.5},
                                          {"name": "train-sft", "status": "ran", "seconds": 9.0}], failed=True)
    client = client_for(project)
    assert client.get_run(run.info.run_id).data.tags["lineage.dvc.outs.outputs/adapters/sft"] == "abc.dir"
    placeholder = client.get_run(made)
    assert placeholder.data.tags["mlflow.parentRunId"] == parent and placeholder.info.run_name == "prepare-sft"
    pipeline = client.get_run(parent)
    assert pipeline.info.status == "FAILED"
    assert pipeline.data.metrics["stage_seconds.train-sft"] == 9.0
    assert pipeline.data.tags["stage_status.prepare-sft"] == "ran"


def test_stage_run_without_parent_is_still_recorded(project):
    with runs.stage_run(project, "evaluate") as run:
        runs.log_metrics({"final": {"loss": 1.5}})
    got = client_for(project).get_run(run.info.run_id)
    assert "mlflow.parentRunId" not in got.data.tags
    assert got.data.tags[runs.STAGE_TAG] == "evaluate" and got.info.status == "FINISHED"
    assert got.data.metrics == {"final.loss": 1.5}


def test_missing_parent_run_gives_a_top_level_run(project):
    with runs.stage_run(project, "dpo", parent_run_id="0" * 32) as run:
        pass
    tags = client_for(project).get_run(run.info.run_id).data.tags
    assert "mlflow.parentRunId" not in tags and tags["tunepipe.missing_parent_run_id"] == "0" * 32


def test_failed_stage_marks_the_run_failed(project):
    with pytest.raises(ValueError, match="boom"), runs.stage_run(project, "cpt") as run:
        raise ValueError("boom")
    assert client_for(project).get_run(run.info.run_id).info.status == "FAILED"


def test_sigterm_marks_the_run_killed(project):
    with pytest.raises(SystemExit) as exit_, runs.stage_run(project, "cpt") as run:
        os.kill(os.getpid(), signal.SIGTERM)
    assert exit_.value.code == 143
    assert client_for(project).get_run(run.info.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_log_params_flat_nests_with_dots_and_truncates(project):
    long = "x" * 7000
    with runs.stage_run(project, "sft") as run:
        logged = runs.log_params_flat({"train": {"lr": 2e-4, "lora": {"r": 8}}, "gates": [{"metric": "m"}],
                                           "note": long, "bad key?": 1})
    params = client_for(project).get_run(run.info.run_id).data.params
    assert params["train.lr"] == "0.0002" and params["train.lora.r"] == "8"
    assert json.loads(params["gates"]) == [{"metric": "m"}]
    assert len(params["note"]) == flatten.MAX_PARAM_VALUE and params["note"].endswith("...")
    assert params["bad key_"] == "1" and logged == params


def test_log_metrics_file_flattens_numbers_only(project, tmp_path):
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps({"final": {"reward_accuracy": 0.75, "ok": True, "samples": ["hi"]},
                                "base": {"ppl": 12}, "note": "text"}))
    with runs.stage_run(project, "evaluate") as run:
        logged = runs.log_metrics_file(path)
    assert logged == {"final.reward_accuracy": 0.75, "base.ppl": 12.0}
    assert client_for(project).get_run(run.info.run_id).data.metrics == logged
    with pytest.raises(ConfigError, match="not found"):
        runs.log_metrics_file(tmp_path / "nope.json", run.info.run_id, project_root=project)
    (tmp_path / "broken.json").write_text('{"final": {"reward_accuracy": 0.75,}}')
    with pytest.raises(ConfigError, match=r"broken\.json.*invalid JSON at line 1: Expecting property name"):
        runs.log_metrics_file(tmp_path / "broken.json", run.info.run_id, project_root=project)


def test_artifacts_land_under_the_project(project, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "loss.csv").write_text("step,loss\n1,2.0\n")
    with runs.stage_run(project, "train") as run:
        runs.log_artifact_dir(model, "adapter")
        runs.log_artifact_file(tmp_path / "loss.csv")
    stored = project / "mlartifacts"
    assert list(stored.rglob("adapter/config.json")) and list(stored.rglob("loss.csv"))
    assert run.info.artifact_uri.startswith(stored.as_uri())


def test_bad_lineage_env_is_one_line_error(monkeypatch):
    monkeypatch.setenv(runs.ENV_LINEAGE, "{not json")
    with pytest.raises(ConfigError, match="TUNEPIPE_LINEAGE.*not valid JSON"):
        runs.read_lineage_env()
    monkeypatch.setenv(runs.ENV_LINEAGE, "[1]")
    with pytest.raises(ConfigError, match="JSON object"):
        runs.read_lineage_env()


def test_git_lineage(tmp_path):
    assert runs.git_lineage(tmp_path) == {}  # not a repository
    lineage = runs.git_lineage(ROOT)
    assert len(lineage["git_commit"]) == 40 and isinstance(lineage["git_dirty"], bool)
