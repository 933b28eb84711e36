"""Team use on the shared finished project: a teammate's clone reuses every trained stage, an old revision comes back
without retraining, a different hash seed writes the same bytes, and a real MLflow tracking server holds the runs
and the registry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import project_env, tunepipe

pytestmark = pytest.mark.slow


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True,
                          env=project_env()).stdout


def dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          env=project_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def lock_md5(root: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
    return next(o["md5"] for o in lock["outs"] if o["path"] == path)


def ran(result: dict) -> set[str]:
    return {s["name"] for s in result["stages"] if s["status"] == "ran"}


def run_json(root: Path, *args: str, **env: str) -> dict:
    proc = tunepipe(root, "run", "--json", *args, env=project_env(**env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pushed(finished_project, tmp_path_factory) -> Path:
    """The finished project committed and pushed to a local DVC remote (what a team shares)."""
    project = finished_project
    remote = tmp_path_factory.mktemp("dvc-remote")
    dvc(project, "remote", "add", "-d", "-f", "shared", str(remote))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "trained", "--allow-empty")
    dvc(project, "push", "-q")
    return project


def test_a_clone_elsewhere_retrains_nothing(pushed, tmp_path):
    clone = tmp_path / "teammate" / "checkout"  # another directory, another depth
    subprocess.run(["git", "clone", "-q", str(pushed), str(clone)], check=True, env=project_env())
    dvc(clone, "pull", "-q")
    # another hash seed too: nothing written may depend on it
    result = run_json(clone, PYTHONHASHSEED="12345")
    assert not {name for name in ran(result) if name.startswith("train-")}, result
    assert ran(result) <= {"params", "merge-cpt", "merge-sft", "merge-dpo"}  # merged models are rebuilt, see docs
    for stage, path in (("train-dpo", "outputs/adapters/dpo"), ("merge-dpo", "outputs/models/dpo"),
                        ("prepare-sft", "outputs/data/sft")):
        assert lock_md5(clone, stage, path) == lock_md5(pushed, stage, path), path
    assert git(clone, "status", "--porcelain", "dvc.lock") == ""  # the clone's lock is the team's lock

    # retrain one stage there with yet another hash seed: the adapter's bytes are the original's
    again = run_json(clone, "--force", "train-cpt", PYTHONHASHSEED="999")
    assert "train-cpt" in ran(again) and lock_md5(clone, "train-cpt", "outputs/adapters/cpt") == lock_md5(
        pushed, "train-cpt", "outputs/adapters/cpt")
    assert not {"train-sft", "train-dpo"} & ran(again)

    # an old revision comes back from the cache without training
    old = git(clone, "rev-parse", "HEAD").strip()
    data = clone / "data" / "demo_dpo.json"
    rows = json.loads(data.read_text())
    data.write_text(json.dumps(rows[2:] + rows[:2], ensure_ascii=False))
    assert "train-dpo" in ran(run_json(clone))
    git(clone, "commit", "-qam", "new dpo data")
    git(clone, "checkout", "-q", old)
    dvc(clone, "checkout", "-q")
    back = run_json(clone)
    assert not {name for name in ran(back) if name.startswith("train-")}, back
    assert lock_md5(clone, "train-dpo", "outputs/adapters/dpo") == lock_md5(pushed, "train-dpo",
                                                                           "outputs/adapters/dpo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_pipeline_tracks_to_a_real_mlflow_server(finished_project, tmp_path):
    from mlflow import MlflowClient

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**project_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        client = MlflowClient(tracking_uri=url, registry_uri=url)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                client.search_experiments()
                break
            except Exception:  # not up yet
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(1)
        result = run_json(finished_project, "--force", "register", MLFLOW_TRACKING_URI=url)
        assert "register" in ran(result)
        decision = json.loads((finished_project / "metrics" / "register.json").read_text())
        experiment = client.get_experiment_by_name("tunepipe")
        runs = client.search_runs([experiment.experiment_id])
        kinds = {r.data.tags.get("tunepipe.kind") for r in runs}
        assert kinds == {"pipeline", "stage"} and any(r.info.run_name == "register" for r in runs)
        version = client.get_model_version(decision["name"], str(decision["version"]))
        assert version.version == str(decision["version"])
        aliases = client.get_registered_model(decision["name"]).aliases
        assert {alias for alias, v in aliases.items() if v == version.version} == set(decision["aliases"])
        assert any((tmp_path / "artifacts").rglob("model.safetensors"))  # the model went to the server's store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    shutil.rmtree(tmp_path / "artifacts", ignore_errors=True)
