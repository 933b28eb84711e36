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
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what the session's Prefect test server installed
    with pytest.raises(SystemExit) as exit_, runs.stage_run(project, "cpt") as run:
        os.kill(os.getpid(), signal.SIGTERM)
    assert exit_.value.code == 143
    assert client_for(project).get_run(run.info.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored


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


# ---------------------------------------------------------------------------------------- metric history, run names
def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_metric_history_callback_logs_every_logging_step(project):
    """What MLflow draws the loss curve from: one point per logging step, at the optimizer step, main process only."""
    from types import SimpleNamespace

    from tunepipe.train.callbacks import MetricHistoryCallback

    progress = SimpleNamespace(last_tokens_per_second=None)
    restored = [{"loss": 3.0, "learning_rate": 1e-3, "epoch": 0.1, "step": 1}]  # resumed from checkpoint-1
    main = SimpleNamespace(is_world_process_zero=True, global_step=1, log_history=restored)
    other_rank = SimpleNamespace(is_world_process_zero=False, global_step=1, log_history=restored)
    with runs.stage_run(project, "train-sft") as run:
        callback, rank1 = MetricHistoryCallback(progress), MetricHistoryCallback(progress)
        callback.on_train_begin(None, main, None)
        rank1.on_train_begin(None, other_rank, None)
        for step, loss in ((2, 2.5), (3, 2.0)):
            main.global_step = other_rank.global_step = step
            progress.last_tokens_per_second = 100.0 * step
            for cb, state in ((callback, main), (rank1, other_rank)):
                cb.on_log(None, state, None, logs={"loss": loss, "grad_norm": 0.5, "learning_rate": 1e-3 / step,
                                                   "epoch": step / 10})
        callback.on_log(None, main, None, logs={"eval_loss": 1.9, "eval_rewards/accuracies": 0.75})
        callback.on_log(None, main, None, logs={"train_runtime": 1.0, "train_loss": 2.4})  # the summary
    client = client_for(project)
    run_id = run.info.run_id
    assert history(client, run_id, "loss") == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert history(client, run_id, "learning_rate") == [(1, 1e-3), (2, 5e-4), (3, 1e-3 / 3)]
    assert history(client, run_id, "step_tokens_per_second") == [(2, 200.0), (3, 300.0)]
    assert history(client, run_id, "grad_norm") == [(2, 0.5), (3, 0.5)]
    assert history(client, run_id, "eval_loss") == [(3, 1.9)]
    assert history(client, run_id, "eval_rewards/accuracies") == [(3, 0.75)]
    assert not {"train_runtime", "train_loss"} & set(client.get_run(run_id).data.metrics)


def test_metric_history_callback_without_a_run_does_nothing():
    from types import SimpleNamespace

    from tunepipe.train.callbacks import MetricHistoryCallback

    callback = MetricHistoryCallback()
    state = SimpleNamespace(is_world_process_zero=True, global_step=1, log_history=[])
    callback.on_train_begin(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 1.0})
    assert callback.client is None


@pytest.mark.parametrize("statuses, noop, decision, name", [
    (["ran"] * 5, False, {"version": 2, "outcome": "champion"}, "5 ran · v2 → champion"),
    (["skipped", "ran", "ran"], False, {"version": 3, "promoted": False}, "2 ran · v3 → candidate"),
    (["skipped", "ran"], False, {"version": 1, "outcome": "unchanged"}, "1 ran · v1 unchanged"),
    (["skipped"] * 3, True, None, "no-op"),
    (["ran", "failed", "skipped"], False, None, "failed at s1 · 1 ran"),
])
def test_pipeline_run_names_say_what_happened(statuses, noop, decision, name):
    import time

    results = [{"name": f"s{i}", "status": status} for i, status in enumerate(statuses)]
    start = int(time.mktime((2026, 12, 1, 8, 5, 0, 0, 0, -1)) * 1000)
    assert pipeline_runs.pipeline_run_name(start, results, noop=noop, decision=decision) == f"12-01 08:05 · {name}"


def test_skipped_stages_are_recorded_and_a_noop_run_is_marked(project):
    first = pipeline_runs.start_pipeline_run(project)
    trained = pipeline_runs.tag_stage_run(first, "train-sft", {})  # the run that made the adapter
    client = client_for(project)
    client.set_tag(trained, pipeline_runs.STATUS_TAG, "ran")
    pipeline_runs.finish_pipeline_run(first, [{"name": "train-sft", "status": "ran", "seconds": 3.0}])

    second = pipeline_runs.start_pipeline_run(project)
    assert client.get_run(second).info.run_name.endswith(" · running")
    pipeline_runs.finish_pipeline_run(second, [{"name": "train-sft", "status": "skipped", "seconds": 0.1},
                                               {"name": "register", "status": "ran", "seconds": 2.0}],
                                      decision={"version": 2, "outcome": "candidate"})
    experiment = store.ensure_store(store.tracking_uri(project))
    (skipped,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{second}'")
    assert skipped.info.run_name == "train-sft · skipped" and skipped.info.status == "FINISHED"
    assert skipped.data.tags[pipeline_runs.REUSED_TAG] == trained
    assert skipped.data.tags[pipeline_runs.STATUS_TAG] == "skipped"
    parent = client.get_run(second)
    assert parent.info.run_name.endswith(" · 1 ran · v2 → candidate")
    assert parent.data.tags[pipeline_runs.DECISION_TAG] == "v2 → candidate"

    noop = pipeline_runs.start_pipeline_run(project)
    pipeline_runs.finish_pipeline_run(noop, [{"name": "train-sft", "status": "skipped", "seconds": 0.0}], noop=True)
    assert client.get_run(noop).info.run_name.endswith(" · no-op")
    assert client.get_run(noop).data.tags[pipeline_runs.STATUS_TAG] == "no-op"
    assert client.search_runs([experiment], f"tags.mlflow.parentRunId = '{noop}'") == []


def test_record_stage_logs_declared_sections_and_keeps_what_the_stage_logged(project, monkeypatch):
    """The flow's record of a stage: its own plan section unprefixed, other declared sections prefixed; a key the
    stage logged itself (register's params, train's eval_loss history) is not logged again."""
    from types import SimpleNamespace

    import yaml

    (project / "outputs").mkdir()
    (project / "outputs" / "params.yaml").write_text(yaml.safe_dump({
        "register": {"final_stage": "dpo", "registry": {"gates": [{"metric": "m", "min": 0.5, "max": None}]}},
        "train-sft": {"train": {"learning_rate": 0.002}}}))
    (project / "metrics").mkdir()
    (project / "metrics" / "register.json").write_text(json.dumps({"version": 1, "eval_loss": 9.0, "ok": 1.0}))
    parent = pipeline_runs.start_pipeline_run(project)
    monkeypatch.setenv("DVC_STAGE", "register")
    with runs.stage_run(project, "register", parent_run_id=parent) as run:
        runs.log_params_flat({"final_stage": "dpo", "registry": {"gates": [{"min": 0.5, "metric": "m"}]}})
        runs.log_metrics({"eval_loss": 1.5}, step=3)
    stage = SimpleNamespace(name="register", params=[("outputs/params.yaml", ["register", "train-sft"])],
                            metrics=["metrics/register.json"], plots=[], artifacts=[])
    assert pipeline_runs.record_stage(project, parent, stage, lineage={"dvc": {"x": "1"}}) == run.info.run_id
    data = client_for(project).get_run(run.info.run_id).data
    assert data.params["train-sft.train.learning_rate"] == "0.002" and data.params["final_stage"] == "dpo"
    assert json.loads(data.params["registry.gates"]) == [{"min": 0.5, "metric": "m"}]  # the stage's own value
    assert history(client_for(project), run.info.run_id, "eval_loss") == [(3, 1.5)]
    assert data.metrics["version"] == 1.0 and data.tags[pipeline_runs.STATUS_TAG] == "ran"
