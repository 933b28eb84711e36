"""`tunepipe import llamafactory`: LLaMA-Factory's example training YAMLs become params.yaml stages.

The round trip is checked with the project's golden parity machinery (tests/data/test_parity_golden.py,
bench/parity.py), not a new LF venv: an imported stage's data options (the plan's DataArgs) equal the DataArgs the
parity harness runs for the same LF arguments, and an imported YAML with a golden case's dataset, template, cutoff
and max_samples produces LF 0.9.5's recorded rows, hash for hash.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from tests.conftest import SHARED, cli
from tests.data.test_parity_golden import GOLDEN_DIR, parity
from tunepipe import lf_import
from tunepipe.config import LF_STAGE, parse_params
from tunepipe.data.features import DataArgs
from tunepipe.errors import ConfigError
from tunepipe.plan import plan

EXAMPLES = SHARED / "data" / "llamafactory-examples"
PT, SFT, DPO, KTO = (EXAMPLES / f"train_lora__qwen3_lora_{name}.yaml" for name in ("pretrain", "sft", "dpo", "kto"))


@pytest.fixture
def examples(lf_demo) -> Path:
    if not EXAMPLES.is_dir():
        pytest.skip("../shared/data/llamafactory-examples is not beside the project")
    return EXAMPLES


def imported(files, tmp_path: Path, lf_demo: Path, **overrides):
    return lf_import.import_llamafactory(files, project=tmp_path, dataset_dir=str(lf_demo), overrides=overrides)


def test_example_yamls_become_stages_with_lf_keys(examples, lf_demo, tmp_path):
    result = imported([PT, SFT, DPO], tmp_path, lf_demo)
    params = result.params
    assert list(params["stages"]) == ["cpt", "sft", "dpo"] and result.sources == {
        "cpt": str(PT), "sft": str(SFT), "dpo": str(DPO)}
    assert params["model"] == {"model_name_or_path": "Qwen/Qwen3-4B-Instruct-2507", "trust_remote_code": True,
                               "template": "qwen3_nothink"}
    assert params["data"] == {"cutoff_len": 2048, "max_samples": 1000, "preprocessing_num_workers": 16,
                              "dataset_dir": str(lf_demo)}
    # the same value in every YAML goes to the shared section, a differing one stays with its stage
    assert params["train"]["gradient_accumulation_steps"] == 8 and params["lora"] == {
        "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all"}
    assert params["stages"]["cpt"] == {"dataset": "c4_demo", "template": None, "learning_rate": 1e-4}
    assert params["stages"]["sft"] == {"dataset": "identity,alpaca_en_demo", "learning_rate": 1e-4}
    assert params["stages"]["dpo"] == {"dataset": "dpo_en_demo", "pref_beta": 0.1, "pref_loss": "sigmoid",
                                       "learning_rate": 5e-6}
    assert params["registry"] == {"model_name": tmp_path.name, "gates": [{"metric": "final.reward_accuracy",
                                                                         "min": 0.5}]}
    assert sorted(result.ignored) == ["dataloader_num_workers", "ddp_timeout", "output_dir", "overwrite_output_dir",
                                      "plot_loss", "report_to",
                                      "resume_from_checkpoint", "save_only_model"]
    assert result.note_lines() == ["bf16: true -> bf16 on a GPU that supports it, fp32 on CPU "
                                   f"({PT.name}, {SFT.name}, {DPO.name})"]
    text = lf_import.render(result)
    assert yaml.safe_load(text) == params and text.startswith("# Imported from LLaMA-Factory YAMLs")
    assert all(len(line) <= 120 for line in text.splitlines())


def test_lf_defaults_fill_keys_a_yaml_leaves_out(examples, lf_demo, tmp_path):
    minimal = tmp_path / "sft.yaml"
    minimal.write_text("model_name_or_path: tiny\nstage: sft\ndataset: identity\ntemplate: qwen\n")
    params = parse_params(imported([minimal], tmp_path, lf_demo).params)
    train = params.stage_train("sft")
    assert (train.learning_rate, train.num_train_epochs, train.lr_scheduler_type) == (5e-5, 3.0, "linear")
    assert params.data.cutoff_len == 2048 and params.stage_template("sft") == "qwen"


def lf_case(path: Path) -> "parity.Case":
    """The parity harness's case for a YAML's data arguments (what `bench/lf_oracle.py` would pass LF)."""
    lf = yaml.safe_load(path.read_text())
    opts = {k: lf[k] for k in ("max_samples", "packing", "neat_packing", "train_on_prompt", "mask_history",
                               "default_system", "tool_format") if k in lf}
    return parity.Case(stage="dpo" if lf["stage"] == "dpo" else lf["stage"], dataset=lf["dataset"],
                       template=lf.get("template"), tokenizer="tiny", cutoff_len=lf.get("cutoff_len", 2048),
                       opts=opts)


def harness_args(case, dataset_dir: Path) -> DataArgs:
    """The DataArgs bench/parity.py's export_ours_inprocess builds for a case (the golden replay's)."""
    opts = dict(case.opts)
    return DataArgs(dataset_dir=str(dataset_dir), template=case.template, cutoff_len=case.cutoff_len,
                    packing=opts.pop("packing", None), **opts)


def imported_args(path: Path, tmp_path: Path, lf_demo: Path, **overrides) -> tuple[str, DataArgs]:
    """(LF stage, DataArgs of its prepare step) of one YAML imported on its own."""
    params = parse_params(imported([path], tmp_path, lf_demo, **overrides).params)
    stage = params.enabled_stages()[0]
    return LF_STAGE[stage], DataArgs(**plan(params)[f"prepare-{stage}"].data)


def same_data(ours: DataArgs, theirs: DataArgs, stage: str) -> None:
    ours, theirs = asdict(ours), asdict(theirs)
    # None = LF's per-stage default: packing on for pt only (sft packs at train time, prepare leaves it off)
    for side in (ours, theirs):
        side["packing"] = stage == "pt" if side["packing"] is None else side["packing"]
    assert Path(ours.pop("dataset_dir")).resolve() == Path(theirs.pop("dataset_dir")).resolve()
    # the golden records were made with one worker; workers shard the rows as LF's num_proc does
    # (tests/data/test_scale.py), so the YAML's preprocessing_num_workers is the import's and not the harness's
    assert ours.pop("preprocessing_num_workers") in (None, 16) and theirs.pop("preprocessing_num_workers") is None
    assert ours == theirs


@pytest.mark.parametrize("name", ["pretrain", "sft", "dpo", "kto"])
def test_imported_stage_reads_the_data_as_the_parity_harness(examples, lf_demo, tmp_path, name):
    path = EXAMPLES / f"train_lora__qwen3_lora_{name}.yaml"
    stage, ours = imported_args(path, tmp_path, lf_demo)
    case = lf_case(path)
    assert stage == case.stage
    same_data(ours, harness_args(case, lf_demo), stage)


# Golden cases (LF 0.9.5's recorded rows) with the example YAMLs' stages; qwen3_nothink where one exists.
GOLDEN = {"pretrain": "pt/c4_demo/default/bpe_bos/c128/max-samples=120",
          "sft": "sft/alpaca_en_demo/qwen3_nothink/tiny/c128/max-samples=40",
          "dpo": "dpo/dpo_en_demo/qwen3_nothink/bpe_plain/c128/max-samples=24",
          "kto": "kto/kto_en_demo/qwen3/tiny/c128/max-samples=24"}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_imported_yaml_gives_llamafactorys_tokens(examples, lf_demo, tmp_path, name):
    """An example YAML with a golden case's dataset/template/cutoff/max_samples, imported: the stage's DataArgs
    produce LF's recorded rows (the golden replay's serialization, prepare() on the plan's values)."""
    from tunepipe.data.features import prepare
    from tunepipe.models.loading import load_tokenizer

    record = parity.load_golden(GOLDEN_DIR)[GOLDEN[name]]
    case = parity.Case.from_args(record["args"])
    lf = yaml.safe_load((EXAMPLES / f"train_lora__qwen3_lora_{name}.yaml").read_text())
    lf.update(dataset=case.dataset, template=case.template, cutoff_len=case.cutoff_len, **case.opts)
    lf.pop("preprocessing_num_workers")  # the records were made in one process (workers shard as LF's num_proc)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(lf))
    stage, args = imported_args(path, tmp_path, lf_demo)
    same_data(args, harness_args(case, lf_demo), stage)

    tok_path = parity.tokenizer_paths(needed={case.tokenizer})[case.tokenizer]
    if parity.tokenizer_fingerprint(tok_path) != record["tokenizer_fingerprint"]:
        pytest.skip(f"tokenizer {case.tokenizer} is not the one the golden record was written with")
    rows: list[str] = []
    prepare(stage, case.dataset, args, load_tokenizer(str(tok_path)),
            on_train_batch=lambda cols: rows.extend(parity.canonical(dict(zip(cols, r))) for r in zip(*cols.values())))
    assert [parity.row_sha(r) for r in rows] == record["sha256"]


def refused(files, tmp_path, lf_demo, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        imported(files, tmp_path, lf_demo, **overrides)
    return str(info.value)


def test_refused_and_unknown_keys_are_one_line_errors(examples, lf_demo, tmp_path):
    otfq = EXAMPLES / "train_qlora__qwen3_lora_sft_otfq.yaml"  # QLoRA imports (tests/test_training.py trains it)
    train = imported([otfq], tmp_path, lf_demo).params["train"]
    assert train["quantization_bit"] == 4 and train["quantization_method"] == "bnb"
    assert refused([otfq], tmp_path, lf_demo, double_quantization=False) == (
        "key 'double_quantization': not supported by tunepipe yet (value False; only LLaMA-Factory's default True "
        "can be imported) (a KEY=VALUE override)")
    merge = EXAMPLES / "merge_lora__qwen3_lora_sft.yaml"
    assert refused([merge], tmp_path, lf_demo) == (
        f"file {merge}: an export/merge config (export_dir): no `stage:` key; tunepipe imports training YAMLs "
        "(stage: pt, sft, dpo or kto) and merges every stage itself")
    assert refused([SFT], tmp_path, lf_demo, lerning_rate=1e-4) == (
        "key 'lerning_rate': unknown LLaMA-Factory key; did you mean 'learning_rate'? (`tunepipe import llamafactory "
        "--keys` lists the keys tunepipe knows) (a KEY=VALUE override)")
    assert refused([SFT, SFT], tmp_path, lf_demo) == (
        f"file {SFT}, key 'stage': a second sft YAML (the first: {SFT}); one YAML per stage")
    assert refused([DPO, KTO], tmp_path, lf_demo) == (
        f"file {KTO}, key 'stage': dpo and kto are alternatives: import one preference YAML")
    assert refused([SFT, DPO], tmp_path, lf_demo, val_size=0.1, eval_dataset="identity") .startswith(
        f"file {SFT}, key 'val_size': cannot be used together with stages.sft.eval_dataset")
    reward = tmp_path / "rm.yaml"
    reward.write_text(SFT.read_text().replace("stage: sft", "stage: rm"))
    assert refused([reward], tmp_path, lf_demo) == (
        f"file {reward}, key 'stage': reward modelling (stage: rm) is not supported yet: tunepipe trains pt, sft, "
        "dpo and kto")
    other = tmp_path / "dpo.yaml"
    other.write_text(DPO.read_text().replace("Qwen/Qwen3-4B-Instruct-2507", "meta-llama/Llama-3.1-8B"))
    assert refused([SFT, other], tmp_path, lf_demo).startswith(
        f"key 'model_name_or_path': differs between the files ({SFT.name}: 'Qwen/Qwen3-4B-Instruct-2507', "
        f"dpo.yaml: 'meta-llama/Llama-3.1-8B'); tunepipe trains one chain with one model_name_or_path")
    ray = EXAMPLES / "train_lora__qwen3_lora_sft_ray.yaml"
    with pytest.raises(ConfigError, match="'REMOTE:llamafactory/demo_data': a hub-hosted dataset registry"):
        lf_import.import_llamafactory([ray], project=tmp_path)


def test_cli_writes_params_and_refuses_to_overwrite(examples, lf_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["import", "llamafactory", str(SFT), str(DPO), "--dataset-dir", str(lf_demo), "model_name_or_path=tiny",
            "val_size=0.1", "--model-name", "acme"]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines[0] == f"wrote {tmp_path / 'params.yaml'}: sft <- {SFT.name}, dpo <- {DPO.name}"
    assert lines[-1] == "next: tunepipe run"
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["model"]["model_name_or_path"] == "tiny" and params["registry"]["model_name"] == "acme"
    assert params["stages"]["sft"]["val_size"] == 0.1
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and err == (f"error: file {tmp_path / 'params.yaml'}: exists: pass --force to replace it (git "
                                 "keeps the old one), or --dry-run to print\n")
    code, out, _ = cli(monkeypatch, capsys, "import", "llamafactory", "--keys", "--json")
    lists = json.loads(out)
    assert lists["supported"]["cutoff_len"] == "data.cutoff_len" and "deepspeed" in lists["ignored"]
    assert lists["refused"]["double_quantization"] == "only LF's default True"
    assert lists["supported"]["quantization_bit"] == "train.quantization_bit (or stages.<stage>.quantization_bit)"


def test_docs_list_every_key():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "llamafactory.md").read_text()
    for kind, keys in lf_import.key_lists().items():
        for key in keys:
            assert f"`{key}`" in doc, f"docs/llamafactory.md does not list the {kind} key {key}"
