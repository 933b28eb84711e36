"""The README's commands are executed, so the documentation cannot rot (LitGPT's test_readme idea)."""

import re
import shlex
import shutil
import subprocess
import sys

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def shell_blocks() -> list[str]:
    return re.findall(r"```\n(.*?)```", README, flags=re.S)


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


def test_readme_quick_start_runs(tmp_path):
    shutil.copytree(ROOT / "data", tmp_path / "data")
    quick_start = commands(".venv/bin/tunepipe")
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
