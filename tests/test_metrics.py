"""tunepipe.evaluation.similarity: LLaMA-Factory-identical BLEU/ROUGE (reference §6 golden table), perplexity,
reward accuracy."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunepipe.evaluation.similarity import (
    SIMILARITY_KEYS,
    perplexity,
    perplexity_from_losses,
    reward_accuracy,
    similarity_example,
    similarity_scores,
)

ROOT = Path(__file__).resolve().parents[1]

# pred, label, rouge-1, rouge-2, rouge-l, bleu-4 (nltk 3.10.4, rouge-chinese 1.0.3, jieba 0.42.1)
GOLDEN = [
    ("hello world", "hello world", 100.0, 100.0, 100.0, 100.0),
    ("The cat sat on the mat.", "The cat is on the mat.", 85.7143, 66.6667, 85.7143, 79.4484),
    ("今天天气很好", "今天天气不错", 40.0, 0.0, 40.0, 50.8133),
    ("", "abc", 0.0, 0.0, 0.0, 0.0),
    ("abc", "abc", 100.0, 0.0, 100.0, 84.0896),
]


@pytest.mark.parametrize(("pred", "label", "r1", "r2", "rl", "bleu"), GOLDEN)
def test_golden_table_per_example(pred, label, r1, r2, rl, bleu):
    scores = similarity_example(pred, label)
    assert scores == {
        "predict_rouge-1": r1,
        "predict_rouge-2": r2,
        "predict_rouge-l": rl,
        "predict_bleu-4": bleu,
    }


def test_golden_table_mean_over_examples():
    preds = [row[0] for row in GOLDEN]
    labels = [row[1] for row in GOLDEN]
    scores = similarity_scores(preds, labels)
    assert set(scores) == set(SIMILARITY_KEYS)
    for key, column in (("predict_rouge-1", 2), ("predict_rouge-2", 3), ("predict_rouge-l", 4),
                        ("predict_bleu-4", 5)):
        expected = sum(row[column] for row in GOLDEN) / len(GOLDEN)
        assert scores[key] == pytest.approx(expected, abs=1e-9)
    assert all(isinstance(v, float) for v in scores.values())


def test_whitespace_only_prediction_scores_zero_rouge():
    scores = similarity_example("   ", "abc")
    assert scores["predict_rouge-1"] == scores["predict_rouge-2"] == scores["predict_rouge-l"] == 0.0


def test_similarity_scores_edge_cases():
    assert similarity_scores([], []) == {}
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        similarity_scores(["a", "b"], ["a"])


def test_perplexity_is_token_weighted():
    # batch means 1.0 over 3 tokens and 2.0 over 1 token: token-weighted mean is 1.25, not 1.5
    result = perplexity_from_losses([(1.0, 3), (2.0, 1)])
    assert result["loss"] == pytest.approx(1.25)
    assert result["perplexity"] == pytest.approx(math.exp(1.25))
    assert result["tokens"] == 4
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(math.log(7.0) * 5, 5) == pytest.approx(7.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    with pytest.raises(ValueError):
        perplexity_from_losses([])


def test_reward_accuracy():
    result = reward_accuracy([1.0, 0.5, -1.0, 2.0], [0.0, 0.5, 0.0, 1.0])
    assert result["accuracy"] == 0.5  # ties do not count as correct (TRL uses chosen > rejected)
    assert result["margin"] == pytest.approx((1.0 + 0.0 - 1.0 + 1.0) / 4)
    with pytest.raises(ValueError):
        reward_accuracy([1.0], [])
    with pytest.raises(ValueError):
        reward_accuracy([], [])


def test_imports_are_lazy_and_jieba_is_silent():
    """Importing the module loads none of jieba/nltk/rouge; first use prints nothing to stderr."""
    code = (
        "import sys, tunepipe.evaluation.similarity as m\n"
        "assert not {'jieba', 'nltk', 'rouge_chinese'} & set(sys.modules), sorted(sys.modules)\n"
        "print(m.similarity_scores(['今天天气很好'], ['今天天气不错'])['predict_rouge-1'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "40.0"
    assert proc.stderr == ""
