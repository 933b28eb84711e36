"""train-<stage>: every trainer runs on the prepared features and writes its adapter, metrics and loss curve; packing
is contamination-free and changes nothing but speed; the DPO/KTO reference is the input model; an interrupted run
resumes from its checkpoint to the same result; LoRA switches reach PEFT; full fine-tuning works.

A 2-layer tiny Qwen2 and a few dozen demo rows (cutoff_len 128) keep every run to a few steps of a few ms.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tunepipe.train import recipe as training  # noqa: E402
from tunepipe.train.callbacks import StopAfterStep  # noqa: E402
from tunepipe.config import LoraParams, TrainParams, objective, parse_params  # noqa: E402
from tunepipe.plan import TrainInputs, train_inputs  # noqa: E402
from tunepipe.train.lora import lora_config  # noqa: E402
from tunepipe.errors import ConfigError  # noqa: E402
from tunepipe.models.loading import load_tokenizer  # noqa: E402
from tunepipe.train.collators import (  # noqa: E402
    COUNTS_KEY,
    KTOCollator,
    PaddedCollator,
    PaddingFreeCollator,
    PreferenceCollator,
    PrepackedCollator,
)

ROOT = Path(__file__).resolve().parents[1]
CUTOFF = 128
DATA = {  # stage -> (LF stage, train datasets, eval datasets, max_samples per dataset)
    "cpt": ("pt", "demo_cpt", "demo_cpt_eval", 64),
    "sft": ("sft", "demo_sft", "demo_sft_eval", 48),
    "dpo": ("dpo", "demo_dpo", "demo_dpo_eval", 24),
    "kto": ("kto", "demo_kto", "demo_kto_eval", 24),
}


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="session")
def data(tiny, tmp_path_factory) -> Path:
    """outputs/data/<stage>/{train,eval} for the four stages, prepared exactly as the prepare stage does."""
    from datasets import Dataset

    from tunepipe.data.features import DataArgs, prepare

    root = tmp_path_factory.mktemp("data")
    for stage, (lf_stage, names, eval_names, limit) in DATA.items():
        args = DataArgs(dataset_dir=str(ROOT / "data"), template="qwen", cutoff_len=CUTOFF, max_samples=limit)
        prepared = prepare(lf_stage, names, args, load_tokenizer(tiny), eval_names=eval_names)
        Dataset.from_dict(prepared.train).save_to_disk(str(root / stage / "train"))
        Dataset.from_dict(prepared.eval).save_to_disk(str(root / stage / "eval"))
    args = DataArgs(dataset_dir=str(ROOT / "data"), template="qwen", cutoff_len=CUTOFF, max_samples=48,
                    neat_packing=True)
    prepared = prepare("sft", "demo_sft", args, load_tokenizer(tiny))
    Dataset.from_dict(prepared.train).save_to_disk(str(root / "sft_neat" / "train"))
    return root


def make_inputs(stage: str = "sft", *, lora: dict | None = None, **stage_values) -> TrainInputs:
    """The stage's section of the plan, as stages/train.py reads it."""
    return train_inputs(make_params(stage, lora=lora, **stage_values), stage)


def make_params(stage: str = "sft", *, lora: dict | None = None, **stage_values):
    values = {"max_steps": 4, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
              "logging_steps": 1, "save_steps": 100, "learning_rate": 5e-3, **stage_values}
    return parse_params({
        "model": {"model_name_or_path": "tiny", "template": "qwen"},
        "data": {"cutoff_len": CUTOFF},
        "lora": {"lora_rank": 8, **(lora or {})},
        "stages": {stage: {"dataset": f"demo_{stage}", **values}},
    })


def paths(tiny: str, data: Path, out: Path, stage: str, data_dir: Path | None = None) -> training.StagePaths:
    return training.StagePaths(input_model=tiny, tokenizer=tiny, data=data_dir or data / stage,
                               adapter=out / "adapters" / stage, checkpoints=out / "checkpoints" / stage,
                               metrics=out / "metrics" / f"train_{stage}.json", plots=out / "plots",
                               measured=out / "logs" / f"train_{stage}.measured.json")


def curve(out: Path, stage: str) -> list[dict]:
    with (out / "plots" / f"loss_{stage}.csv").open() as handle:
        return list(csv.DictReader(handle))


def losses(out: Path, stage: str) -> list[float]:
    return [float(r["loss"]) for r in curve(out, stage) if r["loss"]]


def adapter_tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# Stages end to end (few steps each)
# ---------------------------------------------------------------------------------------------------------------
def test_cpt_writes_adapter_metrics_and_curve(tiny, data, tmp_path):
    metrics = training.run_stage(make_inputs("cpt", max_steps=6), paths(tiny, data, tmp_path, "cpt"))

    adapter = tmp_path / "adapters" / "cpt"
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tunepipe_train.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]  # safetensors only
    assert not list((tmp_path / "adapters").glob(".*"))  # no temporary sibling left behind
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # lora_alpha None -> 2 * rank (LF)
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == linear  # all-linear: all but lm_head
    assert json.loads((adapter / "tunepipe_train.json").read_text())["input_model"] == tiny

    # what identical runs reproduce is versioned; this run's speed and memory are not (a log and the MLflow run)
    saved = json.loads((tmp_path / "metrics" / "train_cpt.json").read_text())
    measured = json.loads((tmp_path / "logs" / "train_cpt.measured.json").read_text())
    assert saved == {k: v for k, v in metrics.items() if k not in measured} and saved["tokens"] == metrics["tokens"]
    assert {"tokens_per_second", "seconds", "trainer_seconds", "peak_rss_mb"} <= set(measured)
    assert measured["tokens_per_second"] == metrics["tokens_per_second"] > 0
    assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 0
    assert metrics["tokens"] == 6 * 4 * CUTOFF  # packed blocks: every position is a real token
    assert metrics["padding_fraction"] == 0.0 and metrics["tokens_per_second"] > 0
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-4)
    assert metrics["train_loss"] < metrics["train_loss_first"]

    rows = curve(tmp_path, "cpt")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["eval_loss"] and not rows[0]["eval_loss"]
    assert (tmp_path / "plots" / "loss_cpt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sft_packing_changes_speed_not_the_math(tiny, data, tmp_path):
    """Same seed, same batches of packed rows: laid out packed (position ids restarting per example, no attention
    mask) or as ordinary padded rows, one per example, the run has the same losses, eval loss and adapter; packing
    only changes the layout. (The rows hold more examples than `packing: false` batches do: the batch size counts
    rows, as with LLaMA-Factory's packing.)"""
    from tunepipe.train.collators import PackedRowsCollator

    runs = {}
    for layout in ("packed", "padded"):
        out = tmp_path / layout
        run = training.setup(make_inputs("sft", max_steps=5, per_device_train_batch_size=4),
                             paths(tiny, data, out, "sft"))
        assert isinstance(run.trainer.data_collator, PackedRowsCollator)
        if layout == "padded":  # the same rows, each example on its own right-padded row
            run.trainer.data_collator = PackedRowsCollator(pad_token_id=run.trainer.data_collator.pad_token_id,
                                                           padded=True)
        runs[layout] = training.train(run)
        training.save(run, runs[layout])
        runs[layout]["losses"] = losses(out, "sft")
        runs[layout]["adapter"] = adapter_tensors(out / "adapters" / "sft")
    packed, padded = runs["packed"], runs["padded"]
    assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-4)
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-4)
    for name, tensor in padded["adapter"].items():
        assert torch.allclose(packed["adapter"][name], tensor, atol=1e-5), name
    assert packed["tokens"] == padded["tokens"]  # (how much padding packing saves: tests/test_packing.py)


def test_loss_goes_down_on_a_tiny_overfit_set(tiny, data, tmp_path):
    from datasets import load_from_disk

    subset = tmp_path / "overfit"
    load_from_disk(str(data / "sft" / "train")).select(range(8)).save_to_disk(str(subset / "train"))
    metrics = training.run_stage(make_inputs("sft", max_steps=20, learning_rate=1e-2, lr_scheduler_type="constant"),
                                 paths(tiny, data, tmp_path, "sft", data_dir=subset))
    trajectory = losses(tmp_path, "sft")
    assert len(trajectory) == 20 and metrics["eval_loss"] is None  # no eval split in this data dir
    assert trajectory[-1] < 0.5 * trajectory[0]
    assert sum(trajectory[-5:]) < 0.6 * sum(trajectory[:5])


def test_dpo_reference_is_the_input_model(tiny, data, tmp_path):
    """A fresh adapter starts as the identity, so the first DPO loss is exactly -log sigmoid(0) = ln 2: the reference
    (adapter disabled) is the model the stage started from. Then the loss falls and reward metrics are recorded."""
    metrics = training.run_stage(make_inputs("dpo", max_steps=6, pref_beta=0.5),
                                 paths(tiny, data, tmp_path, "dpo"))
    trajectory = losses(tmp_path, "dpo")
    assert trajectory[0] == pytest.approx(math.log(2), abs=1e-5)
    assert trajectory[-1] < trajectory[0]
    assert 0.0 <= metrics["eval_reward_accuracy"] <= 1.0 and "eval_reward_margin" in metrics
    assert metrics["objective"] == "dpo" and (tmp_path / "adapters" / "dpo" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_preference_losses(tiny, data, tmp_path, loss):
    metrics = training.run_stage(make_inputs("dpo", max_steps=3, pref_loss=loss, pref_beta=2.0),
                                 paths(tiny, data, tmp_path, "dpo"))
    assert metrics["objective"] == loss and metrics["steps"] == 3
    assert all(math.isfinite(x) for x in losses(tmp_path, "dpo"))
    assert metrics["tokens"] > 0 and metrics["eval_loss"] is not None
    assert (tmp_path / "adapters" / "dpo" / "adapter_model.safetensors").exists()


def test_kto_trains_on_lf_features_with_kl_completions(tiny, data, tmp_path):
    """Policy = reference at step 1 gives KTO loss 1 - sigmoid(0) = 0.5 for every example."""
    metrics = training.run_stage(make_inputs("kto", max_steps=12, pref_beta=0.5),
                                 paths(tiny, data, tmp_path, "kto"))
    trajectory = losses(tmp_path, "kto")
    assert trajectory[0] == pytest.approx(0.5, abs=1e-5)
    # 24 rows in batches of 4: the second epoch sees the first one's examples again, and fits them better (the
    # demo's undesirable answers are length-matched wrong facts, so single new batches are no easier than chance)
    assert sum(trajectory[6:]) / 6 < sum(trajectory[:6]) / 6
    assert metrics["objective"] == "kto" and metrics["eval_loss"] is not None


# ---------------------------------------------------------------------------------------------------------------
# Packing: contamination check on the model itself
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_is_contamination_free(tiny, data, attn):
    """Each example's logits inside a packed batch equal its logits run alone (no padding); a plain concatenation
    (positions not restarting) does not, so the check would catch cross-example attention."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation=attn).eval()
    model.config.use_cache = False
    examples = [load_from_disk(str(data / "sft" / "train"))[i] for i in range(9)]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
        for max_row in (None, CUTOFF):  # one row (FlashAttention layout) / rows of <= cutoff_len (sdpa, eager)
            batch = PaddingFreeCollator(pad_token_id=0, max_row_tokens=max_row)(examples)
            batch.pop(COUNTS_KEY)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            starts = (batch["position_ids"] == 0).nonzero().tolist()
            rows, width = batch["input_ids"].shape
            assert rows == 1 if max_row is None else (1 < rows <= len(examples) and width <= max_row)
            seen = 0
            for row, col in starts:
                ids = batch["input_ids"][row, col:]
                match = [k for k, e in enumerate(examples) if ids[: len(e["input_ids"])].tolist() == e["input_ids"]]
                if not match:  # the pad block that tops up a row
                    continue
                k = match[0]
                n = len(examples[k]["input_ids"])
                assert torch.allclose(logits[row, col:col + n], alone[k], atol=2e-5), (max_row, k)
                seen += 1
            assert seen == len(examples)

            padded = PaddedCollator(pad_token_id=0)(examples)
            padded.pop(COUNTS_KEY)
            assert model(**batch).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-5)

        naive = torch.tensor([[t for e in examples for t in e["input_ids"]]])
        n0, n1 = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
        second = model(input_ids=naive).logits[0, n0:n0 + n1]
        assert not torch.allclose(second, alone[1], atol=1e-3)  # the check is sensitive to contamination


def test_rows_packed_by_prepare_neat_packing(tiny, data, tmp_path):
    """LF neat_packing rows train without their segment-id attention mask (position ids isolate the examples): a
    row's loss equals the loss of its examples run separately."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    row = next(r for r in load_from_disk(str(data / "sft_neat" / "train")) if max(r["attention_mask"]) >= 2)
    batch = PrepackedCollator(pad_token_id=0)([row])
    counts = batch.pop(COUNTS_KEY).tolist()
    assert "attention_mask" not in batch and counts[0] == sum(1 for m in row["attention_mask"] if m)
    segments = [[i for i, m in enumerate(row["attention_mask"]) if m == k]
                for k in range(1, max(row["attention_mask"]) + 1)]  # one per example in the row
    examples = [{"input_ids": [row["input_ids"][i] for i in seg], "labels": [row["labels"][i] for i in seg]}
                for seg in segments]
    padded = PaddedCollator(pad_token_id=0)(examples)
    padded.pop(COUNTS_KEY)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    model.config.use_cache = False  # with a KV cache transformers skips packed-sequence detection (load_model sets it)
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-5)

    metrics = training.run_stage(make_inputs("sft", max_steps=3, per_device_train_batch_size=2),
                                 paths(tiny, data, tmp_path, "sft", data_dir=data / "sft_neat"))
    assert metrics["steps"] == 3 and 0 < metrics["padding_fraction"] < 0.5
    assert all(math.isfinite(x) for x in losses(tmp_path, "sft"))


def test_packed_rows_pad_less_than_padded_batches():
    # lengths that vary as real SFT data does (the demo's are nearly uniform, which leaves padding nothing to gain)
    lengths = [3, 70, 12, 45, 9, 64, 30, 22, 5, 58, 17, 40, 11, 66, 27, 35]
    examples = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    real = sum(lengths)
    padded = PaddedCollator(pad_token_id=0)(examples)[COUNTS_KEY].tolist()
    rows = PaddingFreeCollator(pad_token_id=0, max_row_tokens=128)(examples)[COUNTS_KEY].tolist()
    one_row = PaddingFreeCollator(pad_token_id=0)(examples)[COUNTS_KEY].tolist()
    assert padded[0] == rows[0] == one_row[0] == real and padded[1] == rows[1] == one_row[1]
    assert one_row[2] == real  # a single row has no padding at all
    assert padded[2] == len(lengths) * max(lengths)
    assert real < rows[2] <= 5 * 128 < padded[2]  # best-fit decreasing: 514 tokens in 5 rows of at most 128


def test_preference_collators_keep_lf_tokens_and_labels(data):
    from datasets import load_from_disk

    rows = [load_from_disk(str(data / "dpo" / "train"))[i] for i in range(3)]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape[0] == 6  # [chosen x3, rejected x3]
    for i, row in enumerate(rows):
        for j, side in ((i, "chosen"), (i + 3, "rejected")):
            n = len(row[f"{side}_input_ids"])
            assert batch["input_ids"][j, :n].tolist() == row[f"{side}_input_ids"]
            assert batch["completion_mask"][j, :n].tolist() == [int(y != -100) for y in row[f"{side}_labels"]]
            assert batch["attention_mask"][j].sum() == n
    kto = [load_from_disk(str(data / "kto" / "train"))[i] for i in range(3)]
    batch = KTOCollator(pad_token_id=0)(kto)
    for i, row in enumerate(kto):
        n = len(row["kl_input_ids"])
        assert batch["KL_input_ids"][i, :n].tolist() == row["kl_input_ids"]
        assert batch["KL_completion_mask"][i, :n].tolist() == [int(y != -100) for y in row["kl_labels"]]
    assert batch["label"].tolist() == [bool(r["kto_tags"]) for r in kto]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_from_its_checkpoint(tiny, data, tmp_path):
    params = make_inputs(max_steps=8, save_steps=3)
    full = training.run_stage(params, paths(tiny, data, tmp_path / "straight", "sft"))

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        training.run_stage(params, paths(tiny, data, out, "sft"), callbacks=[StopAfterStep(5)])
    checkpoints = out / "checkpoints" / "sft"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (checkpoints / "fingerprint.json").exists() and not (out / "adapters" / "sft").exists()

    resumed = training.run_stage(params, paths(tiny, data, out, "sft"))
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 8
    assert resumed["tokens"] == full["tokens"]  # the token count continues from the checkpoint
    assert losses(out, "sft") == pytest.approx(losses(tmp_path / "straight", "sft"), rel=1e-5)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    a, b = adapter_tensors(out / "adapters" / "sft"), adapter_tensors(tmp_path / "straight" / "adapters" / "sft")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    assert not checkpoints.exists()  # a finished stage removes its checkpoints

    # a checkpoint of other params is stale: interrupted again, then rerun with another learning rate -> fresh start
    with pytest.raises(KeyboardInterrupt):
        training.run_stage(params, paths(tiny, data, out, "sft"), callbacks=[StopAfterStep(4)])
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3"]
    changed = training.run_stage(make_inputs("sft", max_steps=4, save_steps=3, learning_rate=1e-3),
                                 paths(tiny, data, out, "sft"))
    assert changed["resumed_from_step"] == 0 and changed["steps"] == 4
    assert not checkpoints.exists()  # a finished stage removes its checkpoints


def test_a_planted_incomplete_checkpoint_is_skipped_and_removed(tmp_path):
    """A checkpoint killed mid-save (no completion marker) never blocks a resume: the last complete one is used."""
    import hashlib

    from tunepipe.train.resume import FINGERPRINT_FILE, resolve_resume
    from tunepipe.train.stopping import COMPLETE_MARKER

    fingerprint = {"inputs": {"train": {"learning_rate": 1e-3}}}
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    checkpoints = tmp_path / "checkpoints"
    for step, complete in ((3, True), (6, False)):
        folder = checkpoints / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 8}))
        if complete:
            (folder / COMPLETE_MARKER).write_text(f"{step}\n")
    (checkpoints / FINGERPRINT_FILE).write_text(json.dumps({"digest": digest, "fingerprint": fingerprint}))
    assert resolve_resume(checkpoints, fingerprint, is_main=True) == str(checkpoints / "checkpoint-3")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", FINGERPRINT_FILE]


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def test_lora_switches_reach_peft(tiny):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = lora_config(LoraParams(lora_rank=4, lora_target="q_proj, v_proj", use_dora=True,
                                          use_rslora=True, additional_target="lm_head", lora_dropout=0.1))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.1)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and cfg.modules_to_save == ["lm_head"]
    assert cfg.use_dora and cfg.use_rslora
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), cfg)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert "default" in q.lora_magnitude_vector  # DoRA
    assert not hasattr(model.base_model.model.model.layers[0].self_attn.k_proj, "lora_A")

    plain = lora_config(LoraParams(lora_rank=16, lora_alpha=8))
    assert plain.target_modules == "all-linear" or set(plain.target_modules) >= {"q_proj"}
    assert (plain.lora_alpha, plain.use_dora, plain.use_rslora, plain.modules_to_save) == (8, False, False, None)
    assert lora_config(LoraParams(), ["embed_tokens", "lm_head"]).modules_to_save == ["embed_tokens",
                                                                                                "lm_head"]


def test_preference_loss_mapping():
    def args(**stage):
        run = training.Run(inputs=make_inputs("dpo", **stage),
                           paths=training.StagePaths("m", "m", Path("d"), Path("a"), Path("/tmp/tp-none"), Path("x"),
                                                     Path("p")))
        return training.training_arguments(run, False, training.device_settings(run.train))

    dpo = args(pref_loss="ipo", pref_beta=0.3, pref_ftx=0.5)
    assert (dpo.loss_type, dpo.loss_weights, dpo.beta) == (["ipo", "sft"], [1.0, 0.5], 0.3)
    assert args(pref_loss="sigmoid").loss_type == ["sigmoid"]
    simpo = args(pref_loss="simpo", pref_beta=2.0, pref_ftx=0.1, simpo_gamma=0.8)
    assert (simpo.loss_type, simpo.beta, simpo.cpo_alpha, simpo.simpo_gamma) == ("simpo", 2.0, 0.1, 0.8)
    orpo = args(pref_loss="orpo", pref_beta=0.2)
    assert type(orpo).__name__ == "ORPOConfig" and orpo.beta == 0.2
    assert not dpo.bf16 and dpo.use_cpu and not dpo.activation_checkpointing  # CPU: fp32, despite TRL's defaults


def test_device_settings_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert training.device_settings(TrainParams()) == {"use_cpu": True, "bf16": False, "fp16": False,
                                                       "activation_checkpointing": False}
    explicit = training.device_settings(TrainParams(bf16=True, gradient_checkpointing=True))
    assert explicit["bf16"] and explicit["activation_checkpointing"]


def test_full_finetuning_saves_all_weights(tiny, data, tmp_path):
    from safetensors.torch import load_file

    metrics = training.run_stage(make_inputs("cpt", max_steps=2, lora={"finetuning_type": "full"},
                                                    learning_rate=1e-3), paths(tiny, data, tmp_path, "cpt"))
    out = tmp_path / "adapters" / "cpt"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not (out / "adapter_config.json").exists()
    trained, base = load_file(str(out / "model.safetensors")), load_file(str(Path(tiny) / "model.safetensors"))
    assert not torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert metrics["trainable_parameters"] == sum(t.numel() for t in base.values())


def test_grown_vocabulary_trains_the_embeddings(tiny):
    tokenizer = load_tokenizer(tiny)
    tokenizer.add_special_tokens({"extra_special_tokens": [f"<|new{i}|>" for i in range(80)]})
    model, names = training.load_model(tiny, tokenizer, dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tokenizer) and rows % 64 == 0 and model.get_output_embeddings().weight.shape[0] == rows
    assert names == ["embed_tokens", "lm_head"]
    assert lora_config(LoraParams(), names).modules_to_save == ["embed_tokens", "lm_head"]
    _, unchanged = training.load_model(tiny, load_tokenizer(tiny), dtype=torch.float32)
    assert unchanged == []


def test_missing_data_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="stages.prepare sft"):
        training.load_datasets(tmp_path / "nothing", "sft")
    with pytest.raises(ConfigError, match="unknown stage 'rm'"):
        objective("rm")


# ---------------------------------------------------------------------------------------------------------------
# Quantized LoRA (QLoRA) and kernels
# ---------------------------------------------------------------------------------------------------------------
def test_qlora_trains_on_4_bits_and_merges_into_the_unquantized_weights(tiny, data, tmp_path):
    """bitsandbytes 0.50 runs on CPU: the input model is loaded in 4 bits (NF4) for training; the adapter says so,
    and the merge goes into the unquantized fp32 weights, recording both."""
    pytest.importorskip("bitsandbytes")
    from tunepipe.data.features import DataArgs, load_template
    from tunepipe.models import merging

    metrics = training.run_stage(make_inputs("sft", max_steps=3, quantization_bit=4),
                                 paths(tiny, data, tmp_path, "sft"))
    assert metrics["steps"] == 3 and all(math.isfinite(x) for x in losses(tmp_path, "sft"))
    adapter = tmp_path / "adapters" / "sft"
    meta = json.loads((adapter / "tunepipe_train.json").read_text())
    assert meta["quantization"] == "4-bit bnb (nf4, double quantization)"

    tokenizer = load_tokenizer(tiny)
    template = load_template(DataArgs(template="qwen"), load_tokenizer(tiny), stage="sft")
    result = merging.merge_adapter(tiny, adapter, tmp_path / "merged", tokenizer=tokenizer, template=template,
                                   conversations=merging.SYNTHETIC_CONVERSATIONS, max_new_tokens=4)
    assert result.report["trained_quantized"] == meta["quantization"]
    assert result.report["merged_into"] == "unquantized float32" and result.report["dtype"] == "float32"
    assert result.metrics["max_logit_diff"] < 1e-4
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a full-precision model, like any other stage's


def test_qlora_merge_into_a_quantized_checkpoint_is_refused(tiny, tmp_path):
    pytest.importorskip("bitsandbytes")
    from tunepipe.models import merging
    from tunepipe.models.loading import quantization_config

    quantized = tmp_path / "quantized"
    model = training.load_model(tiny, load_tokenizer(tiny), dtype=torch.float32, quantization=quantization_config(8))[0]
    model.save_pretrained(str(quantized))
    load_tokenizer(tiny).save_pretrained(str(quantized))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")  # refused before the adapter is read
    with pytest.raises(merging.MergeError, match="quantized checkpoint: the adapter is merged into unquantized"):
        merging.load_adapter_model(quantized, tmp_path / "adapter")


@pytest.mark.parametrize("values, message", [
    ({"quantization_bit": 4, "lora": {"finetuning_type": "full"}}, "cannot be used with finetuning_type: full"),
    ({"flash_attn": "fa2"}, "fa2 needs FlashAttention-2 on a CUDA GPU"),
    ({"enable_liger_kernel": True}, "Liger's Triton kernels need a CUDA GPU"),
])
def test_what_this_machine_cannot_run_is_refused_before_any_work(tiny, tmp_path, values, message):
    """One line, exit 2 from the stage, before data or model are loaded (the data dir here does not even exist)."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only refusals")
    values = dict(values)
    lora = values.pop("lora", None)
    with pytest.raises(ConfigError, match=message) as err:
        training.setup(make_inputs("sft", lora=lora, **values), paths(tiny, tmp_path, tmp_path, "sft"))
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_attention_choice():
    from tunepipe.models.loading import attention_implementation

    assert attention_implementation("sdpa") == "sdpa"
    assert attention_implementation("eager") == attention_implementation("disabled") == "eager"
    if not torch.cuda.is_available():
        assert attention_implementation("auto") == "sdpa"  # FlashAttention only with a GPU and flash_attn
