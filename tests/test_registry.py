"""Registry and promotion: decide_promotion (pure), champion/candidate aliases, history, rollback, manual promote,
`tunepipe models ...` / `tunepipe ui`, and the register stage end to end in a tmp project."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tests.test_tracking as shared
from tests.conftest import DEMO_PARAMS_YAML, ROOT, cli
from tunepipe.tracking import logged_model, registry, runs, store
from flows import pipeline_runs
from tunepipe.config import Gate
from tunepipe.tracking.promotion import Decision, decide_promotion
from tunepipe.tracking.registry import RegistryError

# the pre-migrated store fixtures of test_tracking.py (the template DB is migrated once per session for both)
mlflow_template, project, _real_store_untouched = shared.mlflow_template, shared.project, shared._real_store_untouched

NAME = "tiny-model"
METRIC = "final.reward_accuracy"
LOSS = "final.loss"
GATES = [{"metric": METRIC, "min": 0.6}]


# ---------------------------------------------------------------------------------------------- decide_promotion
@pytest.mark.parametrize("metrics, gates, champion, compare, higher, promote, fragment", [
    # no champion: gates decide
    ({"final": {"reward_accuracy": 0.7}}, GATES, None, METRIC, True, True, "no champion yet"),
    ({"final": {"reward_accuracy": 0.5}}, GATES, None, METRIC, True, False, "FAILED"),
    # flat keys work too; a missing gate metric fails
    ({METRIC: 0.9}, [{"metric": LOSS, "max": 2.0}], None, METRIC, True, False, "missing"),
    # better / worse / equal vs champion
    ({METRIC: 0.8}, GATES, {METRIC: 0.7}, METRIC, True, True, "better"),
    ({METRIC: 0.65}, GATES, {METRIC: 0.7}, METRIC, True, False, "not better"),
    ({METRIC: 0.7}, GATES, {METRIC: 0.7}, METRIC, True, False, "=="),
    # better but a gate fails
    ({METRIC: 0.8, LOSS: 3.0}, [{"metric": LOSS, "max": 2.0}], {METRIC: 0.7}, METRIC, True, False, "FAILED"),
    # lower is better
    ({"final": {"loss": 1.0}}, [], {"final": {"loss": 1.2}}, LOSS, False, True, "better"),
    ({"final": {"loss": 1.3}}, [], {"final": {"loss": 1.2}}, LOSS, False, False, "not better"),
    ({"final": {"loss": 1.2}}, [], {LOSS: 1.2}, LOSS, False, False, "=="),
    # gates with min and max, given as the Gate models of params.yaml
    ({METRIC: 0.8, LOSS: 1.0}, [Gate(metric=METRIC, min=0.6, max=0.95), Gate(metric=LOSS, max=1.5)], None, METRIC,
     True, True, "passed"),
    # nothing to compare: the new metric missing or NaN, the champion lacking it
    ({"final": {"other": 1.0}}, [], None, METRIC, True, False, "cannot compare"),
    ({METRIC: math.nan}, [], None, METRIC, True, False, "cannot compare"),
    ({METRIC: 0.9}, [], {"final": {"other": 1.0}}, METRIC, True, False, "promote manually"),
])
def test_decide_promotion(metrics, gates, champion, compare, higher, promote, fragment):
    decision = decide_promotion(metrics, gates, champion, compare, higher)
    assert decision.promote is promote
    assert any(fragment in reason for reason in decision.reasons), decision.reasons
    assert len(decision.gate_results) == len(gates)


def test_gate_results_shape():
    decision = decide_promotion({METRIC: 0.5}, GATES, None, METRIC, True)
    assert decision.gate_results == [{"metric": METRIC, "value": 0.5, "min": 0.6, "max": None, "passed": False}]
    assert decision.promote is False and decision.reasons[0].startswith(f"gate {METRIC} >= 0.6: 0.5 FAILED")


# ------------------------------------------------------------------------------------------------------- registry
def fake_model(root: Path, stage: str = "dpo") -> Path:
    model = root / "outputs" / "models" / stage
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return model


def register(root: Path, accuracy: float, store: str = "copy") -> registry.Registration:
    model = fake_model(root)
    with runs.stage_run(root, "register") as run:
        return registry.register_and_promote(
            root, model, name=NAME, run_id=run.info.run_id, metrics={"final": {"reward_accuracy": accuracy}},
            lineage={"git_commit": "c0ffee"}, gates=GATES, compare_metric=METRIC, store=store)


def aliases(root: Path) -> dict[int, list[str]]:
    return {row["version"]: row["aliases"] for row in registry.list_versions(root, NAME)}


def model_files(root: Path) -> list[Path]:
    return sorted((root / "mlartifacts").rglob("model.safetensors"))


def test_first_model_becomes_champion_with_metrics_and_lineage(project):
    result = register(project, 0.7)
    assert (result.version, result.aliases, result.decision.promote, result.previous_champion) == (
        1, ["champion"], True, None)
    (row,) = registry.list_versions(project, NAME)
    assert row["metrics"] == {METRIC: 0.7} and row["tags"]["lineage.git_commit"] == "c0ffee"
    assert not any(key.startswith("metric.") for key in row["tags"])  # metrics are metrics, not tags
    assert row["tags"][registry.DECISION_TAG] == "champion" and row["source"].startswith("models:/m-")
    assert row["tags"][registry.DIGEST_TAG] == logged_model.model_digest(project / "outputs" / "models" / "dpo")
    # an MLflow Model: the pyfunc flavor with the model directory as its one artifact, the evaluation as metrics
    client = store.connect(project)[0]
    model = client.get_logged_model(logged_model.model_id_of(row["source"]))
    assert {(m.key, m.value) for m in model.metrics} == {(METRIC, 0.7)}
    assert model.tags["lineage.git_commit"] == "c0ffee" and model.source_run_id == row["run_id"]
    (weights,) = model_files(project)
    assert weights.parent.name == "dpo" and (weights.parents[2] / "MLmodel").is_file()
    assert "python_function" in (weights.parents[2] / "MLmodel").read_text()
    assert registry.champion_history(project, NAME) == [1]
    assert registry.champion(project, NAME) == {"version": 1, "metrics": {METRIC: 0.7}}


def test_same_model_bytes_are_never_uploaded_twice(project):
    """A rerun of register on the same bytes (e.g. after a registry param edit) creates no version and no copy:
    the champion stays as it is; another version is decided again with this execution's metrics."""
    model = fake_model(project)
    with runs.stage_run(project, "register") as run:
        first = registry.register_and_promote(project, model, name=NAME, run_id=run.info.run_id,
                                              metrics={METRIC: 0.7}, lineage={}, gates=GATES, compare_metric=METRIC)
    with runs.stage_run(project, "register") as run:
        again = registry.register_and_promote(project, model, name=NAME, run_id=run.info.run_id,
                                              metrics={METRIC: 0.7}, lineage={}, gates=[], compare_metric=METRIC)
    assert (first.model, again.model, again.outcome, again.version) == ("new", "unchanged", "unchanged", 1)
    assert again.aliases == ["champion"] and "already the champion" in again.decision.reasons[1]
    assert len(model_files(project)) == 1 and aliases(project) == {1: ["champion"]}

    worse = register(project, 0.65)  # new bytes: v2, candidate
    assert (worse.model, worse.aliases) == ("new", ["candidate"])
    worse_dir = project / "outputs" / "models" / "dpo"  # register() wrote v2's bytes here
    with runs.stage_run(project, "register") as run:
        better = registry.register_and_promote(project, worse_dir, name=NAME, run_id=run.info.run_id,
                                               metrics={METRIC: 0.9}, lineage={}, gates=GATES, compare_metric=METRIC)
    assert (better.model, better.version, better.outcome, better.previous_champion) == ("re-decided", 2, "champion", 1)
    assert better.decision.reasons[0].startswith("same model as v2 (sha256 ")
    assert aliases(project) == {1: [], 2: ["champion"]} and len(model_files(project)) == 2
    assert registry.champion(project, NAME)["metrics"] == {METRIC: 0.9}  # this execution's metrics are v2's now
    with runs.stage_run(project, "register") as run:  # same bytes in the other store mode: a version of its own
        referenced = registry.register_and_promote(project, worse_dir, name=NAME, run_id=run.info.run_id,
                                                   metrics={METRIC: 0.9}, lineage={}, gates=GATES,
                                                   compare_metric=METRIC, store="reference")
    assert (referenced.model, referenced.version) == ("new", 3) and len(model_files(project)) == 2


def test_worse_model_becomes_candidate_then_better_one_moves_champion(project):
    register(project, 0.7)
    worse = register(project, 0.65)
    assert worse.aliases == ["candidate"] and not worse.decision.promote
    assert aliases(project) == {1: ["champion"], 2: ["candidate"]}
    failing = register(project, 0.5)  # gate fails: candidate moves to it
    assert aliases(project) == {1: ["champion"], 2: [], 3: ["candidate"]}
    assert failing.decision.gate_results[0]["passed"] is False
    better = register(project, 0.8)
    assert better.aliases == ["champion"] and better.previous_champion == 1
    assert aliases(project) == {1: [], 2: [], 3: [], 4: ["champion"]}  # superseded candidate cleared
    assert registry.champion_history(project, NAME) == [1, 4]


def test_rollback_restores_previous_champion_and_errors_when_none(project):
    register(project, 0.7)
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(project, NAME)
    register(project, 0.8)
    register(project, 0.9)
    assert registry.rollback(project, NAME) == (2, 3)
    assert aliases(project)[2] == ["champion"]
    assert registry.rollback(project, NAME) == (1, 2)
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback(project, NAME)
    # the next automatic registration compares against the rolled-back champion
    assert register(project, 0.75).decision.promote


def test_promote_of_the_champion_changes_nothing(project):
    register(project, 0.7)
    client = store.connect(project)[0]
    before = client.get_model_version(NAME, "1")
    assert registry.promote(project, NAME, 1) == 1
    after = client.get_model_version(NAME, "1")
    assert after.tags == before.tags and after.last_updated_timestamp == before.last_updated_timestamp
    assert registry.champion_history(project, NAME) == [1]


def test_promote_of_a_version_failing_its_gates_needs_force(project):
    register(project, 0.7)
    register(project, 0.5)  # fails the gate: candidate
    with pytest.raises(RegistryError, match=r"v2 fails its gates \(gate final.reward_accuracy >= 0.6: 0.5 FAILED\)"
                                            r".*--force"):
        registry.promote(project, NAME, 2, gates=GATES)
    assert aliases(project) == {1: ["champion"], 2: ["candidate"]}
    assert registry.promote(project, NAME, 2, gates=GATES, force=True) == 1
    assert aliases(project) == {1: [], 2: ["champion"]}
    assert store.connect(project)[0].get_model_version(NAME, "2").tags[registry.DECISION_TAG] == \
        "champion (manual, gates forced)"


def test_manual_promote_is_recorded_so_rollback_undoes_it(project):
    register(project, 0.7)
    register(project, 0.65)  # candidate
    assert registry.promote(project, NAME, 2) == 1
    assert aliases(project) == {1: [], 2: ["champion"]}  # candidate alias went with the promotion
    assert registry.rollback(project, NAME) == (1, 2)
    with pytest.raises(RegistryError, match="has no version 9 .versions: 1, 2"):
        registry.promote(project, NAME, 9)
    with pytest.raises(RegistryError, match="no registered model"):
        registry.promote(project, "nope", 1)


def test_apply_decision_and_register_model_separately_with_reference_store(project):
    model = fake_model(project)
    with runs.stage_run(project, "register") as run:
        version = registry.register_model(project, model, name=NAME, run_id=run.info.run_id,
                                          metrics={METRIC: 0.9}, lineage={}, store="reference")
    assert aliases(project) == {1: []}  # registered, no alias until the decision is applied
    assert registry.apply_decision(project, NAME, version, Decision(False, ["manual check"])) == ["candidate"]
    (row,) = registry.list_versions(project, NAME)
    assert row["tags"][registry.MODEL_DIR_TAG] == str(model.resolve())
    assert row["tags"][registry.STORE_TAG] == "reference"
    assert not model_files(project)  # nothing copied: the MLmodel's model_config names the working tree's directory
    (mlmodel,) = (project / "mlartifacts").rglob("MLmodel")
    assert str(model.resolve()) in mlmodel.read_text()


def test_list_versions_of_unknown_model_is_empty(project):
    assert registry.list_versions(project, "nope") == []


# ------------------------------------------------------------------------------------------------------------ CLI
def test_models_list_promote_rollback_cli(project, monkeypatch, capsys):
    register(project, 0.7)
    register(project, 0.6)
    (project / "params.yaml").write_text(DEMO_PARAMS_YAML + "registry:\n  gates:\n    - metric: final.reward_accuracy\n"
                                         "      min: 0.65\n")
    capsys.readouterr()
    where = ["--name", NAME, "--project", str(project)]
    code, out, _ = cli(monkeypatch, capsys, "models", "list", "--json", *where)
    rows = json.loads(out)
    assert code == 0 and [(r["version"], r["aliases"], r["metrics"]) for r in rows] == [
        (1, ["champion"], {METRIC: 0.7}), (2, ["candidate"], {METRIC: 0.6})]
    assert {"version", "aliases", "metrics", "created"} <= set(rows[0])
    code, out, _ = cli(monkeypatch, capsys, "models", "list", *where)
    assert code == 0 and METRIC in out.splitlines()[1] and "champion" in out and "candidate" in out

    code, out, _ = cli(monkeypatch, capsys, "models", "promote", "1", *where)
    assert code == 0 and out.strip() == f"champion: {NAME} v1 (unchanged)"
    code, out, err = cli(monkeypatch, capsys, "models", "promote", "2", *where)  # 0.6 fails params.yaml's gate
    assert code == 2 and out == "" and err.count("\n") == 1 and "v2 fails its gates (gate final.reward_accuracy" in err
    code, out, _ = cli(monkeypatch, capsys, "models", "promote", "2", "--force", *where)
    assert code == 0 and out.strip() == f"champion: {NAME} v2 (was v1)"
    code, out, _ = cli(monkeypatch, capsys, "models", "rollback", *where)
    assert code == 0 and out.strip() == f"champion: {NAME} v1 (rolled back from v2)"
    code, out, err = cli(monkeypatch, capsys, "models", "rollback", *where)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and "no previous" in err
    code, _, err = cli(monkeypatch, capsys, "models", "promote", "7", *where)
    assert code == 2 and "has no version 7" in err


def test_models_cli_outside_a_project_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(store.ENV_TRACKING_URI, raising=False)
    code, _, err = cli(monkeypatch, capsys, "models", "list", "--project", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "no params.yaml" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_ui_runs_mlflow_ui_on_localhost(project, monkeypatch, capsys):
    (project / "params.yaml").write_text(DEMO_PARAMS_YAML + "registry:\n  model_name: x\n")
    started = []

    class FakeServer:
        def __init__(self, command, **kwargs):
            started.append((command, kwargs))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakeServer)
    code, _, err = cli(monkeypatch, capsys, "ui", "--project", str(project), "--port", "5055")
    (command, kwargs), = started
    assert code == 0 and command[:4] == [sys.executable, "-m", "mlflow", "ui"]
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "5055"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{project / 'mlflow.db'}"
    assert command[command.index("--artifacts-destination") + 1] == str(project / "mlartifacts")
    assert kwargs["cwd"] == project and kwargs["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "prefect server start --host 127.0.0.1" in err and "http://127.0.0.1:4200" in err
    # the experiment in MLflow's machine-learning layout (its default for an experiment is the GenAI one)
    experiment = store.ensure_store(store.tracking_uri(project))
    assert f"runs: http://127.0.0.1:5055/#/experiments/{experiment}/runs?workflowType=machine_learning\n" in err
    assert "model: http://127.0.0.1:5055/#/models/x?workflowType=machine_learning\n" in err


# --------------------------------------------------------------------------------------------- register stage
PARAMS = """\
model: {model_name_or_path: tiny}
stages:
  sft: {dataset: demo_sft, eval_dataset: demo_sft_eval}
  dpo: {dataset: demo_dpo, eval_dataset: demo_dpo_eval}
registry:
  model_name: tiny-model
  compare_metric: final.reward_accuracy
  gates:
    - metric: final.reward_accuracy
      min: 0.6
"""


def stage_project(root: Path, accuracy: float) -> None:
    from stages import params as params_stage

    (root / "params.yaml").write_text(PARAMS)
    params_stage.write(root)
    fake_model(root, "dpo")
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps({
        "base": {"reward_accuracy": 0.5}, "sft": {"sft_eval_loss": 2.1},
        "final": {"reward_accuracy": accuracy, "sft_eval_loss": 1.9, "cpt_perplexity": 30.0},
        "samples": [{"prompt": "hi", "output": "yo"}]}))
    for stage, rows in (("sft", 48), ("dpo", 30)):
        (root / "metrics" / f"data_{stage}.json").write_text(json.dumps({"rows_in": rows, "examples_out": rows - 1,
                                                                         "rows_dropped": 1, "tokens": 900}))
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  merge-dpo:\n    cmd: python -m stages.merge dpo\n"
                                   "    deps:\n    - path: stages/merge.py\n      hash: md5\n      md5: 5eed\n"
                                   "    outs:\n    - path: outputs/models/dpo\n      hash: md5\n"
                                   "      md5: 0123abcd.dir\n")


def test_register_stage_end_to_end(project):
    """`python -m stages.register` in a tmp project, as the flow runs it: child of the pipeline run, lineage."""
    stage_project(project, 0.7)
    parent = pipeline_runs.start_pipeline_run(project)
    env = {**os.environ, **pipeline_runs.stage_env(project, parent, {"git_commit": "feedbeef", "pipeline": "nightly"}),
           "PYTHONPATH": str(ROOT), "DVC_ROOT": str(project)}
    proc = subprocess.run([sys.executable, "-m", "stages.register"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("registered tiny-model v1 -> champion:") and "\n" not in line
    report = json.loads((project / "metrics" / "register.json").read_text())
    assert report["version"] == 1 and report["aliases"] == ["champion"] and report["promoted"] is True
    assert report["gate_results"][0]["passed"] is True and report["reasons"] and report["name"] == NAME
    assert registry.current_aliases(project, NAME, 1) == ["champion"]
    assert registry.current_aliases(project, None, 1) == []

    (row,) = registry.list_versions(project, NAME)
    assert row["metrics"]["final.reward_accuracy"] == 0.7 and row["metrics"]["base.reward_accuracy"] == 0.5
    assert row["tags"]["lineage.git_commit"] == "feedbeef" and row["tags"]["lineage.pipeline"] == "nightly"
    assert row["tags"]["lineage.dvc.outputs/models/dpo"] == "0123abcd.dir"
    assert "lineage.dvc.stages/merge.py" not in row["tags"]  # code hashes: on the logged model, not the version
    assert row["tags"]["lineage.final_stage"] == "dpo" and len(row["tags"]["lineage.params_sha256"]) == 64
    assert row["tags"]["lineage.data.sft.dataset"] == "demo_sft"
    assert (row["tags"]["lineage.data.dpo.rows_in"], row["tags"]["lineage.data.dpo.examples_out"]) == ("30", "29")
    model = store.connect(project)[0].get_logged_model(logged_model.model_id_of(row["source"]))
    assert model.tags["lineage.dvc.stages/merge.py"] == "5eed"
    assert model.params["train-dpo.preference.pref_beta"] == "0.1" and model.params["prepare-sft.dataset"] == \
        "demo_sft"  # the recipe: the effective values of every prepare and train step
    client = store.connect(project)[0]
    run = client.get_run(row["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags[runs.STAGE_TAG] == "register"
    assert run.data.metrics["final.reward_accuracy"] == 0.7 and run.data.params["registry.store"] == "copy"


def test_register_stage_in_process_worse_model_and_missing_inputs(project, monkeypatch, capsys):
    from stages import register as stage
    from tunepipe.errors import ConfigError

    monkeypatch.chdir(project)  # stages run from the project root, as DVC starts them
    stage_project(project, 0.7)
    stage.main([])
    stage_project(project, 0.65)
    stage.main([])
    assert "v2 -> candidate (champion unchanged)" in capsys.readouterr().out.splitlines()[-1]
    report = json.loads((project / "metrics" / "register.json").read_text())
    assert (report["version"], report["aliases"], report["promoted"]) == (2, ["candidate"], False)
    assert report["previous_champion"] == 1

    (project / "metrics" / "evaluate.json").unlink()
    with pytest.raises(ConfigError, match="evaluate.json.*run the evaluate stage first"):
        stage.main([])
    for path in sorted((project / "outputs" / "models" / "dpo").iterdir()):
        path.unlink()
    with pytest.raises(ConfigError, match="run merge-dpo first"):
        stage.main([])
    assert len(registry.list_versions(project, NAME)) == 2  # failures never touched the registry
