"""SFT throughput: padding-free packing vs padded batches, same data, same batches, same number of examples.

    .venv/bin/python bench/train.py [--dataset alpaca|demo] [--examples N] [--batch-size 16] [--repeats 2]
                                    [--model outputs/models/cpt] [--data outputs/data/sft]
                                    [--cutoff-len 512] [--eval-examples 64]

Runs the real sft stage code (tunepipe.train.recipe: setup -> train) twice per repeat, `packing: false` then
`packing: true`, with params.yaml's sft hyper-parameters except max_steps = examples / batch size and no checkpoints.
Two data sets:

    alpaca  (default when ../shared/data/llamafactory-demo exists) LLaMA-Factory's `alpaca_en_demo`, read in place
            from that folder (its dataset_info.json) and tokenized here, into a temporary directory, by the data
            layer (tunepipe.data.features) with the tiny model's tokenizer, template qwen and --cutoff-len (data
            cutoff_len of the runs too): the first examples + eval-examples rows, the last eval-examples of them
            held out (LF's val_size split, seeded). Realistic answer lengths: a wide length spread, much padding.
            The tiny model (`tiny`) is trained unless --model says otherwise.
    demo    the prepared SFT features of the shipped demo data (run `python -m stages.prepare sft` first); answers
            of similar lengths, so little padding to remove.
 Both variants see exactly the same
batches in the same order (same seed and sampler). Prints, per variant: effective tokens/s (real, non-pad tokens per
second of optimizer steps; evaluation excluded), the padding fraction (share of computed positions that were
padding), and the held-out loss after training; then the throughput ratio. Numbers, not pass/fail: they depend on
the machine and on how much other work it is doing (repeats interleave the variants; the best repeat is shown).

Expect the ratio to be bounded by 1 / (1 - padding fraction of the padded run): packing removes padding, it does
not change the arithmetic of the real tokens (see docs/stages.md, "Scaling out").
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_variant(params, model: str, tokenizer: str, data: Path, out: Path, packing: bool, steps: int, batch: int):
    from tunepipe.train import recipe as training

    raw = params.model_dump(exclude_unset=False)
    raw["stages"]["sft"].update(packing=packing, max_steps=steps, per_device_train_batch_size=batch,
                                save_steps=10 * steps, logging_steps=max(1, steps // 4))
    for name in ("cpt", "dpo", "kto"):
        raw["stages"][name]["enabled"] = False
    from tunepipe.config import parse_params

    p = parse_params(raw)
    paths = training.StagePaths(input_model=model, tokenizer=tokenizer, data=data, adapter=out / "adapter",
                                checkpoints=out / "checkpoints", metrics=out / "metrics.json", plots=out / "plots")
    run = training.setup("sft", p, paths)
    return training.train(run)


SHARED_DEMO = ROOT.parent / "shared" / "data" / "llamafactory-demo"


def prepare_alpaca(params, tokenizer: str, out: Path, *, examples: int, eval_examples: int, cutoff_len: int) -> dict:
    """Tokenize alpaca_en_demo (sft, template qwen) into out/{train,eval}; returns the length statistics."""
    from datasets import Dataset

    from tunepipe.data.features import DataArgs, prepare
    from tunepipe.models.loading import load_tokenizer

    args = DataArgs(dataset_dir=str(SHARED_DEMO), template="qwen", cutoff_len=cutoff_len,
                    max_samples=examples + eval_examples, val_size=float(eval_examples), seed=params.data.seed)
    prepared = prepare("sft", "alpaca_en_demo", args, load_tokenizer(tokenizer))
    Dataset.from_dict(prepared.train).save_to_disk(str(out / "train"))
    Dataset.from_dict(prepared.eval).save_to_disk(str(out / "eval"))
    lengths = sorted(len(ids) for ids in prepared.train["input_ids"])
    return {"train": len(lengths), "eval": len(prepared.eval["input_ids"]), "min": lengths[0],
            "median": lengths[len(lengths) // 2], "max": lengths[-1], "mean": sum(lengths) / len(lengths),
            "truncated": prepared.health.truncated}


def main() -> None:
    from stages import common
    from tunepipe.config import load_params, parse_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("alpaca", "demo"), default="alpaca" if SHARED_DEMO.is_dir() else "demo",
                        help=f"alpaca: alpaca_en_demo from {SHARED_DEMO} (default when present); demo: --data")
    parser.add_argument("--examples", type=int, default=None,
                        help="examples seen by each variant (default: 320 alpaca, 640 demo)")
    parser.add_argument("--eval-examples", type=int, default=64, help="alpaca: held-out examples")
    parser.add_argument("--cutoff-len", type=int, default=512, help="alpaca: tokens per example at most")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant (best one shown)")
    parser.add_argument("--model", default=None, help="model to train (default: outputs/models/cpt, else base)")
    parser.add_argument("--data", default=str(common.data_dir("sft")), help="demo: prepared sft features")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, once per run
    params = load_params(ROOT / "params.yaml")
    if args.examples is None:
        args.examples = 320 if args.dataset == "alpaca" else 640
    steps = max(1, args.examples // args.batch_size)

    results: dict[str, list[dict]] = {"padded": [], "packed": []}
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as tmp:
        if args.dataset == "alpaca":
            from tunepipe.models.tiny import resolve_model_path

            if not (SHARED_DEMO / "dataset_info.json").exists():
                sys.exit(f"--dataset alpaca: no {SHARED_DEMO / 'dataset_info.json'}")
            tokenizer = resolve_model_path("tiny", cache_dir=common.OUTPUTS / "cache", seed=params.model.tiny_seed)
            model = args.model or tokenizer
            data = Path(tmp) / "data"
            raw = params.model_dump(exclude_unset=False)
            raw["model"]["template"] = "qwen"
            raw["data"]["cutoff_len"] = args.cutoff_len  # the padding-free rows are bounded by it too
            params = parse_params(raw)
            stats = prepare_alpaca(params, tokenizer, data, examples=steps * args.batch_size,
                                   eval_examples=args.eval_examples, cutoff_len=args.cutoff_len)
            source = (f"alpaca_en_demo ({SHARED_DEMO}), template qwen, cutoff_len {args.cutoff_len}: "
                      f"{stats['train']} train / {stats['eval']} held-out examples, train length min "
                      f"{stats['min']} / median {stats['median']} / mean {stats['mean']:.0f} / max {stats['max']} "
                      f"tokens, {stats['truncated']} truncated")
        else:
            tokenizer = common.base_model_path(params)
            model = args.model or (str(common.model_dir("cpt")) if (common.model_dir("cpt") / "config.json").exists()
                                   else tokenizer)
            data = Path(args.data)
            source = f"{data} (prepared demo sft features)"
        print(f"model {model}\ntokenizer {tokenizer}\ndata {source}\n{steps} steps x {args.batch_size} examples = "
              f"{steps * args.batch_size} examples per variant, {args.repeats} repeat(s)\n", flush=True)
        for repeat in range(args.repeats):
            for name, packing in (("padded", False), ("packed", True)):
                out = Path(tmp) / f"{name}-{repeat}"
                m = run_variant(params, model, tokenizer, data, out, packing, steps, args.batch_size)
                results[name].append(m)
                print(f"  repeat {repeat + 1} {name}: {m['tokens_per_second']:,.0f} tok/s "
                      f"({m['seconds']:.1f} s), eval loss {m['eval_loss']:.4f}", flush=True)

    best = {name: max(runs, key=lambda m: m["tokens_per_second"]) for name, runs in results.items()}
    print(f"\n{'variant':8} {'steps':>5} {'tokens':>8} {'padding':>8} {'tok/s':>8} {'train s':>8} {'eval loss':>10}")
    for name, m in best.items():
        print(f"{name:8} {m['steps']:5d} {m['tokens']:8,d} {100 * m['padding_fraction']:7.1f}% "
              f"{m['tokens_per_second']:8,.0f} {m['seconds']:8.1f} {m['eval_loss']:10.4f}")
    ratio = best["packed"]["tokens_per_second"] / best["padded"]["tokens_per_second"]
    ceiling = (1 - best["packed"]["padding_fraction"]) / (1 - best["padded"]["padding_fraction"])
    loss_diff = best["packed"]["eval_loss"] - best["padded"]["eval_loss"]
    print(f"\npacked / padded effective tokens/s: {ratio:.2f}x  (padding-removal ceiling ~{ceiling:.2f}x)")
    print(f"held-out loss packed - padded: {loss_diff:+.2e}  (same batches: equal up to float rounding)")
    if not math.isfinite(ratio):
        sys.exit(1)


if __name__ == "__main__":
    main()
