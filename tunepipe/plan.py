"""The pipeline plan: which stages run, in what order, and exactly which values each one reads.

`plan(params)` turns params.yaml (defaults filled in by tunepipe.config) into one section per pipeline stage:

    base                 the base model to build or reference
    prepare-<stage>      the data options (tunepipe.data.features.DataArgs) and datasets of one stage
    train-<stage>        the effective training, LoRA and preference values of one stage (shared `train:` and
                         `lora:` with the stage's overrides applied), the template options its tokenizer is fixed with
    merge-<stage>        what the merge and its round-trip checks read
    evaluate, register   the evaluation settings and datasets; the registry and its gates

A stage process reads its own section and nothing else (stages/common.py `inputs`), and DVC compares the same
section against dvc.lock. So changing a value - written in params.yaml or a default in tunepipe/config.py - reruns
exactly the stages whose section holds it, and a change that alters no value (a help string, a comment) reruns
nothing. Every section is a typed model below; the plan is written to outputs/params.yaml by the `params` stage.

Values only: a section holds no absolute path unless the user wrote one (the dataset folder is as written,
relative to the project root), so the plan is the same in every checkout.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

from pydantic import Field

from tunepipe.config import (LF_STAGE, PREFERENCE_STAGES, STAGES, EvaluateParams, LoraParams, Objective, Params,
                             PreferenceParams, RegistryParams, Section, TrainParams, objective)
from tunepipe.data.features import EXAMPLE_FIELDS, TEMPLATE_FIELDS

StageName = Literal[STAGES]  # type: ignore[valid-type]


def dvc_stage(step: str, stage: str | None = None) -> str:
    """The name of a pipeline step: `train-sft`, `merge-cpt`, `evaluate`."""
    return f"{step}-{stage}" if stage else step


class BaseInputs(Section):
    model_name_or_path: str = Field(description="Base model: 'tiny', a hub id or a local directory.")
    tiny_seed: int = Field(description="Seed of the embedded tiny model.")


class ReplayInputs(Section):
    dataset: str = Field(description="Earlier-stage dataset(s) mixed into this stage's training data.")
    ratio: float = Field(description="Replay examples per own training example.")
    lf_stage: str = Field(description="How the replay data is processed: pt (CPT text blocks) or sft.")
    packing: bool | None = Field(description="pt replay: packed into cutoff_len blocks as prepare-cpt packs.")


class PrepareInputs(Section):
    stage: StageName = Field(description="The pipeline stage whose data this prepares.")
    lf_stage: str = Field(description="LLaMA-Factory's name of the stage (the data layer's vocabulary).")
    data: dict[str, Any] = Field(description="tunepipe.data.features.DataArgs of the stage.")
    dataset: str = Field(description="Training dataset names.")
    eval_dataset: str | None = Field(description="Held-out dataset names.")
    replay: ReplayInputs | None = Field(None, description="Replay of earlier-stage data (sft), "
                                                          "tunepipe/data/replay.py.")
    trust_remote_code: bool = Field(description="Allow the tokenizer's own code.")


class TrainInputs(Section):
    stage: StageName = Field(description="The pipeline stage.")
    previous: StageName | None = Field(description="The stage whose merged model this one starts from (None: base).")
    objective: Objective = Field(description="What is trained: clm, sft, dpo, orpo, simpo or kto.")
    train: TrainParams = Field(description="Effective training values (train: + the stage's overrides).")
    lora: LoraParams = Field(description="Effective LoRA values (lora: + the stage's lora: overrides).")
    preference: PreferenceParams | None = Field(description="Preference keys (dpo and kto only).")
    template: dict[str, Any] = Field(description="Template options the training tokenizer is fixed with.")
    cutoff_len: int = Field(description="Maximum tokens per example (ORPO/SimPO truncation, packed rows).")
    trust_remote_code: bool = Field(description="Allow the model's own code.")


class MergeInputs(Section):
    stage: StageName = Field(description="The pipeline stage.")
    previous: StageName | None = Field(description="The stage whose merged model the adapter was trained on.")
    data: dict[str, Any] = Field(description="DataArgs fields the round trip reads: template options, and how the "
                                             "stage's conversations are loaded.")
    dataset: str | None = Field(description="Datasets the round-trip conversations come from (None for cpt).")
    finetuning_type: Literal["lora", "full"] = Field(description="Merge an adapter, or re-save full weights.")
    max_new_tokens: int = Field(description="Length of the generation probe.")
    trust_remote_code: bool = Field(description="Allow the model's own code.")


class EvaluateInputs(Section):
    stages: dict[str, str] = Field(description="Each enabled stage -> the model it started from ('base' or a stage).")
    sft: PrepareInputs | None = Field(description="The sft stage's data (generation prompts), if sft is enabled.")
    template: dict[str, Any] = Field(description="Template options of the evaluation tokenizer (sft's).")
    preference: str | None = Field(description="The preference stage (dpo or kto), if any.")
    pref_beta: float = Field(description="Beta of the preference stage's implicit reward.")
    eval_batch_size: int = Field(description="Batch size for scoring.")
    flash_attn: str = Field(description="Attention kernel for scoring (train: flash_attn).")
    enable_liger_kernel: bool = Field(description="Liger kernels for scoring (train: enable_liger_kernel).")
    dataset_dir: str = Field(description="Folder of the knowledge questions (evaluate.knowledge_file).")
    evaluate: EvaluateParams = Field(description="The evaluate: section.")
    trust_remote_code: bool = Field(description="Allow the model's own code.")


class RegisterInputs(Section):
    final_stage: StageName = Field(description="The stage whose merged model is registered.")
    stages: list[StageName] = Field(description="The enabled stages, in order (for the no-regression gates).")
    registry: RegistryParams = Field(description="The registry: section, defaults resolved (name, compare metric).")
    held_out: dict[str, bool] = Field(description="Each enabled stage -> has it held-out data (eval_dataset or "
                                                  "val_size)? A gate on a metric of a stage without says so.")


SECTIONS: dict[str, type[Section]] = {"base": BaseInputs, "prepare": PrepareInputs, "train": TrainInputs,
                                      "merge": MergeInputs, "evaluate": EvaluateInputs, "register": RegisterInputs}


def _template(data: dict[str, Any]) -> dict[str, Any]:
    return {key: data[key] for key in TEMPLATE_FIELDS}


def _examples(data: dict[str, Any]) -> dict[str, Any]:
    return {key: data[key] for key in EXAMPLE_FIELDS}


def replay_inputs(params: Params, stage: str) -> ReplayInputs | None:
    from tunepipe.errors import ConfigError
    from tunepipe.data.replay import replay_stage

    s = params.stage(stage)
    if not s.replay_dataset or s.replay_ratio <= 0:
        return None
    if stage != "sft":
        raise ConfigError("replay is supported for the sft stage (preference stages: use pref_ftx)",
                          key=f"stages.{stage}.replay_dataset")
    kind = replay_stage(params, s.replay_dataset)
    return ReplayInputs(dataset=s.replay_dataset, ratio=s.replay_ratio, lf_stage=kind,
                        packing=params.stage_train("cpt").packing if kind == "pt" else False)


def prepare_inputs(params: Params, stage: str) -> PrepareInputs:
    s = params.stage(stage)
    return PrepareInputs(stage=stage, lf_stage=LF_STAGE[stage], data=asdict(params.data_args(stage)),
                         dataset=s.dataset, eval_dataset=s.eval_dataset, replay=replay_inputs(params, stage),
                         trust_remote_code=params.model.trust_remote_code)


def train_inputs(params: Params, stage: str) -> TrainInputs:
    pref = params.stage_preference(stage) if stage in PREFERENCE_STAGES else None
    data = asdict(params.data_args(stage))
    data["train_on_prompt"] = data["train_on_prompt"] and stage == "sft"  # LF applies it to sft only
    lora = params.stage_lora(stage)
    if lora.finetuning_type == "full":  # no adapter: the LoRA values play no part (and must not rerun the stage)
        lora = LoraParams(finetuning_type="full")
    return TrainInputs(stage=stage, previous=params.previous_stage(stage),
                       objective=objective(stage, pref.pref_loss if pref else "sigmoid"),
                       train=params.stage_train(stage), lora=lora, preference=pref,
                       template=_template(data), cutoff_len=params.data.cutoff_len,
                       trust_remote_code=params.model.trust_remote_code)


def merge_inputs(params: Params, stage: str) -> MergeInputs:
    data = asdict(params.data_args(stage))
    data["train_on_prompt"] = False  # the saved template renders for inference (LF's export does the same)
    s = params.stage(stage)
    datasets = ",".join(n for n in (s.dataset, s.eval_dataset) if n) if stage != "cpt" else None
    # merge calls only load_template and, for a chat stage, load_examples
    data = {**_template(data), **(_examples(data) if datasets else {})}
    return MergeInputs(stage=stage, previous=params.previous_stage(stage), data=data, dataset=datasets,
                       finetuning_type=params.stage_lora(stage).finetuning_type,
                       max_new_tokens=params.evaluate.max_new_tokens,
                       trust_remote_code=params.model.trust_remote_code)


def evaluate_inputs(params: Params) -> EvaluateInputs:
    enabled = params.enabled_stages()
    pref = next((s for s in enabled if s in PREFERENCE_STAGES), None)
    return EvaluateInputs(
        stages={s: params.previous_stage(s) or "base" for s in enabled},
        sft=prepare_inputs(params, "sft") if "sft" in enabled else None,
        template=_template(asdict(params.data_args("sft"))),
        preference=pref, pref_beta=params.stage(pref).pref_beta if pref else 0.1,
        eval_batch_size=params.train.per_device_eval_batch_size, flash_attn=params.train.flash_attn,
        enable_liger_kernel=params.train.enable_liger_kernel, dataset_dir=params.data.dataset_dir,
        evaluate=params.evaluate,
        trust_remote_code=params.model.trust_remote_code)


def plan(params: Params) -> dict[str, Section]:
    """Every pipeline step of `params` in run order, with the values it reads."""
    enabled = params.enabled_stages()
    steps: dict[str, Section] = {
        "base": BaseInputs(model_name_or_path=params.model.model_name_or_path, tiny_seed=params.model.tiny_seed)}
    for stage in enabled:
        steps[dvc_stage("prepare", stage)] = prepare_inputs(params, stage)
    for stage in enabled:
        steps[dvc_stage("train", stage)] = train_inputs(params, stage)
        steps[dvc_stage("merge", stage)] = merge_inputs(params, stage)
    steps["evaluate"] = evaluate_inputs(params)
    steps["register"] = RegisterInputs(final_stage=enabled[-1], stages=enabled, registry=params.registry_in_effect(),
                                       held_out={s: params.has_held_out(s) for s in enabled})
    return steps


def document(params: Params) -> dict[str, dict[str, Any]]:
    """The plan as plain data (what outputs/params.yaml holds)."""
    return {name: section.model_dump(mode="json") for name, section in plan(params).items()}


def read_section(document: dict[str, Any], name: str) -> Section:
    """A step's section from the plan document, validated back into its typed model."""
    from tunepipe.errors import ConfigError

    if name not in document:
        raise ConfigError(f"no step {name!r} in the plan (steps: {', '.join(document)}); is the stage enabled?")
    return SECTIONS[name.split("-", 1)[0]].model_validate(document[name])

