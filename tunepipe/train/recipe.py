"""Training for the cpt / sft / dpo / kto stages: a fresh LoRA adapter (or all weights) on the previous stage's merged
model, trained with transformers / TRL on the pre-tokenized features of the prepare stage.

    setup(inputs, paths)         -> Run     model + fresh adapter, datasets, trainer, resume decision
    train(run)                   -> dict    trainer.train (resumed if a matching checkpoint exists) + final eval
    save(run, metrics)                      adapter (atomic, safetensors), metrics JSON, loss curve CSV + PNG

`inputs` is the stage's section of the plan (tunepipe.plan.TrainInputs: its effective train, LoRA, preference and
template values). Which trainer, by objective (one row each in tunepipe/train/objectives.py; the `stages.<name>` keys
of params.yaml are LLaMA-Factory's):

    cpt (clm)         transformers Trainer, packed blocks from prepare (labels as written there)
    sft               transformers Trainer, our labels (-100 over prompts); `packing` (default on): rows of several
                      examples by best-fit decreasing (tunepipe.train.packing), else padded batches
    dpo  sigmoid|ipo|hinge   TRL DPOTrainer, `pref_beta` -> beta, `pref_ftx` -> + pref_ftx * SFT loss; reference =
                      the adapter-disabled model = the previous stage's merged model (no second copy)
    dpo  orpo         TRL experimental ORPOTrainer (beta = pref_beta), reference-free
    dpo  simpo        TRL experimental CPOTrainer(loss_type="simpo", cpo_alpha = pref_ftx, simpo_gamma)
    kto               TRL KTOTrainer (desirable/undesirable weights = kto_chosen/rejected_weight), LF's KL completions

Precision: fp32 on CPU; bf16 and gradient checkpointing on a GPU when params leave them None. Loading options
(`quantization_bit`, `flash_attn`, `enable_liger_kernel`) are checked first (`check_backends`): what the machine
cannot run is a one-line error before any work. Runs unchanged under `accelerate launch` / `torchrun` (the
launcher keys, stages/dag.py): every rank builds the same trainer, only the main process writes files.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.config import LoraParams, TrainParams
from tunepipe.errors import ConfigError
from tunepipe.plan import TrainInputs
from tunepipe.train.objectives import OBJECTIVES, Objective, stage_columns

log = logging.getLogger("tunepipe.train")

PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
METADATA_FILE = "tunepipe_train.json"


@dataclass
class StagePaths:
    """Where a stage reads and writes (stages/common.py fills it from the project layout; tests from a tmp dir)."""

    input_model: str  # the previous stage's merged model, or the base model
    tokenizer: str  # the base model's tokenizer (every stage tokenizes with it; prepare did too)
    data: Path  # outputs/data/<stage> with train/ and optionally eval/
    adapter: Path  # outputs/adapters/<stage>
    checkpoints: Path  # outputs/checkpoints/<stage>
    metrics: Path  # metrics/train_<stage>.json
    plots: Path  # plots/ (loss_<stage>.csv, loss_<stage>.png)
    measured: Path | None = None  # outputs/logs/train_<stage>.measured.json: MEASURED_KEYS (not versioned)


# Figures of this run on this machine (throughput, time, memory): two identical runs differ in them, so they go to
# the log, the MLflow run and `StagePaths.measured`, never into the versioned metrics file (DVC would see a change).
MEASURED_KEYS = ("tokens_per_second", "seconds", "trainer_seconds", "peak_rss_mb", "peak_gpu_mb")


def versioned(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics that identical runs reproduce: what metrics/train_<stage>.json holds."""
    return {k: v for k, v in metrics.items() if k not in MEASURED_KEYS}


def measured(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in MEASURED_KEYS if metrics.get(k) is not None}


@dataclass
class Run:
    inputs: TrainInputs
    paths: StagePaths
    trainer: Any = None
    counter: Any = None
    progress: Any = None
    curve: Any = None
    resume_from: str | None = None
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)
    resized_vocab: bool = False
    quantization: str | None = None  # e.g. "4-bit bnb (nf4, double quant)" for QLoRA
    stop: Any = None  # tunepipe.train.stopping.StopRequest: a signal asked for a checkpoint and a clean stop

    @property
    def stage(self) -> str:
        return self.inputs.stage

    @property
    def kind(self) -> str:  # the objective: clm | sft | dpo | orpo | simpo | kto
        return self.inputs.objective

    @property
    def objective(self) -> Objective:  # its row of the objective table
        return OBJECTIVES[self.inputs.objective]

    @property
    def train(self) -> TrainParams:
        return self.inputs.train

    @property
    def lora(self) -> LoraParams:
        return self.inputs.lora


# ---------------------------------------------------------------------------------------------------------------
# Small pieces (each unit-tested)
# ---------------------------------------------------------------------------------------------------------------
def device_settings(train: TrainParams) -> dict[str, Any]:
    """fp32 on CPU; bf16 + gradient checkpointing on a GPU unless params.yaml sets them (TRL's configs default to
    bf16=True, which raises on a CPU-only machine, so every field is passed explicitly)."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = train.bf16 if train.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    checkpointing = train.gradient_checkpointing if train.gradient_checkpointing is not None else cuda
    return {"use_cpu": not cuda, "bf16": bf16, "fp16": False, "activation_checkpointing": checkpointing}


def cpu_threads() -> int | None:
    """On CPU, one intra-op thread per process unless OMP_NUM_THREADS says otherwise (torchrun's default too).

    The tiny model's matmuls are too small to split well, and on a shared CPU OpenMP threads spin-wait on each
    other: measured on the 2-core project machine under load, a CPT step took 0.33 s with 1 thread vs 1.26 s with 2.
    A fixed count (not one chosen from the current load) keeps runs reproducible. Returns the count it set, or None.
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return None
    torch.set_num_threads(1)
    return 1


def quantization_note(train: TrainParams) -> str:
    detail = " (nf4, double quantization)" if train.quantization_bit == 4 else ""
    return f"{train.quantization_bit}-bit {train.quantization_method}{detail}"


def load_training_tokenizer(path: str, inputs: TrainInputs):
    """The base tokenizer with the template's fix applied (EOS = the template's stop word, pad, chat template), the
    same object the prepare stage tokenized with; it is saved with the adapter."""
    from tunepipe.data.features import DataArgs, load_template
    from tunepipe.models.loading import load_tokenizer

    tokenizer = load_tokenizer(path, trust_remote_code=inputs.trust_remote_code)
    load_template(DataArgs(**inputs.template), tokenizer, stage=inputs.stage)
    return tokenizer


def load_model(path: str, tokenizer, *, dtype, trust_remote_code: bool = False, attn_implementation: str | None = None,
               quantization: Any = None, liger: bool = False):
    """Load the stage's input model (quantized for QLoRA, with the chosen attention kernel and Liger kernels when
    asked); grow the embeddings when the fixed tokenizer has more tokens than the model.

    Returns (model, names of the embedding modules that must be trained and saved: empty unless resized).
    """
    from tunepipe.models.loading import load_causal_lm

    model = load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code,
                           attn_implementation=attn_implementation, quantization=quantization, liger=liger)
    # Training needs no KV cache; and with one, transformers does not derive the packed-sequence (block-diagonal)
    # mask from position ids, so packed examples would attend to each other.
    model.config.use_cache = False
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return model, []
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    embeddings = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if id(module) in embeddings})
    log.warning("tokenizer has %d tokens but the model %d embedding rows: resized to %d and training %s fully "
                "(saved with the adapter)", len(tokenizer), rows, model.get_input_embeddings().weight.shape[0],
                ",".join(names))
    return model, names


@dataclass
class Backends:
    """The loading options of a stage, resolved and checked before any data or model is loaded."""

    attn_implementation: str  # transformers' name: sdpa | eager | flash_attention_2
    quantization: Any  # a BitsAndBytesConfig, or None
    liger: bool


def check_backends(inputs: TrainInputs) -> Backends:
    """Refuse, in one line and before any work, what this machine cannot run: fa2 or Liger without CUDA, a
    quantization backend that cannot run, QLoRA with full fine-tuning, a DeepSpeed/accelerate config that is
    missing or whose package is absent."""
    import importlib.util

    from tunepipe.models.loading import attention_implementation, check_liger, quantization_config

    t = inputs.train
    attn = attention_implementation(t.flash_attn)
    check_liger(t.enable_liger_kernel)
    if t.quantization_bit is not None and inputs.lora.finetuning_type == "full":
        raise ConfigError("quantization_bit trains LoRA adapters on a quantized model (QLoRA): it cannot be used "
                          "with finetuning_type: full", key=f"stages.{inputs.stage}.quantization_bit")
    quantization = quantization_config(t.quantization_bit, t.quantization_method)
    for key, path in (("deepspeed", t.deepspeed), ("config_file", t.config_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{path} not found (a path relative to the project root)", key=key)
    if t.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{t.deepspeed} needs the deepspeed package, which is not installed here "
                          "(pip install deepspeed)", key="deepspeed")
    return Backends(attn_implementation=attn, quantization=quantization, liger=t.enable_liger_kernel)


def load_datasets(data_dir: Path, stage: str):
    from datasets import load_from_disk

    if not (data_dir / "train").is_dir():
        raise ConfigError(f"no prepared data in {data_dir} (run `python -m stages.prepare {stage}` first)")
    train = load_from_disk(str(data_dir / "train"))
    evals = load_from_disk(str(data_dir / "eval")) if (data_dir / "eval").is_dir() else None
    for name, ds in (("train", train), ("eval", evals)):
        if ds is None:
            continue
        missing = [c for c in stage_columns(stage) if c not in ds.column_names]
        if missing:
            raise ConfigError(f"{data_dir / name}: columns {missing} missing for stage {stage} (has "
                              f"{ds.column_names}); re-run `python -m stages.prepare {stage}`")
    if len(train) == 0:
        raise ConfigError(f"{data_dir / 'train'} is empty: nothing to train on (see {data_dir / 'health.json'})")
    return train, evals if evals is not None and len(evals) else None


# ---------------------------------------------------------------------------------------------------------------
# Trainer construction
# ---------------------------------------------------------------------------------------------------------------
def training_arguments(run: Run, has_eval: bool, device: dict[str, Any]) -> Any:
    """The TrainingArguments (or TRL config) of the stage, every field explicit (TRL's defaults differ); the
    objective's row adds its own fields."""
    t = run.train
    common: dict[str, Any] = dict(
        output_dir=str(run.paths.checkpoints),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=min(t.warmup_ratio, 0.999),  # a float in [0, 1) is a ratio (transformers 5)
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",  # the held-out split is evaluated once, after training (`train`)
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="no",
        ddp_find_unused_parameters=False,
        activation_checkpointing_kwargs={"use_reentrant": False} if device["activation_checkpointing"] else None,
        deepspeed=t.deepspeed,
        torch_compile=t.torch_compile,
        **device,
    )
    module, _, name = run.objective.config.rpartition(".")
    return getattr(importlib.import_module(module), name)(**common, **run.objective.fields(run.inputs))


def make_collator(run: Run, tokenizer, model, train_columns: list[str]):
    from tunepipe.train import collators as tc

    pad = tokenizer.pad_token_id
    if run.objective.packs and "position_ids" in train_columns:
        run.notes.append("sft data packed by prepare (neat_packing): examples isolated by their position ids")
        return tc.PrepackedCollator(pad_token_id=pad)
    if packs(run, model):
        varlen = attention_of(model).startswith("flash_attention")
        # sdpa/eager build a dense (rows x L x L) block-diagonal mask; FlashAttention reads the boundaries
        run.notes.append(f"sft packing: rows of <= {run.inputs.cutoff_len} tokens by best-fit decreasing, position "
                         f"ids restart per example ({attention_of(model)}{', one varlen row' if varlen else ''})")
        return tc.PackedRowsCollator(pad_token_id=pad, varlen=varlen, max_row_tokens=run.inputs.cutoff_len)
    return getattr(tc, run.objective.collator)(pad_token_id=pad)


def attention_of(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def packs(run: Run, model) -> bool:
    """sft packs at train time unless `packing: false`, or the attention kernel cannot isolate packed examples."""
    if not run.objective.packs or run.train.packing is False:
        return False
    if attention_of(model) in PACKING_ATTENTION:
        return True
    log.warning("packing: attention %r cannot isolate packed examples; using padded batches", attention_of(model))
    return False


def setup(inputs: TrainInputs, paths: StagePaths, callbacks: list | tuple = ()) -> Run:
    """One stage, ready to train: load the model (+ a fresh adapter's config), build the trainer from the
    objective's row (tunepipe.train.objectives), decide whether to resume."""
    from accelerate import PartialState

    run = Run(inputs=inputs, paths=paths)
    if run.objective.check is not None:
        run.objective.check(inputs)
    backends = check_backends(inputs)  # before any work: what this machine cannot run is refused here
    state = PartialState()
    device = device_settings(run.train)
    if cpu_threads():
        run.notes.append("CPU: 1 thread per process (set OMP_NUM_THREADS to change)")
    train_ds, eval_ds = load_datasets(paths.data, inputs.stage)
    tokenizer = load_training_tokenizer(paths.tokenizer, inputs)
    model, peft_config = prepare_model(run, tokenizer, backends, device)
    build_trainer(run, model, peft_config, tokenizer, (train_ds, eval_ds), device, callbacks)
    decide_resume(run, state)
    if state.is_main_process:
        _log_setup(run, state, peft_config, device)
    return run


def prepare_model(run: Run, tokenizer, backends: Backends, device: dict[str, Any]):
    """The stage's input model (quantized for QLoRA, resized for a grown vocabulary) and its LoRA config (None for
    full fine-tuning)."""
    import torch

    from tunepipe.train.lora import lora_config

    full = run.lora.finetuning_type == "full"
    dtype = torch.bfloat16 if device["bf16"] and not full else torch.float32
    model, grown = load_model(run.paths.input_model, tokenizer, dtype=dtype,
                              trust_remote_code=run.inputs.trust_remote_code,
                              attn_implementation=backends.attn_implementation,
                              quantization=backends.quantization, liger=backends.liger)
    run.resized_vocab = bool(grown)
    run.quantization = quantization_note(run.train) if backends.quantization is not None else None
    if run.quantization:
        from peft import prepare_model_for_kbit_training

        # LF's (and PEFT's) QLoRA preparation: norms and head in fp32, input grads for checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=device["activation_checkpointing"])
        run.notes.append(f"QLoRA: input model loaded {run.quantization}; the merge uses its unquantized weights")
    if backends.liger:
        run.notes.append("Liger kernels applied")
    if full:
        if grown:
            run.notes.append("vocabulary resized (full fine-tuning trains the new rows)")
        return model, None
    return model, lora_config(run.lora, grown, tied=bool(model.config.get_text_config().tie_word_embeddings))


def build_trainer(run: Run, model, peft_config, tokenizer, datasets: tuple, device: dict[str, Any],
                  callbacks: list | tuple = ()) -> None:
    """run.trainer: the row's trainer class with its config, collator and reference rule (sft may train on rows
    of packed examples)."""
    from transformers import PrinterCallback, set_seed

    from tunepipe.train import trainers as tt
    from tunepipe.train.callbacks import LossCurveCallback, ProgressCallback
    from tunepipe.train.collators import PackedRowsCollator, TokenCounter
    from tunepipe.train.packing import pack_dataset
    from tunepipe.train.stopping import CompleteCheckpoint, StopOnRequest, StopRequest

    row, (train_ds, eval_ds) = run.objective, datasets
    args = training_arguments(run, eval_ds is not None, device)
    run.counter = TokenCounter()
    collator = make_collator(run, tokenizer, model, train_ds.column_names)
    if isinstance(collator, PackedRowsCollator):
        train_ds = pack_dataset(train_ds, run.inputs.cutoff_len)  # the trainer samples rows; eval stays per example
        run.notes.append(f"{len(train_ds.examples)} examples in {len(train_ds)} rows, "
                         f"{100 * train_ds.fill():.1f}% full")
    run.progress, run.curve, run.stop = ProgressCallback(run.stage, run.counter), LossCurveCallback(), StopRequest()
    cls = tt.trainer_class(row.trainer)
    kwargs: dict[str, Any] = {"args": args, "data_collator": collator, "train_dataset": train_ds,
                              "eval_dataset": eval_ds, "processing_class": tokenizer,
                              "callbacks": [run.progress, run.curve, CompleteCheckpoint(), StopOnRequest(run.stop),
                                            *callbacks]}
    if not cls.takes_peft_config:  # transformers' Trainer: we wrap the model; TRL's trainers take the config
        if peft_config is not None:
            from peft import get_peft_model

            set_seed(run.train.seed)  # the adapter's random init (lora_A) is part of the run
            model = get_peft_model(model, peft_config)
    else:
        kwargs["peft_config"] = peft_config
    if row.reference:
        # ref_model=None: with a LoRA adapter TRL scores the reference with the adapter disabled, i.e. the model
        # this stage started from = the previous stage's merged model. Full fine-tuning: TRL loads that same
        # model again from paths.input_model.
        kwargs["ref_model"] = None
        run.notes.append(f"reference model = {run.paths.input_model} (the model this stage starts from: "
                         f"{'adapter disabled' if peft_config is not None else 'frozen copy'})")
    run.trainer = cls(model=model, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not run.trainer.is_fsdp_enabled:
        run.notes.append("the accelerate config asks for FSDP, but FSDP is not used on CPU (accelerate shards on "
                         "accelerators only): the processes train data parallel")
    run.trainer.token_counter = run.counter
    run.trainer.remove_callback(PrinterCallback)  # it prints every log dict; ProgressCallback prints one line


def decide_resume(run: Run, state) -> None:
    """run.resume_from: the last complete checkpoint of an identical run, else None (stale checkpoints removed).

    The main process decides (and clears stale checkpoints, writes the fingerprint) before the others look, so
    that every process makes the same decision from the same files."""
    from tunepipe.train.resume import run_fingerprint, resolve_resume

    fingerprint = run_fingerprint(run.inputs, run.paths)
    run.fingerprint = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    if state.is_main_process:
        run.resume_from = resolve_resume(run.paths.checkpoints, fingerprint, is_main=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        run.resume_from = resolve_resume(run.paths.checkpoints, fingerprint, is_main=False)
    if run.resume_from is None and state.is_main_process:
        run.paths.checkpoints.mkdir(parents=True, exist_ok=True)


def _log_setup(run: Run, state, peft_config, device: dict[str, Any]) -> None:
    from tunepipe.train.lora import describe

    trainer = run.trainer
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    eval_ds = trainer.eval_dataset
    log.info("[%s] %s trainer on %s | %s | %s/%s trainable params (%.2f%%) | train %d%s examples | %s | "
             "bf16=%s grad_ckpt=%s | %s", run.stage, run.kind, run.paths.input_model,
             "full fine-tuning" if peft_config is None else describe(peft_config), f"{trainable:,}", f"{total:,}",
             100 * trainable / max(total, 1), len(trainer.train_dataset), f" / eval {len(eval_ds)}" if eval_ds else "",
             "resuming from " + run.resume_from if run.resume_from else "fresh start", device["bf16"],
             device["activation_checkpointing"], f"{state.num_processes} process(es)" + "".join(
                 f" ({name})" for name, on in (("FSDP", trainer.is_fsdp_enabled),
                                               ("DeepSpeed", trainer.is_deepspeed_enabled)) if on))
    for note in run.notes:
        log.info("[%s] %s", run.stage, note)


# ---------------------------------------------------------------------------------------------------------------
# Train and save
# ---------------------------------------------------------------------------------------------------------------
def train(run: Run) -> dict[str, Any]:
    """Train (resuming when `setup` found a matching checkpoint), evaluate at the end; return the metrics."""
    from tunepipe.train.callbacks import peak_memory_mb

    trainer = run.trainer
    resumed_step = 0
    if run.resume_from:
        resumed_step = int(Path(run.resume_from).name.rsplit("-", 1)[-1])
    started = time.perf_counter()
    run.stop.install()  # from here, SIGTERM/SIGINT end the step, save a checkpoint and stop
    output = trainer.train(resume_from_checkpoint=run.resume_from)
    if run.stop.exit_code is not None:
        log.warning("[%s] stopped at step %d: checkpoint kept in %s, the next run resumes from it; no adapter "
                    "written", run.stage, trainer.state.global_step, run.paths.checkpoints)
        raise SystemExit(run.stop.exit_code)
    eval_metrics: dict[str, float] = {}
    if trainer.eval_dataset is not None:
        last_eval = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
        if last_eval is not None and last_eval.get("step") == trainer.state.global_step:
            eval_metrics = {k: v for k, v in last_eval.items() if k.startswith("eval_")}
        else:
            eval_metrics = trainer.evaluate()
    trainer_seconds = time.perf_counter() - started

    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    progress = run.progress
    tokens = progress.totals["tokens"]
    seconds = progress.train_seconds
    metrics: dict[str, Any] = {
        "stage": run.stage,
        "objective": run.kind,
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "train_loss": losses[-1] if losses else None,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_mean": output.training_loss if trainer.state.global_step > resumed_step else None,
        "eval_loss": eval_metrics.get("eval_loss"),
        "tokens": int(trainer.state.num_input_tokens_seen),
        "tokens_this_run": int(tokens),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "padding_fraction": round(1 - tokens / progress.totals["slots"], 4) if progress.totals["slots"] else None,
        "seconds": round(seconds, 2),  # optimizer steps only: the basis of tokens_per_second
        "trainer_seconds": round(trainer_seconds, 2),  # all of trainer.train() (+ the final evaluate)
        "resumed_from_step": resumed_step,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        **peak_memory_mb(),
    }
    if run.objective.perplexity and metrics["eval_loss"] is not None:
        metrics["eval_perplexity"] = round(math.exp(metrics["eval_loss"]), 4)
    for key, name in run.objective.metrics.items():
        if f"eval_{key}" in eval_metrics:
            metrics[f"eval_{name}"] = eval_metrics[f"eval_{key}"]
    return metrics


def save(run: Run, metrics: dict[str, Any]) -> None:
    """Adapter (or full model) to paths.adapter atomically, safetensors only; metrics JSON; loss curve CSV + PNG.

    Every rank calls `save_model` (DeepSpeed ZeRO-3 / FSDP gather the weights collectively); only the main process
    writes, into a temporary sibling that replaces the destination when complete.
    """
    from tunepipe.io import atomic_write_text, replace_dir

    trainer = run.trainer
    dest = run.paths.adapter
    tmp = dest.with_name(f".{dest.name}.partial")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if main:
        for pickle_file in tmp.glob("*.bin"):  # training_args.bin: a pickle, not needed to use the adapter
            pickle_file.unlink()
        _stable_adapter_config(tmp)
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        if not weights:
            raise RuntimeError(f"no safetensors written to {tmp}")
        meta = {
            "stage": run.stage,
            "objective": run.kind,
            "finetuning_type": run.lora.finetuning_type,
            "input_model": run.paths.input_model,
            "tokenizer": run.paths.tokenizer,
            "template": run.inputs.template["template"],
            "resized_vocab": run.resized_vocab,
            "quantization": run.quantization,  # trained on a quantized model (QLoRA); merged into full weights
            "fingerprint": run.fingerprint,
            "steps": metrics.get("steps"),
            "weights": weights,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        replace_dir(tmp, dest)
        atomic_write_text(run.paths.metrics, json.dumps(versioned(metrics), indent=2) + "\n")
        if run.paths.measured is not None:
            atomic_write_text(run.paths.measured, json.dumps(measured(metrics), indent=2) + "\n")
        log.info("[%s] %s", run.stage, ", ".join(f"{k} {v:,}" for k, v in measured(metrics).items()))
        run.curve.write(run.paths.plots / f"loss_{run.stage}.csv", run.paths.plots / f"loss_{run.stage}.png",
                        title=f"{run.stage} ({run.kind})")
        # The stage is done: its checkpoints (adapter + optimizer state, whole models for full fine-tuning) are
        # only useful to resume an unfinished run.
        shutil.rmtree(run.paths.checkpoints, ignore_errors=True)
        log.info("[%s] adapter -> %s | metrics -> %s | loss curve -> %s", run.stage, dest, run.paths.metrics,
                 run.paths.plots / f"loss_{run.stage}.csv")
    trainer.accelerator.wait_for_everyone()


def _stable_adapter_config(adapter_dir: Path) -> None:
    """PEFT writes `target_modules` (and `modules_to_save`) from a set, so their order follows the hash seed and two
    identical runs would write different adapter hashes: sort them, and the keys."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save", "layers_to_transform", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key], key=str)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def run_stage(inputs: TrainInputs, paths: StagePaths, callbacks: list | tuple = ()) -> dict[str, Any]:
    """setup -> train -> save, for tests and notebooks (stages/train.py spells the same three steps out)."""
    run = setup(inputs, paths, callbacks)
    metrics = train(run)
    save(run, metrics)
    return metrics
