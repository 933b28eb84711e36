"""register: put the final merged model in the MLflow registry; move `champion` only when it earned it.

    python -m stages.register

Reads  its plan section (`registry:`, the final stage) and, as the model's lineage, the prepare-<stage> and
       train-<stage> sections (declared as its DVC params too), metrics/evaluate.json, metrics/data_<stage>.json (row
       counts) and the final model outputs/models/<last enabled stage>.
Does   tunepipe/tracking/registry.py `register_and_promote`: the model becomes an MLflow pyfunc model (loadable with
       mlflow.pyfunc.load_model, servable with `mlflow models serve`) with the evaluation as its metrics and the
       recipe as its params, unless a version already holds the same bytes; then `champion` moves if every gate
       passes and compare_metric strictly beats the current champion, else the version is `candidate`.
Writes metrics/register.json {"name", "version", "aliases", "promoted", "outcome", "model", "reasons", ...} and
       prints the decision on one line.

Lineage (tags of the version and of the logged model): git commit and dirty flag, sha256 of params.yaml, the md5 of
every path in dvc.lock, each stage's datasets and row counts, the model's sha256; overlaid with the flow's
$TUNEPIPE_LINEAGE JSON when set (the flow's values win). The run is a child of $TUNEPIPE_PARENT_RUN_ID when set.
DVC never restores this stage from its run cache (dvc.yaml: `persist` on register.json), so the file always
describes what the registry was told.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from stages import common

RECIPE_STEPS = ("prepare", "train")  # plan sections that describe how the registered model was made


CHAT_MODEL = "tunepipe/tracking/chat_model.py"  # the registered model's code (MLflow models-from-code)


def dvc_entry(name: str, spec, steps) -> common.Entry:
    # the recipe sections and row counts are the model's lineage; chat_model.py is not imported but copied into
    # the registered model; `persist` keeps DVC's run cache from ever restoring register.json instead of running
    # the stage (the registry would not hear of it)
    recipe = recipe_steps(steps)
    return common.Entry(
        cmd="python -m stages.register", module="stages.register", sections=[name, *recipe], tracking=True,
        deps=[CHAT_MODEL, common.metrics_file("evaluate"),
              *[common.metrics_file("prepare", n.partition("-")[2]) for n in recipe if n.startswith("prepare-")],
              common.model_dir(spec.final_stage)],
        metrics=[common.metrics_file("register")], persist=True)


def recipe_steps(plan: dict[str, Any]) -> list[str]:
    """The prepare-<stage> and train-<stage> steps of the plan (stages/dag.py declares the same as DVC params)."""
    return [name for name in plan if name.split("-", 1)[0] in RECIPE_STEPS]


def local_lineage(root: Path, final_stage: str) -> dict[str, Any]:
    """git commit, params.yaml hash and DVC hashes (from dvc.lock) of the project as this stage sees it."""
    from tunepipe.tracking.runs import git_lineage

    lineage: dict[str, Any] = {**git_lineage(root), "final_stage": final_stage}
    params_file = root / "params.yaml"
    if params_file.exists():
        lineage["params_sha256"] = hashlib.sha256(params_file.read_bytes()).hexdigest()
    hashes = {path: md5 for stage in common.dvc_lock_hashes(root).values() for path, md5 in stage.items()}
    if hashes:
        lineage["dvc"] = hashes
    return lineage


def data_lineage(sections: dict[str, Any]) -> dict[str, Any]:
    """{stage: {"dataset", "eval_dataset", "rows_in", "examples_out", "rows_dropped"}} from the prepare sections and
    metrics/data_<stage>.json."""
    from tunepipe.io import read_json

    data: dict[str, Any] = {}
    for name, section in sections.items():
        if not name.startswith("prepare-"):
            continue
        counts = read_json(common.metrics_file("prepare", section.stage), missing="not found: run prepare first")
        data[section.stage] = {"dataset": section.dataset, "eval_dataset": section.eval_dataset or "",
                               **{k: counts[k] for k in ("rows_in", "examples_out", "rows_dropped") if k in counts}}
    return data


def read_metrics(path: Path) -> dict[str, Any]:
    from tunepipe.errors import ConfigError
    from tunepipe.io import read_json

    metrics = read_json(path, missing="not found: run the evaluate stage first")
    if not isinstance(metrics, dict):
        raise ConfigError("expected a JSON object of metric sections", file=str(path))
    return metrics


def main(argv: list[str]) -> None:
    import mlflow
    import yaml

    from tunepipe.errors import ConfigError
    from tunepipe.io import atomic_write_text
    from tunepipe.metric_keys import metric_sources, missing_reason
    from tunepipe.tracking import registry as reg
    from tunepipe.tracking import runs
    from tunepipe.tracking.promotion import no_regression_gates

    spec = common.inputs("register")
    registry, final = spec.registry, spec.final_stage
    plan = yaml.safe_load(common.PLAN.read_text(encoding="utf-8")) or {}
    recipe = {name: common.inputs(name) for name in recipe_steps(plan)}
    common.work_begins("register")
    model = common.model_dir(final)
    if not model.is_dir() or not any(model.iterdir()):
        raise ConfigError(f"final model {model} not found: run merge-{final} first")
    metrics = read_metrics(common.metrics_file("evaluate"))
    lineage = {**local_lineage(common.ROOT, final), "data": data_lineage(recipe), **runs.read_lineage_env()}

    # common.run already opened this stage's run when tracking is on; registering needs one either way
    active = mlflow.active_run()
    context = nullcontext(active) if active else runs.stage_run(common.ROOT, "register")
    with context as run:
        run_id = run.info.run_id
        runs.log_params_flat(spec, run_id)
        runs.set_lineage(run_id, lineage)
        result = reg.register_and_promote(
            common.ROOT, model, name=registry.model_name, run_id=run_id, metrics=metrics, lineage=lineage,
            gates=[*registry.gates, *no_regression_gates(registry.no_regression, spec.stages,
                                                          registry.no_regression_vs)],
            compare_metric=registry.compare_metric,
            higher_is_better=registry.higher_is_better, store=registry.store,
            model_params={name: section.model_dump(mode="json") for name, section in recipe.items()},
            # a gate on a metric of a stage without held-out data says so, rather than only "missing"
            missing={metric: missing_reason(stage) for metric, stage in metric_sources(list(spec.held_out)).items()
                     if not spec.held_out.get(stage, True)})
        if result.model != reg.NEW:  # no new logged model took the metrics: the run still shows what was decided on
            runs.log_metrics(metrics, run_id)
        report = {"name": registry.model_name, **result.to_json()}
        atomic_write_text(common.metrics_file("register"), json.dumps(report, indent=2) + "\n")

    print(summary(registry.model_name, result))


def summary(name: str, result) -> str:
    """The one line the stage prints: what happened to which version, and why."""
    from tunepipe.tracking import registry as reg

    did = {reg.NEW: "registered ", reg.REDECIDED: "decided again: "}.get(result.model, "")
    outcome = {reg.UNCHANGED: "unchanged", reg.CHAMPION: "champion"}.get(result.outcome,
                                                                         "candidate (champion unchanged)")
    return f"{did}{name} v{result.version} -> {outcome}: {'; '.join(result.decision.reasons)}"


if __name__ == "__main__":
    common.run(main, common.no_argument("register"), track=True)
