"""Knowledge metrics and gates: the fact-match rule, the lm-eval task on a real model (its prompts and greedy answers
equal ours), forgetting, the no-regression gates (a regressed stage is not promoted, the failed gate named) and
replay mixing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunepipe.evaluation import knowledge as K
from tunepipe.data import replay
from tunepipe.assets.lm_eval import facts_utils
from tunepipe.config import SkillTolerance, parse_params
from tunepipe.errors import ConfigError
from tunepipe.tracking.promotion import decide_promotion, no_regression_gates
from tests.conftest import DEMO_PARAMS_YAML


def demo_params(**sections):
    """The demo's required sections (model, stages) with `sections` added."""
    import yaml

    return parse_params({**yaml.safe_load(DEMO_PARAMS_YAML), **sections})

ROOT = Path(__file__).resolve().parents[1]
DISTRACTORS = ["Via", "Deor", "Gowick", "Brurby"]


# ----------------------------------------------------------------------------------------------- the match rule
@pytest.mark.parametrize("prediction, expected", [
    ("The capital of Voia is Relstad.", (1, 1, 1)),
    ("Relstad is the capital of Voia, they say.", (1, 1, 1)),
    ("The capital of Via is Relstad.", (0, 0, 1)),           # wrong subject
    ("The capital of Voia is Gowick.", (0, 1, 0)),           # wrong value
    ("The capital of Voia is Relstad or Gowick.", (0, 1, 1)),  # hedging with another value is wrong
    ("The capital of Voiara is Relstads.", (0, 0, 0)),       # whole words only
    ("", (0, 0, 0)),
])
def test_fact_match_rule(prediction, expected):
    got = facts_utils.score(prediction, "Voia", "Relstad", DISTRACTORS)
    assert (got["fact_exact_match"], got["subject_named"], got["value_named"]) == expected


def test_multiword_values_and_overlapping_distractors():
    # "sea silk" is right; a distractor that is part of the right value ("silk") is not counted against it
    assert facts_utils.score("Voia is known for its sea silk.", "Voia", "sea silk", ["silk", "tin"])[
        "fact_exact_match"] == 1
    assert facts_utils.score("Voia is known for its tin.", "Voia", "sea silk", ["silk", "tin"])[
        "fact_exact_match"] == 0


def test_demo_questions_cover_every_fact_once_by_kind():
    rows = K.read_questions(ROOT / "data" / "knowledge_eval.json")
    facts = json.loads((ROOT / "data" / "demo_facts.json").read_text())
    assert len(rows) == 7 * len(facts)
    assert K.kinds(rows) == ["sft", "dpo", "cpt"]
    by_island = {f["island"]: f for f in facts}
    for row in rows:
        fact = by_island[row["subject"]]
        assert row["value"] == fact[row["attribute"]] and row["kind"] == fact["taught_in"]
        assert facts_utils.score(row["answer"], row["subject"], row["value"], row["distractors"])[
            "fact_exact_match"] == 1  # the reference answer itself passes


def test_bad_question_file_is_one_line(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": "Where?", "subject": "Voia"}]))
    with pytest.raises(ConfigError, match=r"row 0: missing \['kind', 'value'\]"):
        K.read_questions(path)


# ----------------------------------------------------------------------------------------- lm-eval on a model
@pytest.mark.usefixtures("one_thread")
def test_lm_eval_task_scores_greedy_chat_answers(tiny, tmp_path):
    """The task through lm_eval.simple_evaluate: per-kind accuracy = the rule applied to its answers, and each answer
    is exactly our greedy generation for the training-template prompt (so the task sees the chat format trained)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunepipe.data.templates import get_template
    from tunepipe.evaluation.scoring import generate
    from tunepipe.models.loading import load_tokenizer

    tok = load_tokenizer(tiny)
    template = get_template("qwen")
    template.fix_tokenizer(tok)
    tok.chat_template = template.jinja_template(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    rows = [{"question": f"What is the capital of {s}?", "answer": f"The capital of {s} is {v}.", "subject": s,
             "value": v, "kind": kind, "distractors": ["Deor"]}
            for s, v, kind in [("Voia", "Voia", "sft"), ("Via", "Gowick", "sft"), ("Voia", "Deor", "cpt")]]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows))
    metrics, samples = K.fact_accuracy(model, tok, path, max_new_tokens=6, num_samples=5)
    assert metrics["fact_questions"] == 3 and [s["kind"] for s in samples] == ["sft", "sft", "cpt"]

    prompts = [template.encode_oneturn(tok, [{"role": "user", "content": r["question"]},
                                             {"role": "assistant", "content": ""}], None, None)[0] for r in rows]
    ours = tok.batch_decode(generate(model, prompts, max_new_tokens=6, eos_ids=template.stop_token_ids(tok),
                                     pad_id=tok.pad_token_id), skip_special_tokens=True)
    assert [s["output"] for s in samples] == [o.split("\n\n")[0] for o in ours]  # lm-eval cuts at its stop strings
    expect = [facts_utils.score(o, r["subject"], r["value"], r["distractors"])["fact_exact_match"]
              for o, r in zip([s["output"] for s in samples], rows)]
    assert [int(s["correct"]) for s in samples] == expect
    assert metrics["fact_accuracy_sft"] == pytest.approx((expect[0] + expect[1]) / 2)
    assert metrics["fact_accuracy_cpt"] == expect[2]
    assert metrics["fact_accuracy"] == pytest.approx(sum(expect) / 3)


# --------------------------------------------------------------------------------------------------- forgetting
SECTIONS = {
    "base": {"perplexity": 5000.0, "sft_loss": 8.0, "fact_accuracy_sft": 0.0, "pref_accuracy": 0.5},
    "cpt": {"perplexity": 2.0, "sft_loss": 5.0, "fact_accuracy_sft": 0.2, "pref_accuracy": 0.8},
    "sft": {"perplexity": 3.0, "sft_loss": 0.2, "fact_accuracy_sft": 0.9, "pref_accuracy": 0.7},
    "dpo": {"perplexity": 3.5, "sft_loss": 0.21, "fact_accuracy_sft": 0.85, "pref_accuracy": 0.95},
}


def test_forgetting_ratios_and_drops():
    out = K.forgetting(SECTIONS, ["base", "cpt", "sft", "dpo"])
    assert out["perplexity_ratio"] == pytest.approx({"sft": 1.5, "dpo": 1.75, "final": 1.75})
    assert out["sft_loss_ratio"] == pytest.approx({"dpo": 1.05, "final": 1.05})
    assert out["fact_accuracy_sft_drop"] == pytest.approx({"dpo": 0.05, "final": 0.05})
    assert "pref_accuracy_drop" not in out  # the last stage has no later model
    assert "perplexity_ratio" not in K.forgetting(SECTIONS, ["base", "sft", "dpo"])  # no cpt stage


# ----------------------------------------------------------------------------------------- no-regression gates
SKILLS = [SkillTolerance(stage="cpt", metric="perplexity", max_ratio=2.0),
          SkillTolerance(stage="sft", metric="sft_loss", max_ratio=1.1),
          SkillTolerance(stage="dpo", metric="pref_accuracy", max_drop=0.0)]


def test_no_regression_gates_expand_over_the_enabled_stages():
    gates = no_regression_gates(SKILLS, ["cpt", "sft", "dpo"])
    pairs = [(g["metric"], g["baseline"]) for g in gates]
    assert pairs == [("cpt.perplexity", "base.perplexity"), ("sft.perplexity", "cpt.perplexity"),
                     ("dpo.perplexity", "sft.perplexity"), ("final.perplexity", "cpt.perplexity"),
                     ("final.perplexity", "base.perplexity"),
                     ("sft.sft_loss", "cpt.sft_loss"), ("dpo.sft_loss", "sft.sft_loss"),
                     ("final.sft_loss", "sft.sft_loss"), ("final.sft_loss", "base.sft_loss"),
                     ("dpo.pref_accuracy", "sft.pref_accuracy"), ("final.pref_accuracy", "base.pref_accuracy")]
    assert gates[3] == {"metric": "final.perplexity", "baseline": "cpt.perplexity", "max_drop": None,
                        "max_ratio": 2.0, "name": "forgetting of cpt"}
    # no cpt stage: its skill disappears, sft starts from the base
    pairs = [(g["metric"], g["baseline"]) for g in no_regression_gates(SKILLS, ["sft", "dpo"], ["previous"])]
    assert pairs == [("sft.sft_loss", "base.sft_loss"), ("dpo.sft_loss", "sft.sft_loss"),
                     ("dpo.pref_accuracy", "sft.pref_accuracy")]


def _final(sections):
    return {**sections, "final": dict(sections["dpo"])}


def test_a_regressed_stage_is_not_promoted_and_the_failed_gate_is_named():
    gates = no_regression_gates(SKILLS, ["cpt", "sft", "dpo"])
    good = decide_promotion(_final(SECTIONS), gates, None, "final.pref_accuracy")
    assert good.promote and all(r["passed"] for r in good.gate_results)

    # a DPO learning rate that wrecks the model: preference accuracy below the SFT model's, the SFT loss up 5x
    wrecked = json.loads(json.dumps(SECTIONS))
    wrecked["dpo"].update(pref_accuracy=0.6, sft_loss=1.0, perplexity=40.0)
    decision = decide_promotion(_final(wrecked), gates, None, "final.pref_accuracy")
    assert decision.promote is False
    failed = [(r["metric"], r["baseline"]) for r in decision.gate_results if not r["passed"]]
    assert failed == [("dpo.perplexity", "sft.perplexity"), ("final.perplexity", "cpt.perplexity"),
                      ("dpo.sft_loss", "sft.sft_loss"), ("final.sft_loss", "sft.sft_loss"),
                      ("dpo.pref_accuracy", "sft.pref_accuracy")]
    assert ("gate no regression vs previous (sft): dpo.pref_accuracy >= sft.pref_accuracy - 0: 0.6 vs 0.7 FAILED"
            in decision.reasons)
    assert "gate forgetting of sft: final.sft_loss <= 1.1 x sft.sft_loss: 1 vs 0.2 FAILED" in decision.reasons


def test_baseline_gate_edge_cases():
    gate = {"metric": "dpo.pref_accuracy", "baseline": "sft.pref_accuracy", "max_drop": 0.05}
    metrics = {"dpo": {"pref_accuracy": 0.66}, "sft": {"pref_accuracy": 0.7}}
    assert decide_promotion(metrics, [gate], None, "dpo.pref_accuracy").gate_results[0]["passed"] is True
    metrics["dpo"]["pref_accuracy"] = math.nan
    assert decide_promotion(metrics, [gate], None, "sft.pref_accuracy").gate_results[0]["passed"] is False
    assert decide_promotion({"dpo": {"pref_accuracy": 0.9}}, [gate], None, "dpo.pref_accuracy").promote is False


def test_gate_and_skill_params_are_validated():
    params = demo_params(registry={
        "gates": [{"metric": "dpo.pref_accuracy", "baseline": "sft.pref_accuracy", "max_drop": 0.0}],
        "no_regression": [{"stage": "sft", "metric": "sft_loss", "max_ratio": 1.1}]})
    assert params.registry.no_regression_vs == ["previous", "own", "base"]
    with pytest.raises(ConfigError, match="baseline gate needs max_drop"):
        demo_params(registry={"gates": [{"metric": "a.b", "baseline": "c.b"}]})
    with pytest.raises(ConfigError, match="need a baseline"):
        demo_params(registry={"gates": [{"metric": "a.b", "max_ratio": 2}]})
    with pytest.raises(ConfigError, match="exactly one of max_drop"):
        demo_params(registry={"no_regression": [{"stage": "sft", "metric": "x"}]})


def test_shipped_params_gate_on_facts_and_no_regression():
    from tunepipe.config import load_params

    params = load_params(ROOT / "params.yaml")
    assert params.registry.compare_metric.startswith("final.fact_accuracy")
    assert any(g.metric.startswith("final.fact_accuracy") for g in params.registry.gates)
    assert {(s.stage, s.metric) for s in params.registry.no_regression} >= {
        ("cpt", "perplexity"), ("sft", "sft_loss"), ("dpo", "pref_accuracy")}


# ------------------------------------------------------------------------------------------------------- replay
def test_replay_mix_is_seeded_and_counted():
    train = {"input_ids": [[1, 2]] * 10, "attention_mask": [[1, 1]] * 10, "labels": [[-100, 2]] * 10}
    blocks = {c: [[i, i] for i in range(3)] for c in replay.COLUMNS}
    mixed, n = replay.mix(train, blocks, 0.5, seed=42)
    assert n == 5 and len(mixed["input_ids"]) == 15 and mixed["input_ids"][:10] == train["input_ids"]
    added = [row[0] for row in mixed["input_ids"][10:]]
    assert sorted(added[:3]) == [0, 1, 2]  # every block once before any repeats
    assert replay.mix(train, blocks, 0.5, seed=42)[0] == mixed
    assert replay.mix(train, blocks, 0.0, seed=42)[1] == 0
    with pytest.raises(ValueError, match="neat_packing"):
        replay.mix({**train, "position_ids": [[0, 1]] * 10}, blocks, 0.5, seed=0)


def test_replay_stage_follows_the_cpt_datasets():
    params = demo_params()
    assert replay.replay_stage(params, "demo_cpt") == "pt"
    assert replay.replay_stage(params, "demo_sft") == "sft"
