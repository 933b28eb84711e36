"""LLaMA-Factory training YAMLs (one per stage) -> params.yaml: `tunepipe import llamafactory FILE.yaml ...`.

A LLaMA-Factory user arrives with a data folder and a YAML per stage (`stage: pt|sft|dpo|kto`). Each YAML becomes
one stage under `stages:` (pt -> cpt), with the same key names wherever tunepipe has the key. Every key of a YAML is
in exactly one of three lists, and the import says which:

- SUPPORTED: mapped to a params.yaml key (most keep their name); values that must be one for the whole chain
  (the base model, the data folder, cutoff_len, max_samples, ...) must agree between the files;
- IGNORED: no effect on what tunepipe trains, or tunepipe does it its own way (launchers, output folders, logging
  back-ends, LF's in-training eval schedule); listed with the reason;
- REFUSED: would change the result and tunepipe cannot honour it yet (other stages, optimizers, rope scaling, ...):
  an error, unless the value is LF's default (then it changes nothing and is ignored).
An unknown key is an error with the closest LF keys, as in LLaMA-Factory itself.

Round trip: the data options of an imported stage are LF's for that YAML (dataset, template, cutoff_len,
max_samples, packing, ...; the plan's DataArgs), so `prepare` produces the tokens LLaMA-Factory 0.9.5 produces for
it (tests/test_lf_import.py replays recorded LF outputs). LF's defaults are written where tunepipe's differ
(learning_rate, num_train_epochs, lr_scheduler_type, cutoff_len), so an absent key means what it meant in LF.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.config import (LF_STAGE, PREFERENCE_STAGES, STAGES, LoraParams, PreferenceParams, TrainParams,
                             parse_params, project_name, read_yaml)
from tunepipe.errors import ConfigError

LF_STAGES = {lf: stage for stage, lf in LF_STAGE.items()}
OTHER_LF_STAGES = {"rm": "reward modelling", "ppo": "PPO"}

# One value for the whole chain (tunepipe trains one base model through the stages on one data folder).
MODEL_KEYS = {"model_name_or_path": "model", "trust_remote_code": "model"}
DATA_KEYS = {"dataset_dir": "data", "cutoff_len": "data", "max_samples": "data", "mix_strategy": "data",
             "tool_format": "data", "default_system": "data", "preprocessing_batch_size": "data",
             "preprocessing_num_workers": "data", "streaming": "data"}
# Per stage, under stages.<stage>: (LF's template is per YAML; so is tunepipe's stages.<stage>.template).
STAGE_KEYS = ("dataset", "eval_dataset", "val_size", "template", "train_on_prompt", "mask_history", "neat_packing")
# How a stage is launched is not in LF's YAMLs (LF reads NPROC_PER_NODE etc. from the environment); its `deepspeed:`
# path points into LF's own examples folder.
LAUNCH_KEYS = ("launcher", "nproc_per_node", "nnodes", "master_addr", "master_port", "config_file", "deepspeed")
TRAIN_KEYS = tuple(k for k in TrainParams.model_fields if k not in ("bf16", "gradient_checkpointing", *LAUNCH_KEYS))
LORA_KEYS = tuple(LoraParams.model_fields)
PREFERENCE_KEYS = tuple(PreferenceParams.model_fields)
# LF keys tunepipe has under another name or with a value translation (see _translate).
TRANSLATED = ("stage", "do_train", "bf16", "disable_gradient_checkpointing", "seed", "packing")
SUPPORTED = sorted({*MODEL_KEYS, *DATA_KEYS, *STAGE_KEYS, *TRAIN_KEYS, *LORA_KEYS, *PREFERENCE_KEYS, *TRANSLATED})

# LF's value where tunepipe's default differs: written for a YAML that leaves the key out (HF TrainingArguments'
# defaults for the training keys, LF's DataArguments for cutoff_len).
LF_DEFAULTS = {"learning_rate": 5e-5, "num_train_epochs": 3.0, "lr_scheduler_type": "linear", "cutoff_len": 2048}

IGNORED = {
    "output_dir": "tunepipe writes outputs/adapters/<stage> and outputs/models/<stage>",
    "overwrite_output_dir": "outputs are replaced atomically",
    "overwrite_cache": "no preprocessing cache: DVC decides when data is re-tokenized",
    "plot_loss": "loss curves are always written (plots/loss_<stage>.png)",
    "report_to": "every run is tracked in MLflow",
    "logging_dir": "logs go to MLflow and the Prefect run",
    "run_name": "MLflow names the runs (train-<stage>)",
    "save_only_model": "checkpoints always keep the full trainer state (resume)",
    "save_strategy": "checkpoints every save_steps",
    "resume_from_checkpoint": "an interrupted stage resumes from its own checkpoints",
    "dataloader_num_workers": "speed only",
    "ddp_timeout": "launcher setting (accelerate launch / torchrun, docs/stages.md Scaling out)",
    "deepspeed": "launcher setting: set train.launcher and train.deepspeed in params.yaml (docs/stages.md)",
    "fsdp": "launcher setting",
    "fsdp_config": "launcher setting",
    "ray_num_workers": "launcher setting (tunepipe scales out with Prefect work pools)",
    "ray_run_name": "launcher setting",
    "ray_storage_path": "launcher setting",
    "ray_init_kwargs": "launcher setting",
    "create_new_adapter": "every stage trains a fresh adapter on the previous stage's merged model",
    "resize_vocab": "the embedding is resized (and trained) whenever the tokenizer outgrows it",
    "adapter_name_or_path": "the stages are chained by tunepipe (an adapter of an earlier imported stage)",
    "do_eval": "held-out data is scored after training and by the evaluate stage",
    "eval_strategy": "held-out data is scored after training and by the evaluate stage",
    "evaluation_strategy": "held-out data is scored after training and by the evaluate stage",
    "eval_steps": "held-out data is scored after training and by the evaluate stage",
    "compute_accuracy": "the evaluate stage computes its own metrics",
    "predict_with_generate": "the evaluate stage generates for the sft held-out prompts (BLEU/ROUGE)",
}
# Keys that change the result and are not supported yet: refused unless the value is LF's default.
REFUSED = {
    "double_quantization": True, "tokenized_path": None, "buffer_size": 16384, "interleave_probs": None,
    "media_dir": None,
    "enable_thinking": True, "fp16": False, "pure_bf16": False, "warmup_steps": 0,
    "rope_scaling": None, "neftune_noise_alpha": None, "loraplus_lr_ratio": None, "pissa_init": False,
    "use_unsloth": False, "use_galore": False, "use_badam": False, "use_apollo": False, "freeze_vision_tower": True,
    "ref_model": None, "ref_model_adapters": None, "new_special_tokens": None,
    "do_predict": False, "eval_on_each_dataset": False, "export_dir": None, "upcast_layernorm": False,
    "optim": "adamw_torch", "lr_scheduler_kwargs": None, "dpo_label_smoothing": 0.0, "pref_bco_weight": 0.0,
}
ALL_KEYS = sorted({*SUPPORTED, *IGNORED, *REFUSED})


@dataclass
class Imported:
    """The params.yaml document of an import, and what the user should read about it."""

    params: dict[str, Any]
    sources: dict[str, str]  # stage -> file
    ignored: dict[str, list[str]] = field(default_factory=dict)  # LF key -> files
    notes: dict[str, list[str]] = field(default_factory=dict)  # note -> files it applies to

    def note(self, text: str, path: Path) -> None:
        self.notes.setdefault(text, []).append(path.name)

    def note_lines(self) -> list[str]:
        return [f"{text} ({', '.join(files)})" for text, files in self.notes.items()]


COMMAND_LINE = Path("<command line>")


def _fail(message: str, file: str | Path, key: str | None = None) -> ConfigError:
    if Path(file) == COMMAND_LINE:
        return ConfigError(f"{message} (a KEY=VALUE override)", key=key)
    return ConfigError(message, file=str(file), key=key)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` LF overrides (as `llamafactory-cli train x.yaml key=value`), values parsed as YAML."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected KEY=VALUE (an LLaMA-Factory key), got {item!r}", key="overrides")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def read_lf_yaml(path: str | Path) -> dict[str, Any]:
    data = read_yaml(path)
    if not isinstance(data, dict) or not data:
        raise _fail("expected an LLaMA-Factory training YAML (a mapping of keys)", path)
    if "stage" not in data:
        what = "an export/merge config (export_dir)" if "export_dir" in data else "not a training config"
        raise _fail(f"{what}: no `stage:` key; tunepipe imports training YAMLs (stage: pt, sft, dpo or kto) and "
                    "merges every stage itself", path)
    return data


def _check_keys(data: dict[str, Any], path: Path, imported: Imported) -> None:
    for key, value in data.items():
        if key in SUPPORTED:
            continue
        if key in IGNORED:
            imported.ignored.setdefault(key, []).append(path.name)
        elif key in REFUSED:
            if value != REFUSED[key] and value is not None:
                raise _fail(f"not supported by tunepipe yet (value {value!r}; only LLaMA-Factory's default "
                            f"{REFUSED[key]!r} can be imported)", path, key)
            imported.ignored.setdefault(key, []).append(path.name)
        else:
            near = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.6)
            raise _fail("unknown LLaMA-Factory key" + (f"; did you mean '{near[0]}'?" if near else "") +
                        " (`tunepipe import llamafactory --keys` lists the keys tunepipe knows)", path, key)


def _translate(data: dict[str, Any], path: Path, stage: str, imported: Imported) -> dict[str, Any]:
    """One YAML's values as tunepipe keys: {"model": {...}, "data": {...}, "stage": {...}}."""
    out: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "stage": {}}
    if data.get("do_train", True) is not True:
        raise _fail("do_train: false does not train; tunepipe imports training YAMLs", path, "do_train")
    for key, value in data.items():
        if key in MODEL_KEYS:
            out["model"][key] = value
        elif key in DATA_KEYS:
            out["data"][key] = value
        elif key in STAGE_KEYS or key in TRAIN_KEYS or key in PREFERENCE_KEYS:
            out["stage"][key] = value
        elif key in LORA_KEYS:
            if key == "finetuning_type" and value not in ("lora", "full"):
                raise _fail(f"finetuning_type {value!r} is not supported (lora or full)", path, key)
            out["stage"].setdefault("lora", {})[key] = value
        elif key == "seed":  # LF's seed drives both the data (num_samples, val split) and the training
            out["data"]["seed"] = value
            out["stage"]["seed"] = value
        elif key == "bf16":
            if value is False:
                out["stage"]["bf16"] = False
            else:  # tunepipe's default: bf16 where a GPU supports it (LF's bf16: true fails on a CPU)
                imported.note("bf16: true -> bf16 on a GPU that supports it, fp32 on CPU", path)
        elif key == "disable_gradient_checkpointing":
            if value:
                out["stage"]["gradient_checkpointing"] = False
        elif key == "packing":
            if stage == "cpt":
                out["stage"]["packing"] = value
            elif value:
                imported.note("packing: true -> tunepipe's padding-free packing at train time (same tokens per "
                              "example; examples never attend to each other, unlike LF's)", path)
    if "pref_loss" in out["stage"] and out["stage"]["pref_loss"] not in ("sigmoid", "ipo", "hinge", "orpo", "simpo"):
        raise _fail(f"pref_loss {out['stage']['pref_loss']!r} is not supported (sigmoid, ipo, hinge, orpo, simpo)",
                    path, "pref_loss")
    for key, value in LF_DEFAULTS.items():
        section = "data" if key in DATA_KEYS else "stage"
        out[section].setdefault(key, value)
    if "template" not in data:
        out["stage"]["template"] = None  # LF's default: the tokenizer's own chat template (else `empty`)
    return out


def _one_value(key: str, values: dict[str, Any]) -> Any:
    distinct = {repr(v) for v in values.values()}
    if len(distinct) > 1:
        listing = ", ".join(f"{Path(f).name}: {v!r}" for f, v in values.items())
        raise ConfigError(f"differs between the files ({listing}); tunepipe trains one chain with one {key}: make "
                          "them agree (or override it: KEY=VALUE)", key=key)
    return next(iter(values.values()))


def slug(name: str) -> str:
    """A registered-model name from a directory name (MLflow refuses '/' and ':')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "tunepipe"


def import_llamafactory(files: list[str | Path], *, project: str | Path = ".", overrides: dict[str, Any] | None = None,
                        dataset_dir: str | None = None, model_name: str | None = None) -> Imported:
    """Read LF training YAMLs and build the params.yaml document (validated; nothing written)."""
    project = Path(project).resolve()
    overrides = dict(overrides or {})
    if dataset_dir is not None:
        overrides["dataset_dir"] = dataset_dir
    imported = Imported(params={}, sources={})
    per_stage: dict[str, dict[str, Any]] = {}
    shared: dict[str, dict[str, dict[str, Any]]] = {"model": {}, "data": {}}  # key -> {file: value}
    if "stage" in overrides:
        raise ConfigError("the stage comes from each YAML, not from the command line", key="stage")
    _check_keys(overrides, COMMAND_LINE, imported)
    for file in files:
        path = Path(file)
        data = {**read_lf_yaml(path), **overrides}
        _check_keys(data, path, imported)
        lf_stage = data["stage"]
        if lf_stage in OTHER_LF_STAGES:
            raise _fail(f"{OTHER_LF_STAGES[lf_stage]} (stage: {lf_stage}) is not supported yet: tunepipe trains pt, "
                        "sft, dpo and kto", path, "stage")
        if lf_stage not in LF_STAGES:
            raise _fail(f"unknown stage {lf_stage!r} (pt, sft, dpo or kto)", path, "stage")
        stage = LF_STAGES[lf_stage]
        if stage in imported.sources:
            raise _fail(f"a second {lf_stage} YAML (the first: {imported.sources[stage]}); one YAML per stage", path,
                        "stage")
        if stage in PREFERENCE_STAGES and (set(PREFERENCE_STAGES) - {stage}) & set(imported.sources):
            raise _fail("dpo and kto are alternatives: import one preference YAML", path, "stage")
        values = _translate(data, path, stage, imported)
        for section in ("model", "data"):
            for key, value in values[section].items():
                shared[section].setdefault(key, {})[str(path)] = value
        per_stage[stage] = values["stage"]
        imported.sources[stage] = str(path)
    if not per_stage:
        raise ConfigError("no LLaMA-Factory YAML given")

    model = {k: _one_value(k, v) for k, v in shared["model"].items()}
    data = {k: _one_value(k, v) for k, v in shared["data"].items()}
    if "model_name_or_path" not in model:
        raise ConfigError("no model_name_or_path in the YAMLs (give model_name_or_path=...)", key="model_name_or_path")
    if "dataset_dir" not in data:
        raise ConfigError("no dataset_dir in the YAMLs: give --dataset-dir (the LLaMA-Factory data folder with "
                          "dataset_info.json; LF's default 'data' is relative to where llamafactory-cli ran)",
                          key="dataset_dir")
    if str(data["dataset_dir"]).startswith(("ONLINE", "REMOTE:")):
        raise ConfigError(f"{data['dataset_dir']!r}: a hub-hosted dataset registry is not supported (runs are "
                          "offline); give --dataset-dir with a local LLaMA-Factory data folder", key="dataset_dir")
    data["dataset_dir"] = _project_relative(data["dataset_dir"], project)
    _hoist_template(per_stage, model)
    train, lora = _hoist(per_stage, TRAIN_KEYS), _hoist_lora(per_stage)
    first = ("dataset", "eval_dataset", "val_size", "template")
    stages = {stage: {**{k: per_stage[stage][k] for k in first if k in per_stage[stage]},
                      **{k: v for k, v in per_stage[stage].items() if k not in first}}
              for stage in STAGES if stage in per_stage}
    name = model_name or slug(project.name)
    registry: dict[str, Any] = {"model_name": name}
    gate = _starter_gate(stages)
    if gate:
        registry["gates"] = [gate]
    imported.params = {"model": model, "data": data, **({"lora": lora} if lora else {}),
                       **({"train": train} if train else {}), "stages": stages, "registry": registry}
    # the result must be a valid params.yaml; report a problem on the LF file and key it came from
    try:
        parse_params(imported.params, project_name=project_name(project))
    except ConfigError as err:
        parts = (err.key or "").split(".")
        source = imported.sources.get(parts[1]) if parts[0] == "stages" and len(parts) > 1 else None
        raise ConfigError(f"{err.message} (params.yaml key {err.key})", file=source, key=parts[-1] or None) from None
    return imported


def _project_relative(dataset_dir: str, project: Path) -> str:
    """A relative dataset_dir given at import is relative to here; params.yaml's are relative to the project."""
    if os.path.isabs(dataset_dir) or dataset_dir.startswith(("ONLINE", "REMOTE:")):
        return dataset_dir
    return os.path.relpath(Path.cwd() / dataset_dir, project)


def _hoist(per_stage: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Values every stage has, equal: moved to the shared section (train:), the rest stay per stage."""
    shared = {}
    for key in keys:
        values = [stage.get(key, KeyError) for stage in per_stage.values()]
        if values[0] is not KeyError and all(v == values[0] for v in values):
            shared[key] = values[0]
            for stage in per_stage.values():
                stage.pop(key)
    return shared


def _hoist_lora(per_stage: dict[str, dict[str, Any]]) -> dict[str, Any]:
    loras = {name: stage.pop("lora", {}) for name, stage in per_stage.items()}
    shared = _hoist(loras, LORA_KEYS)
    for name, lora in loras.items():
        if lora:
            per_stage[name]["lora"] = lora
    return shared


def _hoist_template(per_stage: dict[str, dict[str, Any]], model: dict[str, Any]) -> None:
    """model.template = the chat stages' template (sft's when they differ); a stage with another one, or with LF's
    default None (a pretraining YAML usually names none), keeps its own."""
    chat = [per_stage[s]["template"] for s in ("sft", "dpo", "kto") if s in per_stage]
    model["template"] = (chat or [stage["template"] for stage in per_stage.values()])[0]
    for stage in per_stage.values():
        if stage["template"] == model["template"]:
            stage.pop("template")


def _starter_gate(stages: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """One gate on the final stage's headline metric: better than chance / than its input model (edit it)."""
    last = list(stages)[-1]
    if last in PREFERENCE_STAGES:
        return {"metric": "final.reward_accuracy", "min": 0.5}
    return {"metric": "checks.sft_loss_reduction" if last == "sft" else "checks.cpt_ppl_reduction", "min": 0.0}


def render(imported: Imported) -> str:
    """params.yaml text: a header saying where it came from and what was ignored, then the sections."""
    import yaml

    import textwrap

    lines = ["# Imported from LLaMA-Factory YAMLs by `tunepipe import llamafactory` (tunepipe/lf_import.py):"]
    lines += [f"#   stages.{stage} <- {source}" for stage, source in imported.sources.items()]
    if imported.ignored:
        lines.append("# Ignored LLaMA-Factory keys (no effect on what tunepipe trains; `tunepipe import llamafactory "
                     "--keys` says why):")
        lines += textwrap.wrap(", ".join(sorted(imported.ignored)), 116, initial_indent="#   ",
                               subsequent_indent="#   ")
    for line in imported.note_lines():
        lines += textwrap.wrap(f"Note: {line}", 118, initial_indent="# ", subsequent_indent="#   ")
    lines.append("# `tunepipe params` shows every key with its default and the value in effect.")
    return "\n".join(lines) + "\n" + yaml.safe_dump(imported.params, sort_keys=False, width=120,
                                                     allow_unicode=True)


def key_lists() -> dict[str, dict[str, str]]:
    """{"supported": {key: params.yaml key}, "ignored": {key: why}, "refused": {key: "only <default>"}}."""
    def target(key: str) -> str:
        if key in MODEL_KEYS or key in DATA_KEYS:
            return f"{MODEL_KEYS.get(key) or DATA_KEYS[key]}.{key}"
        if key in LORA_KEYS:
            return f"lora.{key} (or stages.<stage>.lora.{key})"
        special = {"stage": "which stage: pt -> cpt, sft, dpo, kto", "do_train": "must be true",
                   "bf16": "true -> auto (bf16 on a supporting GPU), false -> bf16: false",
                   "disable_gradient_checkpointing": "true -> gradient_checkpointing: false",
                   "seed": "data.seed and train.seed", "packing": "pt: stages.cpt.packing; sft: padding-free "
                                                                 "packing at train time",
                   "template": "model.template (or stages.<stage>.template)"}
        if key in special:
            return special[key]
        shared = "train." if key in TRAIN_KEYS else ""
        return f"{shared}{key} (or stages.<stage>.{key})" if shared else f"stages.<stage>.{key}"

    return {"supported": {k: target(k) for k in SUPPORTED}, "ignored": dict(sorted(IGNORED.items())),
            "refused": {k: f"only LF's default {v!r}" for k, v in sorted(REFUSED.items())}}
