"""The `mlflow ui` command line for a project's store."""

from __future__ import annotations

import sys
from pathlib import Path

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
