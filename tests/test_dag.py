"""dvc.yaml as stages/dag.py generates it: which stages exist for a params.yaml, and what each depends on.

The rerun behaviour these deps give on a real DVC project (a default changed in code, a help-string edit) is
checked in tests/test_pipeline.py; here the graphs themselves, default and not."""

from __future__ import annotations

import pytest
import yaml

from stages import dag
from tests.conftest import ROOT
from tunepipe.config import parse_params
from tunepipe.plan import plan

DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def graph(**stages) -> dict:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, values in stages.items():
        data["stages"][name] = {**data["stages"].get(name, {}), **values}
    return dag.build(ROOT, parse_params(data))["stages"]


def names(stages: dict) -> list[str]:
    return list(stages)


def test_the_default_graph():
    stages = graph()
    assert names(stages) == ["params", "base", "prepare-cpt", "prepare-sft", "prepare-dpo", "train-cpt", "merge-cpt",
                             "train-sft", "merge-sft", "train-dpo", "merge-dpo", "evaluate", "register"]
    for name, body in stages.items():
        assert len(body["deps"]) == len(set(body["deps"])), name  # no padding, no repeated file
        if name not in ("params", "register"):  # every step compares exactly its own section of the plan
            assert body["params"] == [{"outputs/params.yaml": [name]}]
    # register also records the recipe of the model it registers (its lineage); DVC's run cache never restores it
    assert stages["register"]["params"] == [{"outputs/params.yaml": [
        "register", "prepare-cpt", "prepare-sft", "prepare-dpo", "train-cpt", "train-sft", "train-dpo"]}]
    assert stages["register"]["metrics"] == [{"metrics/register.json": {"cache": False, "persist": True}}]
    assert stages["params"]["deps"][0] == "params.yaml"
    assert "tunepipe/config.py" in stages["params"]["deps"] and "tunepipe/plan.py" in stages["params"]["deps"]
    # its datasets, exactly
    assert [d for d in stages["prepare-cpt"]["deps"] if d.startswith("data/")] == [
        "data/dataset_info.json", "data/demo_cpt.txt", "data/demo_cpt_eval.txt"]
    assert [d for d in stages["prepare-dpo"]["deps"] if d.startswith("data/")] == [
        "data/dataset_info.json", "data/demo_dpo.json", "data/demo_dpo_eval.json"]
    # the chain of models
    assert "outputs/models/cpt" in stages["train-sft"]["deps"] and "outputs/models/sft" in stages["train-dpo"]["deps"]
    assert "outputs/models/base" in stages["train-cpt"]["deps"]
    assert "outputs/models/dpo" in stages["register"]["deps"]


def test_code_deps_are_the_import_closure():
    stages = graph()
    train = stages["train-sft"]["deps"]
    # modules the trainer imports only indirectly (a hand-kept list once missed these two)
    for module in ("tunepipe/data/formatters.py", "tunepipe/data/tool_formats.py", "tunepipe/train/collators.py",
                   "tunepipe/train/recipe.py", "tunepipe/models/loading.py", "stages/common.py", "stages/train.py"):
        assert module in train, module
    # values only reach stages through the plan; MLflow logging never changes a versioned output
    for step in stages:
        assert "tunepipe/config.py" not in stages[step]["deps"] or step == "params"
        assert not any(d.startswith("tunepipe/tracking/") for d in stages[step]["deps"]) or step == "register"
    assert "tunepipe/tracking/promotion.py" in stages["register"]["deps"]
    assert not any(d.startswith(("tunepipe/train/", "tunepipe/data/")) for d in stages["register"]["deps"])
    assert not any(d.startswith("tunepipe/train/") for d in stages["prepare-sft"]["deps"])
    assert "tunepipe/assets/tiny_corpus.jsonl" in stages["base"]["deps"]


def test_cpt_disabled_starts_sft_from_the_base_model():
    stages = graph(cpt={"enabled": False})
    assert names(stages) == ["params", "base", "prepare-sft", "prepare-dpo", "train-sft", "merge-sft", "train-dpo",
                             "merge-dpo", "evaluate", "register"]
    assert "outputs/models/base" in stages["train-sft"]["deps"] and "outputs/models/cpt" not in stages["train-sft"][
        "deps"]
    assert not any("cpt" in d for d in stages["evaluate"]["deps"])
    steps = plan(parse_params({**DEFAULT, "stages": {**DEFAULT["stages"], "cpt": {"enabled": False}}}))
    assert steps["train-sft"].previous is None and steps["evaluate"].stages == {"sft": "base", "dpo": "sft"}


def test_kto_instead_of_dpo():
    stages = graph(dpo={"enabled": False},
                   kto={"enabled": True, "dataset": "demo_kto", "eval_dataset": "demo_kto_eval"})
    assert names(stages)[-5:] == ["merge-sft", "train-kto", "merge-kto", "evaluate", "register"]
    assert not any("dpo" in name for name in stages)
    assert [d for d in stages["prepare-kto"]["deps"] if d.startswith("data/")] == [
        "data/dataset_info.json", "data/demo_kto.json", "data/demo_kto_eval.json"]
    assert "outputs/models/sft" in stages["train-kto"]["deps"] and "outputs/models/kto" in stages["register"]["deps"]
    assert "outputs/data/kto" in stages["evaluate"]["deps"]


def test_sft_only():
    stages = graph(cpt={"enabled": False}, dpo={"enabled": False})
    assert names(stages) == ["params", "base", "prepare-sft", "train-sft", "merge-sft", "evaluate", "register"]
    assert "outputs/models/sft" in stages["register"]["deps"]
    steps = plan(parse_params({**DEFAULT, "stages": {**DEFAULT["stages"], "cpt": {"enabled": False},
                                                     "dpo": {"enabled": False}}}))
    assert steps["evaluate"].preference is None and steps["register"].final_stage == "sft"


def test_the_committed_dvc_yaml_is_current():
    assert not dag.sync(ROOT, check=True), "dvc.yaml is stale: run `python -m stages.dag`"


@pytest.mark.parametrize("key, value, changed", [
    (("stages", "dpo", "pref_beta"), 0.2, {"train-dpo", "evaluate"}),
    (("train", "weight_decay"), 0.01, {"train-cpt", "train-sft", "train-dpo"}),
    (("train", "learning_rate"), 1e-3, set()),  # every demo stage sets its own
    (("data", "cutoff_len"), 128, {"prepare-cpt", "prepare-sft", "prepare-dpo", "train-cpt", "train-sft",
                                   "train-dpo", "evaluate"}),  # merges render whole conversations
    (("data", "max_samples"), 10, {"prepare-cpt", "prepare-sft", "prepare-dpo", "merge-sft", "merge-dpo",
                                   "evaluate"}),  # merge-cpt's round trip has no data
    (("evaluate", "num_samples"), 1, {"evaluate"}),
    (("registry", "model_name"), "other", {"register"}),
    (("lora", "lora_rank"), 4, {"train-dpo"}),  # cpt trains all weights, sft sets its own rank
])
def test_a_value_reaches_exactly_the_steps_that_read_it(key, value, changed):
    before = {name: section.model_dump() for name, section in plan(parse_params(DEFAULT)).items()}
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    node = data
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    after = {name: section.model_dump() for name, section in plan(parse_params(data)).items()}
    assert {name for name in before if before[name] != after[name]} == changed
