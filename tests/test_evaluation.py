"""evaluate: losses and perplexity equal a torch CrossEntropy hand computation, reward metrics on constructed
log-probs, batched generation, BLEU/ROUGE through tunepipe.evaluation.similarity, and the evaluate.json structure."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.conftest import DEMO_PARAMS_YAML  # noqa: E402
from tunepipe.evaluation import scoring as E  # noqa: E402
from tunepipe.data.converters import Example  # noqa: E402
from tunepipe.data.processors import Processor, ProcessorOptions  # noqa: E402
from tunepipe.data.templates import get_template  # noqa: E402
from tunepipe.evaluation.similarity import similarity_scores  # noqa: E402
from tunepipe.models.loading import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def tok_template(tiny):
    tok = load_tokenizer(tiny)
    template = get_template("qwen")
    template.fix_tokenizer(tok)
    return tok, template


def load(path: str, scale: float = 1.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if scale != 1.0:  # a different but related model: sharper output distribution
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)
    return model


def sft_example(q: str, a: str, system: str = "") -> Example:
    return Example(prompt=[{"role": "user", "content": q}], response=[{"role": "assistant", "content": a}],
                   system=system)


def pair_example(q: str, good: str, bad: str) -> Example:
    return Example(prompt=[{"role": "user", "content": q}],
                   response=[{"role": "assistant", "content": good}, {"role": "assistant", "content": bad}])


QA = [("What colour is the flag of Diond?", "The flag of Diond is green."),
      ("In which year was Rolis founded?", "Rolis was founded in 1612."),
      ("Name the emblem animal of Rolis.", "The emblem of Rolis is the crab."),
      ("What is the capital?", "The capital is Diond, a city on the river.")]


def process(stage: str, examples, tok, template, cutoff_len: int = 128):
    return Processor(stage, template, tok, ProcessorOptions(cutoff_len=cutoff_len)).process(examples)


@pytest.fixture(scope="module")
def data(tok_template) -> E.EvalData:
    tok, template = tok_template
    docs = [Example(prompt=[{"role": "user", "content": " ".join(a for _, a in QA) * 3}], response=[])]
    return E.EvalData(
        lm=process("pt", docs, tok, template, cutoff_len=32),
        sft=process("sft", [sft_example(q, a) for q, a in QA], tok, template),
        prompts=process("unsupervised", [sft_example(q, a, system="Be brief.") for q, a in QA], tok, template),
        pairs=process("dpo", [pair_example(q, a, "I do not know.") for q, a in QA], tok, template),
    )


# ---------------------------------------------------------------------------------------------------------------
# loss / perplexity


def test_loss_and_perplexity_equal_cross_entropy(tiny, tok_template, data):
    model = load(tiny)
    ids, labels = data.sft["input_ids"], data.sft["labels"]
    sums, counts = E.label_logps(model, ids, labels, batch_size=3)  # 2 batches, padded

    ce_sum = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=-100)
    per_seq, flat_logits, flat_labels = [], [], []
    with torch.no_grad():
        for x, y in zip(ids, labels):
            logits = model(input_ids=torch.tensor([x])).logits[0, :-1]
            target = torch.tensor(y[1:])
            per_seq.append(ce_sum(logits, target).item())
            flat_logits.append(logits)
            flat_labels.append(target)
        mean_ce = torch.nn.CrossEntropyLoss(ignore_index=-100)(torch.cat(flat_logits), torch.cat(flat_labels)).item()
    assert [-s for s in sums] == pytest.approx(per_seq, rel=1e-5, abs=1e-4)
    assert counts == [sum(t != -100 for t in y[1:]) for y in labels]

    result = E.lm_loss(sums, counts)
    assert result["loss"] == pytest.approx(mean_ce, rel=1e-5)  # token-weighted, not a mean of sequence means
    assert result["perplexity"] == pytest.approx(math.exp(mean_ce), rel=1e-5)
    assert result["tokens"] == sum(counts)
    assert result["loss"] != pytest.approx(sum(p / c for p, c in zip(per_seq, counts)) / len(counts), rel=1e-6)

    # batching and padding do not change a sequence's score
    single, _ = E.label_logps(model, ids, labels, batch_size=1)
    assert single == pytest.approx(sums, abs=1e-4)

    # pt blocks: every token after the first is scored
    lm_sums, lm_counts = E.label_logps(model, data.lm["input_ids"], data.lm["labels"], batch_size=8)
    assert lm_counts == [sum(t != -100 for t in y[1:]) for y in data.lm["labels"]] and min(lm_counts) > 25


def test_label_logps_checks_lengths(tiny):
    with pytest.raises(ValueError, match="2 sequences but 1 label rows"):
        E.label_logps(load(tiny), [[5, 6], [7, 8]], [[5, 6]])


# ---------------------------------------------------------------------------------------------------------------
# preference rewards on constructed log-probs


def test_dpo_rewards_on_constructed_logps():
    scores = E.dpo_rewards(policy_chosen=[-1.0, -2.0, -3.0], policy_rejected=[-3.0, -1.0, -4.0],
                           ref_chosen=[-2.0, -2.0, -3.0], ref_rejected=[-2.0, -2.0, -3.0], beta=0.5)
    # chosen rewards [0.5, 0, 0], rejected [-0.5, 0.5, -0.5] -> margins [1.0, -0.5, 0.5]
    assert scores["reward_accuracy"] == pytest.approx(2 / 3)
    assert scores["reward_margin"] == pytest.approx(1 / 3)
    assert scores["reward_chosen"] == pytest.approx(0.5 / 3)
    assert scores["reward_rejected"] == pytest.approx(-0.5 / 3)
    tie = E.dpo_rewards([-1.0], [-1.0], [-1.0], [-1.0], beta=0.1)
    assert tie["reward_accuracy"] == 0.0 and tie["reward_margin"] == 0.0  # strict, as TRL


def test_kto_rewards_on_constructed_logps():
    scores = E.kto_rewards(policy=[-1.0, -5.0, -2.0, -1.0], ref=[-2.0, -4.0, -3.0, -3.0],
                           tags=[True, False, False, True], beta=0.1)
    # rewards [0.1, -0.1, 0.1, 0.2]: right sign for 1, 2, 4
    assert scores["reward_accuracy"] == pytest.approx(0.75)
    assert scores["reward_chosen"] == pytest.approx(0.15) and scores["reward_rejected"] == pytest.approx(0.0)
    assert scores["reward_margin"] == pytest.approx(0.15)


def test_learning_checks():
    sections = {"base": {"perplexity": 100.0, "sft_loss": 5.0, "pref_accuracy": 0.5},
                "cpt": {"perplexity": 20.0, "sft_loss": 4.0, "pref_accuracy": 0.5},
                "sft": {"perplexity": 25.0, "sft_loss": 1.0, "pref_accuracy": 0.6},
                "dpo": {"sft_loss": 1.1, "pref_accuracy": 0.9}}
    checks = E.learning_checks(sections, {"cpt": "base", "sft": "cpt", "dpo": "sft"})
    assert checks == pytest.approx({"cpt_ppl_reduction": 0.8, "sft_loss_reduction": 0.75,
                                    "dpo_pref_accuracy_gain": 0.3})
    # no cpt stage: sft is compared with its own input, the base
    assert E.learning_checks(sections, {"sft": "base"}) == pytest.approx({"sft_loss_reduction": 0.8})


# ---------------------------------------------------------------------------------------------------------------
# generation


def test_batched_generation_matches_single_and_stops_at_eos(tiny, data):
    model = load(tiny)
    prompts = data.prompts["input_ids"]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    single = E.generate(model, prompts, max_new_tokens=6, eos_ids=[10**6], pad_id=0, batch_size=1)
    batched = E.generate(model, prompts, max_new_tokens=6, eos_ids=[10**6], pad_id=0, batch_size=4)
    assert batched == single and all(len(o) == 6 for o in single)
    stop = single[0][2]
    cut = E.generate(model, prompts[:1], max_new_tokens=6, eos_ids=[stop], pad_id=0)[0]
    assert cut == single[0][: single[0].index(stop) + 1] and cut[-1] == stop


# ---------------------------------------------------------------------------------------------------------------
# the whole evaluation


def leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_evaluate_structure_and_values(tiny, tok_template, data):
    tok, template = tok_template
    eos = template.stop_token_ids(tok)
    models = {"base": load(tiny), "sft": load(tiny, 1.5), "dpo": load(tiny, 2.0)}
    logps = {name: E.label_logps(m, data.pairs["chosen_input_ids"] + data.pairs["rejected_input_ids"],
                                 data.pairs["chosen_labels"] + data.pairs["rejected_labels"])[0]
             for name, m in models.items()}
    outputs = E.generate(models["sft"], data.prompts["input_ids"], max_new_tokens=8, eos_ids=eos,
                         pad_id=tok.pad_token_id)
    settings = E.EvalSettings(max_new_tokens=8, num_samples=2, batch_size=4, pref_stage="dpo", beta=0.2)
    results, samples = E.evaluate(models, tok, data, settings, eos_ids=eos, inputs={"sft": "base", "dpo": "sft"})

    assert list(results) == ["base", "sft", "dpo", "final", "checks", "counts"]
    assert results["final"] == results["dpo"]
    json.dumps(results)  # serializable, and every leaf a finite number: what `dvc metrics diff` reads
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for _, v in leaves(results))
    every = {"perplexity", "cpt_loss", "sft_loss", "predict_bleu-4", "predict_rouge-1", "predict_rouge-2",
             "predict_rouge-l", "gen_stopped", "gen_tokens", "pref_accuracy", "pref_logp_margin"}
    reward = {"reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"}
    assert set(results["base"]) == set(results["sft"]) == every
    assert set(results["dpo"]) == every | reward
    assert set(results["checks"]) == {"sft_loss_reduction", "dpo_pref_accuracy_gain"}
    assert results["checks"]["sft_loss_reduction"] == pytest.approx(
        1 - results["sft"]["sft_loss"] / results["base"]["sft_loss"])
    assert results["counts"] == {"lm_blocks": len(data.lm["input_ids"]), "sft_examples": 4,
                                 "generation_prompts": 4, "pref_pairs": 4}

    # preference numbers from the logps: likelihood for every model, DPO rewards vs the stage's input (sft)
    n = 4
    for name in models:
        c, r = logps[name][:n], logps[name][n:]
        assert results[name]["pref_accuracy"] == pytest.approx(sum(a > b for a, b in zip(c, r)) / n)
    expected = E.dpo_rewards(logps["dpo"][:n], logps["dpo"][n:], logps["sft"][:n], logps["sft"][n:], beta=0.2)
    assert {k: results["dpo"][k] for k in reward} == pytest.approx(expected, abs=1e-5)

    # BLEU / ROUGE: LLaMA-Factory's metric (tunepipe.evaluation.similarity) on skip_special_tokens decodes
    preds = tok.batch_decode(outputs, skip_special_tokens=True)
    refs = tok.batch_decode(data.prompts["labels"], skip_special_tokens=True)
    assert refs[0] == QA[0][1] + "\n"  # the reference answer; <|im_end|> skipped, as LF decodes it
    assert {k: results["sft"][k] for k in similarity_scores(preds, refs)} == similarity_scores(preds, refs)

    assert list(samples) == ["base", "sft", "dpo"] and len(samples["sft"]) == 2
    assert samples["sft"][0] == {"prompt": tok.decode(data.prompts["input_ids"][0]), "output": preds[0],
                                 "reference": refs[0]}
    assert samples["sft"][0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_evaluate_kto(tiny, tok_template):
    tok, template = tok_template
    examples = [Example(prompt=[{"role": "user", "content": q}],
                        response=[{"role": "assistant", "content": a}, {"role": "assistant", "content": ""}])
                for q, a in QA[:2]]
    examples += [Example(prompt=[{"role": "user", "content": q}],
                         response=[{"role": "assistant", "content": ""}, {"role": "assistant", "content": "No."}])
                 for q, _ in QA[2:]]
    feedback = process("kto", examples, tok, template)
    assert feedback["kto_tags"] == [True, True, False, False]
    models = {"base": load(tiny), "kto": load(tiny, 1.3)}
    settings = E.EvalSettings(pref_stage="kto", beta=0.1)
    results, _ = E.evaluate(models, tok, E.EvalData(feedback=feedback), settings,
                            eos_ids=template.stop_token_ids(tok), inputs={"kto": "base"})
    policy, _ = E.label_logps(models["kto"], feedback["input_ids"], feedback["labels"])
    ref, _ = E.label_logps(models["base"], feedback["input_ids"], feedback["labels"])
    assert results["final"] == results["kto"] == pytest.approx(
        E.kto_rewards(policy, ref, feedback["kto_tags"], 0.1), abs=1e-6)
    assert results["base"] == {} and results["counts"] == {"kto_examples": 4}


def test_stage_writes_metrics_files(tiny, tmp_path, monkeypatch):
    """prepare-cpt/sft/dpo + evaluate in a scratch project (the merged models are copies of the base)."""
    from stages import common
    from stages import evaluate as evaluate_stage
    from stages import params as params_stage
    from stages import prepare as prepare_stage

    project = tmp_path / "project"
    shutil.copytree(ROOT / "data", project / "data")
    (project / "params.yaml").write_text(
        DEMO_PARAMS_YAML + "data: {cutoff_len: 64, max_samples: 12}\n"
        "evaluate: {max_new_tokens: 4, max_eval_samples: 6, num_samples: 2, knowledge_file: knowledge_eval.json,\n"
        "           max_fact_questions: 2, fact_samples: 1}\n")
    monkeypatch.chdir(project)  # stages run from the project root, as DVC starts them
    params_stage.write()
    shutil.copytree(tiny, common.base_model_dir())
    for stage in ("cpt", "sft", "dpo"):
        prepare_stage.main([stage])
        shutil.copytree(tiny, common.model_dir(stage))
    evaluate_stage.main([])

    results = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert list(results) == ["base", "cpt", "sft", "dpo", "final", "checks", "forgetting", "counts"]
    assert results["final"]["reward_accuracy"] == 0.0  # identical policy and reference: every reward is 0
    assert results["checks"]["cpt_ppl_reduction"] == pytest.approx(0.0, abs=1e-6)
    assert results["counts"]["generation_prompts"] == results["counts"]["sft_examples"] == 6
    # the same weights in every section: fact accuracy identical, forgetting ratios 1 and drops 0
    assert results["base"]["fact_questions"] == 6.0  # 2 per kind (sft, dpo, cpt)
    assert {results[m]["fact_accuracy_cpt"] for m in ("base", "cpt", "sft", "dpo")} == {results["base"][
        "fact_accuracy_cpt"]}
    assert results["checks"]["sft_fact_accuracy_gain"] == 0.0
    assert results["forgetting"]["perplexity_ratio"] == pytest.approx({"sft": 1.0, "dpo": 1.0, "final": 1.0})
    assert results["forgetting"]["sft_loss_ratio"] == pytest.approx({"dpo": 1.0, "final": 1.0})
    assert results["forgetting"]["fact_accuracy_sft_drop"] == {"dpo": 0.0, "final": 0.0}
    samples = json.loads((project / "metrics" / "samples.json").read_text())
    assert set(samples) == {"base", "cpt", "sft", "dpo"} and len(samples["dpo"]) == 2 + 3
    assert set(samples["dpo"][0]) == {"prompt", "output", "reference"}
    assert [s["kind"] for s in samples["dpo"][2:]] == ["sft", "dpo", "cpt"]
    assert set(samples["dpo"][2]) == {"kind", "question", "output", "reference", "correct"}
