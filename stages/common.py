"""What every stage shares: the output layout, params.yaml, logging and the one-line error exit.

The layout is the contract between dvc.yaml and the stages (the flow knows it only through dvc.yaml):

    outputs/models/base/            the base model (built when model_name_or_path is `tiny`, else a reference)
    outputs/data/<stage>/           tokenized train/ and eval/ datasets (Arrow) + health.json
    outputs/adapters/<stage>/       the trained LoRA adapter (or full weights with finetuning_type: full)
    outputs/checkpoints/<stage>/    trainer checkpoints, kept for resume (not versioned)
    outputs/models/<stage>/         the stage's merged model: the next stage's base
    metrics/, plots/                small JSON metrics and loss curves (CSV + PNG) that DVC shows and diffs
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tunepipe.config import Params, load_params

ROOT = Path(os.environ.get("DVC_ROOT") or Path.cwd())
OUTPUTS = ROOT / "outputs"
METRICS = ROOT / "metrics"
PLOTS = ROOT / "plots"


def base_model_dir() -> Path:
    return OUTPUTS / "models" / "base"


def data_dir(stage: str) -> Path:
    return OUTPUTS / "data" / stage


def adapter_dir(stage: str) -> Path:
    return OUTPUTS / "adapters" / stage


def checkpoint_dir(stage: str) -> Path:
    return OUTPUTS / "checkpoints" / stage


def model_dir(stage: str) -> Path:
    return OUTPUTS / "models" / stage


def base_model_path(params: Params) -> str:
    """The base model: outputs/models/base when the base stage built it (tiny), the reference it recorded (a hub
    id or local path), or, when a stage is run by hand before the base stage, the resolved params value."""
    import json

    from tunepipe.models import resolve_model_path

    base = base_model_dir()
    if (base / "config.json").exists():
        return str(base)
    if (base / "base_model.json").exists():
        return json.loads((base / "base_model.json").read_text())["model_name_or_path"]
    return resolve_model_path(params.model.model_name_or_path, cache_dir=OUTPUTS / "cache",
                              seed=params.model.tiny_seed)


def input_model_path(params: Params, stage: str) -> str:
    """The model a stage starts from: the previous enabled stage's merged model, else the base model."""
    previous = params.previous_stage(stage)
    return str(model_dir(previous)) if previous else base_model_path(params)


def params() -> Params:
    return load_params(ROOT / "params.yaml")


def tracking_enabled() -> bool:
    """Stages are tracked when the pipeline flow runs them (it exports the store and the parent run) or when the
    project already has an MLflow store; TUNEPIPE_TRACKING=0 turns it off."""
    if os.getenv("TUNEPIPE_TRACKING") == "0":
        return False
    return bool(os.getenv("TUNEPIPE_PARENT_RUN_ID") or os.getenv("MLFLOW_TRACKING_URI")
                or (ROOT / "mlflow.db").exists())


def log_stage_outputs(stage: str, name: str) -> None:
    """Attach what the stage wrote to its MLflow run: its metrics files as metrics, reports and plots as files."""
    from tunepipe import tracking

    key = name.split("@")[-1]
    for path in sorted(METRICS.glob("*.json")):
        if path.stem.endswith(f"_{key}") or path.stem == stage:
            tracking.log_metrics_file(path, prefix=f"{path.stem}.")
            tracking.log_artifact_file(path, "metrics")
    for path in sorted(PLOTS.glob(f"*_{key}.*")):
        tracking.log_artifact_file(path, "plots")
    if stage == "prepare" and (data_dir(key) / "health.json").exists():
        tracking.log_artifact_file(data_dir(key) / "health.json", "data")


def run(main: Callable[[list[str]], None]) -> None:
    """Run a stage's main with the CLI's error policy (user errors are one line and exit 2; `--debug` or
    TUNEPIPE_DEBUG=1 shows tracebacks) inside the stage's MLflow child run when tracking is on."""
    from contextlib import nullcontext

    from tunepipe import warm
    from tunepipe.errors import TunepipeError

    module = getattr(sys.modules["__main__"], "__spec__", None)
    if module is not None:  # `python -m stages.<name>`: a warm server (tunepipe run starts one) spares the imports
        code = warm.run_in_server(module.name, sys.argv[1:])
        if code is not None:
            sys.exit(code)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = [a for a in sys.argv[1:] if a != "--debug"]
    debug = "--debug" in sys.argv[1:] or os.getenv("TUNEPIPE_DEBUG") == "1"
    stage = Path(sys.argv[0]).stem if sys.argv[0] else "stage"
    name = os.getenv("DVC_STAGE") or "@".join([stage, *argv[:1]])
    try:
        if tracking_enabled():
            from tunepipe import tracking

            context = tracking.stage_run(ROOT, name)
        else:
            context = nullcontext()
        with context:
            main(argv)
            if tracking_enabled():
                log_stage_outputs(stage, name)
    except TunepipeError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
