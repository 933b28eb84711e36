"""merge-<stage>: merged == adapter logits (LoRA, DoRA, rsLoRA, full), the template contract of the saved model,
generation that stops at the template's EOS, and atomic output (a failed merge leaves nothing)."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tests.conftest import DEMO_PARAMS_YAML  # noqa: E402
from tunepipe.models import merging  # noqa: E402
from tunepipe.data.templates import get_template  # noqa: E402
from tunepipe.models.merging import MergeError, check_chat_template, merge_adapter  # noqa: E402
from tunepipe.models.loading import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Diond was founded in 1489."
QUESTION = "In which year was Diond founded?"


pytestmark = pytest.mark.usefixtures("one_thread")

def fixed(tokenizer_path: str, name: str = "qwen"):
    tok = load_tokenizer(tokenizer_path)
    template = get_template(name)
    template.fix_tokenizer(tok)
    return tok, template


def base_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_adapter(base: str, out: Path, *, seed: int = 0, **lora) -> Path:
    """A LoRA adapter with random non-zero A and B (init_lora_weights=False), so merging changes the weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM", **lora)
    model = get_peft_model(base_model(base), config)
    with torch.no_grad():  # keep the delta moderate: random B at full scale makes the logits explode
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(str(out))
    return out


def train_one_example_adapter(base: str, out: Path, steps: int = 30) -> Path:
    """A LoRA adapter (+ a fully trained lm_head, `modules_to_save`) trained until the model answers QUESTION with
    ANSWER + <|im_end|> (greedy). LoRA alone barely moves the random tiny base's output head."""
    from peft import LoraConfig, get_peft_model

    tok, template = fixed(base)
    prompt, answer = template.encode_oneturn(tok, [{"role": "user", "content": QUESTION},
                                                   {"role": "assistant", "content": ANSWER}], None, None)
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    torch.manual_seed(0)
    model = get_peft_model(base_model(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                        modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()
    model.save_pretrained(str(out))
    return out


def conversations(n: int, seed: int = 0) -> list[dict]:
    return merging.synthetic_conversations(n, seed, ragged=True)


def run_merge(tiny: str, adapter: Path, out: Path, convs=None, **kwargs):
    tok, template = fixed(tiny)
    return merge_adapter(tiny, adapter, out, tokenizer=tok, template=template,
                         conversations=convs or merging.SYNTHETIC_CONVERSATIONS, max_new_tokens=8, **kwargs)


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}], ids=["lora", "dora", "rslora"])
def test_merged_logits_equal_adapter_logits(tiny, tmp_path, variant):
    from peft import PeftModel

    adapter = make_adapter(tiny, tmp_path / "adapter", **variant)
    result = run_merge(tiny, adapter, tmp_path / "merged")
    assert result.metrics["max_logit_diff"] < 1e-4
    assert result.metrics["logit_tolerance"] == 1e-4 and result.metrics["probe_tokens"] > 50

    # independently: fresh adapter model vs the saved merged model, on ids the probes did not use
    ids = random.Random(1).choices(range(3, 1000), k=40)
    with_adapter = PeftModel.from_pretrained(base_model(tiny), str(adapter)).eval()
    merged = base_model(str(tmp_path / "merged"))
    assert (logits(with_adapter, ids) - logits(merged, ids)).abs().max().item() < 1e-4
    # and the merge really changed the model (the check is not vacuous)
    assert (logits(base_model(tiny), ids) - logits(merged, ids)).abs().max().item() > 1e-2
    assert not any("lora" in k for k in merged.state_dict())
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_adapter_trained_on_grown_vocabulary(tiny, tmp_path):
    """Training grows the embeddings when the fixed tokenizer outgrows the model (pad to 64) and saves them with the
    adapter (modules_to_save); the merge grows the input model the same way before loading the adapter."""
    from peft import LoraConfig, get_peft_model

    tok, template = fixed(tiny)
    model = base_model(tiny)
    rows = model.get_input_embeddings().weight.shape[0]
    new_tokens = [f"<new_{i}>" for i in range(rows - len(tok) + 40)]  # 40 more than the padded embedding holds
    tok.add_tokens(new_tokens)
    assert len(tok) > rows
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                  modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
            elif "modules_to_save" in name:
                p.add_(0.01 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    base_tok = load_tokenizer(tiny)
    base_tok.add_tokens(new_tokens)
    result = merge_adapter(tiny, tmp_path / "adapter", tmp_path / "merged", tokenizer=base_tok, template=template,
                           conversations=merging.SYNTHETIC_CONVERSATIONS, max_new_tokens=4)
    assert result.metrics["max_logit_diff"] < 1e-4
    merged = base_model(str(tmp_path / "merged"))
    assert merged.get_input_embeddings().weight.shape[0] == -(-len(tok) // 64) * 64 > rows
    ids = [len(tok) - 1, 5, 6, len(tok) - 2]  # new tokens included
    assert (logits(peft_model.eval(), ids) - logits(merged, ids)).abs().max().item() < 1e-4


def test_full_finetuning_dir_is_resaved(tiny, tmp_path):
    full = tmp_path / "full"
    model = base_model(tiny)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(str(full))
    result = run_merge(tiny, full, tmp_path / "merged", full=True)
    assert result.metrics["max_logit_diff"] == 0.0
    ids = list(range(3, 40))
    assert torch.equal(logits(model, ids), logits(base_model(str(tmp_path / "merged")), ids))
    with pytest.raises(MergeError, match="full weights: set finetuning_type: full"):
        run_merge(tiny, full, tmp_path / "again")  # a full-weights dir given as a LoRA adapter


def test_saved_chat_template_renders_training_ids(tiny, tmp_path):
    from tunepipe.data.features import DataArgs, load_examples

    import numpy as np

    adapter = make_adapter(tiny, tmp_path / "adapter")
    convs = conversations(60)
    result = run_merge(tiny, adapter, tmp_path / "merged", convs=convs)
    assert result.metrics["template_roundtrip_ok"] == 1 and result.metrics["template_conversations"] == 60
    assert result.metrics["template_mismatches"] == 0 and result.metrics["generation_prompt_mismatches"] == 0

    # the saved tokenizer, reloaded as a user would, on random and on the demo's multi-turn chat data
    saved = load_tokenizer(str(tmp_path / "merged"))
    _, template = fixed(tiny)
    demo = load_examples(["demo_sft_chat", "demo_sft"], DataArgs(dataset_dir=str(ROOT / "data"), template="qwen"),
                         "sft", np.random.RandomState(0), [], {})
    demo_convs = merging.conversations_from_examples(demo, 400)
    assert len(demo_convs) == 400 and any(len(c["messages"]) >= 4 for c in demo_convs)
    for convs_ in (conversations(100, seed=7), demo_convs):
        check = check_chat_template(saved, template, convs_)
        assert check["mismatches"] == 0 and check["prompt_mismatches"] == 0, check["first_mismatch"]
    one = convs[0]
    assert merging.chat_template_ids(saved, one) == merging.encoder_ids(template, saved, one)
    assert "<|im_start|>system\n" in saved.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_config_and_generation_config_carry_template_eos(tiny, tmp_path):
    adapter = make_adapter(tiny, tmp_path / "adapter")
    result = run_merge(tiny, adapter, tmp_path / "merged")
    tok, template = fixed(tiny)
    stop = template.stop_token_ids(tok)
    assert stop == [tok.convert_tokens_to_ids("<|im_end|>")]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    base_eos = json.loads((Path(tiny) / "config.json").read_text())["eos_token_id"]
    for cfg in (config, generation):
        assert isinstance(cfg["eos_token_id"], list) and set(stop) <= set(cfg["eos_token_id"])
        assert cfg["eos_token_id"] == stop + [base_eos]  # template stop ids first, the model's own EOS kept
        assert cfg["pad_token_id"] == tok.pad_token_id
    saved = load_tokenizer(str(tmp_path / "merged"))
    assert saved.eos_token == "<|im_end|>" and saved.pad_token == "<|endoftext|>"
    assert saved.chat_template == template.jinja_template(tok)
    assert result.report["eos_token_ids"] == config["eos_token_id"]
    assert json.loads((tmp_path / "merged" / merging.REPORT_FILE).read_text())["template"] == "qwen"


def test_generation_stops_at_template_eos(tiny, tmp_path):
    adapter = train_one_example_adapter(tiny, tmp_path / "adapter")
    convs = [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
              "system": "", "tools": ""}] + merging.SYNTHETIC_CONVERSATIONS
    tok, template = fixed(tiny)
    result = merge_adapter(tiny, adapter, tmp_path / "merged", tokenizer=tok, template=template,
                           conversations=convs, max_new_tokens=40)
    generation = result.report["generation"]
    assert result.metrics["generation_stopped"] == 1, generation
    assert generation["output"] == ANSWER
    assert generation["stop_token"] == template.stop_token_ids(tok)[0]
    assert result.metrics["generation_new_tokens"] < 40

    # the same through plain transformers, relying only on the saved files
    from transformers import AutoModelForCausalLM

    saved = load_tokenizer(str(tmp_path / "merged"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    text = saved.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True)
    ids = saved(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, do_sample=False, max_new_tokens=40)[0, ids["input_ids"].shape[1]:].tolist()
    assert out[-1] == saved.convert_tokens_to_ids("<|im_end|>") and len(out) < 40
    assert saved.decode(out, skip_special_tokens=True) == ANSWER

    # contrast: the untrained base, given the same prompt, runs to max_new_tokens
    untrained = base_model(tiny)
    out = untrained.generate(**ids, do_sample=False, max_new_tokens=40, eos_token_id=[2])[0].tolist()
    assert len(out) - ids["input_ids"].shape[1] == 40


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".merged"))


def test_failure_mid_merge_leaves_nothing(tiny, tmp_path, monkeypatch):
    adapter = make_adapter(tiny, tmp_path / "adapter")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(merging, "_save_tokenizer", boom)  # after the weights were written
    with pytest.raises(RuntimeError, match="disk full"):
        run_merge(tiny, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


def test_failed_checks_refuse_the_merge(tiny, tmp_path, monkeypatch):
    adapter = make_adapter(tiny, tmp_path / "adapter")
    with pytest.raises(MergeError, match=r"merged logits differ .* \(> 1e-12 in float32\)"):
        run_merge(tiny, adapter, tmp_path / "merged", logit_tolerance=1e-12)
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []

    # a chat_template that drops the system block: the round-trip check names the first difference
    original = merging.prepare_tokenizer

    def wrong_template(tokenizer, template):
        original(tokenizer, template)
        tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>system", "<|im_start|>sys")
        return tokenizer

    monkeypatch.setattr(merging, "prepare_tokenizer", wrong_template)
    with pytest.raises(MergeError, match=r"chat_template round-trip failed for 4/4 conversations \(first: #0"):
        run_merge(tiny, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []
    # a previous good merge survives a failed one
    monkeypatch.setattr(merging, "prepare_tokenizer", original)
    run_merge(tiny, adapter, tmp_path / "merged")
    before = (tmp_path / "merged" / "model.safetensors").read_bytes()
    with pytest.raises(MergeError):
        run_merge(tiny, make_adapter(tiny, tmp_path / "other", seed=3), tmp_path / "merged", logit_tolerance=1e-12)
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == before


def test_missing_adapter_is_one_line_error(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="no adapter_config.json .run the stage's training first"):
        run_merge(tiny, tmp_path / "empty", tmp_path / "merged")


def test_stage_cli(tiny, tmp_path, monkeypatch, capsys):
    """`python -m stages.merge cpt|sft` in a scratch project (in-process): writes the model and
    metrics/merge_<stage>.json; a missing adapter is a one-line error, exit code 2, and no output."""
    from stages import common
    from stages import merge as merge_stage
    from stages import params as params_stage
    from tunepipe.config import STAGES

    project = tmp_path / "project"
    shutil.copytree(ROOT / "data", project / "data")
    (project / "params.yaml").write_text(DEMO_PARAMS_YAML + "evaluate: {max_new_tokens: 4}\n")
    monkeypatch.chdir(project)  # stages run from the project root, as DVC starts them
    params_stage.write()
    shutil.copytree(tiny, common.base_model_dir())

    def merge(stage):
        monkeypatch.setattr(sys, "argv", ["stages.merge", stage])
        common.run(merge_stage.main, common.stage_argument("merge", STAGES))

    with pytest.raises(SystemExit) as exit_info:
        merge("cpt")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "adapters/cpt: no adapter_config.json" in err[-1]
    assert not common.model_dir("cpt").exists()

    make_adapter(str(common.base_model_dir()), common.adapter_dir("cpt"))
    merge("cpt")
    metrics = json.loads((project / "metrics" / "merge_cpt.json").read_text())
    assert metrics["template_roundtrip_ok"] == 1 and metrics["max_logit_diff"] < 1e-4
    assert metrics["template_conversations"] == len(merging.SYNTHETIC_CONVERSATIONS) + 32  # cpt: no chat data
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    assert (common.model_dir("cpt") / "config.json").is_file()
    assert "merge-cpt:" in capsys.readouterr().out

    # sft starts from the cpt merge and checks its own (demo SFT) conversations too
    make_adapter(str(common.model_dir("cpt")), common.adapter_dir("sft"), seed=1)
    merge("sft")
    metrics = json.loads((project / "metrics" / "merge_sft.json").read_text())
    assert metrics["template_mismatches"] == 0 and metrics["max_logit_diff"] < 1e-4
    assert metrics["template_conversations"] == 32 + len(merging.SYNTHETIC_CONVERSATIONS) + 32
    report = json.loads((common.model_dir("sft") / merging.REPORT_FILE).read_text())
    assert report["input_model"] == str(common.model_dir("cpt")) and report["previous_stage"] == "cpt"

    with pytest.raises(SystemExit):
        merge("kto")  # disabled in params
    assert "no step 'merge-kto' in the plan" in capsys.readouterr().err  # disabled in params
