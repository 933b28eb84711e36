"""prepare@<stage>: tokenize a stage's datasets with the LLaMA-Factory-compatible data layer.

    python -m stages.prepare cpt|sft|dpo|kto

Writes outputs/data/<stage>/{train,eval}/ (Arrow, `datasets.save_to_disk`) and health.json (rows in, dropped by
reason, truncated, zero-label, length histogram); metrics/data_<stage>.json repeats the headline numbers for
`dvc metrics diff`. The eval split is processed as the same stage, so eval losses are comparable to training.
"""

from __future__ import annotations

import json
import sys

from stages import common

# pipeline stage -> data-layer stage (LF's names: cpt is LF's pt)
DATA_STAGE = {"cpt": "pt", "sft": "sft", "dpo": "dpo", "kto": "kto"}


def main(argv: list[str]) -> None:
    from datasets import Dataset

    from tunepipe.data import health
    from tunepipe.data.prepare import DataArgs, prepare
    from tunepipe.errors import ConfigError
    from tunepipe.io import atomic_dir, atomic_write_text
    from tunepipe.models import load_tokenizer

    if len(argv) != 1 or argv[0] not in DATA_STAGE:
        raise ConfigError(f"usage: python -m stages.prepare {{{','.join(DATA_STAGE)}}}")
    name = argv[0]
    params = common.params()
    stage = params.stage(name)
    train = params.stage_train(name)
    model = params.model
    d = params.data
    args = DataArgs(dataset_dir=str(common.ROOT / d.dataset_dir), template=model.template, cutoff_len=d.cutoff_len,
                    packing=train.packing if name == "cpt" else False, neat_packing=stage.neat_packing,
                    train_on_prompt=stage.train_on_prompt, mask_history=stage.mask_history,
                    max_samples=d.max_samples, mix_strategy=d.mix_strategy, val_size=d.val_size if not
                    stage.eval_dataset else 0.0, seed=d.seed, preprocessing_batch_size=d.preprocessing_batch_size,
                    tool_format=d.tool_format, default_system=d.default_system, allow_scripts=d.allow_scripts,
                    skip_bad_rows=d.skip_bad_rows, overlength=d.overlength)
    # Every stage tokenizes with the base model's tokenizer (merges save it unchanged, with the template applied).
    tokenizer = load_tokenizer(common.base_model_path(params), trust_remote_code=model.trust_remote_code)
    prepared = prepare(DATA_STAGE[name], stage.dataset, args, tokenizer, eval_names=stage.eval_dataset)
    if stage.replay_dataset and stage.replay_ratio > 0:
        add_replay(params, name, args, tokenizer, prepared)

    out = common.data_dir(name)
    report = health.report(DATA_STAGE[name], prepared.datasets, prepared.health, d.cutoff_len, prepared.notes,
                           prepared.eval_health)
    with atomic_dir(out) as tmp:
        Dataset.from_dict(prepared.train).save_to_disk(str(tmp / "train"))
        if prepared.eval is not None:
            Dataset.from_dict(prepared.eval).save_to_disk(str(tmp / "eval"))
        (tmp / "health.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    headline = {k: report[k] for k in ("rows_in", "examples_out", "rows_dropped", "truncated", "zero_label",
                                       "tokens", "label_tokens")}
    atomic_write_text(common.METRICS / f"data_{name}.json", json.dumps(headline, indent=2) + "\n")
    print(health.format_table(report), file=sys.stderr)


def add_replay(params, name: str, args, tokenizer, prepared) -> None:
    """Mix the stage's replay dataset (earlier-stage data, processed as its own stage) into the training features."""
    import dataclasses

    from tunepipe import replay
    from tunepipe.data.prepare import prepare
    from tunepipe.errors import ConfigError

    stage = params.stage(name)
    if name != "sft":
        raise ConfigError("replay is supported for the sft stage (preference stages: use pref_ftx)",
                          key=f"stages.{name}.replay_dataset")
    kind = replay.replay_stage(params, stage.replay_dataset)
    replay_args = dataclasses.replace(args, packing=params.stage_train("cpt").packing if kind == "pt" else False,
                                      neat_packing=False, val_size=0.0)
    data = prepare(kind, stage.replay_dataset, replay_args, tokenizer).train
    try:
        prepared.train, n = replay.mix(prepared.train, data, stage.replay_ratio, params.data.seed)
    except ValueError as err:
        raise ConfigError(str(err), key=f"stages.{name}.replay_dataset") from None
    prepared.notes.append(f"replay: {n} {'blocks' if kind == 'pt' else 'rows'} of {stage.replay_dataset} "
                          f"({kind}, ratio {stage.replay_ratio:g}) mixed into the training data")


if __name__ == "__main__":
    common.run(main)
