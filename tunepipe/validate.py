"""Everything `tunepipe run` can check about a project before anything slow starts, in well under 2 s.

`validate_project(root)` reads params.yaml (YAML syntax with file and line; every key, with "did you mean"), then
checks what would otherwise fail minutes later inside a stage, under Prefect's start-up and after DVC has deleted
the stage's outputs: the dataset folder, every dataset name of every enabled stage (with close matches, naming the
params key), each entry's shape for its stage (ranking, kto tags, media for a text template), the data files, the
templates, the base model (a local directory, the Hugging Face cache when offline, or `tiny`), lora_target against
the model's module names (read from its safetensors header or index, or the tiny model's architecture: no torch),
the gates and compare_metric against the metrics evaluate can write for these stages (tunepipe/metric_keys.py),
and the registered model name. The first problem raises a one-line TunepipeError (exit 2); things that will work
but not as the user may expect - a stage without held-out data, a gate that can then never pass - come back as
warnings.

Only light modules are imported here (pydantic, yaml, json and tunepipe's own config/data registry/template
catalog): no torch, transformers, datasets, prefect, mlflow or dvc.
"""

from __future__ import annotations

import difflib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.config import LF_STAGE, TINY, Params, load_params
from tunepipe.errors import ConfigError, DataError
from tunepipe.metric_keys import metric_sources, missing_reason

PARAMS_FILE = "params.yaml"


@dataclass
class Validation:
    params: Params
    warnings: list[str] = field(default_factory=list)


def close(name: str, options, *, n: int = 1) -> str:
    """`; did you mean 'a' or 'b'?` (empty when nothing is close)."""
    found = difflib.get_close_matches(name, list(options), n=n, cutoff=0.6)
    return "; did you mean " + " or ".join(f"'{f}'" for f in found) + "?" if found else ""


def _fail(message: str, key: str) -> ConfigError:
    return ConfigError(message, key=key, file=PARAMS_FILE)


def validate_project(root: str | Path) -> Validation:
    root = Path(root)
    params = load_params(root / PARAMS_FILE, display=PARAMS_FILE)
    result = Validation(params)
    folder = dataset_folder(root, params)
    _check_datasets(params, folder, result)
    _check_templates(params)
    _check_parsed_templates(params, model_folder(root, params.model.model_name_or_path))
    modules = model_modules(root, params.model.model_name_or_path)
    _check_lora(params, modules)
    _check_metrics(params, result, fact_kinds(folder, params))
    _check_registry_name(params.registry_in_effect().model_name, explicit=params.registry.model_name is not None)
    return result


# ------------------------------------------------------------------------------------------------------- datasets
def dataset_folder(root: Path, params: Params) -> Path:
    written = params.data.dataset_dir
    if written == "ONLINE" or written.startswith("REMOTE:"):
        raise _fail(f"{written!r}: hub-hosted dataset registries are not supported (runs are offline); point "
                    "data.dataset_dir at a local folder with a dataset_info.json", "data.dataset_dir")
    folder = root / written  # relative paths are relative to the project root, where the stages run
    if not folder.is_dir():
        raise _fail(f"folder {written} does not exist (relative paths start at the project root {root.resolve()})",
                    "data.dataset_dir")
    if not (folder / "dataset_info.json").is_file():
        raise _fail(f"no dataset_info.json in {written} (a LLaMA-Factory data folder has one)", "data.dataset_dir")
    return folder


def _check_datasets(params: Params, folder: Path, result: Validation) -> None:
    from tunepipe.data.features import check_stage
    from tunepipe.data.registry import parse_entry, read_dataset_info, split_names

    info, _ = read_dataset_info(folder)
    info_path = Path(params.data.dataset_dir) / "dataset_info.json"  # as params.yaml names it
    offline = os.getenv("HF_HUB_OFFLINE", "1") != "0"  # the flow runs stages with HF_HUB_OFFLINE=1 unless told
    for stage in params.enabled_stages():
        for column in ("dataset", "eval_dataset"):
            key = f"stages.{stage}.{column}"
            for name in split_names(getattr(params.stage(stage), column)):
                if name not in info:
                    hint = close(name, info, n=3) or (f" ({len(info)} entries; `tunepipe data check --dataset-dir "
                                                 f"{params.data.dataset_dir}` lists them)")
                    raise _fail(f"undefined dataset '{name}' in {info_path}{hint}", key)
                try:
                    attr = parse_entry(name, info[name], file=str(info_path))
                    check_stage([attr], LF_STAGE[stage])
                    _check_entry(attr, stage, folder, params, offline, result)
                except DataError as err:
                    raise _fail(str(err), key) from None


def _check_entry(attr, stage: str, folder: Path, params: Params, offline: bool, result: Validation) -> None:
    if attr.load_from == "file" and not (folder / attr.dataset_name).exists():
        raise DataError(f"file_name {attr.dataset_name!r} not found in {folder}", dataset=attr.name,
                        field="file_name")
    if attr.load_from == "script" and not params.data.allow_scripts:
        raise DataError("script_url runs Python code from the dataset folder: set data.allow_scripts: true if you "
                        "trust it", dataset=attr.name, field="script_url")
    if attr.load_from in ("hf_hub", "ms_hub", "om_hub", "cloud_file") and offline:
        result.warnings.append(f"dataset '{attr.name}' is loaded from {attr.load_from} ({attr.dataset_name}): runs "
                               "are offline (HF_HUB_OFFLINE=1), so it must already be in the local datasets cache")
    if stage == "kto" and not attr.kto_tag:
        raise DataError("kto needs desirable/undesirable labels: set columns.kto_tag", dataset=attr.name,
                        field="columns.kto_tag")
    media = next((kind for kind in ("images", "videos", "audios") if getattr(attr, kind)), None)
    if media and stage != "cpt":  # the same refusal as the processor's (tunepipe trains text models)
        template = params.stage_template(stage)
        raise DataError(f"has {media} but template {template!r} is text-only (tunepipe trains text models)",
                        dataset=attr.name, field=f"columns.{media}")


# ------------------------------------------------------------------------------------------------------ templates
def _check_templates(params: Params) -> None:
    from tunepipe.data.templates import get_template, template_names

    names = template_names()
    for stage in params.enabled_stages():
        name = params.stage_template(stage)
        key = f"stages.{stage}.template" if "template" in params.stage(stage).model_fields_set else "model.template"
        if name is None:
            continue  # LF's default: the tokenizer's own chat template, parsed at prepare time (else `empty`)
        if name not in names:
            raise _fail(f"unknown template {name!r}{close(name, names)} (`tunepipe data templates` lists them)", key)
        try:
            get_template(name, tool_format=params.data.tool_format, default_system=params.data.default_system,
                         train_on_prompt=params.stage(stage).train_on_prompt and stage == "sft")
        except ConfigError as err:
            raise _fail(err.message, key if err.key == "template" else f"stages.{stage}.{err.key}") from None


def _check_parsed_templates(params: Params, folder: Path | str | None) -> None:
    """template null = LF's default: the tokenizer's own chat template, else `empty`. `empty` renders turns with no
    separator, so a merged model cannot carry it as a chat_template (merge-<stage> refuses after training)."""
    if folder is None:
        return
    for stage in params.enabled_stages():
        if params.stage_template(stage) is None and not has_chat_template(folder):
            key = f"stages.{stage}.template" if "template" in params.stage(stage).model_fields_set else \
                "model.template"
            named = params.model.template or "qwen"
            raise _fail(f"null means LLaMA-Factory's default, the tokenizer's own chat template, but "
                        f"{params.model.model_name_or_path} has none (LF then uses `empty`, which a merged model "
                        f"cannot carry as its chat template): name one, e.g. {named}", key)


def has_chat_template(folder: Path | str) -> bool:
    if folder == TINY:
        return False  # the tiny tokenizer is trained from scratch (tunepipe/models/tiny.py) and has none
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return True  # cannot tell: the prepare stage will


# ---------------------------------------------------------------------------------------------------------- model
# The tiny model is a Qwen2ForCausalLM (tunepipe/models/tiny.py): its module names, without building it.
TINY_MODULES = ("model.embed_tokens", "model.norm", "lm_head", *(
    f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                                    "post_attention_layernorm")))


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repos (its own environment variables, in its order)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot of `repo_id` that an offline `from_pretrained` loads (huggingface_hub's resolution of the
    cache's refs/main), if its config.json is there."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def model_folder(root: Path, model: str) -> Path | str | None:
    """Where the base model's files are: a local directory, its Hugging Face cache snapshot, `tiny`, or None
    (online: the hub decides). A model that cannot be there is a one-line error."""
    key = "model.model_name_or_path"
    if model == TINY:
        return TINY
    local = root / os.path.expanduser(model)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise _fail(f"{model}: not a model directory (no config.json)", key)
        return local
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_like_path:
        raise _fail(f"{model}: no such directory (relative paths start at the project root {root.resolve()})", key)
    if os.getenv("HF_HUB_OFFLINE", "1") == "0":
        return None
    snapshot = _cached_snapshot(model)
    if snapshot is None:
        raise _fail(f"{model!r} is neither a local directory nor in the Hugging Face cache ({hf_cache_dir()}); "
                    f"runs are offline (HF_HUB_OFFLINE=1): download it first (`hf download {model}`) or give a "
                    "local directory", key)
    return snapshot


def model_modules(root: Path, model: str) -> list[str] | None:
    """The module names of the base model (None when its weights cannot be read without loading it)."""
    folder = model_folder(root, model)
    if folder == TINY:
        return list(TINY_MODULES)
    return weight_modules(folder) if folder is not None else None


def weight_modules(folder: Path) -> list[str] | None:
    """Module names from the safetensors index or the safetensors headers (safetensors' numpy reader, no torch)."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            tensors = list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        else:
            tensors = []
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="numpy") as handle:
                    tensors += list(handle.keys())
    except (OSError, ValueError, SafetensorError):
        return None
    modules = sorted({name.rsplit(".", 1)[0] for name in tensors if "." in name})
    return modules or None


def _check_lora(params: Params, modules: list[str] | None) -> None:
    if modules is None:
        return
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    for stage in params.enabled_stages():
        lora = params.stage_lora(stage)
        own = params.stage(stage).lora
        for name in ("lora_target", "additional_target"):
            value = getattr(lora, name) or ""
            if name == "lora_target" and value.strip() == "all":
                continue
            key = f"stages.{stage}.lora.{name}" if own is not None and name in own.model_fields_set else f"lora.{name}"
            targets = [t.strip() for t in value.split(",") if t.strip()]
            if name == "lora_target" and not targets:
                raise _fail("empty: use 'all' or module names such as q_proj,v_proj", key)
            for target in targets:  # PEFT matches a target against the end of each module's dotted name
                if not any(m == target or m.endswith("." + target) for m in modules):
                    raise _fail(f"module {target!r} is not in {params.model.model_name_or_path}"
                                f"{close(target, leaves)} (its modules: {', '.join(leaves)})", key)


# -------------------------------------------------------------------------------------------------------- metrics
def fact_kinds(folder: Path, params: Params) -> list[str]:
    """The kinds of question in evaluate.knowledge_file (each gives final.fact_accuracy_<kind>); [] without one."""
    from tunepipe.evaluation.knowledge import kinds, read_questions

    name = params.evaluate.knowledge_file
    if name is None:
        return []
    key = "evaluate.knowledge_file"
    path = (folder / name).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise _fail(f"{name}: outside the dataset folder {params.data.dataset_dir}", key)
    if not path.is_file():
        raise _fail(f"{name}: no such file in {params.data.dataset_dir}", key)
    try:
        return kinds(read_questions(path))
    except (ValueError, TypeError, KeyError) as err:  # JSON syntax, rows that are not objects
        raise _fail(f"{name}: not a JSON list of question rows ({err})", key) from None


def _check_metrics(params: Params, result: Validation, fact_kinds: list[str]) -> None:
    stages = params.enabled_stages()
    sources = metric_sources(stages, fact_kinds)
    registry = params.registry_in_effect()
    wanted = [(f"registry.gates.{i}.metric", gate.metric) for i, gate in enumerate(registry.gates)]
    if params.registry.compare_metric is not None:
        wanted.append(("registry.compare_metric", registry.compare_metric))
    every = {**metric_sources(["cpt", "sft", "kto"]), **metric_sources(["cpt", "sft", "dpo"])}
    lm_eval = tuple(f".lmeval_{task}_" for task in params.evaluate.lm_eval_tasks)  # its metric names: the task's
    for key, metric in wanted:
        if metric not in sources and not any(part in metric for part in lm_eval):
            final = ", ".join(k for k in sources if k.startswith("final."))
            if metric in every:  # a real metric, of a stage this project does not run (or runs earlier)
                missing = "" if every[metric] in stages else ": add that stage"
                hint = f" (it is computed on {every[metric]} data{missing})"
            else:
                hint = close(metric, sources) or f" (it writes e.g. {final})"
            raise _fail(f"{metric!r} is not a metric evaluate writes for stages {', '.join(stages)}{hint}", key)
    bare = [s for s in stages if not params.has_held_out(s)]
    if bare:
        result.warnings.append(f"no held-out data for {', '.join(bare)}: their evaluation metrics are not computed "
                               "(set stages.<stage>.val_size, e.g. 0.1, or stages.<stage>.eval_dataset; on import: "
                               "val_size=0.1)")
    if params.registry.compare_metric is None:
        wanted.append(("registry.compare_metric (default)", registry.compare_metric))
    for key, metric in wanted:
        if sources.get(metric) in bare:
            result.warnings.append(f"{key} {metric}: {missing_reason(sources[metric])}: the model can only become "
                                   "a candidate, never champion")


# ------------------------------------------------------------------------------------------------------- registry
def _check_registry_name(name: str, *, explicit: bool) -> None:
    """MLflow's own rules for registered model names (mlflow.utils.validation._validate_model_name)."""
    key = "registry.model_name" if explicit else "registry.model_name (default: the project's name)"
    if not name.strip() or name != name.strip():
        raise _fail(f"{name!r}: must be a non-empty name without leading or trailing spaces", key)
    if "/" in name or ":" in name or posixpath.normpath(name) != name or name.startswith(".."):
        raise _fail(f"{name!r}: MLflow model names cannot contain '/' or ':' or resolve to another path", key)


def check_force(params: Params, force: list[str]) -> None:
    """`tunepipe run --force STAGE`: STAGE must be a step of this project's pipeline."""
    from tunepipe.plan import plan

    steps = ["params", *plan(params)]
    for name in force:
        if name not in steps:
            raise ConfigError(f"unknown stage {name!r}{close(name, steps)} (stages: {', '.join(steps)})",
                              key="--force")

