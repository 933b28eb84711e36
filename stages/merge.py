"""merge@<stage>: merge the stage's adapter into its input model; the result is the next stage's base.

    python -m stages.merge cpt|sft|dpo|kto

Reads the stage's input model (`common.input_model_path`: the previous enabled stage's merged model, else the base)
and outputs/adapters/<stage>; writes outputs/models/<stage>/ (safetensors, tokenizer with the training template's
chat_template and EOS, config + generation_config whose eos_token_id lists the template's stop ids, and
merge_report.json) and metrics/merge_<stage>.json. Before the model directory is renamed into place it is reloaded
and checked: the saved chat_template must render training conversations to the training ids, and the merged logits
must equal the adapter model's (max |diff| <= 1e-4 in fp32). A failed check is a one-line error, exit 2, and no
outputs/models/<stage>. Logic: tunepipe/merging.py.

The conversations for the template check: for sft/dpo/kto the stage's own datasets (first 32 usable rows; dpo: the
chosen answer), plus built-in and 32 seeded random multi-turn / system-prompt / unicode conversations (all that
merge@cpt uses: it has no chat data, and reading another stage's data would make it a DVC dependency).
"""

from __future__ import annotations

import json

from stages import common

STAGES = ("cpt", "sft", "dpo", "kto")
DATA_CONVERSATIONS = 32


def data_args(params, name: str):
    """The data options that decide how conversations are rendered (same mapping as stages/prepare.py)."""
    from tunepipe.data.prepare import DataArgs

    d = params.data
    return DataArgs(dataset_dir=str(common.ROOT / d.dataset_dir), template=params.model.template,
                    cutoff_len=d.cutoff_len, max_samples=d.max_samples, seed=d.seed,
                    tool_format=d.tool_format, default_system=d.default_system, allow_scripts=d.allow_scripts,
                    skip_bad_rows=d.skip_bad_rows)


def check_conversations(params, args, name: str) -> list[dict]:
    import numpy as np

    from tunepipe.data.prepare import load_examples
    from tunepipe.data.registry import split_names
    from tunepipe.merging import SYNTHETIC_CONVERSATIONS, conversations_from_examples, synthetic_conversations

    examples = []
    if name != "cpt":
        stage = params.stage(name)
        names = split_names(stage.dataset) + split_names(stage.eval_dataset)
        examples = load_examples(names, args, name, np.random.RandomState(args.seed), [], {})
    return (conversations_from_examples(examples, DATA_CONVERSATIONS) + SYNTHETIC_CONVERSATIONS
            + synthetic_conversations(DATA_CONVERSATIONS, seed=args.seed))


def main(argv: list[str]) -> None:
    from tunepipe.data.prepare import load_template
    from tunepipe.errors import ConfigError
    from tunepipe.io import atomic_write_text
    from tunepipe.merging import merge_adapter
    from tunepipe.models import load_tokenizer
    from transformers.utils import logging as hf_logging

    if len(argv) != 1 or argv[0] not in STAGES:
        raise ConfigError(f"usage: python -m stages.merge {{{','.join(STAGES)}}}")
    name = argv[0]
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    params = common.params()
    if name not in params.enabled_stages():
        raise ConfigError(f"stage {name} is disabled in params.yaml", key=f"stages.{name}.enabled")
    trust = params.model.trust_remote_code
    args = data_args(params, name)
    # The base tokenizer, fixed by the template exactly as prepare@<stage> fixed it for training.
    tokenizer = load_tokenizer(common.base_model_path(params), trust_remote_code=trust)
    template = load_template(args, tokenizer, stage="sft")
    result = merge_adapter(
        common.input_model_path(params, name), common.adapter_dir(name), common.model_dir(name),
        tokenizer=tokenizer, template=template, conversations=check_conversations(params, args, name),
        full=params.stage_lora(name).finetuning_type == "full", max_new_tokens=params.evaluate.max_new_tokens,
        trust_remote_code=trust, provenance={"stage": name, "previous_stage": params.previous_stage(name)},
    )
    atomic_write_text(common.METRICS / f"merge_{name}.json", json.dumps(result.metrics, indent=2) + "\n")
    m, g = result.metrics, result.report["generation"]
    print(f"merge@{name}: {common.model_dir(name)}  max|dlogit| {m['max_logit_diff']:.2e}  chat_template "
          f"{m['template_conversations'] - m['template_mismatches']}/{m['template_conversations']} identical  "
          f"eos {result.report['eos_token_ids']}  generation {'stopped' if g['stopped'] else 'did NOT stop'} after "
          f"{g['new_tokens']} tokens: {g['output'][:60]!r}")


if __name__ == "__main__":
    common.run(main)
