"""register: put the final merged model in the MLflow registry; move `champion` only when it earned it.

    python -m stages.register

Reads params.yaml `registry:`, metrics/evaluate.json and the final model outputs/models/<last enabled stage>.
Lineage is what this stage sees itself (git commit and dirty flag, sha256 of params.yaml, the md5 of every path in
dvc.lock) overlaid with the flow's $TUNEPIPE_LINEAGE JSON when set (the flow's values win). The run is a child of
$TUNEPIPE_PARENT_RUN_ID when set. Logic: tunepipe/tracking.py `register_and_promote` — the version is created and
an alias moved only at the very end: `champion` if every gate passes and compare_metric strictly beats the current
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
    import yaml

    from tunepipe.tracking import git_lineage

    lineage: dict[str, Any] = {**git_lineage(root), "final_stage": final_stage}
    params_file = root / "params.yaml"
    if params_file.exists():
        lineage["params_sha256"] = hashlib.sha256(params_file.read_bytes()).hexdigest()
    lock_file = root / "dvc.lock"
    if lock_file.exists():
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
        hashes = {}
        for stage in (lock.get("stages") or {}).values():
            for entry in (stage.get("deps") or []) + (stage.get("outs") or []):
                if isinstance(entry, dict) and entry.get("path") and entry.get("md5"):
                    hashes[entry["path"]] = entry["md5"]
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
    from tunepipe import tracking
    from tunepipe.errors import ConfigError
    from tunepipe.io import atomic_write_text
    from tunepipe.knowledge import no_regression_gates

    if argv:
        raise ConfigError(f"usage: python -m stages.register (unexpected arguments: {' '.join(argv)})")
    params = common.params()
    registry = params.registry
    final = params.enabled_stages()[-1]
    model = common.model_dir(final)
    if not model.is_dir() or not any(model.iterdir()):
        raise ConfigError(f"final model {model} not found: run merge@{final} first")
    metrics = read_metrics(common.METRICS / "evaluate.json")
    lineage = {**local_lineage(common.ROOT, final), **tracking.read_lineage_env()}

    import mlflow

    # common.run already opened this stage's run when tracking is on; registering needs one either way
    active = mlflow.active_run()
    context = nullcontext(active) if active else tracking.stage_run(common.ROOT, "register")
    with context as run:
        run_id = run.info.run_id
        tracking.log_params_flat({"registry": registry, "final_stage": final}, run_id)
        tracking.set_lineage(run_id, lineage)
        tracking.log_metrics(metrics, run_id)
        result = tracking.register_and_promote(
            common.ROOT, model, name=registry.model_name, run_id=run_id, metrics=metrics, lineage=lineage,
            gates=[*registry.gates, *no_regression_gates(registry.no_regression, params.enabled_stages(),
                                                          registry.no_regression_vs)],
            compare_metric=registry.compare_metric,
            higher_is_better=registry.higher_is_better, store=registry.store)
        report = {"name": registry.model_name, **result.to_json()}
        atomic_write_text(common.METRICS / "register.json", json.dumps(report, indent=2) + "\n")

    outcome = "champion" if result.decision.promote else "candidate (champion unchanged)"
    print(f"registered {registry.model_name} v{result.version} -> {outcome}: {'; '.join(result.decision.reasons)}")


if __name__ == "__main__":
    common.run(main)
