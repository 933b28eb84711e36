"""LLaMA-Factory 0.9.5's SFT training (LoRA), timed the way tunepipe times its own: run inside the LF side venv.

    /work/lf-venv/bin/python bench/lf_train.py --model DIR --dataset-dir DIR --dataset NAME --out DIR \
        [--cutoff-len 512] [--batch-size 8] [--max-steps 40] [--neat-packing] [--lr 2e-3] [--max-samples N]

bench/train.py starts it (it is not imported by tunepipe). It calls LF's own `run_exp` (the code behind
`llamafactory-cli train`) with the YAML keys below, plus one TrainerCallback and a wrapped compute_loss that
measure exactly what tunepipe's ProgressCallback measures: real (non-padding) tokens of the batches trained on,
and the wall time of the optimizer steps (on_step_begin -> on_step_end: forward, backward, optimizer).
Writes out/lf_metrics.json ({tokens, slots, seconds, steps, tokens_per_second, padding_fraction}) and LF's
adapter (out/adapter).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--val-size", type=float, default=0.0, help="held out (LF's split; not trained on)")
    parser.add_argument("--neat-packing", action="store_true")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch
    from transformers import TrainerCallback

    from llamafactory.train.tuner import run_exp

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # tunepipe's default on CPU: 1 thread
    counts = {"tokens": 0, "slots": 0, "seconds": 0.0, "steps": 0, "training": False}

    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    original = CustomSeq2SeqTrainer.compute_loss

    def counting_loss(self, model, inputs, *rest, **kwargs):
        # Counted where the batch is trained on (prefetched batches are not), like tunepipe's TokenCounter.
        if model.training:
            mask = inputs["attention_mask"]
            if mask.dim() == 4:  # neat packing: LF's 4D mask is 0 where attended; a real token attends to itself
                real = int((mask.diagonal(dim1=-2, dim2=-1) == 0).sum())
            else:
                real = int((mask != 0).sum())
            counts["tokens"] += real
            counts["slots"] += int(inputs["input_ids"].numel())
            counts["width"] = int(inputs["input_ids"].shape[-1])
        return original(self, model, inputs, *rest, **kwargs)

    CustomSeq2SeqTrainer.compute_loss = counting_loss

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            counts["training"] = True

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            counts["seconds"] += time.perf_counter() - self.start
            counts["steps"] += 1

        def on_train_end(self, *a, **k):
            counts["training"] = False

    yaml = {
        "model_name_or_path": args.model, "trust_remote_code": False,
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_rank": args.lora_rank,
        "lora_alpha": 2 * args.lora_rank, "lora_target": "all",
        "dataset": args.dataset, "dataset_dir": args.dataset_dir, "template": "qwen", "cutoff_len": args.cutoff_len,
        "overwrite_cache": True, "preprocessing_num_workers": None, "neat_packing": args.neat_packing,
        "output_dir": str(args.out / "adapter"), "logging_steps": max(1, args.max_steps // 4),
        "save_strategy": "no", "plot_loss": False, "overwrite_output_dir": True, "report_to": "none",
        "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
        "learning_rate": args.lr, "max_steps": args.max_steps, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
        "bf16": False, "fp16": False, "use_cpu": True, "seed": args.seed, "dataloader_num_workers": 0,
        "disable_tqdm": True, "flash_attn": "sdpa",
    }
    if args.val_size:
        yaml["val_size"] = args.val_size
    if args.max_samples:
        yaml["max_samples"] = args.max_samples
    started = time.perf_counter()
    run_exp(yaml, callbacks=[StepTimer()])
    wall = time.perf_counter() - started
    result = {
        "tokens": counts["tokens"], "slots": counts["slots"], "seconds": round(counts["seconds"], 3),
        "steps": counts["steps"], "row_width": counts.get("width"), "wall_seconds": round(wall, 2),
        "tokens_per_second": round(counts["tokens"] / counts["seconds"], 1) if counts["seconds"] else None,
        "padding_fraction": round(1 - counts["tokens"] / counts["slots"], 4) if counts["slots"] else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lf_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
