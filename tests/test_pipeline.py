"""The pipeline product, end to end on a temp copy of the project: real DVC, real Prefect (test harness), real
MLflow (a pre-migrated SQLite store), the tiny model with a tiny training budget.

One session-scoped project (conftest.pipeline_project) goes through the scenarios in order (each builds on the last,
like a real project's history): cold run, nothing-changed rerun, DPO-data change, a failing stage, a gate that cannot
pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(pipeline_project):
    return pipeline_project


def run(project: Path, force=None):
    from flows.pipeline import pipeline

    sys.path.insert(0, str(project))
    state = pipeline(project_dir=str(project), force=force or [], return_state=True)
    result = state.result(raise_on_failure=False)
    return state, result


def statuses(result) -> dict[str, str]:
    return {stage["name"]: stage["status"] for stage in result["stages"]}


def versions(project: Path) -> dict[int, list[str]]:
    from tunepipe.tracking import registry

    return {int(v["version"]): sorted(v["aliases"]) for v in registry.list_versions(project, "test-model")}


CHAIN = ["params", "base", "prepare-cpt", "prepare-sft", "prepare-dpo", "train-cpt", "merge-cpt", "train-sft",
         "merge-sft", "train-dpo", "merge-dpo", "evaluate", "register"]


def test_cold_run_trains_every_stage_and_registers_a_champion(project):
    state, result = run(project)
    assert state.is_completed(), result
    assert sorted(statuses(result)) == sorted(CHAIN)
    assert set(statuses(result).values()) == {"ran"}
    assert result["model"]["version"] == 1 and "champion" in result["model"]["aliases"]
    assert versions(project) == {1: ["champion"]}
    for path in ("outputs/models/dpo/model.safetensors", "outputs/adapters/dpo", "metrics/evaluate.json",
                 "plots/loss_sft.csv", "metrics/register.json", "dvc.lock"):
        assert (project / path).exists(), path
    # every stage that ran has an MLflow child run under one pipeline run, tagged with its DVC hashes
    from tunepipe.tracking import store

    client = store.connect(project)[0]
    experiment = client.get_experiment_by_name(store.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.`tunepipe.kind` = 'stage'")
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    assert len(parents) == 1 and None not in parents
    by_stage = {r.data.tags.get("tunepipe.stage"): r for r in runs}
    assert set(by_stage) == set(CHAIN)
    train_sft = by_stage["train-sft"]
    assert train_sft.data.tags["lineage.dvc.outputs/adapters/sft"].endswith(".dir")
    # each stage's run holds the values of its own plan section and only its own metrics
    assert train_sft.data.params["train.learning_rate"] == str(2e-3) and "pref_beta" not in str(train_sft.data.params)
    assert by_stage["train-dpo"].data.params["preference.pref_beta"] == "0.1"
    prepare = by_stage["prepare-sft"].data
    assert prepare.params["dataset"] == "demo_sft,demo_sft_chat" and "examples_out" in prepare.metrics
    assert not any(k.startswith(("train", "eval_")) for k in prepare.metrics)
    assert all(r.data.metrics["startup_seconds"] > 0 for r in runs)
    # what evaluate wrote (fact questions, forgetting included) is exactly what `tunepipe run` validates gates on
    from tunepipe.evaluation.knowledge import kinds, read_questions
    from tunepipe.metric_keys import metric_sources
    from tunepipe.tracking.flatten import numeric_metrics

    evaluated = numeric_metrics(json.loads((project / "metrics" / "evaluate.json").read_text()))
    questions = kinds(read_questions(project / "data" / "knowledge_eval.json"))
    assert set(evaluated) == set(metric_sources(["cpt", "sft", "dpo"], questions))
    # measured figures stay out of the versioned metrics (they go to the run and the log)
    assert "tokens_per_second" in by_stage["train-sft"].data.metrics
    assert "tokens_per_second" not in json.loads((project / "metrics" / "train_sft.json").read_text())


def test_second_run_retrains_nothing(project):
    state, result = run(project)
    assert state.is_completed()
    assert set(statuses(result).values()) == {"skipped"}
    assert versions(project) == {1: ["champion"]}  # no new version when nothing changed
    from tunepipe.tracking import store

    client, _, experiment = store.connect(project)
    (latest,) = client.search_runs([experiment], "tags.`tunepipe.kind` = 'pipeline'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
    assert latest.info.run_name.endswith(" · no-op") and latest.data.tags["tunepipe.status"] == "no-op"


def stale_after_plan(project: Path) -> set[str]:
    """Rebuild the plan (the `params` step, as a run would first), then ask DVC which stages are stale now."""
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # DVC's `python`
    subprocess.run([*dvc, "repro", "--single-item", "params"], cwd=project, check=True, capture_output=True, env=env)
    status = subprocess.run([*dvc, "status", "--json"], cwd=project, check=True, capture_output=True, text=True,
                            env=env)
    return set(json.loads(status.stdout or "{}"))


def test_code_defaults_rerun_exactly_the_stages_that_read_them(project):
    """Effective values are what DVC compares: a default changed in tunepipe/config.py reruns the stages whose plan
    section holds it (every train stage: none sets max_grad_norm), a help-string edit there reruns nothing."""
    config = project / "tunepipe" / "config.py"
    original = config.read_text()
    try:
        config.write_text(original.replace('description="Gradient clipping."', 'description="Clip gradients."'))
        assert stale_after_plan(project) == set()
        config.write_text(original.replace("max_grad_norm: float = Field(1.0,", "max_grad_norm: float = Field(0.5,"))
        # register too: the effective training values are the registered model's recipe (its params)
        assert stale_after_plan(project) == {"train-cpt", "train-sft", "train-dpo", "register"}
    finally:
        config.write_text(original)
    assert stale_after_plan(project) == set()


def test_dpo_data_change_reruns_only_the_dpo_branch(project):
    path = project / "data" / "demo_dpo.json"
    rows = json.loads(path.read_text())
    path.write_text(json.dumps(rows[1:] + rows[:1], ensure_ascii=False))  # same rows, new order: new DPO data
    state, result = run(project)
    assert state.is_completed(), result
    status = statuses(result)
    assert {s for s, v in status.items() if v == "ran"} == {"prepare-dpo", "train-dpo", "merge-dpo", "evaluate",
                                                           "register"}
    assert all(status[s] == "skipped" for s in ("params", "base", "prepare-cpt", "prepare-sft", "train-cpt",
                                                "merge-cpt", "train-sft", "merge-sft"))
    assert 2 in versions(project)
    # prepare-dpo's run of this execution carries its own figures only, none of the stages that ran after it
    from tunepipe.tracking import store

    client, _, experiment = store.connect(project)
    (prepare,) = client.search_runs([experiment], "tags.`tunepipe.dvc_stage` = 'prepare-dpo'", max_results=1,
                                    order_by=["attributes.start_time DESC"])
    assert "examples_out" in prepare.data.metrics and prepare.data.params["dataset"] == "demo_dpo"
    assert not any(k.startswith(("train", "merge", "eval_", "final")) for k in prepare.data.metrics)


def test_failed_stage_leaves_the_registry_untouched(project):
    before = versions(project)
    register_before = (project / "metrics" / "register.json").read_text()
    (project / "data" / "demo_dpo.json").write_text("[{broken")
    state, result = run(project)
    assert state.is_failed()
    failed = [s for s in result["stages"] if s["status"] == "failed"]
    assert [s["name"] for s in failed] == ["prepare-dpo"] and "invalid JSON" in failed[0]["error"]
    assert statuses(result)["register"] == "not run" and failed[0]["exit_code"] == 2
    assert versions(project) == before
    assert (project / "metrics" / "register.json").read_text() == register_before
    subprocess.run(["git", "checkout", "--", "data/demo_dpo.json"], cwd=project, check=True)


def test_model_failing_a_gate_is_only_a_candidate(project):
    champion = [v for v, aliases in versions(project).items() if "champion" in aliases]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["registry"]["gates"] = [{"metric": "final.reward_accuracy", "min": 2.0}]  # impossible
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = versions(project)
    state, result = run(project)
    assert state.is_completed(), result
    ran = {s for s, v in statuses(result).items() if v == "ran"}
    assert "register" in ran and "train-cpt" not in ran
    # the DPO data is back to the cold run's, so DVC restored that model: its bytes are v1's, no new version
    after = versions(project)
    assert set(after) == set(before)
    assert [v for v, aliases in after.items() if "champion" in aliases] == champion
    decision = json.loads((project / "metrics" / "register.json").read_text())
    assert decision["promoted"] is False and decision["version"] == 1 and decision["model"] != "new"
    assert any("final.reward_accuracy >= 2: " in r and "FAILED" in r for r in decision["reasons"])
    assert "candidate" in after[1] or decision["outcome"] == "unchanged"  # decided again, or already champion


@pytest.mark.timeout(600)
def test_a_learning_rate_that_wrecks_dpo_is_only_a_candidate_with_the_failed_gate_named(project):
    """The shipped no-regression gates (params.yaml registry.no_regression) on a real DPO run whose learning rate
    destroys the SFT model: the new version is a candidate, the champion stays, and the decision names the
    forgetting gate on the SFT loss."""
    champion = [v for v, aliases in versions(project).items() if "champion" in aliases]
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["registry"]["gates"] = []
    params["registry"]["no_regression"] = shipped["registry"]["no_regression"]
    params["stages"]["dpo"]["learning_rate"] = 0.05  # 500x the demo's (0.5 also breaks merge's logit check)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    state, result = run(project)
    assert state.is_completed(), result
    ran = {s for s, v in statuses(result).items() if v == "ran"}
    assert {"train-dpo", "evaluate", "register"} <= ran and "train-sft" not in ran
    after = versions(project)
    assert after[max(after)] == ["candidate"]
    assert [v for v, aliases in after.items() if "champion" in aliases] == champion
    decision = json.loads((project / "metrics" / "register.json").read_text())
    failed = {(g["metric"], g.get("baseline")) for g in decision["gate_results"] if not g["passed"]}
    assert decision["promoted"] is False and ("final.sft_loss", "sft.sft_loss") in failed, decision["reasons"]
    assert any(r.startswith("gate forgetting of sft: final.sft_loss <= 1.1 x sft.sft_loss") and r.endswith("FAILED")
               for r in decision["reasons"])
    evaluate = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert evaluate["forgetting"]["sft_loss_ratio"]["final"] > 1.1
    assert all(g.get("baseline") for g in decision["gate_results"] if not g["passed"])  # only no-regression gates


def test_a_second_run_in_the_same_project_is_refused(project):
    from flows.pipeline import PipelineBusy, project_lock

    with project_lock(project):
        state, result = run(project)
    assert isinstance(result, PipelineBusy) and "in progress" in str(result)
