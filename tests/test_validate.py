"""`tunepipe run` checks the project before anything slow starts (tunepipe/validate.py).

Every user error issue 12 lists is run as the real command in a fresh interpreter: its exact one-line message,
exit code 2, the seconds before it appears, and that nothing heavy was imported on the way (no prefect, dvc, mlflow,
torch: Prefect's start-up alone took 20-27 s before validation existed). The time bound is loose on purpose (the
machine is shared; the figures are printed with `-s`); the import check is the exact one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tunepipe.metric_keys import metric_sources

DATA = ROOT / "data"
HEAVY = ("prefect", "dvc", "mlflow", "torch", "transformers", "datasets", "trl", "peft")
# The CLI in a fresh interpreter, reporting (exit code, heavy modules it imported) on stdout's last line.
RUNNER = textwrap.dedent("""
    import json, sys
    from tunepipe.cli import main
    sys.argv = ["tunepipe", *sys.argv[1:]]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
    print(json.dumps({"code": code, "heavy": heavy}))
""" % (HEAVY,))


def base_params() -> dict:
    return {
        "model": {"model_name_or_path": "tiny", "template": "qwen"},
        "data": {"dataset_dir": str(DATA)},
        "stages": {"sft": {"dataset": "demo_sft", "eval_dataset": "demo_sft_eval"},
                   "dpo": {"dataset": "demo_dpo", "eval_dataset": "demo_dpo_eval"}},
        "registry": {"model_name": "acme", "gates": [{"metric": "final.reward_accuracy", "min": 0.5}]},
    }


def make_project(tmp_path: Path, params: dict | str) -> Path:
    root = tmp_path / "project"
    (root / "flows").mkdir(parents=True)
    (root / "flows" / "pipeline.py").write_text("")  # what `tunepipe run` looks for (never run here)
    text = params if isinstance(params, str) else yaml.safe_dump(params, sort_keys=False)
    (root / "params.yaml").write_text(text)
    return root


def tunepipe(root: Path, *args: str, env: dict | None = None) -> tuple[int, list[str], float, list[str]]:
    """(exit code, stderr lines, seconds until the process ended, heavy modules imported)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=root, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    seconds = time.perf_counter() - started
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report["code"], proc.stderr.strip().splitlines(), seconds, report["heavy"]


def edit(change):
    params = base_params()
    change(params)
    return params


def _set(path: str, value):
    def change(params):
        *parents, last = path.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return change


def _gate_on_kto_facts(params):
    params["evaluate"] = {"knowledge_file": "knowledge_eval.json"}  # its questions are of kinds sft, dpo and cpt
    params["registry"]["gates"] = [{"metric": "final.fact_accuracy_kto", "min": 0.5}]


# (id, params.yaml (dict or text), extra CLI args, the exact error line; {root} is the project directory)
CASES = [
    ("typo in a key", edit(_set("train.max_step", 3)), (),
     "error: file params.yaml, key 'train.max_step': unknown key; did you mean 'max_steps'? (`tunepipe params "
     "--keys` lists every key)"),
    ("key in the wrong section", edit(_set("train.cutoff_len", 64)), (),
     "error: file params.yaml, key 'train.cutoff_len': unknown key; it belongs in data: (data.cutoff_len) "
     "(`tunepipe params --keys` lists every key)"),
    ("YAML syntax", "model:\n  model_name_or_path: tiny\n   template: qwen\nstages: {}\n", (),
     "error: file params.yaml: invalid YAML at line 3, column 12: mapping values are not allowed here"),
    ("empty params.yaml", "# nothing yet\n", (),
     "error: file params.yaml: empty: params.yaml needs model: (model_name_or_path) and stages: (each stage to "
     "run with its dataset); `tunepipe import llamafactory FILE.yaml ...` writes one"),
    ("missing required section", {"model": {"model_name_or_path": "tiny"}}, (),
     "error: file params.yaml, key 'stages': missing required section (params.yaml needs model: "
     "(model_name_or_path) and stages: (each stage to run with its dataset); `tunepipe import llamafactory "
     "FILE.yaml ...` writes one)"),
    ("empty section", edit(_set("train", None)), (),
     "error: file params.yaml, key 'train': empty section: write its keys or remove it"),
    ("enabled stage without dataset", edit(_set("stages.sft", {"eval_dataset": "demo_sft_eval"})), (),
     "error: file params.yaml, key 'stages.sft.dataset': required for an enabled stage (dataset names from "
     "dataset_info.json; or set stages.sft.enabled: false)"),
    ("val_size with eval_dataset", edit(_set("stages.sft.val_size", 0.1)), (),
     "error: file params.yaml, key 'stages.sft.val_size': cannot be used together with stages.sft.eval_dataset "
     "(LLaMA-Factory: \"Cannot specify `val_size` if `eval_dataset` is not None.\")"),
    ("unknown dataset", edit(_set("stages.sft.dataset", "demo_sfft")), (),
     f"error: file params.yaml, key 'stages.sft.dataset': undefined dataset 'demo_sfft' in {DATA}/"
     "dataset_info.json; did you mean 'demo_sft' or 'demo_sft_eval' or 'demo_sft_chat'?"),
    ("dataset for another stage", edit(_set("stages.dpo.dataset", "demo_sft")), (),
     "error: file params.yaml, key 'stages.dpo.dataset': dataset 'demo_sft', field 'ranking': stage dpo needs a "
     "ranking (chosen/rejected) dataset, but this entry has ranking: false"),
    ("dataset folder", edit(_set("data.dataset_dir", "lf_data")), (),
     "error: file params.yaml, key 'data.dataset_dir': folder lf_data does not exist (relative paths start at the "
     "project root {root})"),
    ("unknown template", edit(_set("model.template", "qwen3_nothnk")), (),
     "error: file params.yaml, key 'model.template': unknown template 'qwen3_nothnk'; did you mean 'qwen3_nothink'? "
     "(`tunepipe data templates` lists them)"),
    ("model directory", edit(_set("model.model_name_or_path", "./models/mine")), (),
     "error: file params.yaml, key 'model.model_name_or_path': ./models/mine: no such directory (relative paths "
     "start at the project root {root})"),
    ("hub model not downloaded", edit(_set("model.model_name_or_path", "Qwen/Qwen3-4B-Instruct-2507")), (),
     "error: file params.yaml, key 'model.model_name_or_path': 'Qwen/Qwen3-4B-Instruct-2507' is neither a local "
     "directory nor in the Hugging Face cache ({root}/hf-cache); runs are offline (HF_HUB_OFFLINE=1): download it "
     "first (`hf download Qwen/Qwen3-4B-Instruct-2507`) or give a local directory"),
    ("lora_target", edit(_set("lora.lora_target", "q_prj,v_proj")), (),
     "error: file params.yaml, key 'lora.lora_target': module 'q_prj' is not in tiny; did you mean 'q_proj'? (its "
     "modules: down_proj, embed_tokens, gate_proj, input_layernorm, k_proj, lm_head, norm, o_proj, "
     "post_attention_layernorm, q_proj, up_proj, v_proj)"),
    ("gate metric", edit(_set("registry.gates", [{"metric": "final.reward_acc", "min": 0.5}])), (),
     "error: file params.yaml, key 'registry.gates.0.metric': 'final.reward_acc' is not a metric evaluate writes "
     "for stages sft, dpo; did you mean 'final.reward_accuracy'?"),
    ("compare metric of a disabled stage", edit(_set("registry.compare_metric", "final.perplexity")), (),
     "error: file params.yaml, key 'registry.compare_metric': 'final.perplexity' is not a metric evaluate writes "
     "for stages sft, dpo (it is computed on cpt data: add that stage)"),
    ("knowledge file", edit(_set("evaluate.knowledge_file", "facts.json")), (),
     f"error: file params.yaml, key 'evaluate.knowledge_file': facts.json: no such file in {DATA}"),
    ("fact kind the questions lack", edit(_gate_on_kto_facts), (),
     "error: file params.yaml, key 'registry.gates.0.metric': 'final.fact_accuracy_kto' is not a metric evaluate "
     "writes for stages sft, dpo; did you mean 'final.fact_accuracy_sft'?"),
    ("registry model name", edit(_set("registry.model_name", "acme/bot")), (),
     "error: file params.yaml, key 'registry.model_name': 'acme/bot': MLflow model names cannot contain '/' or ':' "
     "or resolve to another path"),
    ("stage to force", base_params(), ("--force", "train-sfft"),
     "error: key '--force': unknown stage 'train-sfft'; did you mean 'train-sft'? (stages: params, base, "
     "prepare-sft, prepare-dpo, train-sft, merge-sft, train-dpo, merge-dpo, evaluate, register)"),
]


@pytest.mark.parametrize("params, args, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_run_refuses_before_anything_starts(tmp_path, params, args, expected):
    root = make_project(tmp_path, params)
    code, err, seconds, heavy = tunepipe(root, "run", *args, env={"HF_HUB_CACHE": str(root / "hf-cache")})
    print(f"{seconds:.2f} s: {err[-1] if err else ''}")
    assert err == [expected.format(root=root.resolve())]
    assert code == 2 and heavy == []
    assert seconds < 5  # Prefect's ephemeral start-up alone takes 7-27 s here; validation well under 2 s idle


def test_media_dataset_is_refused_for_a_text_template(tmp_path, lf_demo):
    params = base_params()
    params["data"]["dataset_dir"] = str(lf_demo)
    params["stages"] = {"sft": {"dataset": "mllm_demo", "val_size": 0.5}}
    params["registry"]["gates"] = []
    code, err, seconds, heavy = tunepipe(make_project(tmp_path, params), "run")
    assert err == ["error: file params.yaml, key 'stages.sft.dataset': dataset 'mllm_demo', field 'columns.images': "
                   "has images but template 'qwen' is text-only (tunepipe trains text models)"]
    assert code == 2 and heavy == [] and seconds < 5


def test_a_stage_without_held_out_data_is_a_warning_and_gates_say_why(tmp_path):
    params = base_params()
    del params["stages"]["dpo"]["eval_dataset"]
    code, err, _, heavy = tunepipe(make_project(tmp_path, params), "validate")
    assert code == 0 and heavy == []
    assert err[:-1] == [
        "warning: no held-out data for dpo: their evaluation metrics are not computed (set stages.<stage>.val_size, "
        "e.g. 0.1, or stages.<stage>.eval_dataset; on import: val_size=0.1)",
        "warning: registry.gates.0.metric final.reward_accuracy: no held-out data for dpo (set "
        "stages.dpo.eval_dataset or stages.dpo.val_size): the model can only become a candidate, never champion",
        "warning: registry.compare_metric (default) final.reward_accuracy: no held-out data for dpo (set "
        "stages.dpo.eval_dataset or stages.dpo.val_size): the model can only become a candidate, never champion"]
    assert err[-1].endswith("params.yaml: ok")


def test_gate_reasons_name_the_missing_held_out_data():
    from tunepipe.metric_keys import missing_reason
    from tunepipe.tracking.promotion import decide_promotion

    missing = {m: missing_reason(s) for m, s in metric_sources(["sft", "dpo"]).items() if s == "dpo"}
    decision = decide_promotion({"final": {"sft_loss": 1.0}}, [{"metric": "final.reward_accuracy", "min": 0.5}],
                                None, "final.reward_accuracy", missing=missing)
    assert not decision.promote and decision.reasons == [
        "gate final.reward_accuracy >= 0.5: no held-out data for dpo (set stages.dpo.eval_dataset or "
        "stages.dpo.val_size) FAILED",
        "final.reward_accuracy is no held-out data for dpo (set stages.dpo.eval_dataset or stages.dpo.val_size) in "
        "the new model's metrics: cannot compare"]


def test_metric_sources_per_stage_set():
    keys = metric_sources(["cpt", "sft", "kto"])
    assert keys["base.perplexity"] == "cpt" and keys["sft.predict_bleu-4"] == "sft"
    assert keys["kto.reward_accuracy"] == keys["final.reward_accuracy"] == "kto"
    assert "base.reward_accuracy" not in keys and "final.pref_accuracy" not in keys  # pairs load for dpo only
    assert keys["checks.cpt_ppl_reduction"] == "cpt" and "checks.dpo_pref_accuracy_gain" not in keys
    assert set(metric_sources(["sft"])) == {
        *(f"{section}.{key}" for section in ("base", "sft", "final") for key in (
            "sft_loss", "predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "gen_stopped",
            "gen_tokens")), "checks.sft_loss_reduction", "counts.sft_examples", "counts.generation_prompts"}


def test_metric_sources_with_fact_questions_and_forgetting():
    keys = metric_sources(["cpt", "sft", "dpo"], ["sft", "dpo", "cpt"])
    assert keys["final.fact_accuracy_sft"] == keys["base.fact_accuracy"] == "knowledge"
    assert keys["checks.dpo_fact_accuracy_gain"] == "knowledge"
    # each stage's own skill on every later model: cpt's perplexity, sft's loss and facts; dpo is last
    assert {k for k in keys if k.startswith("forgetting.")} == {
        "forgetting.perplexity_ratio.sft", "forgetting.perplexity_ratio.dpo", "forgetting.perplexity_ratio.final",
        "forgetting.sft_loss_ratio.dpo", "forgetting.sft_loss_ratio.final",
        "forgetting.fact_accuracy_sft_drop.dpo", "forgetting.fact_accuracy_sft_drop.final"}
    assert keys["forgetting.sft_loss_ratio.final"] == "sft" and keys["forgetting.perplexity_ratio.sft"] == "cpt"
    assert not any(k.startswith(("forgetting.", "base.fact")) for k in metric_sources(["sft"]))


def test_lora_targets_of_a_local_model_come_from_its_safetensors_header(tmp_path, tiny):
    from tunepipe.validate import model_modules

    modules = model_modules(tmp_path, tiny)
    assert "model.layers.1.self_attn.q_proj" in modules and "lm_head" in modules
    from tunepipe.validate import TINY_MODULES

    assert {m.rsplit(".", 1)[-1] for m in modules} == {m.rsplit(".", 1)[-1] for m in TINY_MODULES}


def test_dataset_dir_outside_the_project_stays_as_written_in_dvc_yaml(tmp_path, lf_demo):
    """dvc.yaml names data outside the project as params.yaml does (relative stays relative), so it is the same in
    every checkout beside the data."""
    import os

    from stages import dag
    from tunepipe.config import parse_params

    params = base_params()
    params["data"]["dataset_dir"] = os.path.relpath(lf_demo, ROOT)
    params["stages"] = {"sft": {"dataset": "identity", "val_size": 0.1}}
    deps = dag.build(ROOT, parse_params(params))["stages"]["prepare-sft"]["deps"]
    assert f"{params['data']['dataset_dir']}/identity.json" in deps
    assert f"{params['data']['dataset_dir']}/dataset_info.json" in deps
