"""The typed schema of params.yaml: the one file a user edits.

Keys follow LLaMA-Factory's names wherever the concept is the same (`model_name_or_path`, `template`, `cutoff_len`,
`lora_rank`, `lora_target`, `pref_beta`, `pref_loss`, `learning_rate`, ...), so an LF YAML maps over line by line.
Every field has a help string (`tunepipe params --help-keys` prints them) and every bad key or value is reported
as one line naming the key path, e.g. `params.yaml: stages.dpo.pref_beta: Input should be greater than 0`.

Training hyper-parameters live in `train:` (shared) and can be overridden per stage under `stages.<name>:`;
LoRA settings likewise under `lora:` and `stages.<name>.lora:`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunepipe.errors import ConfigError

# The one vocabulary of stage kinds. Pipeline stages, in order (dpo and kto are alternatives):
STAGES = ("cpt", "sft", "dpo", "kto")
PREFERENCE_STAGES = ("dpo", "kto")
# LLaMA-Factory's `stage:` name of each: the data layer (which mirrors LF) and LF's YAMLs speak this one.
LF_STAGE = {"cpt": "pt", "sft": "sft", "dpo": "dpo", "kto": "kto"}
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
TINY = "tiny"  # model_name_or_path of the embedded base model (tunepipe.models.tiny builds it)
DPO_FAMILY = ("sigmoid", "ipo", "hinge")  # losses against a reference model (the stage's input model)
Objective = Literal["clm", "sft", "dpo", "orpo", "simpo", "kto"]


def objective(stage: str, pref_loss: str = "sigmoid") -> Objective:
    """What a stage trains: clm (cpt: next-token loss on raw text), sft, dpo (sigmoid/ipo/hinge), orpo, simpo, kto."""
    if stage == "cpt":
        return "clm"
    if stage == "dpo":
        return "dpo" if pref_loss in DPO_FAMILY else pref_loss  # type: ignore[return-value]
    if stage in ("sft", "kto"):
        return stage  # type: ignore[return-value]
    raise ConfigError(f"unknown stage {stage!r} (expected {', '.join(STAGES)})")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(Section):
    model_name_or_path: str = Field("tiny", description="Base model: 'tiny' (embedded, built locally), a Hugging "
                                                        "Face model id or a local directory.")
    template: str = Field("qwen", description="Chat template used for training and written into every merged model.")
    trust_remote_code: bool = Field(False, description="Allow custom model/tokenizer code from the model repo.")
    tiny_seed: int = Field(0, description="Seed of the embedded tiny model (only for model_name_or_path: tiny).")


class DataParams(Section):
    dataset_dir: str = Field("data", description="Folder with dataset_info.json (relative to the project root).")
    cutoff_len: int = Field(512, gt=1, description="Maximum tokens per example.")
    preprocessing_batch_size: int = Field(1000, gt=0, description="Rows per processing batch (LF semantics).")
    max_samples: int | None = Field(None, gt=0, description="Keep only the first N rows of each dataset (debug).")
    val_size: float = Field(0.0, ge=0, description="Held-out split taken from the training data when a stage has "
                                                   "no eval_dataset: fraction in (0,1) or a row count.")
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
                                                   "padding-free packing at train time (default on).")


class PreferenceParams(Section):
    """The preference-optimisation keys of a dpo or kto stage."""

    pref_loss: Literal["sigmoid", "ipo", "hinge", "orpo", "simpo"] = Field(
        "sigmoid", description="dpo stage loss: sigmoid/ipo/hinge (DPO family, reference = previous stage), orpo or "
                               "simpo (reference-free).")
    pref_beta: float = Field(0.1, gt=0, description="Preference beta (DPO/IPO/hinge/ORPO lambda/SimPO beta).")
    pref_ftx: float = Field(0.0, ge=0, description="SFT loss weight added to the preference loss.")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO target reward margin.")
    kto_chosen_weight: float = Field(1.0, gt=0, description="kto: weight of desirable examples.")
    kto_rejected_weight: float = Field(1.0, gt=0, description="kto: weight of undesirable examples.")


class StageParams(TrainParams, PreferenceParams):
    """One stage: its data and any override of the shared `train:` and `lora:` values."""

    enabled: bool = Field(True, description="Run this stage; when off the next stage starts from the previous one.")
    dataset: str = Field(..., description="Dataset name(s) from dataset_info.json, comma-separated.")
    eval_dataset: str | None = Field(None, description="Held-out dataset name(s) for evaluation.")
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


STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpt": {"dataset": "demo_cpt", "eval_dataset": "demo_cpt_eval"},
    "sft": {"dataset": "demo_sft", "eval_dataset": "demo_sft_eval"},
    "dpo": {"dataset": "demo_dpo", "eval_dataset": "demo_dpo_eval"},
    "kto": {"dataset": "demo_kto", "eval_dataset": "demo_kto_eval", "enabled": False},
}


def _stage(name: str) -> Any:
    return Field(default_factory=lambda: StageParams(**STAGE_DEFAULTS[name]),
                 description=f"The {name} stage (defaults: {STAGE_DEFAULTS[name]}).")


class StagesParams(Section):
    cpt: StageParams = _stage("cpt")
    sft: StageParams = _stage("sft")
    dpo: StageParams = _stage("dpo")
    kto: StageParams = _stage("kto")

    @model_validator(mode="before")
    @classmethod
    def _fill_stage_defaults(cls, data: Any) -> Any:
        """A stage written partially (`cpt: {enabled: false}`) keeps its default datasets."""
        if isinstance(data, dict):
            data = {name: {**STAGE_DEFAULTS[name], **value} if name in STAGE_DEFAULTS and isinstance(value, dict)
                    else value for name, value in data.items()}
        return data

    @model_validator(mode="after")
    def _one_preference_stage(self) -> StagesParams:
        if self.dpo.enabled and self.kto.enabled:
            raise ValueError("enable at most one preference stage: dpo or kto (kto replaces dpo)")
        if not any(getattr(self, name).enabled for name in STAGES):
            raise ValueError("every stage is disabled")
        return self


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
    stage: Literal["cpt", "sft", "dpo", "kto"] = Field(..., description="The stage whose held-out skill this is.")
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
    model_name: str = Field("tunepipe-demo", description="MLflow registered model name.")
    compare_metric: str = Field("final.reward_accuracy", description="Metric a new model must beat the current "
                                                                     "champion on.")
    higher_is_better: bool = Field(True, description="Direction of compare_metric.")
    gates: list[Gate] = Field(default_factory=list, description="All must pass before a model can be champion.")
    no_regression: list[SkillTolerance] = Field(
        default_factory=list, description="Each stage's held-out skill and how much later models may lose of it; "
                                          "expanded into baseline gates (tunepipe.tracking.promotion.no_regression_gates).")
    no_regression_vs: list[Literal["previous", "own", "base"]] = Field(
        default_factory=lambda: ["previous", "own", "base"],
        description="What the skills are compared with: previous = every model from the skill's stage on vs the "
                    "model it started from; own = the final model vs the skill's stage; base = final vs base.")
    store: Literal["copy", "reference"] = Field(
        "copy", description="copy: log the final model's files as MLflow artifacts (self-contained registry); "
                            "reference: register its absolute path only (no extra copy; restore old versions "
                            "with git checkout + dvc checkout).")


class Params(Section):
    model: ModelParams = Field(default_factory=ModelParams, description="Base model and chat template.")
    data: DataParams = Field(default_factory=DataParams, description="Data processing options.")
    lora: LoraParams = Field(default_factory=LoraParams, description="LoRA defaults for every stage.")
    train: TrainParams = Field(default_factory=TrainParams, description="Training defaults for every stage.")
    stages: StagesParams = Field(default_factory=StagesParams, description="The stages, in order cpt, sft, dpo|kto.")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Evaluation settings.")
    registry: RegistryParams = Field(default_factory=RegistryParams, description="Registry and promotion gates.")

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

    def stage_preference(self, name: str) -> PreferenceParams:
        stage = self.stage(name)
        return PreferenceParams(**{key: getattr(stage, key) for key in PreferenceParams.model_fields})

    def data_args(self, name: str, *, root: str | Path = "."):
        """The data-layer options of stage `name` (the one params -> tunepipe.data mapping every stage uses).

        cpt packs into cutoff_len blocks at prepare time (LF's pt); sft packs at train time, so its prepared data
        is unpacked. `data.val_size` applies only to a stage without an eval_dataset."""
        from tunepipe.data.features import DataArgs

        stage, d = self.stage(name), self.data
        return DataArgs(dataset_dir=str(Path(root) / d.dataset_dir), template=self.model.template,
                        cutoff_len=d.cutoff_len, packing=self.stage_train(name).packing if name == "cpt" else False,
                        neat_packing=stage.neat_packing, train_on_prompt=stage.train_on_prompt,
                        mask_history=stage.mask_history, max_samples=d.max_samples, mix_strategy=d.mix_strategy,
                        val_size=d.val_size if not stage.eval_dataset else 0.0, seed=d.seed,
                        preprocessing_batch_size=d.preprocessing_batch_size, tool_format=d.tool_format,
                        default_system=d.default_system, allow_scripts=d.allow_scripts,
                        skip_bad_rows=d.skip_bad_rows, overlength=d.overlength)

    def previous_stage(self, name: str) -> str | None:
        """The last enabled stage before `name` (its merged model is this stage's base); None = the base model."""
        enabled = self.enabled_stages()
        before = [s for s in STAGES[: STAGES.index(name)] if s in enabled]
        return before[-1] if before else None


def _format_error(err: ValidationError, file: str) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(root)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; `tunepipe params --keys` lists valid keys)"
    elif "input" in first and first["type"] not in ("missing", "value_error"):
        message = f"{message} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return ConfigError(message + more, key=key, file=file)


def parse_params(data: dict[str, Any] | None, file: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(data or {})
    except ValidationError as err:
        raise _format_error(err, file) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found (run from the project root)", file=str(path)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{where}: {getattr(err, 'problem', err)}", file=str(path)) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError("expected a mapping of sections (model, data, stages, ...)", file=str(path))
    return parse_params(data, str(path))


def describe_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[tuple[str, str]]:
    """(key path, help) for every field, for `tunepipe params --keys` and docs."""
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if nested is not None and name != "lora" or (nested is LoraParams and not prefix):
            rows += describe_keys(nested, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", info.description or ""))
    return rows
