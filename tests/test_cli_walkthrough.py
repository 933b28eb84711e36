"""The README's bring-your-own walk-through, executed: a LLaMA-Factory data folder + LLaMA-Factory's example YAMLs
-> `tunepipe import llamafactory` -> `tunepipe run` registers a model whose gates were evaluated. Then a broken
row in that data: the run ends with the stage's one-line error, exit 2, and the later stages `not run`.

The project is a copy (git + dvc init, pre-migrated MLflow store) beside a copy of the LF demo files it uses
(`../shared/data/llamafactory-demo`, as the README writes it; the example YAMLs are linked, read only). The CLI
runs as the README shows it, in subprocesses, against the session's Prefect test server (PREFECT_API_URL), so no
ephemeral server starts per command. `-s` prints each command's time (the README quotes them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import LF_DEMO, ROOT, SHARED, copy_project
from tunepipe.metric_keys import metric_sources

pytestmark = pytest.mark.slow
README = (ROOT / "README.md").read_text()
LF_FILES = ("dataset_info.json", "c4_demo.jsonl", "identity.json", "alpaca_en_demo.json", "dpo_en_demo.json")


def walkthrough() -> list[list[str]]:
    """The commands of the README's ```shell block (backslash continuations joined)."""
    block = re.search(r"```shell\n(.*?)```", README, flags=re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def byo(tmp_path_factory, prefect_harness):
    from prefect.settings import get_current_settings

    if not LF_DEMO.is_dir() or not (SHARED / "data" / "llamafactory-examples").is_dir():
        pytest.skip("../shared/data (LLaMA-Factory's demo folder and examples) is not beside the project")
    base = tmp_path_factory.mktemp("byo")
    demo = base / "shared" / "data" / "llamafactory-demo"
    demo.mkdir(parents=True)
    for name in LF_FILES:  # a copy: the failure scenario breaks a row in it
        shutil.copy(LF_DEMO / name, demo / name)
    (base / "shared" / "data" / "llamafactory-examples").symlink_to(SHARED / "data" / "llamafactory-examples")
    root = base / "project"
    copy_project(root, tmp_path_factory)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PREFECT_API_URL": get_current_settings().api.url}
    env.pop("MLFLOW_TRACKING_URI", None)
    return root, env


def tunepipe(root: Path, env: dict, args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tunepipe.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    return proc, time.perf_counter() - started


def statuses(stdout: str) -> dict[str, str]:
    found = (re.match(r"^(\S+)\s+(ran|skipped|failed|not run)\s+[\d.]+s$", line) for line in stdout.splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def test_readme_walkthrough_registers_a_model_with_evaluated_gates(byo):
    root, env = byo
    commands = walkthrough()
    assert [c[:3] for c in commands] == [[".venv/bin/tunepipe", "data", "check"],
                                        [".venv/bin/tunepipe", "import", "llamafactory"],
                                        [".venv/bin/tunepipe", "params"], [".venv/bin/tunepipe", "run"]]
    outputs = []
    for command in commands:
        proc, seconds = tunepipe(root, env, command[1:])
        print(f"{seconds:7.1f} s  tunepipe {' '.join(command[1:3])}")
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        outputs.append(proc)
    check, imported, params, run = outputs
    assert [line.split()[-1] for line in check.stdout.splitlines()[1:]] == ["ok"] * 4
    assert imported.stderr.splitlines()[-1] == "next: tunepipe run"
    written = yaml.safe_load((root / "params.yaml").read_text())
    assert list(written["stages"]) == ["cpt", "sft", "dpo"] and written["model"]["model_name_or_path"] == "tiny"
    assert written["data"]["dataset_dir"] == "../shared/data/llamafactory-demo"
    assert "* stages.dpo.dataset" in params.stdout and "dpo_en_demo" in params.stdout
    assert set(statuses(run.stdout).values()) == {"ran"} and len(statuses(run.stdout)) == 13

    decision = json.loads((root / "metrics" / "register.json").read_text())
    assert decision["name"] == "project" and decision["version"] == 1  # the project directory's name
    gate, = decision["gate_results"]
    assert gate["metric"] == "final.reward_accuracy" and isinstance(gate["value"], float)  # evaluated
    assert f"model project version 1: {', '.join(decision['aliases'])}" in run.stdout
    # every metric the validation expects (tunepipe/metric_keys.py) is what evaluate wrote
    from tunepipe.tracking.flatten import numeric_metrics

    evaluated = numeric_metrics(json.loads((root / "metrics" / "evaluate.json").read_text()))
    assert set(evaluated) == set(metric_sources(["cpt", "sft", "dpo"]))
    # dvc.yaml names the data outside the project as params.yaml does (the same in every checkout)
    assert "../shared/data/llamafactory-demo/dpo_en_demo.json" in (root / "dvc.yaml").read_text()


def test_a_broken_row_fails_its_stage_with_one_line_and_exit_2(byo):
    root, env = byo
    path = root.parent / "shared" / "data" / "llamafactory-demo" / "dpo_en_demo.json"
    rows = json.loads(path.read_text())
    rows[2]["conversations"][0]["value"] = None  # a user turn (row 5 starts with a system message)
    path.write_text(json.dumps(rows, ensure_ascii=False))
    proc, seconds = tunepipe(root, env, ["run"])
    print(f"{seconds:7.1f} s  tunepipe run (broken row)")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert errors == ["error: stage prepare-dpo failed (exit 2): dataset 'dpo_en_demo', file "
                      f"{path.parent.resolve()}/dpo_en_demo.json, row 2, field 'conversations[0].value': message "
                      "content must be a string, got null"]
    status = statuses(proc.stdout)
    assert status["prepare-dpo"] == "failed" and status["params"] == status["train-sft"] == "skipped"
    assert {status[s] for s in ("train-dpo", "merge-dpo", "evaluate", "register")} == {"not run"}
