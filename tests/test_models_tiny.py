"""The embedded `tiny` model: a real Qwen2 checkpoint + BPE tokenizer, built locally, deterministically, atomically."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported

import hashlib
import json
from pathlib import Path

import pytest

from tunepipe.models import tiny as models
from tunepipe.models.tiny import (
    EOS_TOKEN,
    IM_END,
    IM_START,
    TINY,
    build_tiny_model,
    resolve_model_path,
)
from tunepipe.models.loading import load_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three builds (~5 s each on a laptop CPU): seed 0 twice, and seed 1 through resolve_model_path."""
    root = tmp_path_factory.mktemp("tiny")
    a = build_tiny_model(root / "a", seed=0)
    b = build_tiny_model(root / "b", seed=0)
    c = Path(resolve_model_path(TINY, cache_dir=root / "cache", seed=1))
    return {"root": root, "a": a, "b": b, "c": c}


@pytest.fixture(scope="module")
def tokenizer(built):
    return load_tokenizer(str(built["a"]))


def test_writes_a_normal_hf_model_dir(built):
    for name in HF_FILES:
        assert (built["a"] / name).is_file(), name
    config = json.loads((built["a"] / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["bos_token_id"] is None
    gen = json.loads((built["a"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == config["eos_token_id"]


def test_same_seed_gives_identical_bytes_other_seed_differs(built):
    a, b, c = built["a"], built["b"], built["c"]
    for name in HF_FILES:
        assert _sha(a / name) == _sha(b / name), name
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")
    assert _sha(a / "tokenizer.json") == _sha(c / "tokenizer.json")  # the tokenizer depends on the corpus only


def test_param_count_and_forward_pass(built, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(built["a"]))
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 <= n_params <= 6_000_000, n_params
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size >= len(tokenizer)

    text = f"{IM_START}user\nWhat is the capital of Voia?{IM_END}\n{IM_START}assistant\n"
    batch = tokenizer([text], return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(out.loss)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert batch["input_ids"].shape[1] < generated.shape[1] <= batch["input_ids"].shape[1] + 4


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == EOS_TOKEN
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (EOS_TOKEN, IM_START, IM_END)}
    assert ids == {EOS_TOKEN: 0, IM_START: 1, IM_END: 2}
    # each is one special token, never split into pieces, and kept out of decoded text
    assert tokenizer.encode(IM_END, add_special_tokens=False) == [2]
    encoded = tokenizer.encode(f"{IM_START}user\nhi{IM_END}\n", add_special_tokens=False)
    assert encoded[0] == 1 and 2 in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "user\nhi\n"
    assert {0, 1, 2} <= set(tokenizer.all_special_ids)
    # no BOS (or anything else) is added around plain text
    assert tokenizer.encode("The capital", add_special_tokens=True) == tokenizer.encode(
        "The capital", add_special_tokens=False
    )


def test_tokenizer_round_trips_domain_text(tokenizer):
    lines = (DATA / "demo_cpt_eval.txt").read_text(encoding="utf-8").splitlines()
    sft = json.loads((DATA / "demo_sft_eval.json").read_text(encoding="utf-8"))
    samples = lines[:10] + [row["output"] for row in sft[:10]] + ["Ünïcødé → 今天天气很好 🙂", "  two  spaces\n"]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # the BPE fits the domain: well under one token per 3 characters on held-out text
    text = "\n".join(lines)
    assert len(tokenizer.encode(text, add_special_tokens=False)) < len(text) / 3


@pytest.mark.parametrize("declared", ["PreTrainedTokenizerFast", "TokenizersBackend"])
def test_generic_fast_tokenizer_class_is_kept_beside_a_qwen2_config(built, tmp_path, declared):
    """transformers 5.2x would load a Qwen2Tokenizer from config.json (another pre-tokenizer, other ids);
    LLaMA-Factory's transformers keeps the declared generic class, and so do we."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(built["a"] / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": declared}))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    loaded = load_tokenizer(str(tmp_path))
    assert type(loaded).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert "Split" not in str(loaded.backend_tokenizer.pre_tokenizer)
    text = "Ünïcødé 12345 isn't\n\n  spaced"
    from tokenizers import Tokenizer

    saved = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # the ids the file itself defines
    assert loaded.encode(text, add_special_tokens=False) == saved.encode(text, add_special_tokens=False).ids


def test_resolve_model_path(built, monkeypatch):
    assert resolve_model_path("Qwen/Qwen2.5-0.5B", cache_dir=built["root"]) == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_path("/some/local/dir", cache_dir=built["root"]) == "/some/local/dir"
    c = built["c"]
    assert c.parent == (built["root"] / "cache").resolve()
    assert c.name.startswith("tiny-") and len(c.name) == len("tiny-") + 16

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached tiny model was rebuilt")

    monkeypatch.setattr(models, "_write_tiny", no_rebuild)
    assert resolve_model_path(TINY, cache_dir=built["root"] / "cache", seed=1) == str(c)
    # nothing but the finished model is left in the cache dir
    assert [p.name for p in c.parent.iterdir()] == [c.name]


def test_cache_key_depends_on_seed_corpus_and_config(tmp_path):
    files = models.default_corpus_files(models.DEFAULT_DATA_DIR)  # the demo files themselves
    assert models.default_corpus_files() == [models.TINY_CORPUS]
    key = models.tiny_build_key(seed=0, corpus_files=files, config=models.TinyConfig())
    assert key == models.tiny_build_key(seed=0, corpus_files=files, config=models.TinyConfig())
    assert key != models.tiny_build_key(seed=1, corpus_files=files, config=models.TinyConfig())
    assert key != models.tiny_build_key(seed=0, corpus_files=files[:1], config=models.TinyConfig())
    assert key != models.tiny_build_key(seed=0, corpus_files=files, config=models.TinyConfig(num_hidden_layers=3))


def test_frozen_corpus_snapshot_trains_the_same_tokenizer_as_the_demo_files():
    # editing data/ must not change the base model, so the corpus is a snapshot; it must still be the demo text
    snapshot = models.train_tiny_tokenizer(models.default_corpus_files(), 4096)
    demo = models.train_tiny_tokenizer(models.default_corpus_files(models.DEFAULT_DATA_DIR), 4096)
    assert snapshot.to_str() == demo.to_str()


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_write(out_dir, **kwargs):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_write_tiny", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_model(tmp_path / "tiny")
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path(TINY, cache_dir=tmp_path / "cache")
    assert [p.name for p in tmp_path.iterdir() if p.name != "cache"] == []
    assert list((tmp_path / "cache").iterdir()) == []


def test_rebuild_replaces_existing_dir_and_keeps_global_rng(built, tmp_path):
    import torch

    target = tmp_path / "tiny"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    corpus = [DATA / "demo_sft_eval.json", DATA / "demo_cpt_eval.txt"]  # small corpus: a fast build
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(target, seed=0, corpus_files=corpus)
    assert torch.equal(torch.rand(3), expected)  # the build does not consume the caller's RNG stream
    assert not (target / "stale.txt").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_bad_corpus_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_tiny_model(tmp_path / "x", corpus_files=[tmp_path / "missing.txt"])
    bad = tmp_path / "corpus.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        build_tiny_model(tmp_path / "x", corpus_files=[bad])
    assert not (tmp_path / "x").exists()
