"""What every stage shares: the output layout, its section of the plan, the error exit and its MLflow run.

Stages run from the project root (DVC starts them there) and use paths relative to it, so nothing they write
depends on where the project lives. The layout is the contract between dvc.yaml and the stages (the flow knows it
only through dvc.yaml):

    outputs/params.yaml             the plan: every stage's effective values (stages/params.py writes it)
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(".")
OUTPUTS = ROOT / "outputs"
METRICS = ROOT / "metrics"
PLOTS = ROOT / "plots"
PLAN = OUTPUTS / "params.yaml"

log = logging.getLogger("stages")


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


def health_file(stage: str) -> Path:
    """The prepare stage's data health report (rows in, dropped by reason, truncated, lengths)."""
    return data_dir(stage) / "health.json"


def merge_report(stage: str) -> Path:
    return model_dir(stage) / "merge_report.json"


def loss_curve(stage: str, suffix: str) -> Path:
    """plots/loss_<stage>.csv|.png: the train stage's loss curve."""
    return PLOTS / f"loss_{stage}.{suffix}"


def samples_file() -> Path:
    """metrics/samples.json: the evaluate stage's generated answers beside their references."""
    return METRICS / "samples.json"


def metrics_file(step: str, stage: str | None = None) -> Path:
    """metrics/<file>.json of a pipeline step: data_<stage> (prepare), train_<stage>, merge_<stage>, evaluate, ..."""
    name = {"prepare": "data"}.get(step, step)
    return METRICS / (f"{name}_{stage}.json" if stage else f"{name}.json")


@dataclass
class Entry:
    """A stage's DVC entry as its module declares it (`dvc_entry(name, spec, steps)`, from this module's path
    functions). stages/dag.py adds the code dependencies (the project modules `module` imports), the plan sections
    as params, resolves the datasets to files, and writes dvc.yaml."""

    cmd: str
    module: str  # stages.<name>: the project modules it imports are its code dependencies
    deps: list[Path | str] = field(default_factory=list)  # earlier outputs and project files, relative to the root
    datasets: list[str | None] = field(default_factory=list)  # dataset names: dataset_info.json + their local files
    files: list[str] = field(default_factory=list)  # paths as params.yaml wrote them (launch configs, questions)
    outs: list[Path | str] = field(default_factory=list)  # cached by DVC
    uncached: list[Path | str] = field(default_factory=list)  # tracked, not cached (rebuilt in seconds)
    metrics: list[Path | str] = field(default_factory=list)
    plots: dict[Path | str, dict[str, Any]] = field(default_factory=dict)  # path -> DVC plot options (x, y)
    artifacts: list[Path | str] = field(default_factory=list)  # files the flow attaches to the stage's MLflow run
    sections: list[str] | None = None  # the plan sections it reads; None: its own step's
    tracking: bool = False  # its code dependencies follow tunepipe.tracking (it writes to the registry)
    values: bool = False  # its code dependencies include the values-only modules (it writes the plan)
    persist: bool = False  # DVC never restores its metrics from the run cache instead of running it
    optional: list[str] = field(default_factory=list)  # deps kept only where the file exists


def base_model_path() -> str:
    """The base model: outputs/models/base when the base stage built it (tiny), else the hub id or local path it
    recorded in base_model.json."""
    import json

    from tunepipe.errors import ConfigError

    base = base_model_dir()
    if (base / "config.json").exists():
        return str(base)
    if (base / "base_model.json").exists():
        return json.loads((base / "base_model.json").read_text())["model_name_or_path"]
    raise ConfigError(f"no base model in {base}: run the base stage first (`dvc repro base`)")


def input_model_dir(previous: str | None) -> Path:
    """The output a stage's input model comes from: the previous enabled stage's merged model, else the base."""
    return model_dir(previous) if previous else base_model_dir()


def input_model_path(previous: str | None) -> str:
    """The model a stage starts from: the previous enabled stage's merged model, else the base model."""
    return str(model_dir(previous)) if previous else base_model_path()


def inputs(name: str):
    """This step's section of the plan (tunepipe.plan): the only values from params.yaml a stage reads."""
    import yaml

    from tunepipe.errors import ConfigError
    from tunepipe.plan import read_section

    try:
        document = yaml.safe_load(PLAN.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError("not found: run the params stage first (`dvc repro params`, or `tunepipe run`)",
                          file=str(PLAN)) from None
    return read_section(document, name)


def dvc_lock_hashes(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """{stage: {path: md5}} of every dep and out in dvc.lock ({} before the first run): lineage for MLflow."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
    hashes: dict[str, dict[str, str]] = {}
    for name, entry in stages.items():
        for item in (entry.get("deps") or []) + (entry.get("outs") or []):
            if isinstance(item, dict) and item.get("path") and item.get("md5"):
                hashes.setdefault(name, {})[item["path"]] = item["md5"]
    return hashes


def tracking_enabled() -> bool:
    """Stages are tracked when the pipeline flow runs them (it exports the store and the parent run) or when the
    project already has an MLflow store; TUNEPIPE_TRACKING=0 turns it off."""
    if os.getenv("TUNEPIPE_TRACKING") == "0":
        return False
    return bool(os.getenv("TUNEPIPE_PARENT_RUN_ID") or os.getenv("MLFLOW_TRACKING_URI")
                or (ROOT / "mlflow.db").exists())


def _process_age() -> float:
    """Seconds since this process started (interpreter start-up included)."""
    import psutil

    return time.time() - psutil.Process().create_time()


def work_begins(name: str) -> float:
    """Call where a stage's useful work begins (its libraries imported, its run open): logs the start-up time, which
    the flow records on the stage's MLflow run (the line's format is read by flows/pipeline.py)."""
    seconds = _process_age()
    log.info("[%s] start-up %.1f s (interpreter, imports, tracking)", name, seconds)
    return seconds


def run(main: Callable[[list[str]], Any], name: Callable[[list[str]], str], *, track: bool = False) -> None:
    """Run a stage's main with the CLI's error policy (user errors are one line and exit 2; `--debug` or
    TUNEPIPE_DEBUG=1 shows tracebacks).

    `name(argv)` gives the pipeline step name (`train-sft`): the plan section, the MLflow run name. The flow records
    every stage's MLflow run from what dvc.yaml declares (its params section, metrics, plots, artifacts) after the
    stage ends, so a stage process imports MLflow only when it must write to its run while it works: `track=True`
    (training's live metric history, the registry) opens that run here, as a child of the pipeline run."""
    from contextlib import nullcontext

    from tunepipe.errors import TunepipeError, describe_failure

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # bitsandbytes (imported by PEFT whenever it is installed) warns on every CPU import that an optional kernel
    # from the Hugging Face hub is missing; its own fallback is used, and runs are offline anyway
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    argv = [a for a in sys.argv[1:] if a != "--debug"]
    debug = "--debug" in sys.argv[1:] or os.getenv("TUNEPIPE_DEBUG") == "1"
    try:
        step = name(argv)
        if not (ROOT / "params.yaml").is_file():
            raise TunepipeError(f"no params.yaml in {Path.cwd()}: run stages from the project root")
        if track and tracking_enabled():
            from tunepipe.tracking import runs

            context = runs.stage_run(ROOT, step)
        else:
            context = nullcontext()
        with context:
            main(argv)
    except TunepipeError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Exception as err:  # a bug, a library's refusal, a full disk: still one line for the user
        if debug:
            raise
        print(f"error: {describe_failure(err)} (traceback: {_save_traceback(step_name(argv))})", file=sys.stderr)
        sys.exit(1)


def step_name(argv: list[str]) -> str:
    module = getattr(sys.modules["__main__"], "__spec__", None)
    return "-".join([(module.name.rsplit(".", 1)[-1] if module else "stage"), *argv[:1]])


def _save_traceback(name: str) -> str:
    """The full traceback, kept out of the one-line error but never lost: outputs/logs/<step>.traceback.txt."""
    import traceback

    rank = os.environ.get("RANK", "0")  # under a launcher every process may fail: one file each
    path = OUTPUTS / "logs" / (f"{name}.traceback.txt" if rank == "0" else f"{name}.rank{rank}.traceback.txt")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
    except OSError:  # the disk may be what failed
        return "not saved"
    return str(path)


def stage_argument(command: str, choices: tuple[str, ...]) -> Callable[[list[str]], str]:
    """`name` for `run`: the one argument of `python -m stages.<command> <stage>` -> `<command>-<stage>`."""

    def name(argv: list[str]) -> str:
        from tunepipe.errors import ConfigError

        if len(argv) != 1 or argv[0] not in choices:
            raise ConfigError(f"usage: python -m stages.{command} {{{','.join(choices)}}}")
        return f"{command}-{argv[0]}"

    return name


def no_argument(command: str) -> Callable[[list[str]], str]:
    def name(argv: list[str]) -> str:
        from tunepipe.errors import ConfigError

        if argv:
            raise ConfigError(f"usage: python -m stages.{command} (unexpected arguments: {' '.join(argv)})")
        return command

    return name
