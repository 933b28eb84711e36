"""The typed schema of params.yaml: the one file a user edits.

Keys follow LLaMA-Factory's names wherever the concept is the same (`model_name_or_path`, `template`, `cutoff_len`,
`lora_rank`, `lora_target`, `pref_beta`, `pref_loss`, `learning_rate`, `val_size`, ...), so an LF YAML maps over
line by line (`tunepipe import llamafactory` does it: tunepipe/lf_import.py). Every field has a help string
(`tunepipe params --keys` prints them) and every bad key or value is reported as one line naming the key path, e.g.
`file params.yaml, key 'train.max_step': unknown key; did you mean 'max_steps'?`.

No default depends on the demo data: `model` (with `model_name_or_path`) and `stages` are required sections, and a
stage runs only when it is written under `stages:` with its `dataset`. Training hyper-parameters live in `train:`
(shared) and can be overridden per stage under `stages.<name>:`; LoRA settings likewise under `lora:` and
`stages.<name>.lora:`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_serializer, model_validator

from tunepipe.errors import ConfigError
from tunepipe.train import objectives as _objectives

# The one vocabulary of stage kinds, read from the objective table (tunepipe/train/objectives.py, plain data).
# Pipeline stages, in order (dpo and kto are alternatives):
STAGES = _objectives.STAGES
PREFERENCE_STAGES = _objectives.PREFERENCE_STAGES
# LLaMA-Factory's `stage:` name of each: the data layer (which mirrors LF) and LF's YAMLs speak this one.
LF_STAGE = {"cpt": "pt", "sft": "sft", "dpo": "dpo", "kto": "kto"}
PREF_LOSSES = _objectives.PREF_LOSSES
TINY = "tiny"  # model_name_or_path of the embedded base model (tunepipe.models.tiny builds it)
DPO_FAMILY = _objectives.REFERENCE_LOSSES  # losses against a reference model (the stage's input model)
Objective = Literal[tuple(_objectives.OBJECTIVES)]  # clm | sft | dpo | orpo | simpo | kto
REQUIRED_SECTIONS = ("model", "stages")  # what every params.yaml must say: which model, which stages on which data
# The registered model's name when params.yaml gives none: the project's name. `tunepipe import` writes one; without
# it, [project] name of the pyproject.toml beside params.yaml (the same in every clone, unlike the directory's name,
# which would change the plan and rerun register), else this.
DEFAULT_PROJECT_NAME = "tunepipe"
# The metric a new model must beat the champion on, by final stage, when registry.compare_metric is not set.
HEADLINE_METRIC = {"cpt": "final.perplexity", "sft": "final.sft_loss", "dpo": "final.reward_accuracy",
                   "kto": "final.reward_accuracy"}


def higher_is_better(metric: str) -> bool:
    """Losses and perplexities improve downwards, everything evaluate writes besides them upwards."""
    return not metric.rsplit(".", 1)[-1].endswith(("loss", "perplexity", "gen_tokens"))


def objective(stage: str, pref_loss: str = "sigmoid") -> Objective:
    """What a stage trains: clm (cpt: next-token loss on raw text), sft, dpo (sigmoid/ipo/hinge), orpo, simpo, kto."""
    row = _objectives.select(stage, pref_loss)
    if row is None:
        raise ConfigError(f"unknown stage {stage!r} (expected {', '.join(STAGES)})")
    return row.name  # type: ignore[return-value]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(Section):
    model_name_or_path: str = Field(..., description="Base model (required): a local directory, a Hugging Face model "
                                                     "id (in the local HF cache: runs are offline) or 'tiny' (a small "
                                                     "random model built locally, for tests and the demo).")
    template: str | None = Field(None, description="Chat template (`tunepipe data templates`), used for training and "
                                                   "written into every merged model; null = LLaMA-Factory's default: "
                                                   "the tokenizer's own chat template, parsed (else `empty`).")
    trust_remote_code: bool = Field(False, description="Allow custom model/tokenizer code from the model repo.")
    tiny_seed: int = Field(0, description="Seed of the embedded tiny model (only for model_name_or_path: tiny).")


class DataParams(Section):
    dataset_dir: str = Field("data", description="Folder with dataset_info.json (relative to the project root).")
    cutoff_len: int = Field(512, gt=1, description="Maximum tokens per example.")
    preprocessing_batch_size: int = Field(1000, gt=0, description="Rows per processing batch (LF semantics).")
    preprocessing_num_workers: int | None = Field(None, gt=0, description="Processes that tokenize in parallel "
                                                                          "(LF semantics: the rows are split into "
                                                                          "that many contiguous shards); None = "
                                                                          "one.")
    streaming: bool = Field(False, description="pt (cpt): read text corpora line by line and write the blocks "
                                               "as they are made, so memory stays flat in the corpus size (same "
                                               "tokens as without streaming).")
    max_samples: int | None = Field(None, gt=0, description="Keep only the first N rows of each dataset (debug).")
    val_size: float = Field(0.0, ge=0, description="Held-out split of every stage's training data that has no "
                                                   "eval_dataset (LLaMA-Factory's val_size): a fraction in (0,1) or "
                                                   "a row count (> 1); stages.<name>.val_size overrides it.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over", "interleave_once"] = Field(
        "concat", description="How to mix several datasets of one stage.")
    tool_format: str | None = Field(None, description="Override the template's tool format.")
    default_system: str | None = Field(None, description="Override the template's default system prompt.")
    overlength: Literal["truncate", "drop"] = Field("truncate", description="Examples over cutoff_len: truncate "
                                                                            "(LLaMA-Factory) or drop (counted).")
    skip_bad_rows: bool = Field(False, description="Drop malformed rows (counted) instead of failing.")
    allow_scripts: bool = Field(False, description="Allow dataset scripts (script_url) to run.")
    seed: int = Field(42, description="Data seed (num_samples, interleaving, val split).")


class LoraParams(Section):
    finetuning_type: Literal["lora", "full"] = Field("lora", description="Train a LoRA adapter (merged after the "
                                                                         "stage) or all weights.")
    lora_rank: int = Field(8, gt=0, description="LoRA rank r.")
    lora_alpha: int | None = Field(None, gt=0, description="LoRA alpha; default 2 * lora_rank (LLaMA-Factory).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    lora_target: str = Field("all", description="Comma-separated module names, or 'all' for every linear layer "
                                                "except the output head.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    additional_target: str | None = Field(None, description="Modules trained fully and saved with the adapter "
                                                            "(e.g. embed_tokens,lm_head when the vocab grows).")


class TrainParams(Section):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Total optimizer steps; -1 = use num_train_epochs.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Examples (or packed rows) per device step.")
    per_device_eval_batch_size: int = Field(8, gt=0, description="Eval batch size.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Steps accumulated per optimizer update.")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of steps for linear warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    logging_steps: int = Field(5, gt=0, description="Log loss / lr / tokens per second every N steps.")
    save_steps: int = Field(50, gt=0, description="Checkpoint every N steps (resume after a kill).")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept.")
    seed: int = Field(42, description="Training seed.")
    bf16: bool | None = Field(None, description="bf16 mixed precision; None = on when a GPU supports it, off on CPU.")
    gradient_checkpointing: bool | None = Field(None, description="None = on with a GPU, off on CPU.")
    packing: bool | None = Field(None, description="pt: pack into cutoff_len blocks (LF, default on); sft: "
                                                   "several examples per row of at most cutoff_len tokens, packed "
                                                   "at train time by best-fit decreasing, no cross-example "
                                                   "attention (default on; per_device_train_batch_size then "
                                                   "counts rows).")
    # How the stage is launched (stages/dag.py writes the command into dvc.yaml; docs/stages.md "Scaling out").
    launcher: Literal["none", "torchrun", "accelerate"] = Field(
        "none", description="none: one process (`python -m stages.train`); torchrun or accelerate: "
                            "`torchrun ...` / `accelerate launch ...` with the keys below (gloo on CPU, nccl on GPU).")
    nproc_per_node: int | None = Field(None, gt=0, description="Processes per machine (one per GPU) under a "
                                                               "launcher (LF: NPROC_PER_NODE); None = the "
                                                               "launcher's default (1, or the accelerate config's).")
    nnodes: int | None = Field(None, gt=0, description="Machines taking part (LF: NNODES); each machine sets its "
                                                       "rank itself (PET_NODE_RANK for torchrun, machine_rank in "
                                                       "its accelerate config). None = one.")
    master_addr: str | None = Field(None, description="Address of the rank-0 machine when nnodes > 1 "
                                                      "(LF: MASTER_ADDR), passed to the launcher.")
    master_port: int | None = Field(None, gt=0, lt=65536, description="Rendezvous port (LF: MASTER_PORT), passed "
                                                                       "to the launcher; None = its default.")
    deepspeed: str | None = Field(None, description="DeepSpeed config JSON (path relative to the project root, "
                                                    "e.g. LF's ds_z2_config.json), handed to the trainer; needs a "
                                                    "launcher and the deepspeed package.")
    config_file: str | None = Field(None, description="accelerate config file (FSDP / FSDP2 / DeepSpeed / "
                                                      "MULTI_CPU) for launcher: accelerate (`accelerate launch "
                                                      "--config_file`).")
    # Model loading and kernels (tunepipe/models/loading.py)
    quantization_bit: Literal[4, 8] | None = Field(None, description="QLoRA: load the stage's input model "
                                                                      "quantized to 4 or 8 bits (LoRA only); the "
                                                                      "merge still goes into the unquantized "
                                                                      "weights.")
    quantization_method: Literal["bnb"] = Field("bnb", description="Quantization backend: bnb (bitsandbytes; "
                                                                   "4-bit NF4 with double quantization, or 8-bit).")
    flash_attn: Literal["auto", "disabled", "sdpa", "eager", "fa2"] = Field(
        "auto", description="Attention kernel for training and evaluation: auto (FlashAttention-2 when installed "
                            "on a GPU, else sdpa), sdpa, eager (= LF's disabled) or fa2 (refused where it cannot "
                            "run).")
    enable_liger_kernel: bool = Field(False, description="Liger's Triton kernels (RMSNorm, RoPE, SwiGLU, fused "
                                                         "linear cross-entropy) for training and evaluation; needs "
                                                         "a CUDA GPU and liger-kernel.")
    torch_compile: bool = Field(False, description="torch.compile the model for training (transformers' "
                                                   "torch_compile); pays off on long GPU runs only.")


class PreferenceParams(Section):
    """The preference-optimisation keys of a dpo or kto stage."""

    pref_loss: Literal[PREF_LOSSES] = Field(  # type: ignore[valid-type]
        "sigmoid", description="dpo stage loss: sigmoid/ipo/hinge (DPO family, reference = previous stage), orpo or "
                               "simpo (reference-free).")
    pref_beta: float = Field(0.1, gt=0, description="Preference beta (DPO/IPO/hinge/ORPO lambda/SimPO beta).")
    pref_ftx: float = Field(0.0, ge=0, description="SFT loss weight added to the preference loss.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin.")
    kto_chosen_weight: float = Field(1.0, gt=0, description="kto: weight of desirable examples.")
    kto_rejected_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable examples.")


class StageParams(TrainParams, PreferenceParams):
    """One stage: its data and any override of the shared `train:` and `lora:` values."""

    enabled: bool = Field(True, description="Run this stage (a stage not written under stages: does not run); when "
                                            "off the next stage starts from the previous one.")
    dataset: str | None = Field(None, description="Training dataset name(s) from dataset_info.json, comma-separated "
                                                  "(required for an enabled stage).")
    eval_dataset: str | None = Field(None, description="Held-out dataset name(s) for evaluation and the gates.")
    val_size: float | None = Field(None, ge=0, description="Held-out split of this stage's training data "
                                                           "(LLaMA-Factory's val_size): a fraction in (0,1) or a row "
                                                           "count (> 1); not with eval_dataset. Default: data.val_size "
                                                           "when the stage has no eval_dataset.")
    template: str | None = Field(None, description="This stage's chat template: not written = model.template; null = "
                                                   "LLaMA-Factory's default (the tokenizer's own), e.g. for a "
                                                   "pretraining YAML without template.")
    lora: LoraParams | None = Field(None, description="LoRA overrides for this stage.")
    # sft
    train_on_prompt: bool = Field(False, description="sft: also train on prompt tokens.")
    mask_history: bool = Field(False, description="sft: train on the last turn only.")
    neat_packing: bool = Field(False, description="sft: LF's neat_packing in the exported data.")
    # replay (tunepipe/data/replay.py)
    replay_dataset: str | None = Field(None, description="sft: earlier-stage dataset(s) mixed into this stage's "
                                       "training data (e.g. demo_cpt: CPT text as pt blocks, every token a label) "
                                       "so the stage keeps what the earlier one taught.")
    replay_ratio: float = Field(0.0, ge=0, description="Replay examples per own training example (0.5 = half as "
                                                       "many CPT blocks as SFT rows), drawn with the data seed.")

    @model_serializer(mode="wrap")
    def _unset_template_is_absent(self, handler):
        """A template not written means model.template, `null` LF's default: a dump that parses back must keep the
        difference, so an unset one is left out."""
        data = handler(self)
        if "template" not in self.model_fields_set and isinstance(data, dict):
            data.pop("template", None)
        return data


def _absent_stage() -> Any:
    return Field(default_factory=lambda: StageParams(enabled=False),
                 description="Not written under stages: = not run.")


class StagesParams(Section):
    cpt: StageParams = _absent_stage()
    sft: StageParams = _absent_stage()
    dpo: StageParams = _absent_stage()
    kto: StageParams = _absent_stage()


class EvaluateParams(Section):
    max_new_tokens: int = Field(48, gt=0, description="Generation length for BLEU/ROUGE and samples.")
    max_eval_samples: int = Field(64, gt=0, description="Held-out examples scored per metric.")
    num_samples: int = Field(3, ge=0, description="Sample generations written to the metrics file.")
    knowledge_file: str | None = Field(
        None, description="Held-out fact questions (JSON rows {question, answer, subject, value, kind, distractors}, "
                          "in data.dataset_dir) scored by the lm-eval task tunepipe_facts: exact-match fact "
                          "accuracy per kind (where the fact was taught) for the base and every stage. None = off.")
    max_fact_questions: int | None = Field(None, gt=0, description="Fact questions scored per kind (None = all).")
    fact_samples: int = Field(2, ge=0, description="Fact-question generations per kind written to samples.json.")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="Standard lm-evaluation-harness tasks (by "
                                     "name) also run on every model, e.g. [arc_easy] (needs their datasets: network "
                                     "or a local HF cache); numbers go to evaluate.json as lmeval_<task>_<metric>.")


class Gate(Section):
    metric: str = Field(..., description="Metric key in metrics/evaluate.json (e.g. final.reward_accuracy).")
    min: float | None = Field(None, description="Pass only if metric >= min.")
    max: float | None = Field(None, description="Pass only if metric <= max.")
    baseline: str | None = Field(None, description="No-regression gate: another metric key to compare with (e.g. "
                                                   "metric dpo.pref_accuracy, baseline sft.pref_accuracy).")
    max_drop: float | None = Field(None, ge=0, description="With baseline: pass only if metric >= baseline - "
                                                           "max_drop (higher-is-better metrics).")
    max_ratio: float | None = Field(None, gt=0, description="With baseline: pass only if metric <= max_ratio * "
                                                            "baseline (losses, perplexity).")
    name: str | None = Field(None, description="Label shown in the decision's reasons.")

    @model_validator(mode="after")
    def _baseline_bounds(self) -> Gate:
        if (self.max_drop is not None or self.max_ratio is not None) and self.baseline is None:
            raise ValueError("max_drop / max_ratio need a baseline metric")
        if self.baseline is not None and self.max_drop is None and self.max_ratio is None:
            raise ValueError("a baseline gate needs max_drop (higher is better) or max_ratio (lower is better)")
        return self


class SkillTolerance(Section):
    stage: Literal[STAGES] = Field(..., description="The stage whose held-out skill this is.")
    metric: str = Field(..., description="Key in each model's section of metrics/evaluate.json (e.g. perplexity, "
                                         "sft_loss, fact_accuracy_sft, pref_accuracy).")
    max_drop: float | None = Field(None, ge=0, description="Higher-is-better skill: largest allowed drop.")
    max_ratio: float | None = Field(None, gt=0, description="Lower-is-better skill: largest allowed later / earlier "
                                                            "ratio (1.1 = may rise 10%).")

    @model_validator(mode="after")
    def _one_bound(self) -> SkillTolerance:
        if (self.max_drop is None) == (self.max_ratio is None):
            raise ValueError("set exactly one of max_drop (higher is better) or max_ratio (lower is better)")
        return self


class RegistryParams(Section):
    model_name: str | None = Field(None, description="MLflow registered model name; default: the project's name "
                                                     "(pyproject.toml's [project] name, else 'tunepipe'). `tunepipe "
                                                     "import` writes the project directory's name here.")
    compare_metric: str | None = Field(None, description="Metric a new model must beat the current champion on; "
                                                         "default: the final stage's headline metric "
                                                         "(final.reward_accuracy for dpo/kto, final.sft_loss for "
                                                         "sft, final.perplexity for cpt).")
    higher_is_better: bool | None = Field(None, description="Direction of compare_metric; default: lower for losses "
                                                            "and perplexities, higher otherwise.")
    gates: list[Gate] = Field(default_factory=list, description="All must pass before a model can be champion.")
    no_regression: list[SkillTolerance] = Field(
        default_factory=list, description="Each stage's held-out skill and how much later models may lose of it; "
                                          "expanded into baseline gates "
                                          "(tunepipe.tracking.promotion.no_regression_gates).")
    no_regression_vs: list[Literal["previous", "own", "base"]] = Field(
        default_factory=lambda: ["previous", "own", "base"],
        description="What the skills are compared with: previous = every model from the skill's stage on vs the "
                    "model it started from; own = the final model vs the skill's stage; base = final vs base.")
    store: Literal["copy", "reference"] = Field(
        "copy", description="copy: log the final model's files as MLflow artifacts (self-contained registry); "
                            "reference: register its absolute path only (no extra copy; restore old versions "
                            "with git checkout + dvc checkout).")


class Params(Section):
    model: ModelParams = Field(..., description="Base model and chat template (required).")
    data: DataParams = Field(default_factory=DataParams, description="Data processing options.")
    lora: LoraParams = Field(default_factory=LoraParams, description="LoRA defaults for every stage.")
    train: TrainParams = Field(default_factory=TrainParams, description="Training defaults for every stage.")
    stages: StagesParams = Field(..., description="The stages to run (required), in order cpt, sft, dpo|kto.")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Evaluation settings.")
    registry: RegistryParams = Field(default_factory=RegistryParams, description="Registry and promotion gates.")
    _project_name: str | None = PrivateAttr(None)  # pyproject.toml's [project] name (load_params reads it)

    def enabled_stages(self) -> list[str]:
        return [name for name in STAGES if getattr(self.stages, name).enabled]

    def stage(self, name: str) -> StageParams:
        return getattr(self.stages, name)

    def stage_train(self, name: str) -> TrainParams:
        """The shared `train:` values with the stage's explicit overrides applied."""
        stage = self.stage(name)
        merged = self.train.model_dump()
        merged.update({k: v for k, v in stage.model_dump(exclude_unset=True).items() if k in TrainParams.model_fields})
        return TrainParams(**merged)

    def stage_lora(self, name: str) -> LoraParams:
        """The shared `lora:` values with the stage's `lora:` overrides applied."""
        stage = self.stage(name)
        merged = self.lora.model_dump()
        if stage.lora is not None:
            merged.update(stage.lora.model_dump(exclude_unset=True))
        return LoraParams(**merged)

    def stage_template(self, name: str) -> str | None:
        """The stage's template: its own `template` when written (null included: LF's default), else model's."""
        stage = self.stage(name)
        return stage.template if "template" in stage.model_fields_set else self.model.template

    def stage_val_size(self, name: str) -> float:
        """LF's val_size of the stage: its own, else data.val_size unless the stage has an eval_dataset."""
        stage = self.stage(name)
        if stage.val_size is not None:
            return stage.val_size
        return 0.0 if stage.eval_dataset else self.data.val_size

    def has_held_out(self, name: str) -> bool:
        """Does the stage have held-out data (an eval_dataset or a val_size split) to evaluate and gate on?"""
        return bool(self.stage(name).eval_dataset) or self.stage_val_size(name) > 1e-6

    def registry_in_effect(self) -> RegistryParams:
        """`registry:` with its defaults resolved: the project's name, the final stage's headline metric."""
        r = self.registry
        metric = r.compare_metric or HEADLINE_METRIC[self.enabled_stages()[-1]]
        return r.model_copy(update={
            "model_name": r.model_name or self._project_name or DEFAULT_PROJECT_NAME, "compare_metric": metric,
            "higher_is_better": higher_is_better(metric) if r.higher_is_better is None else r.higher_is_better})

    def stage_preference(self, name: str) -> PreferenceParams:
        stage = self.stage(name)
        return PreferenceParams(**{key: getattr(stage, key) for key in PreferenceParams.model_fields})

    def data_args(self, name: str, *, root: str | Path = "."):
        """The data-layer options of stage `name` (the one params -> tunepipe.data mapping every stage uses).

        cpt packs into cutoff_len blocks at prepare time (LF's pt); sft packs at train time, so its prepared data
        is unpacked. `val_size` applies only to a stage without an eval_dataset."""
        from tunepipe.data.features import DataArgs

        stage, d = self.stage(name), self.data
        return DataArgs(dataset_dir=str(Path(root) / d.dataset_dir), template=self.stage_template(name),
                        cutoff_len=d.cutoff_len, packing=self.stage_train(name).packing if name == "cpt" else False,
                        neat_packing=stage.neat_packing, train_on_prompt=stage.train_on_prompt,
                        mask_history=stage.mask_history, max_samples=d.max_samples, mix_strategy=d.mix_strategy,
                        val_size=self.stage_val_size(name), seed=d.seed,
                        preprocessing_batch_size=d.preprocessing_batch_size,
                        preprocessing_num_workers=d.preprocessing_num_workers, streaming=d.streaming,
                        tool_format=d.tool_format,
                        default_system=d.default_system, allow_scripts=d.allow_scripts,
                        skip_bad_rows=d.skip_bad_rows, overlength=d.overlength)

    def previous_stage(self, name: str) -> str | None:
        """The last enabled stage before `name` (its merged model is this stage's base); None = the base model."""
        enabled = self.enabled_stages()
        before = [s for s in STAGES[: STAGES.index(name)] if s in enabled]
        return before[-1] if before else None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The section model that holds the key at `loc` (("stages", "sft", "max_step") -> StageParams)."""
    model: type[BaseModel] | None = Params
    for part in loc[:-1]:
        info = model.model_fields.get(str(part)) if model else None
        if info is None:
            return None
        annotation = info.annotation
        args = getattr(annotation, "__args__", None) or (annotation,)  # `LoraParams | None` -> LoraParams
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _key_hint(loc: tuple) -> str:
    """`; did you mean 'max_steps'?` from the keys valid where the unknown one was written, else the section it
    belongs to when it is a key of another section (`cutoff_len` under train: -> data.cutoff_len)."""
    model, name = _model_at(loc), str(loc[-1])
    if model is not None:
        close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.6)
        if close:
            return f"; did you mean '{close[0]}'?"
    elsewhere = [key for key, _ in describe_keys() if key.rsplit(".", 1)[-1] == name]
    if elsewhere:
        return f"; it belongs in {elsewhere[0].rsplit('.', 1)[0]}: ({elsewhere[0]})"
    return ""


def _format_error(err: ValidationError, file: str) -> ConfigError:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(part) for part in loc) or "(root)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown key{_key_hint(loc)} (`tunepipe params --keys` lists every key)"
    elif first["type"] == "missing" and len(loc) == 1:
        message = f"missing required section ({_required_sections_help()})"
    elif first["type"] == "missing":
        message = "required key missing"
    elif first["type"] == "model_type" and first.get("input") is None:
        message = ("empty section: " + (_required_sections_help() if key in REQUIRED_SECTIONS else
                                        "write its keys or remove it"))
    elif first["type"] == "model_type":
        message = f"expected a mapping of keys, got {first.get('input')!r}"
    elif "input" in first and first["type"] not in ("value_error",):
        message = f"{message} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return ConfigError(message + more, key=key, file=file)


def _required_sections_help() -> str:
    return ("params.yaml needs model: (model_name_or_path) and stages: (each stage to run with its dataset); "
            "`tunepipe import llamafactory FILE.yaml ...` writes one")


def _check(params: Params, file: str) -> None:
    """The rules that span keys, each reported on the key to change."""
    def fail(message: str, key: str) -> ConfigError:
        return ConfigError(message, key=key, file=file)

    for name in STAGES:
        stage = params.stage(name)
        if stage.enabled and not stage.dataset:
            raise fail(f"required for an enabled stage (dataset names from dataset_info.json; or set "
                       f"stages.{name}.enabled: false)", f"stages.{name}.dataset")
        if stage.val_size is not None and stage.val_size > 1e-6 and stage.eval_dataset:
            raise fail(f"cannot be used together with stages.{name}.eval_dataset (LLaMA-Factory: \"Cannot specify "
                       f"`val_size` if `eval_dataset` is not None.\")", f"stages.{name}.val_size")
    for key, value in [("data.val_size", params.data.val_size)] + [
            (f"stages.{n}.val_size", params.stage(n).val_size) for n in STAGES]:
        if value is not None and value == 1:
            raise fail("1 would hold out every row: give a fraction in (0,1) or a row count > 1", key)
    if params.stages.dpo.enabled and params.stages.kto.enabled:
        raise fail("dpo and kto are alternatives: enable at most one preference stage (remove one, or set its "
                   "enabled: false)", "stages.kto")
    if not params.enabled_stages():
        raise fail(f"no stage is enabled: write at least one of {', '.join(STAGES)} with its dataset", "stages")


def parse_params(data: dict[str, Any] | None, file: str = "params.yaml", *, project_name: str | None = None) -> Params:
    if not data:
        raise ConfigError(f"empty: {_required_sections_help()}", file=file)
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        raise _format_error(err, file) from None
    _check(params, file)
    params._project_name = project_name
    return params


def project_name(root: str | Path) -> str | None:
    """[project] name of the pyproject.toml in `root` (None without one): the default registered model name."""
    import tomllib

    path = Path(root) / "pyproject.toml"
    try:
        name = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return name if isinstance(name, str) and name else None


def read_yaml(path: str | Path, *, display: str | None = None) -> Any:
    """A YAML file's data; a missing file or a syntax error is one line with the file (`display`) and line."""
    import yaml

    path = Path(path)
    file = display or str(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found (run from the project root)", file=file) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{where}: {getattr(err, 'problem', None) or err}", file=file) from None


def load_params(path: str | Path = "params.yaml", *, display: str | None = None) -> Params:
    """params.yaml, validated; errors name the file as `display` (default: the path)."""
    path = Path(path)
    file = display or str(path)
    data = read_yaml(path, display=file)
    if data is not None and not isinstance(data, dict):
        raise ConfigError("expected a mapping of sections (model, data, stages, ...)", file=file)
    return parse_params(data, file, project_name=project_name(path.parent))


def describe_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[tuple[str, str]]:
    """(key path, help) for every field (every stage's keys under each stage name), e.g. for "did you mean"."""
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if nested is not None and name != "lora" or (nested is LoraParams and not prefix):
            rows += describe_keys(nested, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", info.description or ""))
    return rows


def _default_text(info: Any) -> str:
    if info.is_required():
        return "(required)"
    value = info.default_factory() if info.default_factory is not None else info.default
    if isinstance(value, BaseModel):
        return "-"
    return "null" if value is None else str(value)


def schema_rows() -> list[tuple[str, str, str]]:
    """(key, default, help) for every params.yaml key, a stage's keys once as `stages.<stage>.<key>` (their
    training and LoRA keys default to the shared train: and lora: values): `tunepipe params`."""
    rows: list[tuple[str, str, str]] = []
    for section, info in Params.model_fields.items():
        model = info.annotation
        if section == "stages":
            for key, field_info in StageParams.model_fields.items():
                if key == "lora":
                    rows += [(f"stages.<stage>.lora.{k}", f"= lora.{k}", i.description or "")
                             for k, i in LoraParams.model_fields.items()]
                elif key in TrainParams.model_fields:
                    rows.append((f"stages.<stage>.{key}", f"= train.{key}", field_info.description or ""))
                else:
                    default = {"val_size": "= data.val_size", "template": "= model.template"}.get(
                        key, _default_text(field_info))
                    rows.append((f"stages.<stage>.{key}", default, field_info.description or ""))
            continue
        for key, field_info in model.model_fields.items():
            rows.append((f"{section}.{key}", _default_text(field_info), field_info.description or ""))
    return rows
