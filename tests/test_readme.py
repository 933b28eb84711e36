"""The README's commands are executed, so the documentation cannot rot (LitGPT's test_readme idea)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def shell_blocks() -> list[str]:
    """The untagged fenced blocks (the ```shell walk-through is tests/test_cli_walkthrough.py's)."""
    return [body for tag, body in re.findall(r"^```(\w*)\n(.*?)^```$", README, flags=re.S | re.M) if not tag]


def commands(prefix: str) -> list[list[str]]:
    """Commands of the README's code blocks that start with `prefix` (backslash continuations joined)."""
    found = []
    for block in shell_blocks():
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith(prefix):
                found.append(shlex.split(command))
    return found


def test_readme_has_exactly_the_two_setup_commands_and_make_knows_them():
    lines = [line.strip() for block in shell_blocks() for line in block.splitlines()]
    assert lines.count("make demo") == 1 and lines.count("make test") == 1
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_data_commands_run(tmp_path):
    shutil.copytree(ROOT / "data", tmp_path / "data")
    quick_start = [c for c in commands(".venv/bin/tunepipe") if c[1] == "data"]
    assert [c[1:3] for c in quick_start] == [["data", "check"], ["data", "preview"], ["data", "export"]]
    outputs = []
    for command in quick_start:
        proc = subprocess.run([sys.executable, "-m", "tunepipe.cli", *command[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
        outputs.append(proc)
    check, preview, export = outputs
    assert "demo_sft" in check.stdout and "unusable" not in check.stdout
    assert "⟦" in preview.stdout and "--- example 1 ---" in preview.stdout
    rows = (tmp_path / "sft.jsonl").read_text().splitlines()
    assert len(rows) > 100 and "wrote" in export.stderr and "rows in" in export.stderr


def test_readme_pipeline_commands_run(pipeline_project):
    """`tunepipe run --json` and `tunepipe models list` as the README shows them (on the tiny test project)."""
    pipeline = [c for c in commands(".venv/bin/tunepipe") if c[1] in ("run", "models")]
    assert [c[1:] for c in pipeline] == [["run", "--json"], ["models", "list"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "tunepipe.cli", *pipeline[0][1:]], cwd=pipeline_project,
                         capture_output=True, text=True, timeout=1200, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert {s["status"] for s in result["stages"]} <= {"ran", "skipped"}
    assert [s["name"] for s in result["stages"]][-1] == "register" and result["model"]["name"] == "test-model"
    listing = subprocess.run([sys.executable, "-m", "tunepipe.cli", *pipeline[1][1:], "--name", "test-model",
                              "--json"], cwd=pipeline_project, capture_output=True, text=True, env=env)
    assert listing.returncode == 0, listing.stderr
    versions = json.loads(listing.stdout)
    assert any("champion" in v["aliases"] for v in versions) and all("metrics" in v for v in versions)
