"""SFT throughput: padding-free packing vs padded batches, same data, same batches, same number of examples.

    .venv/bin/python bench/train.py [--examples 640] [--batch-size 16] [--repeats 2]
                                    [--model outputs/models/cpt] [--data outputs/data/sft]

Runs the real sft stage code (tunepipe.training: setup -> train) twice per repeat, `packing: false` then
`packing: true`, on the prepared SFT features (run `python -m stages.prepare sft` first), with params.yaml's sft
hyper-parameters except max_steps = examples / batch size and no checkpoints. Both variants see exactly the same
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_variant(params, model: str, tokenizer: str, data: Path, out: Path, packing: bool, steps: int, batch: int):
    from tunepipe import training

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


def main() -> None:
    from stages import common
    from tunepipe.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=640, help="examples seen by each variant")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per variant (best one shown)")
    parser.add_argument("--model", default=None, help="model to train (default: outputs/models/cpt, else base)")
    parser.add_argument("--data", default=str(common.data_dir("sft")), help="prepared sft features")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    params = load_params(ROOT / "params.yaml")
    tokenizer = common.base_model_path(params)
    model = args.model or (str(common.model_dir("cpt")) if (common.model_dir("cpt") / "config.json").exists()
                           else tokenizer)
    steps = max(1, args.examples // args.batch_size)
    print(f"model {model}\ndata {args.data}\n{steps} steps x {args.batch_size} examples = "
          f"{steps * args.batch_size} examples per variant, {args.repeats} repeat(s)\n", flush=True)

    results: dict[str, list[dict]] = {"padded": [], "packed": []}
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as tmp:
        for repeat in range(args.repeats):
            for name, packing in (("padded", False), ("packed", True)):
                out = Path(tmp) / f"{name}-{repeat}"
                m = run_variant(params, model, tokenizer, Path(args.data), out, packing, steps, args.batch_size)
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
