"""The final model as an MLflow Model: a pyfunc LoggedModel (tunepipe/tracking/chat_model.py) that
`mlflow.pyfunc.load_model` loads and `mlflow models serve` serves, with the evaluation as its metrics.

`registry.store` decides where the weights live, and there is one copy at most:
    copy       the model directory becomes the logged model's artifact `model_dir` (the only copy in the artifact
               store; the registered version points at the logged model, `models:/<model id>`)
    reference  the logged model holds MLmodel, the code and requirements (~30 KB); `model_config.model_dir` is the
               absolute path of the working tree's directory, so loading needs that checkout (git + dvc checkout)

`model_digest` (sha256 of every file's relative path and bytes) identifies the model: registering the same bytes
again finds the version that holds them instead of uploading another copy.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from tunepipe.tracking.flatten import BATCH, MAX_PARAM_VALUE, MAX_TAG_VALUE, clean_key, clip_value, flatten, \
    numeric_metrics

CHAT_MODEL_FILE = Path(__file__).with_name("chat_model.py")
MODEL_DIR_ARTIFACT = "model_dir"  # = chat_model.MODEL_DIR (that file is never imported)
STORES = ("copy", "reference")
# what the served model imports; exact versions of this environment (`--env-manager local` installs nothing)
REQUIREMENTS = ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "pandas")


def model_digest(model_dir: str | Path) -> str:
    """sha256 over the directory's files (relative path, size and bytes, in path order)."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def pip_requirements() -> list[str]:
    """`package==version` of what the pyfunc needs, as installed here (local labels like +cpu dropped)."""
    return [f"{name}=={metadata.version(name).split('+', 1)[0]}" for name in REQUIREMENTS]


def signature():
    """Rows of `messages` (chat) or `prompt` (plain text) in, `text` out; param `max_new_tokens`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", "string"), Property("content", "string")])
    return ModelSignature(
        inputs=Schema([ColSpec(Array(message), "messages", required=False),
                       ColSpec("string", "prompt", required=False)]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]))


def log_chat_model(model_dir: str | Path, *, name: str, run_id: str, store: str,
                   params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None):
    """Log `model_dir` as a pyfunc LoggedModel of the active run `run_id`; returns mlflow's ModelInfo
    (.model_id, .model_uri)."""
    import mlflow

    from tunepipe.errors import ConfigError

    if store not in STORES:
        raise ConfigError(f"expected copy or reference, got {store!r}", key="registry.store")
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError(f"log_chat_model needs run {run_id} to be the active MLflow run")
    model_dir = Path(model_dir).resolve()
    where = ({"artifacts": {MODEL_DIR_ARTIFACT: str(model_dir)}} if store == "copy"
             else {"model_config": {MODEL_DIR_ARTIFACT: str(model_dir)}})
    with warnings.catch_warnings():
        # an input example would make MLflow load and run the model while logging it (torch in the register
        # stage); the signature says the same; type hints would replace the signature's validation
        warnings.filterwarnings("ignore", message=".*(input example|type hints)", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name=clean_key(name), python_model=str(CHAT_MODEL_FILE), signature=signature(),
            pip_requirements=pip_requirements(),
            params={clean_key(k): clip_value(v, MAX_PARAM_VALUE) for k, v in flatten(params or {}).items()},
            tags={k: clip_value(v, MAX_TAG_VALUE) for k, v in (tags or {}).items()}, **where)


def log_model_metrics(client, run_id: str, model_id: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric leaves of `metrics` as metrics of the logged model (and of `run_id`, the run logging them)."""
    from mlflow.entities import Metric

    flat = {clean_key(k): v for k, v in numeric_metrics(metrics).items()}
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, 0, model_id=model_id, run_id=run_id) for k, v in flat.items()]
    for start in range(0, len(items), BATCH * 10):
        client.log_batch(run_id, metrics=items[start:start + BATCH * 10])
    return flat


def model_id_of(source: str | None) -> str | None:
    """The logged model id of a version's source `models:/m-<id>` (None for other sources)."""
    if source and source.startswith("models:/m-") and "@" not in source and source.count("/") == 1:
        return source[len("models:/"):]
    return None


def logged_model_metrics(client, model_id: str) -> dict[str, float]:
    """{key: value} of a logged model's metrics, the latest value per key (step, then time)."""
    latest: dict[str, Any] = {}
    for metric in client.get_logged_model(model_id).metrics or []:
        current = latest.get(metric.key)
        if current is None or (metric.step, metric.timestamp) >= (current.step, current.timestamp):
            latest[metric.key] = metric
    return {key: float(metric.value) for key, metric in latest.items()}
