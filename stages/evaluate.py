"""evaluate: the base model vs every enabled stage's merged model on the held-out data.

    python -m stages.evaluate

Reads outputs/models/base (or the base model reference), outputs/models/<stage> and outputs/data/<stage>/eval for
every enabled stage, plus the SFT datasets (re-processed as LLaMA-Factory's unsupervised/predict set for the
generation prompts). Writes metrics/evaluate.json (numbers only, for `dvc metrics diff` and MLflow; sections
base / cpt / sft / dpo|kto / final / checks / counts) and metrics/samples.json (a few prompt / output / reference
generations per model). Logic and metric definitions: tunepipe/evaluation.py; docs/stages.md "## evaluate".
"""

from __future__ import annotations

import json
import logging
import sys

from stages import common

log = logging.getLogger("stages.evaluate")


def sft_data_args(params):
    """prepare@sft's data options (same mapping as stages/prepare.py), for the unsupervised prompt set."""
    from tunepipe.data.prepare import DataArgs

    stage, train, d = params.stage("sft"), params.stage_train("sft"), params.data
    return DataArgs(dataset_dir=str(common.ROOT / d.dataset_dir), template=params.model.template,
                    cutoff_len=d.cutoff_len, packing=False, neat_packing=stage.neat_packing,
                    train_on_prompt=stage.train_on_prompt, mask_history=stage.mask_history,
                    max_samples=d.max_samples, mix_strategy=d.mix_strategy,
                    val_size=d.val_size if not stage.eval_dataset else 0.0, seed=d.seed,
                    preprocessing_batch_size=d.preprocessing_batch_size, tool_format=d.tool_format,
                    default_system=d.default_system, allow_scripts=d.allow_scripts, skip_bad_rows=d.skip_bad_rows,
                    overlength=d.overlength)


def load_eval(stage: str, limit: int) -> dict | None:
    from datasets import load_from_disk

    from tunepipe.evaluation import cap

    path = common.data_dir(stage) / "eval"
    if not path.is_dir():
        log.warning("no held-out data for %s (%s): its metrics are skipped (set eval_dataset or data.val_size)",
                    stage, path)
        return None
    ds = load_from_disk(str(path))
    return cap(ds.select(range(min(limit, ds.num_rows))).to_dict(), limit)


def main(argv: list[str]) -> None:
    from tunepipe.data.prepare import load_template, prepare
    from tunepipe.errors import ConfigError
    from tunepipe.evaluation import EvalData, EvalSettings, cap, evaluate, load_model
    from tunepipe.io import atomic_write_text
    from tunepipe.models import load_tokenizer
    from transformers.utils import logging as hf_logging

    if argv:
        raise ConfigError("usage: python -m stages.evaluate")
    hf_logging.disable_progress_bar()  # "Loading weights" bars for every model
    params = common.params()
    stages = params.enabled_stages()
    limit = params.evaluate.max_eval_samples
    trust = params.model.trust_remote_code
    base = common.base_model_path(params)
    tokenizer = load_tokenizer(base, trust_remote_code=trust)
    args = sft_data_args(params)
    template = load_template(args, tokenizer, stage="sft")  # the training tokenizer: EOS replaced, pad set

    models = {"base": base}
    for stage in stages:
        path = common.model_dir(stage)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no merged model: run `python -m stages.merge {stage}` first")
        models[stage] = str(path)

    data = EvalData()
    if "cpt" in stages:
        data.lm = load_eval("cpt", limit)
    if "sft" in stages:
        data.sft = load_eval("sft", limit)
        sft = params.stage("sft")
        if sft.eval_dataset or params.data.val_size:
            prompts = prepare("sft", sft.dataset, args, tokenizer, eval_names=sft.eval_dataset,
                              eval_stage="unsupervised").eval
            data.prompts = cap(prompts, limit)
    pref = next((s for s in ("dpo", "kto") if s in stages), None)
    if pref == "dpo":
        data.pairs = load_eval("dpo", limit)
    elif pref == "kto":
        data.feedback = load_eval("kto", limit)

    inputs = {stage: params.previous_stage(stage) or "base" for stage in stages}
    settings = EvalSettings(max_new_tokens=params.evaluate.max_new_tokens, num_samples=params.evaluate.num_samples,
                            batch_size=params.train.per_device_eval_batch_size,
                            gen_batch_size=max(32, params.train.per_device_eval_batch_size), pref_stage=pref,
                            beta=params.stage(pref).pref_beta if pref else 0.1)
    results, samples = evaluate(models, tokenizer, data, settings, eos_ids=template.stop_token_ids(tokenizer),
                                inputs=inputs, load=lambda path: load_model(path, trust_remote_code=trust))
    add_knowledge(params, results, samples, models, tokenizer, template, inputs,
                  load=lambda path: load_model(path, trust_remote_code=trust))
    atomic_write_text(common.METRICS / "evaluate.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(common.METRICS / "samples.json", json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    print(format_table(results, list(models)), file=sys.stderr)


def add_knowledge(params, results: dict, samples: dict, models: dict, tokenizer, template, inputs: dict, *,
                  load) -> None:
    """Fact accuracy per kind (lm-eval task tunepipe_facts) for every model, then `forgetting` (each stage's own
    held-out skill re-measured on the later models); `final` and `checks` are refreshed to include them."""
    import copy

    from tunepipe import knowledge
    from tunepipe.evaluation import learning_checks

    ev = params.evaluate
    if ev.knowledge_file or ev.lm_eval_tasks:
        qa_tokenizer = copy.deepcopy(tokenizer)  # the training tokenizer with the template's chat_template
        qa_tokenizer.chat_template = template.jinja_template(qa_tokenizer)
        data_file = common.ROOT / params.data.dataset_dir / ev.knowledge_file if ev.knowledge_file else None
        for name, path in models.items():
            model = load(path)
            if data_file is not None:
                metrics, fact_samples = knowledge.fact_accuracy(
                    model, qa_tokenizer, data_file, max_new_tokens=ev.max_new_tokens,
                    batch_size=max(32, params.train.per_device_eval_batch_size), limit=ev.max_fact_questions,
                    num_samples=ev.fact_samples, extra_tasks=ev.lm_eval_tasks)
                samples[name] = samples.get(name, []) + fact_samples
            else:
                metrics = knowledge.lm_eval_numbers(model, qa_tokenizer, ev.lm_eval_tasks)
            results[name].update(metrics)
            log.info("facts %s: %s", name, ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
            del model
    order = list(models)
    results["final"] = dict(results[order[-1]])
    results["checks"] = learning_checks({n: results[n] for n in order}, inputs)
    for stage in order[1:]:  # what each stage added to its input model's fact accuracy
        before, after = results[inputs[stage]].get("fact_accuracy"), results[stage].get("fact_accuracy")
        if before is not None and after is not None:
            results["checks"][f"{stage}_fact_accuracy_gain"] = after - before
    results["forgetting"] = knowledge.forgetting(results, order)
    counts = results.pop("counts")
    results["counts"] = counts  # keep the counts last


def format_table(results: dict, names: list[str]) -> str:
    keys = sorted({k for name in names for k in results[name]}, key=_key_order)
    lines = [f"{'metric':<18}" + "".join(f"{n:>12}" for n in names)]
    for key in keys:
        cells = "".join(f"{results[n][key]:>12.4g}" if key in results[n] else f"{'-':>12}" for n in names)
        lines.append(f"{key:<18}{cells}")
    lines += [f"{k:<18}{v:>12.4g}" for k, v in results["checks"].items()]
    for skill, values in results.get("forgetting", {}).items():
        lines.append(f"forgetting {skill}: " + ", ".join(f"{n} {v:.4g}" for n, v in values.items()))
    return "\n".join(lines)


ORDER = ("fact_accuracy", "fact_accuracy_sft", "fact_accuracy_dpo", "fact_accuracy_kto", "fact_accuracy_cpt",
         "perplexity", "cpt_loss", "sft_loss", "predict_bleu-4", "predict_rouge-1", "predict_rouge-2",
         "predict_rouge-l", "gen_stopped", "gen_tokens", "pref_accuracy", "pref_logp_margin", "reward_accuracy",
         "reward_margin", "reward_chosen", "reward_rejected")


def _key_order(key: str) -> tuple[int, str]:
    return (ORDER.index(key) if key in ORDER else len(ORDER), key)


if __name__ == "__main__":
    common.run(main)
