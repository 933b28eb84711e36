"""Scoring of the tunepipe_facts lm-eval task (imported by lm_eval through `!function facts_utils.process_results`;
tunepipe.evaluation.knowledge imports it too). Pure Python: no torch, no lm_eval."""

from __future__ import annotations

import re


def mentions(text: str, phrase: str) -> bool:
    """`phrase` occurs in `text` as whole words (case-sensitive: names and values are written as in the data)."""
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text) is not None


def score(prediction: str, subject: str, value: str, distractors: list[str]) -> dict[str, int]:
    """fact_exact_match = the answer names the right subject and the right value and none of the distractors (other
    subjects, other values of the attribute)."""
    subject_ok = mentions(prediction, subject)
    value_ok = mentions(prediction, value)
    wrong = any(mentions(prediction, d) for d in distractors if d not in (subject, value)
                and not mentions(value, d) and not mentions(subject, d))
    return {"fact_exact_match": int(subject_ok and value_ok and not wrong), "subject_named": int(subject_ok),
            "value_named": int(value_ok)}


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    return score(results[0], doc["subject"], doc["value"], list(doc.get("distractors") or []))
