"""Build two small, deterministic test tokenizers for the LLaMA-Factory parity oracle.

Usage (either venv works; needs `tokenizers` + `transformers`):
    python bench/make_test_tokenizers.py [--data-dir DIR] [--out-dir DIR] [--vocab-size N]
Defaults: --data-dir /work/shared/data/llamafactory-demo, --out-dir bench/_tokenizers, --vocab-size 2000.

Both tokenizers share one byte-level BPE model (GPT-2/Qwen style: ByteLevel pre-tokenizer and decoder)
trained on the demo text; they differ only in their special tokens, which are appended after the BPE vocab:
  bpe_plain  eos `<|endoftext|>` (id = vocab_size); no bos, no pad, no chat template. Qwen-like.
  bpe_bos    bos `<s>` (id vocab_size), eos `</s>` (vocab_size+1); no pad. Loads as GPT2Tokenizer with
             `add_bos_token=True`, so `getattr(tokenizer, "add_bos_token", False)` is True (what LF's
             pretrain processor checks) and tokenizer(text) prepends `<s>`. Llama-like.

Hub access is unavailable here, so these stand in for real model tokenizers in parity tests. They are
small (a few hundred KB) and byte-for-byte reproducible: the BPE trainer is deterministic for a fixed
corpus order, and the corpus is read in sorted file order.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_DATA_DIR = Path("/work/shared/data/llamafactory-demo")
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "_tokenizers"
# Real LLM tokenizers return only these; the PreTrainedTokenizerFast default would add token_type_ids,
# which LF's pretrain processor would then carry into the dataset.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]


def _strings(obj: object) -> Iterator[str]:
    """Yield every string leaf of a JSON value, in document order."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for item in obj:
            yield from _strings(item)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)


def iter_corpus(data_dir: Path) -> Iterator[str]:
    """All text of the demo datasets (multimodal demos skipped), sorted by file name."""
    for path in sorted(data_dir.iterdir()):
        if path.name.startswith("mllm") or path.name in {"dataset_info.json"}:
            continue
        if path.suffix == ".json":
            yield from _strings(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    yield from _strings(json.loads(line))
        elif path.suffix == ".txt":
            yield from path.read_text(encoding="utf-8").splitlines()


def train_bpe(data_dir: Path, vocab_size: int) -> Tokenizer:
    """Byte-level BPE without any special token (those are added per variant, after the BPE ids)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(iter_corpus(data_dir), trainer=trainer)
    return tok


def save_plain(base: Tokenizer, out: Path, *, eos: str) -> None:
    """Qwen/GPT-2 style: tokenizer.json only, eos appended after the BPE ids, nothing added around text."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(base.to_str())
    tok.add_special_tokens([eos])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, model_input_names=MODEL_INPUT_NAMES)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # transformers 5 writes "TokenizersBackend"; the v4-compatible alias loads the same class everywhere.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def save_bos(base: Tokenizer, out: Path, *, bos: str, eos: str) -> None:
    """Llama style: same BPE, `<s>` prepended, `add_bos_token` visible on the loaded tokenizer.

    Trap: transformers 5.x drops `add_bos_token` from tokenizer_config.json whenever a tokenizer.json is
    present, so a TemplateProcessing post-processor alone gives `add_bos_token == False` after reload. We
    therefore ship vocab.json + merges.txt (no tokenizer.json) with tokenizer_class GPT2Tokenizer (byte-level
    BPE, same GPT-2 regex split): the flag is then honoured and transformers builds the
    `<s> $A` TemplateProcessing post-processor itself.
    """
    model = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for token in (bos, eos):
        vocab[token] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    out.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    (out / "vocab.json").write_text(json.dumps(ordered, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": True,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": None,
        "model_input_names": MODEL_INPUT_NAMES,
        "added_tokens_decoder": {str(vocab[t]): {"content": t, **special} for t in (bos, eos)},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    ap.add_argument("--vocab-size", type=int, default=2000)
    args = ap.parse_args(argv)

    base = train_bpe(args.data_dir, args.vocab_size)
    save_plain(base, args.out_dir / "bpe_plain", eos="<|endoftext|>")
    save_bos(base, args.out_dir / "bpe_bos", bos="<s>", eos="</s>")
    print(f"wrote {args.out_dir}/bpe_plain and {args.out_dir}/bpe_bos (BPE vocab {base.get_vocab_size()})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
