"""SFT throughput: tunepipe's packed rows vs LLaMA-Factory 0.9.5's neat_packing, same data, same tokens per step.

    bash bench/lf_venv.sh                               # once: LLaMA-Factory 0.9.5 in a side venv (/work/lf-venv)
    .venv/bin/python bench/train.py [--steps 40] [--batch-size 8] [--cutoff-len 512] [--repeats 2]
                                    [--lf-venv /work/lf-venv] [--skip-lf] [--padded]

Data: LLaMA-Factory's `alpaca_en_demo` (../shared/data/llamafactory-demo), template qwen, cutoff_len 512, the
embedded tiny model and its tokenizer; 64 examples held out by LF's own split (val_size 64, seed 42), the same rows
on both sides. Both sides train LoRA (rank 16, alpha 32, all linear layers), lr 2e-3 cosine with 10% warm-up,
`--steps` optimizer steps of `--batch-size` packed rows of at most cutoff_len tokens: the same number of tokens
per optimizer step up to the rows' fill (printed). One torch thread each, fp32, sdpa.

    tunepipe packed   the real sft stage code (tunepipe.train.recipe: setup -> train), `packing: true`: rows by
                      best-fit decreasing, batched by length, block-diagonal attention from the position ids
    LF neat_packing   LLaMA-Factory's run_exp (the code behind `llamafactory-cli train`) with `neat_packing: true`
                      (its greedy-knapsack rows per 1000-row batch and a 4D block-diagonal mask), in its own venv
                      (bench/lf_train.py), timed exactly like ours
    --padded          also tunepipe's padded batches (`packing: false`, batch = examples): the old baseline

Printed per variant: effective tokens/s (real, non-pad tokens per second of optimizer steps: forward, backward,
optimizer; data loading and evaluation excluded), the padding fraction (share of computed positions that were
padding), tokens per optimizer step, and the held-out loss of the trained adapter, scored for every variant by the
same code (token-averaged cross-entropy of the 64 held-out examples). Repeats interleave the variants; the range
over repeats is shown (the machine is shared: timings swing with its load).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DEMO = ROOT.parent / "shared" / "data" / "llamafactory-demo"
DATASET, HELD_OUT, LR, RANK = "alpaca_en_demo", 64, 2e-3, 16


def params_for(cutoff: int, steps: int, batch: int, packing: bool):
    from tunepipe.config import parse_params

    return parse_params({
        "model": {"template": "qwen"}, "data": {"cutoff_len": cutoff},
        "lora": {"lora_rank": RANK, "lora_alpha": 2 * RANK, "lora_target": "all"},
        "train": {"learning_rate": LR, "max_steps": steps, "per_device_train_batch_size": batch,
                  "per_device_eval_batch_size": 8, "warmup_ratio": 0.1, "lr_scheduler_type": "cosine",
                  "logging_steps": max(1, steps // 4), "save_steps": 10 * steps, "packing": packing,
                  "flash_attn": "sdpa"},
        "stages": {"cpt": {"enabled": False}, "dpo": {"enabled": False}, "sft": {"dataset": DATASET}},
    })


def prepare(tokenizer: str, out: Path, cutoff: int) -> dict:
    """alpaca_en_demo -> out/{train,eval} with tunepipe's data layer (LF's tokens, LF's val_size split)."""
    from datasets import Dataset

    from tunepipe.data.features import DataArgs, prepare as prepare_features
    from tunepipe.models.loading import load_tokenizer

    args = DataArgs(dataset_dir=str(SHARED_DEMO), template="qwen", cutoff_len=cutoff, val_size=float(HELD_OUT),
                    seed=42)
    prepared = prepare_features("sft", DATASET, args, load_tokenizer(tokenizer))
    Dataset.from_dict(prepared.train).save_to_disk(str(out / "train"))
    Dataset.from_dict(prepared.eval).save_to_disk(str(out / "eval"))
    lengths = sorted(len(ids) for ids in prepared.train["input_ids"])
    return {"train": len(lengths), "eval": len(prepared.eval["input_ids"]), "min": lengths[0],
            "median": lengths[len(lengths) // 2], "mean": sum(lengths) / len(lengths), "max": lengths[-1]}


def run_tunepipe(model: str, data: Path, out: Path, cutoff: int, steps: int, batch: int, packing: bool) -> dict:
    from tunepipe.plan import train_inputs
    from tunepipe.train import recipe

    paths = recipe.StagePaths(input_model=model, tokenizer=model, data=data, adapter=out / "adapter",
                              checkpoints=out / "checkpoints", metrics=out / "metrics.json", plots=out / "plots")
    run = recipe.setup(train_inputs(params_for(cutoff, steps, batch, packing), "sft"), paths)
    run.trainer.eval_dataset = None  # scored below, the same way for every variant
    metrics = recipe.train(run)
    recipe.save(run, metrics)
    return {"tokens": metrics["tokens"], "seconds": metrics["seconds"], "steps": metrics["steps"],
            "tokens_per_second": metrics["tokens_per_second"], "padding_fraction": metrics["padding_fraction"],
            "adapter": str(out / "adapter")}


def run_lf(lf_python: Path, model: str, out: Path, cutoff: int, steps: int, batch: int) -> dict:
    cmd = [str(lf_python), str(ROOT / "bench" / "lf_train.py"), "--model", model, "--dataset-dir", str(SHARED_DEMO),
           "--dataset", DATASET, "--out", str(out), "--cutoff-len", str(cutoff), "--batch-size", str(batch),
           "--max-steps", str(steps), "--neat-packing", "--lr", str(LR), "--lora-rank", str(RANK),
           "--val-size", str(HELD_OUT)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(out / "hf")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=out.parent)
    if proc.returncode != 0:
        sys.exit(f"LLaMA-Factory run failed:\n{proc.stderr[-3000:]}")
    result = json.loads((out / "lf_metrics.json").read_text())
    result["adapter"] = str(out / "adapter")
    return result


def held_out_loss(model: str, adapter: str, eval_dir: Path) -> float:
    """Token-averaged cross-entropy of the held-out examples under base + adapter (padded batches of 8)."""
    import torch
    from datasets import load_from_disk
    from peft import PeftModel

    from tunepipe.models.loading import load_causal_lm
    from tunepipe.train.collators import COUNTS_KEY, PaddedCollator

    net = PeftModel.from_pretrained(load_causal_lm(model, attn_implementation="sdpa"), adapter).eval()
    rows = list(load_from_disk(str(eval_dir)))
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = PaddedCollator(pad_token_id=0)(rows[start:start + 8])
            batch.pop(COUNTS_KEY)
            labels = batch.pop("labels")
            logits = net(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((target != -100).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8, help="packed rows per optimizer step")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lf-venv", default=os.getenv("LF_VENV", "/work/lf-venv"))
    parser.add_argument("--skip-lf", action="store_true")
    parser.add_argument("--padded", action="store_true", help="also tunepipe's padded batches (batch = examples)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if not (SHARED_DEMO / "dataset_info.json").exists():
        sys.exit(f"no {SHARED_DEMO / 'dataset_info.json'}")
    lf_python = Path(args.lf_venv) / "bin" / "python"
    if not args.skip_lf and not lf_python.exists():
        sys.exit(f"no LLaMA-Factory venv at {args.lf_venv}: run `bash bench/lf_venv.sh {args.lf_venv}` first")
    from stages import common
    from tunepipe.models.tiny import resolve_model_path

    model = resolve_model_path("tiny", cache_dir=common.OUTPUTS / "cache")
    variants = ["tunepipe packed", *([] if args.skip_lf else ["LF neat_packing"]),
                *(["tunepipe padded"] if args.padded else [])]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="tunepipe-bench-") as tmp:
        data = Path(tmp) / "data"
        stats = prepare(model, data, args.cutoff_len)
        print(f"model {model} (tiny), data {DATASET}: {stats['train']} train / {stats['eval']} held-out examples, "
              f"length min {stats['min']} / median {stats['median']} / mean {stats['mean']:.0f} / max "
              f"{stats['max']} tokens; cutoff_len {args.cutoff_len}; {args.steps} steps x {args.batch_size} rows; "
              f"{args.repeats} repeat(s)\n", flush=True)
        for repeat in range(args.repeats):
            for name in variants:
                out = Path(tmp) / f"{name.replace(' ', '-')}-{repeat}"
                out.mkdir()
                if name == "LF neat_packing":
                    m = run_lf(lf_python, model, out, args.cutoff_len, args.steps, args.batch_size)
                else:
                    m = run_tunepipe(model, data, out, args.cutoff_len, args.steps, args.batch_size,
                                     packing=name == "tunepipe packed")
                m["eval_loss"] = held_out_loss(model, m["adapter"], data / "eval")
                results[name].append(m)
                print(f"  repeat {repeat + 1} {name:16} {m['tokens_per_second']:8,.0f} tok/s  ({m['seconds']:.1f} s), "
                      f"held-out loss {m['eval_loss']:.4f}", flush=True)

    print(f"\n{'variant':16} {'steps':>5} {'tok/step':>8} {'padding':>8} {'tok/s (range)':>20} {'held-out loss':>14}")
    for name, runs in results.items():
        tps = sorted(r["tokens_per_second"] for r in runs)
        r = runs[0]
        print(f"{name:16} {r['steps']:5d} {r['tokens'] / r['steps']:8,.0f} {100 * r['padding_fraction']:7.2f}% "
              f"{tps[0]:9,.0f} - {tps[-1]:<8,.0f} {min(x['eval_loss'] for x in runs):7.4f}-"
              f"{max(x['eval_loss'] for x in runs):.4f}")
    if "LF neat_packing" in results:
        ours = [r["tokens_per_second"] for r in results["tunepipe packed"]]
        lf = [r["tokens_per_second"] for r in results["LF neat_packing"]]
        paired = sorted(a / b for a, b in zip(ours, lf))
        print(f"\ntunepipe packed / LF neat_packing effective tokens/s: {paired[0]:.2f}x - {paired[-1]:.2f}x "
              f"(per repeat), best vs best {max(ours) / max(lf):.2f}x")
        diff = [a["eval_loss"] - b["eval_loss"] for a, b in zip(results["tunepipe packed"],
                                                               results["LF neat_packing"])]
        print(f"held-out loss, tunepipe - LF: {min(diff):+.4f} .. {max(diff):+.4f}")


if __name__ == "__main__":
    main()
