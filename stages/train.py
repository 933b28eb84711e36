"""train@<stage>: a fresh LoRA adapter on the previous stage's merged model, trained on the prepared features.

    python -m stages.train cpt|sft|dpo|kto
    accelerate launch -m stages.train sft          # or: torchrun --nproc-per-node 8 -m stages.train sft

Reads  params.yaml (train:, lora:, stages.<stage>:), outputs/data/<stage>/, the input model (outputs/models/<prev>
       or the base model) and the base tokenizer.
Writes outputs/adapters/<stage>/     adapter_model.safetensors + adapter_config.json + tokenizer (atomic)
       outputs/checkpoints/<stage>/  checkpoint-N/ every save_steps + fingerprint.json (resume after a kill)
       metrics/train_<stage>.json    final train/eval loss, steps, tokens, tokens/s, seconds, peak memory
       plots/loss_<stage>.csv|.png   the loss curve (step, loss, eval_loss)

A rerun with the same params, data and input model resumes from the last checkpoint; anything else starts fresh.
TUNEPIPE_FAIL_AFTER_STEP=N stops the run after step N (to try the resume by hand).
"""

from __future__ import annotations

import os

from stages import common

STAGES = ("cpt", "sft", "dpo", "kto")


def main(argv: list[str]) -> None:
    from tunepipe import training
    from tunepipe.callbacks import StopAfterStep
    from tunepipe.errors import ConfigError

    if len(argv) != 1 or argv[0] not in STAGES:
        raise ConfigError(f"usage: python -m stages.train {{{','.join(STAGES)}}}")
    stage = argv[0]
    params = common.params()
    if not params.stage(stage).enabled:
        raise ConfigError(f"stage {stage} is disabled in params.yaml (stages.{stage}.enabled)")

    # setup: input model + fresh adapter, prepared data, trainer, resume decision
    paths = training.StagePaths(
        input_model=common.input_model_path(params, stage),
        tokenizer=common.base_model_path(params),
        data=common.data_dir(stage),
        adapter=common.adapter_dir(stage),
        checkpoints=common.checkpoint_dir(stage),
        metrics=common.METRICS / f"train_{stage}.json",
        plots=common.PLOTS,
    )
    fail_after = os.environ.get("TUNEPIPE_FAIL_AFTER_STEP")
    run = training.setup(stage, params, paths, callbacks=[StopAfterStep(int(fail_after))] if fail_after else [])

    # train (continues from the last matching checkpoint) and evaluate on the held-out split
    metrics = training.train(run)

    # save: adapter, metrics, loss curve
    training.save(run, metrics)


if __name__ == "__main__":
    common.run(main)
