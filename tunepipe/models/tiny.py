"""The embedded `tiny` base model: a few million random parameters and a tokenizer trained on the demo corpus.

`model_name_or_path: tiny` needs nothing downloaded: `resolve_model_path` builds, once per (seed, corpus, config),
a randomly initialised Qwen2ForCausalLM of a few million parameters with a byte-level BPE tokenizer trained on the
shipped demo corpus, and saves it as an ordinary Hugging Face model directory. The build is deterministic: the
same seed and corpus give byte-identical `model.safetensors` and `tokenizer.json`, so DVC sees no change on rerun.

torch / transformers / tokenizers are imported inside the functions: the CLI imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tunepipe.config import TINY


# Bump when the build recipe changes in a way that changes the output bytes: it is part of the cache key.
TINY_BUILD_VERSION = 1

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes their ids: 0, 1, 2 (the BPE trainer puts special tokens first).
TINY_SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)

# Demo datasets the tokenizer is trained on by default (train and eval splits), read in this order.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data"
DEMO_CORPUS_FILES = (
    "demo_cpt.txt",
    "demo_cpt_eval.txt",
    "demo_sft.json",
    "demo_sft_eval.json",
    "demo_sft_chat.json",
    "demo_sft_chat_eval.json",
    "demo_dpo.json",
    "demo_dpo_eval.json",
    "demo_kto.json",
    "demo_kto_eval.json",
)
_COMPLETE_MARKER = "tiny_build.json"


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny model (Qwen2). The defaults give ~3.0M parameters on the demo corpus.

    `vocab_size` is the BPE trainer's *target*. The demo corpus saturates below it (every word of the domain becomes
    one token at ~1.25k), so the model's embedding is sized to the trained vocabulary rounded up to a multiple of
    64 (unused rows are harmless, as in Qwen's own checkpoints).
    """

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048  # = LLaMA-Factory's default cutoff_len
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    # Untied output head, initialised wider than the rest. With the usual 0.02 (tied or not) the largest logit a
    # frozen random head can produce is about 0.02 * hidden_size ~ 5, so LoRA-only training on a random base stalls
    # above unigram level (measured: held-out ppl ~330 after 150 CPT steps); at 0.1 it reaches ~9.
    tie_word_embeddings: bool = False
    lm_head_init_std: float = 0.1


# The tokenizer corpus is a frozen snapshot of the demo texts (DEMO_CORPUS_FILES, one JSON string per line) shipped
# with the package: editing the demo data must not change the base model, or every stage would rerun.
TINY_CORPUS = Path(__file__).resolve().parents[1] / "assets" / "tiny_corpus.jsonl"


def default_corpus_files(data_dir: Path | None = None) -> list[Path]:
    """The tiny tokenizer's corpus: the frozen snapshot, or the demo files in `data_dir` when given."""
    return [TINY_CORPUS] if data_dir is None else [data_dir / name for name in DEMO_CORPUS_FILES]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
def _strings(obj: object) -> Iterator[str]:
    """Every string leaf of a JSON value (values only, never keys), in document order."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for item in obj:
            yield from _strings(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)


def iter_corpus_text(files: Sequence[Path]) -> Iterator[str]:
    """Text of .txt (one doc per line), .json and .jsonl files, in the given order."""
    for path in files:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            yield from (line for line in text.splitlines() if line.strip())
        elif path.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    yield from _strings(json.loads(line))
        elif path.suffix == ".json":
            yield from _strings(json.loads(text))
        else:
            raise ValueError(f"tiny tokenizer corpus: unsupported file type {path} (use .txt, .json or .jsonl)")


def train_tiny_tokenizer(corpus_files: Sequence[Path], vocab_size: int):
    """Byte-level BPE (GPT-2/Qwen style, no BOS), special tokens at ids 0..2. Returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_corpus_text(corpus_files), trainer=trainer)
    return tok


def _save_tokenizer(tok, out_dir: Path, max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids, like real LLM tokenizers
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # transformers 5 writes "TokenizersBackend"; the v4-compatible name loads the same class in LF's venv too.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
def _corpus_digest(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(Path(path).name.encode() + b"\0")
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()


def tiny_build_key(*, seed: int, corpus_files: Sequence[Path], config: TinyConfig) -> str:
    """Short hash of everything that determines the tiny model's bytes (used as the cache directory name)."""
    payload = {
        "build_version": TINY_BUILD_VERSION,
        "seed": seed,
        "config": asdict(config),
        "corpus": _corpus_digest(corpus_files),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _write_tiny(out_dir: Path, *, seed: int, corpus_files: Sequence[Path], config: TinyConfig) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    tok = train_tiny_tokenizer(corpus_files, config.vocab_size)
    eos_id = tok.token_to_id(EOS_TOKEN)
    _save_tokenizer(tok, out_dir, config.max_position_embeddings)

    model_config = Qwen2Config(
        vocab_size=-(-tok.get_vocab_size() // 64) * 64,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype="float32",
    )
    # Seeded, on CPU, in float32, with the global RNG state restored afterwards: reproducible bit for bit.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(model_config)
        if not config.tie_word_embeddings:
            with torch.no_grad():
                model.lm_head.weight.normal_(mean=0.0, std=config.lm_head_init_std)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" would go to stderr on every build
    try:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    n_params = sum(p.numel() for p in model.parameters())
    marker = {
        "name": TINY,
        "build_version": TINY_BUILD_VERSION,
        "seed": seed,
        "config": asdict(config),
        "corpus_files": [Path(p).name for p in corpus_files],
        "corpus_sha256": _corpus_digest(corpus_files),
        "parameters": n_params,
        "tokenizer_vocab": tok.get_vocab_size(),
        "model_vocab": model_config.vocab_size,
    }
    (out_dir / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fix_permissions(out_dir)


def _fix_permissions(path: Path) -> None:
    """mkdtemp makes 0700 dirs (and some writers 0600 files); give the usual umask-based modes instead."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for child in path.iterdir():
        child.chmod(0o666 & ~umask)


def _corpus(corpus_files: Sequence[str | Path] | None) -> list[Path]:
    corpus = [Path(p) for p in (corpus_files if corpus_files is not None else default_corpus_files())]
    missing = [str(p) for p in corpus if not p.is_file()]
    if missing:
        hint = "" if corpus_files is not None else " (the default corpus is the project's data/ folder)"
        raise FileNotFoundError(f"tiny model: corpus file(s) not found{hint}: {', '.join(missing)}")
    return corpus


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    corpus_files: Sequence[str | Path] | None = None,
    vocab_size: int | None = None,
    config: TinyConfig | None = None,
) -> Path:
    """Build the tiny model + tokenizer into `out_dir` (replaced if it exists) and return its path.

    `corpus_files` defaults to the shipped demo datasets; `vocab_size` (BPE target) overrides `config.vocab_size`.
    The directory is assembled in a temporary sibling and renamed into place, so a crash never leaves a
    half-written model at `out_dir`. Same seed + corpus + config => byte-identical files.
    """
    out_dir = Path(out_dir).resolve()
    corpus = _corpus(corpus_files)
    cfg = config if config is not None else TinyConfig()
    if vocab_size is not None:
        cfg = replace(cfg, vocab_size=vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_tiny(tmp, seed=seed, corpus_files=corpus, config=cfg)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()


def resolve_model_path(
    model_name_or_path: str,
    *,
    cache_dir: str | Path,
    seed: int = 0,
    corpus_files: Sequence[str | Path] | None = None,
    config: TinyConfig | None = None,
) -> str:
    """`"tiny"` -> path of the built tiny model (built on first use into cache_dir/tiny-<hash>); else unchanged.

    The hash covers the seed, the config, the corpus bytes and TINY_BUILD_VERSION, so a changed demo corpus
    gives a new directory (and a new model) rather than a stale one. Safe against concurrent first use.
    """
    if model_name_or_path != TINY:
        return model_name_or_path
    corpus = _corpus(corpus_files)
    cfg = config if config is not None else TinyConfig()
    target = Path(cache_dir).resolve() / f"{TINY}-{tiny_build_key(seed=seed, corpus_files=corpus, config=cfg)}"
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_tiny(tmp, seed=seed, corpus_files=corpus, config=cfg)
        try:
            os.replace(tmp, target)  # atomic; fails if another process finished first (non-empty target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
