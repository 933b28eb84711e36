"""register: put the final merged model in the MLflow registry; move `champion` only when it earned it.

    python -m stages.register

Reads its plan section (`registry:`, the final stage), metrics/evaluate.json and the final model
outputs/models/<last enabled stage>. Lineage is what this stage sees itself (git commit and dirty flag, sha256 of
params.yaml, the md5 of every path in dvc.lock) overlaid with the flow's $TUNEPIPE_LINEAGE JSON when set (the flow's
values win). The run is a child of $TUNEPIPE_PARENT_RUN_ID when set. Logic: tunepipe/tracking/registry.py
`register_and_promote` — the version is created and an alias moved only at the very end: `champion` if every gate passes and compare_metric strictly beats the current
champion, else `candidate`.

Writes metrics/register.json {"name", "version", "aliases", "promoted", "reasons", "gate_results", ...} and prints the
decision on one line.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from stages import common


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


def read_metrics(path: Path) -> dict[str, Any]:
    from tunepipe.errors import ConfigError
    from tunepipe.io import read_json

    metrics = read_json(path, missing="not found: run the evaluate stage first")
    if not isinstance(metrics, dict):
        raise ConfigError("expected a JSON object of metric sections", file=str(path))
    return metrics


def main(argv: list[str]) -> None:
    import mlflow

    from tunepipe.errors import ConfigError
    from tunepipe.io import atomic_write_text
    from tunepipe.metric_keys import metric_sources, missing_reason
    from tunepipe.tracking import registry as reg
    from tunepipe.tracking import runs

    spec = common.inputs("register")
    registry, final = spec.registry, spec.final_stage
    common.work_begins("register")
    model = common.model_dir(final)
    if not model.is_dir() or not any(model.iterdir()):
        raise ConfigError(f"final model {model} not found: run merge-{final} first")
    metrics = read_metrics(common.metrics_file("evaluate"))
    lineage = {**local_lineage(common.ROOT, final), **runs.read_lineage_env()}

    # common.run already opened this stage's run when tracking is on; registering needs one either way
    active = mlflow.active_run()
    context = nullcontext(active) if active else runs.stage_run(common.ROOT, "register")
    with context as run:
        run_id = run.info.run_id
        runs.log_params_flat({"registry": registry, "final_stage": final}, run_id)
        runs.set_lineage(run_id, lineage)
        runs.log_metrics(metrics, run_id)
        result = reg.register_and_promote(
            common.ROOT, model, name=registry.model_name, run_id=run_id, metrics=metrics, lineage=lineage,
            gates=registry.gates, compare_metric=registry.compare_metric,
            higher_is_better=registry.higher_is_better, store=registry.store,
            # a gate on a metric of a stage without held-out data says so, rather than only "missing"
            missing={metric: missing_reason(stage) for metric, stage in metric_sources(list(spec.held_out)).items()
                     if not spec.held_out[stage]})
        report = {"name": registry.model_name, **result.to_json()}
        atomic_write_text(common.metrics_file("register"), json.dumps(report, indent=2) + "\n")

    outcome = "champion" if result.decision.promote else "candidate (champion unchanged)"
    print(f"registered {registry.model_name} v{result.version} -> {outcome}: {'; '.join(result.decision.reasons)}")


if __name__ == "__main__":
    common.run(main, common.no_argument("register"), track=True)
