"""The `mlflow ui` command line for a project's store, and the pages worth opening in it.

MLflow 3's UI shows an experiment in the GenAI layout (traces, "No data") unless the URL asks for the classic
machine-learning one: `?workflowType=machine_learning` (the experiment tag mlflow.experimentKind does not choose it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote

from tunepipe.tracking import store


def ui_command(project_root: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow ui` command line for this project's store (bound to 127.0.0.1 unless told otherwise)."""
    uri = store.tracking_uri(project_root)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               "--workers", "1"]
    db = store.sqlite_path(uri)
    if db is not None:  # experiments created from the UI keep their artifacts beside the DB too
        command += ["--artifacts-destination", str(db.parent / store.ARTIFACTS_DIR)]
    return command


def urls(host: str, port: int, experiment_id: str, model_name: str) -> dict[str, str]:
    """{"runs": the experiment's runs list (machine-learning layout), "model": the registered model's page}."""
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/#"
    return {"runs": f"{base}/experiments/{experiment_id}/runs?workflowType=machine_learning",
            "model": f"{base}/models/{quote(model_name, safe='')}?workflowType=machine_learning"}
