"""The layers hold (docs/architecture.md): import-linter's contracts from pyproject.toml, checked on the real code
and on a copy with a forbidden import planted, plus what the flow and the cheap stages really import at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root)})


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    for name in ("tunepipe", "stages", "flows"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root)
    return root


def test_the_contracts_are_kept():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "4 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("tunepipe/io.py", "import prefect", "the library knows nothing of the orchestrators"),
    ("tunepipe/config.py", "from stages import common", "flows -> stages -> tunepipe"),
    ("stages/register.py", "import torch", "the flow and the register stage never load the training stack"),
    ("stages/train.py", "import flows.lifecycle", "stages do not import flows"),
])
def test_a_forbidden_import_breaks_a_contract(copy, module, line, contract):
    path = copy / module
    original = path.read_text()
    path.write_text(original + f"\n{line}\n")
    try:
        proc = lint(copy)
    finally:
        path.write_text(original)
    assert proc.returncode == 1
    assert f"{contract}" in proc.stdout and "BROKEN" in proc.stdout.split(contract, 1)[1].splitlines()[0]


@pytest.mark.parametrize("module", ["flows.pipeline", "stages.register", "stages.params", "stages.dag"])
def test_cheap_modules_do_not_import_the_training_stack(module):
    code = (f"import sys, {module}; heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft') "
            "if m in sys.modules); print(','.join(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


def test_building_dvc_yaml_imports_every_stage_module_but_not_the_training_stack():
    """stages.dag imports each stage module for its declared entry (by name: import-linter would count the training
    imports inside the stage's main()); building the whole graph still loads no torch."""
    code = ("import sys; from pathlib import Path; from stages import dag; from tunepipe.config import load_params; "
            "doc = dag.build(Path('.'), load_params(Path('params.yaml'))); "
            "print(sorted(m for m in sys.modules if m.startswith('stages.'))); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules)); "
            "print(sorted(doc['stages']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules, heavy, steps = proc.stdout.strip().splitlines()
    assert modules == str(sorted(f"stages.{m}" for m in ("base", "common", "dag", "evaluate", "launch", "merge",
                                                          "params", "prepare", "register", "train")))
    assert heavy == "[]"
    assert "'train-sft'" in steps and "'register'" in steps


def test_the_cli_does_not_import_prefect_or_the_project_layers():
    code = ("import sys; from tunepipe.cli import app; "
            "print(','.join(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
            "('prefect', 'dvc', 'flows', 'stages', 'torch', 'mlflow'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == ""


def test_prefect_yaml_entrypoint_loads_the_pipeline_flow():
    """The flow `prefect deploy` / a worker would run is the one `tunepipe run` runs."""
    import yaml

    entrypoint = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["entrypoint"]
    code = ("from prefect.flows import load_flow_from_entrypoint; "
            f"f = load_flow_from_entrypoint({entrypoint!r}, use_placeholder_flow=False); print(f.name)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "tunepipe-pipeline"
