"""Held-out evaluation of the base model and every stage's merged model.

    scoring.py     perplexity, SFT loss, generation, preference accuracy and implicit rewards (one metrics dict)
    similarity.py  BLEU-4 / ROUGE exactly as LLaMA-Factory computes them
    knowledge.py   exact-match fact accuracy (an lm-evaluation-harness task over local files) and forgetting
"""
