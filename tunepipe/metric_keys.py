"""The keys the evaluate stage can write to metrics/evaluate.json, and the held-out data each one is computed on.

tunepipe/evaluation/ computes the metrics; this module only names them, without importing torch, so that
`tunepipe run` can check `registry.gates` and `compare_metric` in milliseconds before anything starts
(tunepipe/validate.py) and the register stage can say why a gate's metric is missing ("no held-out data for dpo")
instead of only "missing". Keep the tables in step with evaluation/ (tests/test_cli_walkthrough.py compares them with a
real evaluate run's keys, and tests/test_evaluation.py with the demo's).
"""

from __future__ import annotations

from tunepipe.config import PREFERENCE_STAGES

# Scored for every model (base and each stage): metric -> the stage whose held-out data it is computed on.
MODEL_METRICS = {
    "perplexity": "cpt", "cpt_loss": "cpt",
    "sft_loss": "sft",
    "predict_bleu-4": "sft", "predict_rouge-1": "sft", "predict_rouge-2": "sft", "predict_rouge-l": "sft",
    "gen_stopped": "sft", "gen_tokens": "sft",
    "pref_accuracy": "dpo", "pref_logp_margin": "dpo",
}  # fmt: skip
# Only in the preference stage's own section (and `final` when it is last): its implicit reward vs its input model.
REWARD_METRICS = ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected")
# `checks`: did each stage learn what it trains (evaluation.learning_checks).
CHECKS = {"cpt_ppl_reduction": "cpt", "sft_loss_reduction": "sft", "dpo_pref_accuracy_gain": "dpo"}
# Fact questions (evaluate.knowledge_file, scored for every model): their source is that file, not a stage's
# held-out data. Per kind of question (where the fact was taught) `fact_accuracy_<kind>`, and over all of them:
KNOWLEDGE = "knowledge"
FACT_METRICS = ("fact_accuracy", "fact_subject_named", "fact_value_named", "fact_questions")
# `forgetting`: each stage's own held-out skill re-measured on every later model (evaluation/knowledge.py):
# (stage, metric, higher is better) -> forgetting.<metric>_drop.<model> (accuracies) or _ratio (losses).
SKILLS: tuple[tuple[str, str, bool], ...] = (
    ("cpt", "perplexity", False),
    ("sft", "sft_loss", False),
    ("sft", "fact_accuracy_sft", True),
    ("dpo", "pref_accuracy", True),
    ("kto", "reward_accuracy", True),
)
# `counts`: examples scored.
COUNTS = {"lm_blocks": "cpt", "sft_examples": "sft", "generation_prompts": "sft", "pref_pairs": "dpo",
          "kto_examples": "kto"}


def metric_sources(stages: list[str], fact_kinds: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """Every key evaluate can write for these enabled stages (pipeline order) -> the stage whose held-out data it
    needs (KNOWLEDGE for the fact questions, of `fact_kinds`: the kinds in evaluate.knowledge_file). A key is
    written only when that stage has held-out data (an eval_dataset or a val_size split)."""
    enabled = set(stages)
    per_model = {key: stage for key, stage in MODEL_METRICS.items() if stage in enabled}
    if fact_kinds:
        per_model.update({key: KNOWLEDGE for key in (*(f"fact_accuracy_{kind}" for kind in fact_kinds),
                                                     *FACT_METRICS)})
    preference = next((s for s in stages if s in PREFERENCE_STAGES), None)
    keys: dict[str, str] = {}
    for section in ("base", *stages):
        keys.update({f"{section}.{key}": stage for key, stage in per_model.items()})
        if section == preference:
            keys.update({f"{section}.{key}": preference for key in REWARD_METRICS})
    last = stages[-1]
    keys.update({f"final.{key.split('.', 1)[1]}": stage for key, stage in keys.items() if key.startswith(f"{last}.")})
    keys.update({f"checks.{key}": stage for key, stage in CHECKS.items() if stage in enabled})
    if fact_kinds:
        keys.update({f"checks.{stage}_fact_accuracy_gain": KNOWLEDGE for stage in stages})
    keys.update({f"counts.{key}": stage for key, stage in COUNTS.items() if stage in enabled})
    for stage, metric, higher in SKILLS:
        later = stages[stages.index(stage) + 1:] if stage in enabled else []
        if later and f"{stage}.{metric}" in keys and f"{later[0]}.{metric}" in keys:
            name = f"forgetting.{metric}_{'drop' if higher else 'ratio'}"
            keys.update({f"{name}.{model}": keys[f"{stage}.{metric}"] for model in (*later, "final")})
    return keys


def missing_reason(stage: str) -> str:
    """Why a metric computed on `stage`'s held-out data is missing when that stage has none."""
    return f"no held-out data for {stage} (set stages.{stage}.eval_dataset or stages.{stage}.val_size)"
