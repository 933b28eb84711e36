"""Knowledge metrics: exact-match fact accuracy (an lm-evaluation-harness task) and forgetting across stages.

Fact accuracy. A local JSON file of held-out questions (data/knowledge_eval.json for the demo; rows
`{question, answer, subject, value, kind, distractors}`) is scored by the lm-eval task in
tunepipe/assets/lm_eval/tunepipe_facts.yaml: greedy generation with the model's chat template, and an answer counts
when it names the right subject and the right value and none of the distractors (other subjects, other values of the
attribute). One task per `kind` (where the fact was taught: `sft` rows, `dpo` pairs, or only the `cpt` text), named
`tunepipe_facts_<kind>`, run through `lm_eval.simple_evaluate` on an HFLM wrapped around the already-loaded model.
Standard lm-eval tasks can be added by name (`evaluate.lm_eval_tasks`) on a machine that can download them.

Forgetting. Each stage's own held-out skill (cpt: perplexity; sft: sft_loss and fact accuracy on sft-taught facts;
dpo: preference accuracy), re-measured on every later model: `forgetting.<skill>.<model>` is the ratio (losses,
perplexity: later / own stage, > 1 = forgot) or the drop (accuracies: own stage - later, > 0 = forgot).

Nothing here depends on time, paths or hosts: the numbers go to metrics/evaluate.json as they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunepipe.metric_keys import SKILLS

log = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parents[1] / "assets" / "lm_eval"
TASK_YAML = TASK_DIR / "tunepipe_facts.yaml"
TASK = "tunepipe_facts"
METRIC = "fact_exact_match"

def read_questions(path: str | Path) -> list[dict[str, Any]]:
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    required = {"question", "subject", "value", "kind"}
    for i, row in enumerate(rows):
        missing = required - set(row)
        if missing:
            from tunepipe.errors import ConfigError

            raise ConfigError(f"row {i}: missing {sorted(missing)} (need question, subject, value, kind)",
                              file=str(path))
    return rows


def kinds(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The `kind` values in order of first appearance, with the stage order first (sft, dpo, cpt)."""
    seen = list(dict.fromkeys(str(r["kind"]) for r in rows))
    order = {k: n for n, k in enumerate(("sft", "dpo", "kto", "cpt"))}
    return sorted(seen, key=lambda k: (order.get(k, len(order)), seen.index(k)))


def task_configs(data_file: str | Path, kind_names: Sequence[str], *, max_new_tokens: int) -> list[dict[str, Any]]:
    """One lm-eval task config per kind: the shipped YAML with the data file filled in and the rows filtered."""
    from lm_eval.tasks._yaml_loader import load_yaml

    base = load_yaml(TASK_YAML)
    configs = []
    for kind in kind_names:
        config = dict(base)
        config["task"] = f"{TASK}_{kind}"
        config["dataset_kwargs"] = {"data_files": {"test": str(Path(data_file).resolve())}}
        config["process_docs"] = _only(kind)
        config["generation_kwargs"] = {**base["generation_kwargs"], "max_gen_toks": max_new_tokens}
        configs.append(config)
    return configs


def _only(kind: str):
    def process_docs(dataset):
        return dataset.filter(lambda doc: doc["kind"] == kind)

    return process_docs


def run_lm_eval(model: Any, tokenizer: Any, tasks: Sequence[str | dict[str, Any]], *, batch_size: int = 32,
                limit: int | None = None, include_defaults: bool = False) -> dict[str, Any]:
    """lm_eval.simple_evaluate on an HFLM around the loaded model (chat template applied, greedy, no cache)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults)
    datasets.disable_progress_bars()  # "Generating test split" / "Filter" bars for every task and model
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, apply_chat_template=True,
                                       log_samples=True, limit=limit, bootstrap_iters=0, verbosity="ERROR")
    finally:
        quiet.setLevel(level)


def fact_accuracy(model: Any, tokenizer: Any, data_file: str | Path, *, max_new_tokens: int = 48,
                  batch_size: int = 32, limit: int | None = None, num_samples: int = 2,
                  extra_tasks: Sequence[str] = ()) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, samples) of one model: `fact_accuracy_<kind>` per kind, `fact_accuracy` over all questions,
    `fact_subject_named` / `fact_value_named` (all questions), `fact_questions`; plus `lmeval_<task>_<metric>` for
    every number of each extra lm-eval task. Samples: the first `num_samples` questions of every kind."""
    rows = read_questions(data_file)
    names = kinds(rows)
    configs = task_configs(data_file, names, max_new_tokens=max_new_tokens)
    out = run_lm_eval(model, tokenizer, [*configs, *extra_tasks], batch_size=batch_size, limit=limit,
                      include_defaults=bool(extra_tasks))
    results, logged = out["results"], out.get("samples") or {}
    metrics: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    totals = {METRIC: 0.0, "subject_named": 0.0, "value_named": 0.0}
    n_all = 0
    for kind in names:
        task = f"{TASK}_{kind}"
        rows_scored = logged.get(task, [])
        n = len(rows_scored)
        metrics[f"fact_accuracy_{kind}"] = float(results[task][f"{METRIC},none"])
        for key in totals:
            totals[key] += float(results[task][f"{key},none"]) * n
        n_all += n
        for entry in sorted(rows_scored, key=lambda e: e["doc_id"])[:num_samples]:
            doc = entry["doc"]
            samples.append({"kind": kind, "question": doc["question"], "output": _response(entry),
                            "reference": doc.get("answer", doc["value"]), "correct": bool(entry[METRIC])})
    if n_all:
        metrics["fact_accuracy"] = totals[METRIC] / n_all
        metrics["fact_subject_named"] = totals["subject_named"] / n_all
        metrics["fact_value_named"] = totals["value_named"] / n_all
    metrics["fact_questions"] = float(n_all)
    for task in extra_tasks:
        for key, value in (results.get(task) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key:
                metrics[f"lmeval_{task}_{key.split(',')[0]}"] = float(value)
    return metrics, samples


def lm_eval_numbers(model: Any, tokenizer: Any, tasks: Sequence[str], *, batch_size: int = 32) -> dict[str, float]:
    """Standard lm-eval tasks by name (no fact questions): `lmeval_<task>_<metric>` for every number."""
    out = run_lm_eval(model, tokenizer, list(tasks), batch_size=batch_size, include_defaults=True)
    return {f"lmeval_{task}_{key.split(',')[0]}": float(value) for task in tasks
            for key, value in (out["results"].get(task) or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key}


def _response(entry: Mapping[str, Any]) -> str:
    resp = entry.get("filtered_resps") or entry.get("resps") or [""]
    while isinstance(resp, list):
        resp = resp[0] if resp else ""
    return str(resp)


# ---------------------------------------------------------------------------------------------------------------
# Forgetting


def forgetting(sections: Mapping[str, Mapping[str, float]], order: Sequence[str],
               skills: Sequence[tuple[str, str, bool]] = SKILLS) -> dict[str, dict[str, float]]:
    """Each enabled stage's own skill re-measured on every later model (`order`: model names in pipeline order,
    base first). Ratios for lower-is-better metrics (later / own), drops for accuracies (own - later); the last
    model is also reported as `final`."""
    out: dict[str, dict[str, float]] = {}
    for stage, key, higher in skills:
        if stage not in order or key not in sections.get(stage, {}):
            continue
        own = sections[stage][key]
        later = order[order.index(stage) + 1:]
        values: dict[str, float] = {}
        for name in later:
            value = sections.get(name, {}).get(key)
            if value is None or not math.isfinite(own):
                continue
            if higher:
                values[name] = own - value
            elif own > 0:
                values[name] = value / own
        if values:
            values["final"] = values[later[-1]] if later[-1] in values else math.nan
            out[f"{key}_{'drop' if higher else 'ratio'}"] = values
    return out


# ---------------------------------------------------------------------------------------------------------------
# No-regression gates
