"""Token-level parity oracle: run LLaMA-Factory 0.9.5's own data pipeline and dump the processed rows.

Run with the SIDE venv's python (built by bench/lf_venv.sh), never with the project venv:

    /work/lf-venv/bin/python bench/lf_oracle.py --stage sft --dataset alpaca_en_demo \
        --dataset-dir /work/shared/data/llamafactory-demo --template qwen \
        --tokenizer bench/_tokenizers/bpe_plain --cutoff-len 256 --max-samples 20 --out /tmp/lf_sft.jsonl

The CLI mirrors `tunepipe data export` (plus LF-only knobs: --seed, --mix-strategy, --interleave-probs,
--preprocessing-batch-size, --tool-format, --default-system, --[no-]enable-thinking).

What it does, in the order `llamafactory-cli train` does it:
  1. turns the CLI into the config dict a YAML run would have and calls LF's real get_train_args (it runs on
     CPU without weights). That gets every subtle rule for free, e.g. DataArguments.__post_init__ sees
     `packing` as given (None by default): neat_packing forces packing and only an *explicit* packing
     decrements cutoff_len by 1, while get_train_args defaults packing to (stage == "pt") *afterwards*, so
     default pt packing keeps the full cutoff_len; it also calls transformers.set_seed(seed), which the
     dataset_info `num_samples` sampling (numpy global RNG) depends on;
  2. load_tokenizer -> get_template_and_fix_tokenizer -> get_dataset(stage=...), with dpo mapped to LF's
     "rm" stage exactly as LF's DPO workflow does;
  3. for pt, adds `labels` via the real DataCollatorForLanguageModeling(mlm=False) the pt workflow uses
     (input_ids with every pad_token_id -> -100; pad == eos after the template fix, so eos is masked too).

Output: one JSON object per processed row of the train split, in dataset order, keys = LF's column names
(media columns images/videos/audios dropped when None/empty). Row count and tokenizer changes go to stderr;
LF's own chatter (logs, "training example:" dump) is routed to stderr too.

Hermetic by default: HF hub/datasets offline, and the datasets cache lives in a fresh temp dir per run
(so a stale Arrow/map cache can never answer for changed code or data); pass --hf-cache DIR to reuse one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any

MEDIA_COLUMNS = ("images", "videos", "audios")
LF_STAGE = {"pt": "pt", "sft": "sft", "dpo": "rm", "kto": "kto"}  # tunepipe stage -> get_dataset stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="LLaMA-Factory 0.9.5 data-pipeline oracle (see module doc).")
    ap.add_argument("--stage", required=True, choices=sorted(LF_STAGE))
    ap.add_argument("--dataset", required=True, help="comma-separated dataset names from dataset_info.json")
    ap.add_argument("--dataset-dir", required=True)
    ap.add_argument("--template", required=True)
    ap.add_argument("--tokenizer", required=True, help="local tokenizer directory")
    ap.add_argument("--cutoff-len", type=int, required=True)
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                    help="default: LF's (on for pt, off otherwise)")
    ap.add_argument("--neat-packing", action="store_true")
    ap.add_argument("--train-on-prompt", action="store_true")
    ap.add_argument("--mask-history", action="store_true")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--out", required=True, help="output .jsonl path")
    # LF-only knobs, LF defaults.
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--mix-strategy", default="concat",
                    choices=["concat", "interleave_under", "interleave_over", "interleave_once"])
    ap.add_argument("--interleave-probs", default=None, help="comma-separated floats")
    ap.add_argument("--preprocessing-batch-size", type=int, default=1000)
    ap.add_argument("--tool-format", default=None)
    ap.add_argument("--default-system", default=None)
    ap.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--hf-cache", default=None, help="datasets cache dir (default: a fresh temp dir per run)")
    ap.add_argument("--preprocessing-num-workers", type=int, default=None)
    ap.add_argument("--digest", action="store_true", help="write {rows, tokens, sha256 of input_ids} to --out "
                                                          "instead of every row (large corpora)")
    return ap.parse_args(argv)


def token_digest(dataset: Any) -> dict[str, Any]:
    """Rows, tokens and a sha256 over the input_ids of a datasets.Dataset, read in chunks (bench/preprocess.py
    computes the same on tunepipe's output)."""
    import hashlib

    import numpy as np

    digest, rows, tokens = hashlib.sha256(), 0, 0
    for batch in dataset.select_columns(["input_ids"]).iter(batch_size=4096):
        for ids in batch["input_ids"]:
            array = np.asarray(ids, dtype=np.int64)
            digest.update(array.tobytes())
            rows += 1
            tokens += len(array)
    return {"rows": rows, "tokens": tokens, "sha256": digest.hexdigest()}


def _set_env(cache_dir: str) -> None:
    """Must run before datasets/transformers are imported: both read these at import time."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = cache_dir
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")  # else get_train_args turns on transformers INFO logs


def _tokenizer_summary(tok: Any) -> str:
    def tid(name: str) -> str:
        return f"{getattr(tok, name)!r}/{getattr(tok, name + '_id')}"

    return (f"class={type(tok).__name__} len={len(tok)} bos={tid('bos_token')} eos={tid('eos_token')} "
            f"pad={tid('pad_token')} add_bos_token={getattr(tok, 'add_bos_token', False)}")


def train_config(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """The YAML config a `llamafactory-cli train` run would get for the same export (None = LF default)."""
    cfg: dict[str, Any] = {
        "stage": args.stage,  # "dpo" stays "dpo" here; only get_dataset sees "rm"
        "do_train": True,
        "model_name_or_path": args.tokenizer,
        "output_dir": output_dir,
        "report_to": "none",
        "dataset": args.dataset,
        "dataset_dir": args.dataset_dir,
        "template": args.template,
        "cutoff_len": args.cutoff_len,
        "packing": args.packing,
        "neat_packing": args.neat_packing,
        "train_on_prompt": args.train_on_prompt,
        "mask_history": args.mask_history,
        "max_samples": args.max_samples,
        "seed": args.seed,
        "mix_strategy": args.mix_strategy,
        "interleave_probs": args.interleave_probs,
        "preprocessing_batch_size": args.preprocessing_batch_size,
        "preprocessing_num_workers": args.preprocessing_num_workers,
        "tool_format": args.tool_format,
        "default_system": args.default_system,
        "enable_thinking": args.enable_thinking,
    }
    return {k: v for k, v in cfg.items() if v is not None}


def run(args: argparse.Namespace, scratch: str) -> int:
    from transformers import DataCollatorForLanguageModeling

    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    # 1-2. LF's own argument parsing (CPU-only is fine: it needs neither weights nor a GPU). The output dir
    #      is fresh and empty so get_train_args' resume-from-checkpoint logic stays out of the way.
    output_dir = os.path.join(scratch, "output")  # never written to; TrainingArguments requires one
    model_args, data_args, training_args, _, _ = get_train_args(train_config(args, output_dir))
    print(f"[lf_oracle] stage={args.stage} (LF get_dataset stage {LF_STAGE[args.stage]}) packing={data_args.packing} "
          f"neat_packing={data_args.neat_packing} effective cutoff_len={data_args.cutoff_len} "
          f"seed={training_args.seed}",
          file=sys.stderr)

    # 2. tokenizer, template fix, dataset: the workflow's own calls (train/*/workflow.py).
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    before_added = dict(tokenizer.get_added_vocab())
    print(f"[lf_oracle] tokenizer loaded:   {_tokenizer_summary(tokenizer)}", file=sys.stderr)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    added = {k: v for k, v in tokenizer.get_added_vocab().items() if before_added.get(k) != v}
    print(f"[lf_oracle] after template fix: {_tokenizer_summary(tokenizer)} newly added={added}", file=sys.stderr)

    started = time.perf_counter()
    dataset_module = get_dataset(template, model_args, data_args, training_args,
                                 stage=LF_STAGE[args.stage], **tokenizer_module)
    dataset = dataset_module["train_dataset"]
    print(f"[lf_oracle] get_dataset took {time.perf_counter() - started:.2f}s", file=sys.stderr)

    # 3. pt labels come from the collator, not the dataset: DataCollatorForLanguageModeling(mlm=False) sets
    #    labels = input_ids with every pad id replaced by -100 (checked against the collator on the first row).
    pad_id = tokenizer.pad_token_id
    if args.stage == "pt" and len(dataset):
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
        first = dataset[0]["input_ids"]
        assert collator([{"input_ids": first}])["labels"][0].tolist() == [-100 if t == pad_id else t for t in first]

    if args.digest:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(token_digest(dataset), fh)
        return 0
    n_rows = 0
    columns = [c for c in dataset.column_names]
    with open(args.out, "w", encoding="utf-8") as fh:
        for row in dataset.to_list():  # Arrow -> plain Python lists in C++, much faster than row iteration
            record = {k: row[k] for k in columns if not (k in MEDIA_COLUMNS and not row[k])}
            if args.stage == "pt":
                record["labels"] = [-100 if t == pad_id else t for t in row["input_ids"]]
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n_rows += 1
    print(f"[lf_oracle] rows={n_rows} columns={list(dataset.column_names)} -> {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="lf_oracle_"))
        _set_env(args.hf_cache or os.path.join(scratch, "hf_datasets"))
        # LF's logger binds sys.stdout when first configured (at import) and the processors print() a
        # sample row: send all of it to stderr so stdout stays empty.
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        rc = run(args, scratch)
    print(f"[lf_oracle] done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
