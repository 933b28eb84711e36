"""Shared test setup: offline, quiet, isolated from the developer's caches."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
# `datasets` writes Arrow caches and reads this at import time: keep them out of the home directory.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="tunepipe-test-hf-"))
# Prefect reads its settings at import time: isolate its home (DB, result cache) before anything imports prefect.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="tunepipe-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LF_DEMO = SHARED / "data" / "llamafactory-demo"


def pytest_collection_modifyitems(items):
    """tests/test_pipeline.py is the shared project's history from its cold run on: it must come before any other
    module that uses that project (test_faults.py sorts before it and would otherwise do the first run)."""
    items.sort(key=lambda item: item.path.name != "test_pipeline.py" or "pipeline_project" not in item.fixturenames)


@pytest.fixture
def lf_demo() -> Path:
    if not LF_DEMO.is_dir():
        pytest.skip("../shared/data/llamafactory-demo is not beside the project")
    return LF_DEMO


def write_dataset(tmp_path: Path, entries: dict, files: dict[str, object]) -> Path:
    """Create a dataset folder with dataset_info.json and data files (str = raw text, else JSON)."""
    import json

    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries))
    return tmp_path


# ---------------------------------------------------------------------------------------------- pipeline projects
# The smallest params.yaml of a project on the shipped demo data (model and stages are required sections).
DEMO_PARAMS_YAML = """\
model: {model_name_or_path: tiny, template: qwen}
stages:
  cpt: {dataset: demo_cpt, eval_dataset: demo_cpt_eval}
  sft: {dataset: demo_sft, eval_dataset: demo_sft_eval}
  dpo: {dataset: demo_dpo, eval_dataset: demo_dpo_eval}
"""
TINY_PARAMS = {
    "data": {"cutoff_len": 64, "max_samples": 24},
    "train": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 50},
    "evaluate": {"max_new_tokens": 8, "max_eval_samples": 4, "num_samples": 1, "max_fact_questions": 2},
    "registry": {"model_name": "test-model", "compare_metric": "final.reward_accuracy", "higher_is_better": True,
                 "gates": [], "no_regression": []},
}
COPY = ("data", "stages", "flows", "tunepipe", "params.yaml", ".dvcignore", "prefect.yaml", ".gitignore")


def deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = deep_update(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def make_project(tmp_path_factory, extra: dict | None = None, label: str = "project") -> Path:
    """A temp copy of the project with TINY_PARAMS (deep-updated with `extra`), git + dvc init, MLflow store."""
    def tiny_budget(root: Path) -> None:
        params = deep_update(deep_update(yaml.safe_load((root / "params.yaml").read_text()), TINY_PARAMS), extra or {})
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    root = tmp_path_factory.mktemp(label)
    copy_project(root, tmp_path_factory, tiny_budget)
    return root


def copy_project(root: Path, tmp_path_factory, edit=None) -> None:
    """A copy of the project in `root` (created) as a git + DVC repository with a pre-migrated MLflow store;
    `edit(root)` changes it before the first commit."""
    from tests.test_tracking import migrated_template

    root.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)
    if edit is not None:
        edit(root)
    shutil.copy(migrated_template(tmp_path_factory), root / "mlflow.db")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(command, cwd=root, check=True, env=env, capture_output=True)


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory, prefect_harness):
    """A temp copy of the project (git + dvc init, pre-migrated MLflow store) with a tiny training budget."""
    root = make_project(tmp_path_factory)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the project's own store: <root>/mlflow.db
    return root


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def project_env(**extra: str) -> dict[str, str]:
    """The environment of a `tunepipe` command in a test project: this venv first on PATH (DVC runs `python`)."""
    env = {**os.environ, **GIT_ENV, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    return env


def tunepipe(project: Path, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`tunepipe ARGS` in `project`, as a user types it."""
    return subprocess.run([sys.executable, "-m", "tunepipe.cli", *args], cwd=project, capture_output=True, text=True,
                          env=env or project_env(), timeout=timeout)


@pytest.fixture(scope="session")
def finished_project(pipeline_project) -> Path:
    """The shared tiny project after one complete pipeline run (tests/test_pipeline.py's cold run when it ran first,
    else one run here): for the end-to-end tests of schedules, clones and served models."""
    if not (pipeline_project / "metrics" / "register.json").exists():
        proc = tunepipe(pipeline_project, "run", "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return pipeline_project




# ------------------------------------------------------------------------------------------------ tiny test models
def _small_config():
    from tunepipe.models.tiny import TinyConfig

    return TinyConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)


SMALL = _small_config()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """A 2-layer tiny Qwen2 with the demo tokenizer, built once per session (training, merging, evaluation)."""
    from tunepipe.models.tiny import TINY, resolve_model_path

    return resolve_model_path(TINY, cache_dir=tmp_path_factory.getbasetemp() / "tiny-cache", config=SMALL)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded; on a busy shared CPU two OpenMP threads are ~100x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`tunepipe ARGS` in this process: (exit code, stdout, stderr)."""
    from tunepipe.cli import main

    monkeypatch.setattr(sys, "argv", ["tunepipe", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
