"""The registered champion as MLflow users use it, after a pipeline run: `mlflow.pyfunc.load_model` and
`mlflow models serve` on models:/<name>@champion answer like the merged model loaded with transformers; the train
run carries the loss curve; register reruns are never restored from DVC's run cache and upload nothing twice.

Runs after tests/test_pipeline.py on the same session project (conftest.pipeline_project): its last scenario leaves
an impossible gate in params.yaml; putting the cold run's gates back here is exactly the state DVC's run cache holds
a register entry for. Run alone, the fixture makes the cold run itself first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS

NAME = TINY_PARAMS["registry"]["model_name"]
CHAT = [{"role": "user", "content": "What does DVC decide?"}]
PROMPT = "The pipeline"
NEW_TOKENS = 8


def run_flow(project: Path):
    from flows.pipeline import pipeline

    state = pipeline(project_dir=str(project), return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_completed(), result
    return {stage["name"]: stage["status"] for stage in result["stages"]}


def weight_copies(project: Path) -> int:
    return len(list((project / "mlartifacts").rglob("model.safetensors")))


@pytest.fixture(scope="module")
def project(pipeline_project):
    """The session project after a register rerun into the cold run's registry settings, a state DVC's run cache
    has seen; (project, statuses, (versions, weight copies) before)."""
    from tunepipe.tracking import registry

    project = pipeline_project
    sys.path.insert(0, str(project))
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    if not (project / "dvc.lock").exists() or params["registry"] == TINY_PARAMS["registry"]:
        # leave the cold run's settings for one run first (test_pipeline's last scenario leaves them too)
        params["registry"]["gates"] = [{"metric": "final.reward_accuracy", "min": 0.0}]
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        run_flow(project)
    params["registry"] = {**TINY_PARAMS["registry"]}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    before = (len(registry.list_versions(project, NAME)), weight_copies(project))
    statuses = run_flow(project)
    return project, statuses, before


def registered(project: Path) -> dict:
    return json.loads((project / "metrics" / "register.json").read_text())


@pytest.mark.slow
def test_register_reruns_match_the_registry_and_upload_nothing_twice(project):
    from tunepipe.tracking import logged_model, registry

    project, statuses, (versions_before, copies_before) = project
    assert statuses["register"] == "ran"  # DVC's run cache holds this state: `persist` keeps it from restoring it
    report = registered(project)
    assert report["aliases"] == registry.current_aliases(project, NAME, report["version"])
    row = next(r for r in registry.list_versions(project, NAME) if r["version"] == report["version"])
    assert row["tags"][registry.DIGEST_TAG] == logged_model.model_digest(project / "outputs" / "models" / "dpo")
    if versions_before:  # after test_pipeline: the model's bytes were registered before
        assert report["model"] in ("unchanged", "re-decided")
        assert (len(registry.list_versions(project, NAME)), weight_copies(project)) == (versions_before,
                                                                                        copies_before)
    mode = (project / "outputs" / "models" / "dpo").stat().st_mode
    assert mode & 0o055 == 0o055  # merged models are readable by group and others like every other output


@pytest.mark.slow
def test_pipeline_runs_are_named_and_the_train_run_has_a_loss_curve(project):
    from tunepipe.tracking import store

    project, statuses, _ = project
    client, _, experiment = store.connect(project)
    (latest,) = client.search_runs([experiment], "tags.`tunepipe.kind` = 'pipeline'", max_results=1,
                                   order_by=["attributes.start_time DESC"])
    ran = sum(status == "ran" for status in statuses.values())
    decision = registered(project)
    outcome = "unchanged" if decision["outcome"] == "unchanged" else f"→ {decision['outcome']}"
    assert latest.info.run_name.endswith(f" · {ran} ran · v{decision['version']} {outcome}")
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{latest.info.run_id}'")
    skipped = {r.data.tags["tunepipe.stage"] for r in children if r.data.tags.get("tunepipe.status") == "skipped"}
    assert skipped == {name for name, status in statuses.items() if status == "skipped"}
    (train_sft,) = client.search_runs([experiment], "tags.`tunepipe.dvc_stage` = 'train-sft' and "
                                                    "tags.`tunepipe.status` = 'ran'", max_results=1,
                                      order_by=["attributes.start_time DESC"])
    losses = client.get_metric_history(train_sft.info.run_id, "loss")
    assert len(losses) > 1 and sorted(m.step for m in losses) == list(range(1, len(losses) + 1))
    assert {"learning_rate", "grad_norm", "step_tokens_per_second", "eval_loss"} <= set(train_sft.data.metrics)
    assert train_sft.data.params["train.learning_rate"] == "0.002"


def transformers_output(model_dir: Path, messages=None, prompt=None) -> str:
    """Greedy generation with the merged model loaded by transformers (tunepipe's own loaders)."""
    import torch

    from tunepipe.models.loading import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(model_dir)
    if messages is not None:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=NEW_TOKENS)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def champion(project):
    """The champion is the version holding the workspace's merged model (promoted by hand when the scenarios left
    another one champion); its expected answers from transformers."""
    from tunepipe.tracking import registry, store

    project = project[0]
    version = registered(project)["version"]
    if "champion" not in registry.current_aliases(project, NAME, version):
        registry.promote(project, NAME, version, force=True)
    model_dir = project / "outputs" / "models" / "dpo"
    return {"project": project, "uri": store.tracking_uri(project), "version": version,
            "chat": transformers_output(model_dir, messages=CHAT), "prompt": transformers_output(model_dir,
                                                                                                  prompt=PROMPT)}


@pytest.mark.slow
def test_champion_loads_with_mlflow_pyfunc_and_answers_like_transformers(champion, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["uri"])
    mlflow.set_tracking_uri(champion["uri"])
    mlflow.set_registry_uri(champion["uri"])
    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    print(f"pyfunc load: {time.perf_counter() - started:.1f} s")
    chat = model.predict([{"messages": CHAT}], params={"max_new_tokens": NEW_TOKENS})
    prompt = model.predict({"prompt": PROMPT}, params={"max_new_tokens": NEW_TOKENS})
    assert (list(chat["text"]), list(prompt["text"])) == ([champion["chat"]], [champion["prompt"]])
    assert champion["chat"]  # greedy decoding of the trained model says something


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_champion_is_served_by_mlflow_models_serve(champion):
    import psutil

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["uri"], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    server = subprocess.Popen(command, env=env, cwd=champion["project"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the model server did not answer /ping within 180 s"
            time.sleep(1)
        print(f"models serve ready: {time.perf_counter() - started:.1f} s")
        family = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        answer = post(f"http://127.0.0.1:{port}/invocations",
                      {"dataframe_records": [{"messages": CHAT}], "params": {"max_new_tokens": NEW_TOKENS}})
        assert answer == {"predictions": [{"text": champion["chat"]}]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        server.stderr.close()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert alive == [] and server.returncode is not None  # the server and its workers are gone


def test_atomic_dir_outputs_are_world_readable(tmp_path):
    from tunepipe.io import atomic_dir

    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
