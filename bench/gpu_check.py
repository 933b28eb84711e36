"""The GPU check: Qwen2.5-shaped random models through the real stages, per attention / kernel / quantization variant.

    python bench/gpu_check.py [--shapes 0.5b,1.5b] [--variants sdpa,fa2,liger,4bit] [--sft-steps 30]
                              [--cutoff-len 1024] [--batch-size 8] [--out DIR]
    python bench/gpu_check.py --shapes tiny            # CPU: what CI runs (bench/gpu.sh picks it without a GPU)

Nothing is downloaded. Per shape a Qwen2ForCausalLM is built from its config with random weights (Qwen2.5-0.5B:
24 layers, hidden 896, MLP 4864, 14 heads / 2 KV heads, vocab 151936, tied embeddings; 1.5B: 28 / 1536 / 8960 /
12 / 2; `tiny`: the embedded tiny model's 2-layer test shape) and saved with the project's own tokenizer (the tiny
model's BPE tokenizer, its ids a subset of the vocabulary). A throw-away project (this working tree's stages/,
tunepipe/ and data/) then runs, as `python -m stages.<name>` processes exactly as DVC would start them:

    params, base, prepare-sft, prepare-dpo              once per shape
    train-sft, merge-sft, train-dpo (a few DPO steps)   once per variant, params.yaml set for it

Variants: sdpa (flash_attn: sdpa), fa2 (flash_attn: fa2), liger (sdpa + enable_liger_kernel), 4bit (sdpa +
quantization_bit: 4, bitsandbytes). A variant the machine cannot run is reported as skipped with the stage's own
one-line reason. Printed per variant: effective tokens/s of train-sft (real tokens per second of optimizer steps),
MFU, peak GPU memory (peak RSS on CPU), merge max |dlogit| (merged model vs base + adapter) and the wall seconds of
each stage. One `RESULT {json}` line per variant follows the table (tests/test_gpu_check.py reads them).

MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token = 4 N + 12 n_layers d_model s. LoRA training
does the forward (2 N) and the backward through the activations (2 N) of the frozen weights but no weight
gradients (the adapters' own are negligible), hence 4 N rather than dense training's 6 N; N = parameters of the
matmuls (every linear layer, lm_head included, not the embedding lookup). Attention: QK^T and AV cost 4 d_model s
FLOPs per token per layer forward, 3x with the backward; s = mean attended length of a token = sum(len^2) /
(2 sum(len)) over the packed examples (each attends only to itself). Peak: the datasheet dense bf16 rate on
H100/H200 (989 TFLOP/s); elsewhere (CPU) a measured matmul rate in the training dtype, so MFU is comparable
only within one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1280, tie_word_embeddings=False),
}
VARIANTS = {
    "sdpa": {"flash_attn": "sdpa"},
    "fa2": {"flash_attn": "fa2"},
    "liger": {"flash_attn": "sdpa", "enable_liger_kernel": True},
    "4bit": {"flash_attn": "sdpa", "quantization_bit": 4},
}
DATASHEET_BF16 = {"H100": 989.5e12, "H200": 989.5e12}
COLUMNS = ("shape", "variant", "status", "tokens_per_second", "mfu", "peak_mem_mb", "merge_max_dlogit",
           "prepare_s", "train_sft_s", "merge_sft_s", "train_dpo_s")


def build_model(shape: str, out: Path) -> int:
    """A random Qwen2ForCausalLM of `shape` with the project's tokenizer in `out`; returns its matmul parameters."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tunepipe.models.tiny import TINY, resolve_model_path

    tokenizer_dir = resolve_model_path(TINY, cache_dir=out.parent / "tiny-cache")
    config = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, **SHAPES[shape],
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(str(out))
    for name in os.listdir(tokenizer_dir):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(Path(tokenizer_dir) / name, out / name)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    del model
    if cuda:
        torch.cuda.empty_cache()
    return matmul


def peak_flops() -> tuple[float, str]:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in DATASHEET_BF16.items():
            if key in name:
                return value, f"{name} datasheet dense bf16"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 4096 if device == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start), f"measured {n}x{n} {str(dtype)[6:]} matmul on {device}"


def mean_attended(data_dir: Path) -> float:
    from datasets import load_from_disk

    lengths = [len(x) for x in load_from_disk(str(data_dir / "train"))["input_ids"]]
    return sum(n * n for n in lengths) / (2 * sum(lengths))


def stage(project: Path, env: dict, *args: str, timeout: int = 900) -> tuple[float, str | None]:
    """Run `python -m stages.<args>` in the project; (seconds, None) or (seconds, its one-line error)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return seconds, None
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    return seconds, (lines[-1][7:] if lines else proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                     else f"exit {proc.returncode}")[:300]


def refusal(variant: dict) -> str | None:
    """The one-line reason train-sft would refuse this variant on this machine (its own checks), or None."""
    from tunepipe.errors import ConfigError
    from tunepipe.models.loading import attention_implementation, check_liger, quantization_config

    try:
        attention_implementation(variant.get("flash_attn", "auto"))
        check_liger(variant.get("enable_liger_kernel", False))
        quantization_config(variant.get("quantization_bit"))
    except ConfigError as err:
        return str(err)
    return None


def write_params(project: Path, model_dir: Path, args, variant: dict) -> None:
    import yaml

    sft = {"max_steps": args.sft_steps, "per_device_train_batch_size": args.batch_size, "logging_steps": 5,
           "save_steps": 10 * args.sft_steps, "learning_rate": 2e-4, **variant}
    params = {
        "model": {"model_name_or_path": str(model_dir), "template": "qwen"},
        "data": {"dataset_dir": "data", "cutoff_len": args.cutoff_len},
        "lora": {"lora_rank": 16, "lora_target": "all"},
        "train": {"per_device_eval_batch_size": args.batch_size, "warmup_ratio": 0.1},
        "stages": {"cpt": {"enabled": False},
                   "sft": {"dataset": "demo_sft,demo_sft_chat", "eval_dataset": None, **sft},
                   "dpo": {"dataset": "demo_dpo", "eval_dataset": None, "max_steps": args.dpo_steps,
                           "per_device_train_batch_size": 2, "save_steps": 100, "learning_rate": 5e-5,
                           "logging_steps": 1, **variant}},
        "evaluate": {"max_new_tokens": 8},
    }
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_shape(shape: str, args, work: Path, peak: float) -> list[dict]:
    project = work / f"project-{shape}"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    for name in ("stages", "tunepipe", "data"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    model_dir = work / f"model-{shape}"
    shutil.rmtree(model_dir, ignore_errors=True)
    matmul = build_model(shape, model_dir)
    layers, hidden = SHAPES[shape]["num_hidden_layers"], SHAPES[shape]["hidden_size"]
    env = {**os.environ, "TUNEPIPE_TRACKING": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(project), *filter(None, [os.environ.get("PYTHONPATH")])])}

    write_params(project, model_dir, args, VARIANTS["sdpa"])
    prepare_s = 0.0
    for step in (("stages.params",), ("stages.base",), ("stages.prepare", "sft"), ("stages.prepare", "dpo")):
        seconds, error = stage(project, env, *step)
        prepare_s += seconds
        if error:
            sys.exit(f"{shape}: {' '.join(step)} failed: {error}")
    s_bar = mean_attended(project / "outputs" / "data" / "sft")
    flops_per_token = 4 * matmul + 12 * layers * hidden * s_bar

    rows = []
    for name in args.variants.split(","):
        write_params(project, model_dir, args, VARIANTS[name])
        row: dict = {"shape": shape, "variant": name, "prepare_s": round(prepare_s, 1), "matmul_params": matmul,
                     "flops_per_token": round(flops_per_token), "mean_attended_tokens": round(s_bar, 1)}
        refused = refusal(VARIANTS[name])
        if refused:  # the stage's own check, asked here so a refused variant costs no stage start-up
            row["status"] = f"skipped: {refused}"
            rows.append(row)
            print_row(row, flush=True)
            continue
        stage(project, env, "stages.params")
        for label, step in (("train_sft_s", ("stages.train", "sft")), ("merge_sft_s", ("stages.merge", "sft")),
                            ("train_dpo_s", ("stages.train", "dpo"))):
            seconds, error = stage(project, env, *step)
            row[label] = round(seconds, 1)
            if error:
                row["status"] = f"skipped: {error}" if label == "train_sft_s" else f"failed in {step}: {error}"
                break
        else:
            row["status"] = "ok"
        train = project / "metrics" / "train_sft.json"
        if row["status"] == "ok" or (row["status"].startswith("failed") and train.exists()):
            metrics = json.loads(train.read_text())
            metrics.update(json.loads((project / "outputs" / "logs" / "train_sft.measured.json").read_text()))
            row["tokens_per_second"] = metrics["tokens_per_second"]
            row["padding_fraction"] = metrics["padding_fraction"]
            row["peak_mem_mb"] = metrics.get("peak_gpu_mb", metrics["peak_rss_mb"])
            row["mfu"] = round(metrics["tokens_per_second"] * flops_per_token / peak, 4)
            merge = project / "metrics" / "merge_sft.json"
            if merge.exists():
                row["merge_max_dlogit"] = json.loads(merge.read_text())["max_logit_diff"]
        for path in ("metrics/train_sft.json", "metrics/merge_sft.json", "metrics/train_dpo.json",
                     "outputs/logs/train_sft.measured.json"):
            (project / path).unlink(missing_ok=True)  # a later variant must not report this one's figures
        rows.append(row)
        print_row(row, flush=True)
    return rows


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def print_row(row: dict, flush: bool = False) -> None:
    cells = [fmt(row.get(c)) for c in COLUMNS]
    print(" | ".join(cells), flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help="comma-separated: 0.5b, 1.5b, tiny (default: 0.5b,1.5b on a "
                                                      "GPU, tiny on CPU)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sft-steps", type=int, default=None, help="default 30 on a GPU, 4 on CPU")
    parser.add_argument("--dpo-steps", type=int, default=2)
    parser.add_argument("--cutoff-len", type=int, default=None, help="default 1024 on a GPU, 128 on CPU")
    parser.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json here")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    args.shapes = args.shapes or ("0.5b,1.5b" if cuda else "tiny")
    args.sft_steps = args.sft_steps or (30 if cuda else 4)
    args.cutoff_len = args.cutoff_len or (1024 if cuda else 128)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS] + \
              [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown variant/shape: {', '.join(unknown)}")
    peak, source = peak_flops()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# tunepipe gpu check | device {device} | torch {torch.__version__} | peak {peak / 1e12:.1f} TFLOP/s "
          f"({source}) | cutoff_len {args.cutoff_len} | sft {args.sft_steps} steps x {args.batch_size} rows | dpo "
          f"{args.dpo_steps} steps", flush=True)
    print(" | ".join(COLUMNS), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunepipe-gpu-check-") as tmp:
        for shape in args.shapes.split(","):
            rows += run_shape(shape, args, Path(tmp), peak)
    for row in rows:
        print("RESULT " + json.dumps(row, sort_keys=True))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"device": device, "peak_flops": peak,
                                                           "peak_source": source, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
