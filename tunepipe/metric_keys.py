"""The keys the evaluate stage can write to metrics/evaluate.json, and the held-out data each one is computed on.

tunepipe/evaluation.py computes the metrics; this module only names them, without importing torch, so that
`tunepipe run` can check `registry.gates` and `compare_metric` in milliseconds before anything starts
(tunepipe/validate.py) and the register stage can say why a gate's metric is missing ("no held-out data for dpo")
instead of only "missing". Keep the tables in step with evaluation.py (tests/test_validate.py compares them with a
real evaluate run's keys).
"""

from __future__ import annotations

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
# `counts`: examples scored.
COUNTS = {"lm_blocks": "cpt", "sft_examples": "sft", "generation_prompts": "sft", "pref_pairs": "dpo",
          "kto_examples": "kto"}


def metric_sources(stages: list[str]) -> dict[str, str]:
    """Every key evaluate can write for these enabled stages (pipeline order) -> the stage whose held-out data it
    needs. A key is written only when that stage has held-out data (an eval_dataset or a val_size split)."""
    enabled = set(stages)
    per_model = {key: stage for key, stage in MODEL_METRICS.items() if stage in enabled}
    preference = next((s for s in stages if s in ("dpo", "kto")), None)
    keys: dict[str, str] = {}
    for section in ("base", *stages):
        keys.update({f"{section}.{key}": stage for key, stage in per_model.items()})
        if section == preference:
            keys.update({f"{section}.{key}": preference for key in REWARD_METRICS})
    last = stages[-1]
    keys.update({f"final.{key.split('.', 1)[1]}": stage for key, stage in keys.items() if key.startswith(f"{last}.")})
    keys.update({f"checks.{key}": stage for key, stage in CHECKS.items() if stage in enabled})
    keys.update({f"counts.{key}": stage for key, stage in COUNTS.items() if stage in enabled})
    return keys


def missing_reason(stage: str) -> str:
    """Why a metric computed on `stage`'s held-out data is missing when that stage has none."""
    return f"no held-out data for {stage} (set stages.{stage}.eval_dataset or stages.{stage}.val_size)"
