"""Held-out evaluation of the base model and every stage's merged model: one metrics dict DVC can diff.

Every number is computed on the stages' eval datasets exactly as they were tokenized for training
(outputs/data/<stage>/eval), and every model is scored with the same code, so base -> cpt -> sft -> dpo is a fair
comparison:

- `perplexity` / `cpt_loss`: token-weighted over the CPT held-out blocks (exp of the summed NLL / label tokens);
- `sft_loss`: mean NLL per label token (answer tokens only) of the SFT held-out set, token-weighted;
- `predict_bleu-4`, `predict_rouge-1/2/l`: greedy generation for the SFT held-out prompts (processed as
  LLaMA-Factory's unsupervised/predict set), stopped by the template's stop ids, decoded with
  `skip_special_tokens`, scored by `tunepipe.metrics.similarity_scores` (LLaMA-Factory's ComputeSimilarity);
- `pref_accuracy` / `pref_logp_margin`: share of held-out DPO pairs whose chosen answer has the higher summed
  log-probability, and the mean difference (every model);
- `reward_accuracy` / `reward_margin` / `reward_chosen` / `reward_rejected`: the preference stage's DPO implicit
  reward beta * (log pi(y|x) - log pi_ref(y|x)) with pi_ref = that stage's input model (the SFT model);
  for KTO (held-out desirable/undesirable examples) accuracy = share whose reward has the sign of its label,
  margin = mean desirable reward - mean undesirable reward.

The core primitive is `label_logps`: per sequence, the summed log-probability of its label tokens (labels shifted
by one, IGNORE_INDEX skipped) and their count — perplexity, loss and preference log-ratios all come from it.
Batches are length-sorted and right-padded for scoring, left-padded for generation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunepipe.config import PREFERENCE_STAGES
from tunepipe.evaluation import similarity as M
from tunepipe.data.processors import IGNORE_INDEX

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Scoring primitives


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding); every index exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def label_logps(model: Any, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], *,
                batch_size: int = 16, pad_id: int = 0) -> tuple[list[float], list[int]]:
    """Per sequence: (sum of log p(label_t | tokens < t) over its label tokens, number of label tokens).

    `labels` are aligned with `input_ids` the Hugging Face way (the model predicts labels[t] from tokens < t, so
    the first position is never scored); IGNORE_INDEX positions are skipped. Computed in fp32."""
    import torch

    if len(input_ids) != len(labels):
        raise ValueError(f"label_logps: {len(input_ids)} sequences but {len(labels)} label rows")
    device = next(model.parameters()).device
    sums, counts = [0.0] * len(input_ids), [0] * len(input_ids)
    with torch.inference_mode():
        for batch in _length_batches([len(x) for x in input_ids], batch_size):
            width = max(len(input_ids[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            lab = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(input_ids[i])
                ids[row, :n] = torch.tensor(list(input_ids[i]))
                lab[row, :n] = torch.tensor(list(labels[i]))
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            target = lab[:, 1:].to(device)
            valid = target != IGNORE_INDEX
            token_logp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            batch_sums = (token_logp * valid).sum(-1).tolist()
            batch_counts = valid.sum(-1).tolist()
            for row, i in enumerate(batch):
                sums[i], counts[i] = float(batch_sums[row]), int(batch_counts[row])
    return sums, counts


def lm_loss(sums: Sequence[float], counts: Sequence[int]) -> dict[str, float]:
    """Token-weighted mean NLL and perplexity from per-sequence (sum logp, tokens)."""
    n = int(sum(counts))
    nll = -float(sum(sums))
    return {"loss": nll / n, "perplexity": M.perplexity(nll, n), "tokens": n}


def dpo_rewards(policy_chosen: Sequence[float], policy_rejected: Sequence[float], ref_chosen: Sequence[float],
                ref_rejected: Sequence[float], beta: float) -> dict[str, float]:
    """DPO implicit rewards r = beta * (logp_policy - logp_ref): accuracy (chosen > rejected, strictly, as TRL),
    mean margin and the mean chosen / rejected rewards."""
    chosen = [beta * (p - r) for p, r in zip(policy_chosen, ref_chosen, strict=True)]
    rejected = [beta * (p - r) for p, r in zip(policy_rejected, ref_rejected, strict=True)]
    scores = M.reward_accuracy(chosen, rejected)
    return {"reward_accuracy": scores["accuracy"], "reward_margin": scores["margin"],
            "reward_chosen": sum(chosen) / len(chosen), "reward_rejected": sum(rejected) / len(rejected)}


def kto_rewards(policy: Sequence[float], ref: Sequence[float], tags: Sequence[bool], beta: float) -> dict[str, float]:
    """KTO held-out rewards r = beta * (logp_policy - logp_ref): accuracy = share with r > 0 for desirable and
    r < 0 for undesirable examples; margin = mean desirable r - mean undesirable r (0 for a missing class)."""
    rewards = [beta * (p - r) for p, r in zip(policy, ref, strict=True)]
    if not rewards:
        raise ValueError("kto_rewards needs at least one example")
    good = [r for r, t in zip(rewards, tags) if t]
    bad = [r for r, t in zip(rewards, tags) if not t]
    accuracy = sum((r > 0) if t else (r < 0) for r, t in zip(rewards, tags)) / len(rewards)
    mean_good = sum(good) / len(good) if good else 0.0
    mean_bad = sum(bad) / len(bad) if bad else 0.0
    return {"reward_accuracy": accuracy, "reward_margin": mean_good - mean_bad, "reward_chosen": mean_good,
            "reward_rejected": mean_bad}


# ---------------------------------------------------------------------------------------------------------------
# Generation


def generate(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int],
             pad_id: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations (new tokens only, cut after the first stop token, which is kept), in input order.
    Left-padded batches of similar length, as LLaMA-Factory's predict does."""
    import torch

    device = next(model.parameters()).device
    eos_ids = list(eos_ids)
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        for batch in _length_batches([len(p) for p in prompts], batch_size):
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(prompts[i])
                ids[row, width - n:] = torch.tensor(list(prompts[i]))
                mask[row, width - n:] = 1
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                                       temperature=None, top_p=None, top_k=None)
            for row, i in enumerate(batch):
                new = generated[row, width:].tolist()
                stop = next((k for k, t in enumerate(new) if t in eos_ids), None)
                out[i] = new if stop is None else new[: stop + 1]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class EvalData:
    """Held-out feature columns (as prepare-<stage> wrote them), each capped to max_eval_samples rows.

    lm: pt blocks (input_ids, labels); sft: supervised (input_ids, labels); prompts: the SFT eval set processed as
    "unsupervised" (input_ids = prompt, labels = reference answer ids); pairs: dpo columns; feedback: kto columns.
    """

    lm: dict[str, list] | None = None
    sft: dict[str, list] | None = None
    prompts: dict[str, list] | None = None
    pairs: dict[str, list] | None = None
    feedback: dict[str, list] | None = None


@dataclass
class EvalSettings:
    max_new_tokens: int = 48
    num_samples: int = 3
    batch_size: int = 16  # scoring batches
    gen_batch_size: int = 32  # generation batches (fewer decoding steps; CPU time halves from 8 to 32)
    pref_stage: str | None = None  # "dpo" or "kto": its model also gets implicit-reward metrics (reference:
    # the model `inputs[pref_stage]` names, i.e. the stage's input model)
    beta: float = 0.1


@dataclass
class ModelScores:
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    logps: dict[str, list[float]] = field(default_factory=dict)  # kept for the reference of the next model


def cap(columns: dict[str, list] | None, limit: int | None) -> dict[str, list] | None:
    if columns is None or limit is None:
        return columns
    return {key: values[:limit] for key, values in columns.items()}


def score_model(model: Any, tokenizer: Any, data: EvalData, settings: EvalSettings, *, eos_ids: Sequence[int],
                name: str = "", reference: ModelScores | None = None) -> ModelScores:
    """Every metric of one model. `reference`: the scores of the preference stage's input model (needed when
    `name == settings.pref_stage`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    bs = settings.batch_size
    scores = ModelScores()
    m = scores.metrics
    if data.lm is not None and data.lm["input_ids"]:
        lm = lm_loss(*label_logps(model, data.lm["input_ids"], data.lm["labels"], batch_size=bs, pad_id=pad))
        m["perplexity"], m["cpt_loss"] = lm["perplexity"], lm["loss"]
    if data.sft is not None and data.sft["input_ids"]:
        m["sft_loss"] = lm_loss(*label_logps(model, data.sft["input_ids"], data.sft["labels"], batch_size=bs,
                                             pad_id=pad))["loss"]
    if data.prompts is not None and data.prompts["input_ids"]:
        outputs = generate(model, data.prompts["input_ids"], max_new_tokens=settings.max_new_tokens,
                           eos_ids=eos_ids, pad_id=pad, batch_size=settings.gen_batch_size)
        preds = tokenizer.batch_decode(outputs, skip_special_tokens=True)
        refs = tokenizer.batch_decode(data.prompts["labels"], skip_special_tokens=True)
        m.update(M.similarity_scores(preds, refs))
        m["gen_stopped"] = sum(bool(o) and o[-1] in eos_ids for o in outputs) / len(outputs)
        m["gen_tokens"] = sum(len(o) for o in outputs) / len(outputs)
        scores.samples = [{"prompt": tokenizer.decode(data.prompts["input_ids"][i]), "output": preds[i],
                           "reference": refs[i]} for i in range(min(settings.num_samples, len(preds)))]
    if data.pairs is not None and data.pairs["chosen_input_ids"]:
        n = len(data.pairs["chosen_input_ids"])
        sums, _ = label_logps(model, data.pairs["chosen_input_ids"] + data.pairs["rejected_input_ids"],
                              data.pairs["chosen_labels"] + data.pairs["rejected_labels"], batch_size=bs, pad_id=pad)
        scores.logps["chosen"], scores.logps["rejected"] = sums[:n], sums[n:]
        likelihood = M.reward_accuracy(sums[:n], sums[n:])
        m["pref_accuracy"], m["pref_logp_margin"] = likelihood["accuracy"], likelihood["margin"]
    if data.feedback is not None and data.feedback["input_ids"]:
        scores.logps["feedback"], _ = label_logps(model, data.feedback["input_ids"], data.feedback["labels"],
                                                  batch_size=bs, pad_id=pad)
    if name and name == settings.pref_stage:
        if reference is None:
            raise ValueError(f"{name}: the reference model's scores are needed for reward metrics")
        if settings.pref_stage == "kto" and "feedback" in scores.logps:
            m.update(kto_rewards(scores.logps["feedback"], reference.logps["feedback"], data.feedback["kto_tags"],
                                 settings.beta))
        elif "chosen" in scores.logps:
            m.update(dpo_rewards(scores.logps["chosen"], scores.logps["rejected"], reference.logps["chosen"],
                                 reference.logps["rejected"], settings.beta))
    return scores


def learning_checks(sections: dict[str, dict[str, float]], inputs: dict[str, str]) -> dict[str, float]:
    """Did each stage learn what it trains? `inputs`: stage -> the model it started from (e.g. sft -> cpt)."""
    checks: dict[str, float] = {}

    def reduction(stage: str, key: str, out: str) -> None:
        before, after = sections.get(inputs.get(stage, ""), {}).get(key), sections.get(stage, {}).get(key)
        if before is not None and after is not None and before > 0 and math.isfinite(before):
            checks[out] = 1.0 - after / before

    reduction("cpt", "perplexity", "cpt_ppl_reduction")
    reduction("sft", "sft_loss", "sft_loss_reduction")
    for stage in PREFERENCE_STAGES:
        before = sections.get(inputs.get(stage, ""), {}).get("pref_accuracy")
        after = sections.get(stage, {}).get("pref_accuracy")
        if before is not None and after is not None:
            checks[f"{stage}_pref_accuracy_gain"] = after - before
    return checks


def evaluate(models: dict[str, Any], tokenizer: Any, data: EvalData, settings: EvalSettings, *,
             eos_ids: Sequence[int], inputs: dict[str, str],
             load: Callable[[Any], Any] | None = None) -> tuple[dict[str, Any], dict[str, list]]:
    """Score every model (name -> model or path, in pipeline order: base first) one at a time.

    Returns (metrics, samples): metrics = {name: {...}, "final": the last model's section, "checks": learning
    checks, "counts": examples scored}; samples = {name: [{"prompt", "output", "reference"}, ...]}.
    `load(path)` loads a model (default: fp32 AutoModelForCausalLM on CPU/GPU); `inputs` maps each stage to the
    model it started from (the preference stage's reference)."""
    import time

    load = load or load_model
    sections: dict[str, dict[str, float]] = {}
    samples: dict[str, list] = {}
    scored: dict[str, ModelScores] = {}
    for name, source in models.items():
        start = time.perf_counter()
        model = load(source) if isinstance(source, str) else source
        ref = scored.get(inputs.get(name, "")) if name == settings.pref_stage else None
        result = score_model(model, tokenizer, data, settings, eos_ids=eos_ids, name=name, reference=ref)
        scored[name] = result
        sections[name], samples[name] = result.metrics, result.samples
        del model
        log.info("evaluate %s: %s (%.1fs)", name, ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()),
                 time.perf_counter() - start)
    last = list(models)[-1]
    out: dict[str, Any] = dict(sections)
    out["final"] = dict(sections[last])
    out["checks"] = learning_checks(sections, inputs)
    counts = {}
    for key, columns, column in (("lm_blocks", data.lm, "input_ids"), ("sft_examples", data.sft, "input_ids"),
                                 ("generation_prompts", data.prompts, "input_ids"),
                                 ("pref_pairs", data.pairs, "chosen_input_ids"),
                                 ("kto_examples", data.feedback, "input_ids")):
        if columns is not None:
            counts[key] = len(columns[column])
    out["counts"] = counts
    return out, samples


def load_model(path: str, *, trust_remote_code: bool = False, flash_attn: str = "auto", liger: bool = False) -> Any:
    """fp32 on CPU (exact, small models); the checkpoint's dtype on a GPU, moved there; the attention kernel and
    Liger kernels of params' flash_attn / enable_liger_kernel (checked before loading)."""
    import torch

    from tunepipe.models.loading import attention_implementation, check_liger, load_causal_lm

    check_liger(liger)
    return load_causal_lm(path, trust_remote_code=trust_remote_code, attn_implementation=attention_implementation(
        flash_attn), liger=liger).to("cuda" if torch.cuda.is_available() else "cpu")
