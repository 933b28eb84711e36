"""train-<stage>: a fresh LoRA adapter on the previous stage's merged model, trained on the prepared features.

    python -m stages.train cpt|sft|dpo|kto
    accelerate launch -m stages.train sft          # or: torchrun --nproc-per-node 8 -m stages.train sft

dvc.yaml carries the command that params.yaml's launcher keys ask for (stages/dag.py `train_command`). Under a
launcher every process runs this module; only rank 0 opens the stage's MLflow run and writes files.

Reads  its plan section (effective train:, lora:, preference and template values), outputs/data/<stage>/, the input
       model (outputs/models/<previous> or the base model) and the base tokenizer.
Writes outputs/adapters/<stage>/     adapter_model.safetensors + adapter_config.json + tokenizer (atomic)
       outputs/checkpoints/<stage>/  checkpoint-N/ every save_steps + fingerprint.json (resume after a kill)
       metrics/train_<stage>.json    final train/eval loss, steps, tokens, padding (what identical runs reproduce)
       outputs/logs/train_<stage>.measured.json  tokens/s, seconds, peak memory of this run (also on its MLflow
                                     run; not versioned: they differ between identical runs)
       plots/loss_<stage>.csv|.png   the loss curve (step, loss, eval_loss)
       MLflow                        loss, eval_loss, learning_rate, grad_norm, tokens/s per logging step, as the
                                     metric history of this stage's run (when tracked)

A rerun with the same inputs, data and input model resumes from the last checkpoint; anything else starts fresh.
TUNEPIPE_FAIL_AFTER_STEP=N stops the run after step N (to try the resume by hand).
"""

from __future__ import annotations

import os

from stages import common
from stages.launch import train_command
from tunepipe.config import STAGES


def dvc_entry(name: str, spec, steps) -> common.Entry:
    stage = spec.stage
    return common.Entry(
        cmd=train_command(stage, spec.train), module="stages.train",
        deps=[common.data_dir(stage), common.base_model_dir(), common.input_model_dir(spec.previous)],
        files=[p for p in (spec.train.deepspeed, spec.train.config_file) if p],
        outs=[common.adapter_dir(stage)], metrics=[common.metrics_file("train", stage)],
        plots={common.loss_curve(stage, "csv"): {"x": "step", "y": "loss"}, common.loss_curve(stage, "png"): {}})


def main(argv: list[str]) -> None:
    from tunepipe.train import recipe
    from tunepipe.train.callbacks import MetricHistoryCallback, StopAfterStep

    spec = common.inputs(f"train-{argv[0]}")
    stage = spec.stage

    # setup: input model + fresh adapter, prepared data, trainer, resume decision
    paths = recipe.StagePaths(
        input_model=common.input_model_path(spec.previous),
        tokenizer=common.base_model_path(),
        data=common.data_dir(stage),
        adapter=common.adapter_dir(stage),
        checkpoints=common.checkpoint_dir(stage),
        metrics=common.metrics_file("train", stage),
        plots=common.PLOTS,
        measured=common.OUTPUTS / "logs" / f"train_{stage}.measured.json",
    )
    fail_after = os.environ.get("TUNEPIPE_FAIL_AFTER_STEP")
    common.work_begins(f"train-{stage}")
    run = recipe.setup(spec, paths, callbacks=[StopAfterStep(int(fail_after))] if fail_after else [])
    run.trainer.add_callback(MetricHistoryCallback(run.progress))  # per-step metrics into this stage's MLflow run

    # train (continues from the last matching checkpoint) and evaluate on the held-out split
    metrics = recipe.train(run)

    # save: adapter, metrics, loss curve; this run's throughput and memory onto its MLflow run
    recipe.save(run, metrics)
    log_measured(recipe.measured(metrics))


def log_measured(values: dict[str, float]) -> None:
    import sys

    mlflow = sys.modules.get("mlflow")  # imported by the stage's tracked run (common.run, track=True)
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_metrics(values)


def rank_zero() -> bool:
    """The main process of a torchrun / accelerate launch (RANK is the global rank both launchers export)."""
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    common.run(main, common.stage_argument("train", STAGES), track=rank_zero())
