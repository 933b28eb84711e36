"""The tracking store of a project.

`tracking_uri(root)` is `MLFLOW_TRACKING_URI` when set (must be absolute), else `sqlite:///<abs root>/mlflow.db`;
artifacts of the `tunepipe` experiment go to `<db dir>/mlartifacts` (absolute, set when the experiment is created).
`ensure_store(uri)` creates/migrates the DB and the experiment under a file lock (`<db>.lock`), because several
processes migrating a fresh SQLite DB at once crash (`duplicate column name`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from tunepipe.errors import ConfigError

EXPERIMENT = "tunepipe"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

_READY: dict[str, str] = {}  # uri -> experiment id, per process
_READY_LOCK = threading.Lock()


def quiet_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MLflow's transformers helpers look up model cards otherwise


def tracking_uri(project_root: str | Path) -> str:
    """`MLFLOW_TRACKING_URI` if set (a relative SQLite path is refused), else the project's absolute SQLite DB."""
    uri = os.environ.get(ENV_TRACKING_URI, "").strip()
    if uri:
        _check_absolute(uri)
        return uri
    return f"sqlite:///{Path(project_root).resolve() / DB_NAME}"


def _check_absolute(uri: str) -> None:
    db = sqlite_path(uri)
    if db is not None:
        relative = db != Path(":memory:") and not db.is_absolute()
    else:  # a bare path is a file store; "databricks"-style names are remote
        relative = "://" not in uri and ":" not in uri and not uri.startswith("/") and uri != "databricks"
    if relative:
        raise ConfigError(f"{uri!r} is relative to the current directory, so every stage process would use a "
                          f"different store; use an absolute URI such as sqlite:////abs/path/mlflow.db",
                          key=ENV_TRACKING_URI)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def artifact_root(uri: str) -> str | None:
    """Where the experiment keeps artifacts: `<db dir>/mlartifacts` for SQLite, the server's choice otherwise."""
    db = sqlite_path(uri)
    return (db.parent / ARTIFACTS_DIR).as_uri() if db is not None and db.is_absolute() else None


@contextlib.contextmanager
def lock(uri: str) -> Iterator[None]:
    """An exclusive lock shared by every process using this SQLite store (no-op for other stores)."""
    db = sqlite_path(uri)
    if db is None or not db.is_absolute():
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_store(uri: str) -> str:
    """Create/migrate the store and the `tunepipe` experiment once; returns the experiment id.

    Safe to call from several processes at once (file lock around creation and migration) and cheap to call
    again in the same process."""
    quiet_env()
    with _READY_LOCK:
        if uri in _READY:
            return _READY[uri]
        with lock(uri):
            mlflow_client = client(uri)  # the SqlAlchemyStore migrates a fresh DB here
            mlflow_client.search_registered_models(max_results=1)  # and the registry store on the same DB
            experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                experiment_id = mlflow_client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri))
            else:
                experiment_id = experiment.experiment_id
                if experiment.lifecycle_stage == "deleted":
                    mlflow_client.restore_experiment(experiment_id)
        _READY[uri] = experiment_id
        return experiment_id


def connect(project_root: str | Path):
    """(MlflowClient, uri, experiment id) for a project, store ready."""
    uri = tracking_uri(project_root)
    experiment_id = ensure_store(uri)
    return client(uri), uri, experiment_id
