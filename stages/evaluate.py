"""evaluate: the base model vs every enabled stage's merged model on the held-out data.

    python -m stages.evaluate

Reads outputs/models/base (or the base model reference), outputs/models/<stage> and outputs/data/<stage>/eval for
every enabled stage, plus the SFT datasets (re-processed as LLaMA-Factory's unsupervised/predict set for the
generation prompts). Writes metrics/evaluate.json (numbers only, for `dvc metrics diff` and MLflow; sections
base / cpt / sft / dpo|kto / final / checks / counts) and metrics/samples.json (a few prompt / output / reference
generations per model). Logic and metric definitions: tunepipe/evaluation/scoring.py; docs/stages.md "## evaluate".
"""

from __future__ import annotations

import json
import logging
import sys

from stages import common

log = logging.getLogger("stages.evaluate")


LM_EVAL_TASKS = "tunepipe/assets/lm_eval"  # read by lm_eval at run time (YAML + its utils), not imported


def dvc_entry(name: str, spec, steps) -> common.Entry:
    knowledge = spec.evaluate.knowledge_file
    return common.Entry(
        cmd="python -m stages.evaluate", module="stages.evaluate",
        deps=[LM_EVAL_TASKS, common.base_model_dir(), *map(common.model_dir, spec.stages),
              *map(common.data_dir, spec.stages)],
        datasets=[spec.sft.dataset, spec.sft.eval_dataset] if spec.sft else [],  # the generation prompts
        files=[f"{spec.dataset_dir}/{knowledge}"] if knowledge else [],
        metrics=[common.metrics_file("evaluate")], uncached=[common.samples_file()],
        artifacts=[common.samples_file()])


def load_eval(stage: str, limit: int) -> dict | None:
    from datasets import load_from_disk

    from tunepipe.evaluation.scoring import cap

    path = common.data_dir(stage) / "eval"
    if not path.is_dir():
        log.warning("no held-out data for %s (%s): its metrics are skipped (set eval_dataset or data.val_size)",
                    stage, path)
        return None
    ds = load_from_disk(str(path))
    return cap(ds.select(range(min(limit, ds.num_rows))).to_dict(), limit)


def main(argv: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    from tunepipe.data.features import DataArgs, load_template, prepare
    from tunepipe.errors import ConfigError
    from tunepipe.evaluation.scoring import EvalData, EvalSettings, cap, evaluate, load_model
    from tunepipe.io import atomic_write_text
    from tunepipe.models.loading import load_tokenizer

    spec = common.inputs("evaluate")
    hf_logging.disable_progress_bar()  # "Loading weights" bars for every model
    limit = spec.evaluate.max_eval_samples
    trust = spec.trust_remote_code
    common.work_begins("evaluate")
    base = common.base_model_path()
    tokenizer = load_tokenizer(base, trust_remote_code=trust)
    template = load_template(DataArgs(**spec.template), tokenizer, stage="sft")  # EOS replaced, pad set
    sft = spec.sft
    args = DataArgs(**sft.data) if sft else None

    models = {"base": base}
    for stage in spec.stages:
        path = common.model_dir(stage)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no merged model: run `python -m stages.merge {stage}` first")
        models[stage] = str(path)

    data = EvalData()
    if "cpt" in spec.stages:
        data.lm = load_eval("cpt", limit)
    if sft is not None:
        data.sft = load_eval("sft", limit)
        if sft.eval_dataset or args.val_size:
            prompts = prepare("sft", sft.dataset, args, tokenizer, eval_names=sft.eval_dataset,
                              eval_stage="unsupervised").eval
            data.prompts = cap(prompts, limit)
    if spec.preference == "dpo":
        data.pairs = load_eval("dpo", limit)
    elif spec.preference == "kto":
        data.feedback = load_eval("kto", limit)

    settings = EvalSettings(max_new_tokens=spec.evaluate.max_new_tokens, num_samples=spec.evaluate.num_samples,
                            batch_size=spec.eval_batch_size, gen_batch_size=max(32, spec.eval_batch_size),
                            pref_stage=spec.preference, beta=spec.pref_beta)
    def load(path):
        return load_model(path, trust_remote_code=trust, flash_attn=spec.flash_attn, liger=spec.enable_liger_kernel)

    results, samples = evaluate(models, tokenizer, data, settings, eos_ids=template.stop_token_ids(tokenizer),
                                inputs=dict(spec.stages), load=load)
    add_knowledge(spec, results, samples, models, tokenizer, template, dict(spec.stages), load=load)
    atomic_write_text(common.metrics_file("evaluate"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(common.samples_file(), json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    print(format_table(results, list(models)), file=sys.stderr)


def add_knowledge(spec, results: dict, samples: dict, models: dict, tokenizer, template, inputs: dict, *,
                  load) -> None:
    """Fact accuracy per kind (lm-eval task tunepipe_facts) for every model, then `forgetting` (each stage's own
    held-out skill re-measured on the later models); `final` and `checks` are refreshed to include them."""
    import copy

    from tunepipe.evaluation import knowledge
    from tunepipe.evaluation.scoring import learning_checks

    ev = spec.evaluate
    if ev.knowledge_file or ev.lm_eval_tasks:
        qa_tokenizer = copy.deepcopy(tokenizer)  # the training tokenizer with the template's chat_template
        qa_tokenizer.chat_template = template.jinja_template(qa_tokenizer)
        data_file = common.ROOT / spec.dataset_dir / ev.knowledge_file if ev.knowledge_file else None
        for name, path in models.items():
            model = load(path)
            if data_file is not None:
                metrics, fact_samples = knowledge.fact_accuracy(
                    model, qa_tokenizer, data_file, max_new_tokens=ev.max_new_tokens,
                    batch_size=max(32, spec.eval_batch_size), limit=ev.max_fact_questions,
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
    common.run(main, common.no_argument("evaluate"))
