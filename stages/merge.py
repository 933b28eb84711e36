"""merge-<stage>: merge the stage's adapter into its input model; the result is the next stage's base.

    python -m stages.merge cpt|sft|dpo|kto

Reads its plan section, the stage's input model (the previous enabled stage's merged model, else the base)
and outputs/adapters/<stage>; writes outputs/models/<stage>/ (safetensors, tokenizer with the training template's
chat_template and EOS, config + generation_config whose eos_token_id lists the template's stop ids, and
merge_report.json) and metrics/merge_<stage>.json. Before the model directory is renamed into place it is reloaded
and checked: the saved chat_template must render training conversations to the training ids, and the merged logits
must equal the adapter model's (max |diff| <= 1e-4 in fp32). A failed check is a one-line error, exit 2, and no
outputs/models/<stage>. Logic: tunepipe/models/merging.py.

The conversations for the template check: for sft/dpo/kto the stage's own datasets (first 32 usable rows; dpo: the
chosen answer), plus built-in and 32 seeded random multi-turn / system-prompt / unicode conversations (all that
merge-cpt uses: it has no chat data, and reading another stage's data would make it a DVC dependency).
"""

from __future__ import annotations

import json

from stages import common
from tunepipe.config import STAGES

DATA_CONVERSATIONS = 32


def dvc_entry(name: str, spec, steps) -> common.Entry:
    stage = spec.stage
    return common.Entry(
        cmd=f"python -m stages.merge {stage}", module="stages.merge",
        deps=[common.adapter_dir(stage), common.base_model_dir(), common.input_model_dir(spec.previous)],
        datasets=[spec.dataset],  # the template round trip reads these conversations
        uncached=[common.model_dir(stage)], metrics=[common.metrics_file("merge", stage)],
        artifacts=[common.merge_report(stage)])


def check_conversations(spec, args) -> list[dict]:
    import numpy as np

    from tunepipe.config import LF_STAGE
    from tunepipe.data.features import load_examples
    from tunepipe.data.registry import split_names
    from tunepipe.models.merging import SYNTHETIC_CONVERSATIONS, conversations_from_examples, synthetic_conversations

    examples = []
    if spec.dataset:
        examples = load_examples(split_names(spec.dataset), args, LF_STAGE[spec.stage],
                                 np.random.RandomState(args.seed), [], {})
    return (conversations_from_examples(examples, DATA_CONVERSATIONS) + SYNTHETIC_CONVERSATIONS
            + synthetic_conversations(DATA_CONVERSATIONS, seed=args.seed))


def main(argv: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    from tunepipe.data.features import DataArgs, load_template
    from tunepipe.io import atomic_write_text
    from tunepipe.models.loading import load_tokenizer
    from tunepipe.models.merging import merge_adapter

    spec = common.inputs(f"merge-{argv[0]}")
    name = spec.stage
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    args = DataArgs(**spec.data)
    common.work_begins(f"merge-{name}")
    # The base tokenizer, fixed by the template exactly as prepare-<stage> fixed it for training.
    tokenizer = load_tokenizer(common.base_model_path(), trust_remote_code=spec.trust_remote_code)
    template = load_template(args, tokenizer, stage="sft")
    result = merge_adapter(
        common.input_model_path(spec.previous), common.adapter_dir(name), common.model_dir(name),
        tokenizer=tokenizer, template=template, conversations=check_conversations(spec, args),
        full=spec.finetuning_type == "full", max_new_tokens=spec.max_new_tokens,
        trust_remote_code=spec.trust_remote_code, provenance={"stage": name, "previous_stage": spec.previous},
    )
    atomic_write_text(common.metrics_file("merge", name), json.dumps(result.metrics, indent=2) + "\n")
    m, g = result.metrics, result.report["generation"]
    print(f"merge-{name}: {common.model_dir(name)}  max|dlogit| {m['max_logit_diff']:.2e}  chat_template "
          f"{m['template_conversations'] - m['template_mismatches']}/{m['template_conversations']} identical  "
          f"eos {result.report['eos_token_ids']}  generation {'stopped' if g['stopped'] else 'did NOT stop'} after "
          f"{g['new_tokens']} tokens: {g['output'][:60]!r}")


if __name__ == "__main__":
    common.run(main, common.stage_argument("merge", STAGES))
