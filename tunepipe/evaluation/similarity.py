"""Evaluation metrics: perplexity, LLaMA-Factory-identical BLEU-4 / ROUGE, preference reward accuracy.

`similarity_scores` reproduces LLaMA-Factory 0.9.5's `ComputeSimilarity` (train/sft/metric.py) number for number:
jieba default-mode segmentation for every language, `rouge_chinese` F-scores, character-level sentence BLEU with
nltk's method3 smoothing, every score x100 and rounded to 4 decimals per example, then averaged.

jieba, nltk and rouge_chinese are imported inside the functions: importing them costs CLI startup time and jieba
loads its dictionary (and logs to stderr) on first use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

SIMILARITY_KEYS = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")


def _jieba():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)  # "Building prefix dict ..." otherwise goes to stderr on first cut
    return jieba


def similarity_example(pred: str, label: str) -> dict[str, float]:
    """Scores of one (prediction, reference) pair, x100 and rounded to 4 decimals, keyed like LF's metrics."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba = _jieba()
    hypothesis = list(jieba.cut(pred))
    reference = list(jieba.cut(label))

    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        rouge = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        rouge = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]

    scores = {f"predict_{k}": round(v["f"] * 100, 4) for k, v in rouge.items()}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    scores["predict_bleu-4"] = round(bleu * 100, 4)
    return scores


def similarity_scores(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Mean BLEU-4 / ROUGE-1/2/L over examples, exactly as LLaMA-Factory reports them for `predict_with_generate`.

    Returns {} for no examples (LF would produce NaN means; an empty dict is easier to diff and to gate on).
    """
    if len(preds) != len(labels):
        raise ValueError(f"similarity_scores: {len(preds)} predictions but {len(labels)} labels")
    if not preds:
        return {}
    import numpy as np

    per_example = [similarity_example(pred, label) for pred, label in zip(preds, labels)]
    # np.mean, as LF does, so the last bits of the float match too
    return {key: float(np.mean([scores[key] for scores in per_example])) for key in SIMILARITY_KEYS}


def perplexity(sum_nll: float, n_tokens: int) -> float:
    """exp(token-weighted mean negative log-likelihood). `sum_nll` is in nats, summed over `n_tokens` tokens."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    mean = sum_nll / n_tokens
    return math.exp(mean) if mean < 700 else math.inf


def perplexity_from_losses(losses: Iterable[tuple[float, int]]) -> dict[str, float]:
    """Token-weighted perplexity from per-batch (mean_loss, n_tokens) pairs.

    Averaging batch losses directly is wrong when batches hold different numbers of label tokens; this weights each
    batch mean by its token count. Returns {"loss": mean NLL per token, "perplexity": exp(loss), "tokens": n}.
    """
    sum_nll, n_tokens = 0.0, 0
    for mean_loss, n in losses:
        sum_nll += float(mean_loss) * int(n)
        n_tokens += int(n)
    ppl = perplexity(sum_nll, n_tokens)
    return {"loss": sum_nll / n_tokens, "perplexity": ppl, "tokens": n_tokens}


def reward_accuracy(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float]) -> dict[str, float]:
    """Preference accuracy (share of pairs with chosen > rejected, strictly, like TRL) and mean reward margin."""
    if len(chosen_rewards) != len(rejected_rewards):
        raise ValueError(
            f"reward_accuracy: {len(chosen_rewards)} chosen but {len(rejected_rewards)} rejected rewards"
        )
    if not chosen_rewards:
        raise ValueError("reward_accuracy needs at least one pair")
    pairs = list(zip(map(float, chosen_rewards), map(float, rejected_rewards)))
    accuracy = sum(c > r for c, r in pairs) / len(pairs)
    margin = sum(c - r for c, r in pairs) / len(pairs)
    return {"accuracy": accuracy, "margin": margin}
