"""Faults a scheduled pipeline meets: it is stopped, killed, runs out of disk, meets a trainer that refuses its
settings. Each test asserts the effect: what is left running (nothing), the lock, the MLflow runs, the next run,
the one-line error and what DVC takes as done."""

from __future__ import annotations

import fcntl
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import project_env, tunepipe

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# Long enough for a signal to land mid-training (~0.1 s a step, a checkpoint every 3), short enough for CI.
SFT_STEPS = 100


def copy_project(source: Path, dest: Path, **stage_values) -> Path:
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(".prefect", "serve.log"))
    if stage_values:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for stage, values in stage_values.items():
            params["stages"][stage].update(values)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def start_run(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunepipe.cli", "run", "--json", *args], cwd=project,
                            env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(project: Path, stage: str, timeout: float = 600) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sorted((project / "outputs" / "checkpoints" / stage).glob("checkpoint-*/tunepipe_checkpoint_complete"))
        if done:
            return done[-1].parent
        time.sleep(0.2)
    raise AssertionError(f"no complete checkpoint of {stage} within {timeout:.0f}s")


def alive(processes: list[psutil.Process]) -> list[int]:
    return [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def lock_is_free(project: Path) -> bool:
    with open(project / "outputs" / ".pipeline.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def runs_by_status(project: Path) -> dict[str, set[str]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tunepipe")
    latest = client.search_runs([experiment.experiment_id], "tags.`tunepipe.kind` = 'pipeline'", max_results=1,
                                order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{latest.info.run_id}'")
    statuses: dict[str, set[str]] = {}
    # the pipeline run is named after its outcome ("12-01 14:08 · 1 ran"): file it under its kind
    statuses.setdefault(latest.info.status, set()).add("pipeline")
    for run in children:
        statuses.setdefault(run.info.status, set()).add(run.info.run_name)
    return statuses


def test_sigterm_stops_everything_and_the_next_run_resumes(finished_project, tmp_path):
    project = copy_project(finished_project, tmp_path / "p", sft={"max_steps": SFT_STEPS, "save_steps": 3})
    run = start_run(project)
    checkpoint = wait_for_checkpoint(project, "sft")
    tree = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
    assert any("stages.train" in " ".join(p.cmdline()) for p in tree[1:])  # the stage is running under it
    started = time.monotonic()
    run.send_signal(signal.SIGTERM)  # to the pid only, as systemd, timeout(1) and CI runners do
    out, err = run.communicate(timeout=120)
    assert run.returncode == 143, err[-3000:]
    assert time.monotonic() - started < 60
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM during train-sft")
    assert json.loads(out.strip().splitlines()[-1])["stopped"] == signal.SIGTERM
    assert alive(tree) == []
    assert lock_is_free(project)
    statuses = runs_by_status(project)
    assert {"pipeline", "train-sft"} <= statuses.get("KILLED", set()) and not statuses.get("RUNNING"), statuses
    assert not (project / "outputs" / "adapters" / "sft").exists()  # DVC removed the old one; none was written

    step = int(checkpoint.name.rsplit("-", 1)[1])
    result = json.loads(tunepipe(project, "run", "--json").stdout.strip().splitlines()[-1])
    assert {s["name"]: s["status"] for s in result["stages"]}["train-sft"] == "ran"
    metrics = json.loads((project / "metrics" / "train_sft.json").read_text())
    assert metrics["resumed_from_step"] >= step and metrics["steps"] == SFT_STEPS


def test_a_killed_runs_orphans_are_stopped_before_the_next_run(finished_project, tmp_path):
    project = copy_project(finished_project, tmp_path / "p", sft={"max_steps": SFT_STEPS, "save_steps": 3})
    run = start_run(project)
    wait_for_checkpoint(project, "sft")
    orphans = psutil.Process(run.pid).children(recursive=True)
    run.kill()
    run.wait(timeout=30)
    time.sleep(1)
    assert alive(orphans), "kill -9 should leave the stage behind (that is the fault)"
    proc = tunepipe(project, "run", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "was killed" in proc.stderr and "stopped its stage train-sft" in proc.stderr
    assert alive(orphans) == []
    statuses = runs_by_status(project)
    assert not statuses.get("RUNNING"), statuses


def test_a_trainer_refusal_is_one_line_through_the_flow(finished_project, tmp_path):
    project = copy_project(finished_project, tmp_path / "p", sft={"lora": {"lora_target": "no_such_proj"}})
    # `tunepipe run` checks the modules before anything starts ...
    proc = tunepipe(project, "run")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: file params.yaml, key 'stages.sft.lora.lora_target': module 'no_such_proj' is not in tiny; did you "
        "mean 'o_proj'? (its "
        "modules: down_proj, embed_tokens, gate_proj, input_layernorm, k_proj, lm_head, norm, o_proj, "
        "post_attention_layernorm, q_proj, up_proj, v_proj)"]
    assert not list((project / "outputs" / "logs").glob("*.traceback.txt"))  # no stage started
    # ... and a deployment's run, which starts the flow without the CLI, gets PEFT's refusal from the stage in one
    # line, with the traceback kept
    proc = subprocess.run([sys.executable, "-m", "flows", "run"], cwd=project, env=project_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage train-sft failed") and "no_such_proj" in last and "not found" in last
    assert "Traceback" not in last
    logs = list((project / "outputs" / "logs").glob("train-sft.traceback.txt"))
    assert logs and "Traceback" in logs[0].read_text()


def test_strict_exits_3_when_the_new_model_is_not_promoted(finished_project, tmp_path):
    project = copy_project(finished_project, tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["registry"]["gates"] = [{"metric": "final.reward_accuracy", "min": 2.0}]  # cannot pass
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = tunepipe(project, "run", "--strict", "--json")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "was not promoted" in proc.stderr.strip().splitlines()[-1]
    assert json.loads((project / "metrics" / "register.json").read_text())["promoted"] is False


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KB tmpfs, where this machine lets the test mount one (root in a container usually may)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_says_no_space_and_leaves_nothing_done(finished_project, tmp_path, small_disk):
    project = copy_project(finished_project, tmp_path / "p")
    data = project / "outputs" / "data"
    shutil.rmtree(data)
    data.symlink_to(small_disk)  # the prepared data lands on the full disk
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "sft"], cwd=project, env=project_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left on device"), last
    assert list(small_disk.iterdir()) == []  # no half-written output that DVC could take as done
