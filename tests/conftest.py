"""Shared test setup: offline, quiet, isolated from the developer's caches."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
# `datasets` writes Arrow caches and reads this at import time: keep them out of the home directory.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="tunepipe-test-hf-"))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LF_DEMO = SHARED / "data" / "llamafactory-demo"


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
