"""prepare-<stage>: tokenize a stage's datasets with the LLaMA-Factory-compatible data layer.

    python -m stages.prepare cpt|sft|dpo|kto

Reads its plan section (data options, datasets) and the base tokenizer. Writes outputs/data/<stage>/{train,eval}/
(Arrow, `datasets.save_to_disk`) and health.json (rows in, dropped by reason, truncated, zero-label, length
histogram); metrics/data_<stage>.json repeats the headline numbers for `dvc metrics diff`. The eval split is
processed as the same stage, so eval losses are comparable to training.
"""

from __future__ import annotations

import functools
import json
import sys

from stages import common
from tunepipe.config import STAGES


def dvc_entry(name: str, spec, steps) -> common.Entry:
    stage = spec.stage
    return common.Entry(
        cmd=f"python -m stages.prepare {stage}", module="stages.prepare", deps=[common.base_model_dir()],
        datasets=[spec.dataset, spec.eval_dataset, spec.replay.dataset if spec.replay else None],
        outs=[common.data_dir(stage)], metrics=[common.metrics_file("prepare", stage)],
        artifacts=[common.health_file(stage)])


def main(argv: list[str]) -> None:
    from tunepipe.data import health
    from tunepipe.data.features import DataArgs, prepare_to_disk
    from tunepipe.errors import ConfigError
    from tunepipe.io import atomic_dir, atomic_write_text
    from tunepipe.models.loading import load_tokenizer

    spec = common.inputs(f"prepare-{argv[0]}")
    args = DataArgs(**spec.data)
    common.work_begins(f"prepare-{spec.stage}")
    # Every stage tokenizes with the base model's tokenizer (merges save it unchanged, with the template applied).
    tokenizer = load_tokenizer(common.base_model_path(), trust_remote_code=spec.trust_remote_code)
    amend = None
    if spec.replay is not None:
        if args.streaming:
            raise ConfigError("replay mixes features in memory: it cannot be combined with streaming",
                              key=f"stages.{spec.stage}.replay_dataset")
        amend = functools.partial(add_replay, spec, args, tokenizer)
    with atomic_dir(common.data_dir(spec.stage)) as tmp:  # streaming writes the features while it tokenizes
        prepared = prepare_to_disk(spec.lf_stage, spec.dataset, args, tokenizer, tmp, eval_names=spec.eval_dataset,
                                   amend=amend)
        report = health.report(spec.lf_stage, prepared.datasets, prepared.health, args.cutoff_len, prepared.notes,
                               prepared.eval_health)
        (tmp / "health.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    headline = {k: report[k] for k in ("rows_in", "examples_out", "rows_dropped", "truncated", "zero_label",
                                       "tokens", "label_tokens")}
    atomic_write_text(common.metrics_file("prepare", spec.stage), json.dumps(headline, indent=2) + "\n")
    print(health.format_table(report), file=sys.stderr)


def add_replay(spec, args, tokenizer, prepared) -> None:
    """Mix the stage's replay dataset (earlier-stage data, processed as its own stage) into the training features."""
    import dataclasses

    from tunepipe.data import replay
    from tunepipe.data.features import prepare
    from tunepipe.errors import ConfigError

    r = spec.replay
    replay_args = dataclasses.replace(args, packing=r.packing, neat_packing=False, val_size=0.0)
    data = prepare(r.lf_stage, r.dataset, replay_args, tokenizer).train
    try:
        prepared.train, n = replay.mix(prepared.train, data, r.ratio, args.seed)
    except ValueError as err:
        raise ConfigError(str(err), key=f"stages.{spec.stage}.replay_dataset") from None
    prepared.notes.append(f"replay: {n} {'blocks' if r.lf_stage == 'pt' else 'rows'} of {r.dataset} "
                          f"({r.lf_stage}, ratio {r.ratio:g}) mixed into the training data")

if __name__ == "__main__":
    common.run(main, common.stage_argument("prepare", STAGES))
