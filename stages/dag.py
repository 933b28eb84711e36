"""dvc.yaml from params.yaml: the stage DAG for the stages that are switched on.

    python -m stages.dag          # rewrite dvc.yaml if it is out of date (prints what changed)
    python -m stages.dag --check  # exit 1 if dvc.yaml does not match params.yaml

Which stages exist, and what each stage's input model is, follows from `stages.<name>.enabled` in params.yaml: a
switched-off stage disappears and the next stage depends on the last enabled stage's merged model. Writing that as
`foreach` dictionaries keeps dvc.yaml short and readable, and `dvc repro` alone runs the chain correctly. The
prepare stages depend on exactly the files of their own datasets, so new DPO data reruns only the DPO branch.

Cache choice (see docs/pipeline.md): adapters, tokenized data and the base model are cached by DVC (small, or
expensive to rebuild); merged models are `cache: false` — they are rebuilt from base + adapters in seconds, and a
merged 7B model would otherwise exist three times (workspace, DVC cache, MLflow registry).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from stages import common

DATA_CODE = ["tunepipe/data"]
TRAIN_CODE = ["stages/train.py", "tunepipe/training.py", "tunepipe/trainers.py", "tunepipe/callbacks.py",
              "tunepipe/models.py", "tunepipe/data/templates.py"]
MERGE_CODE = ["stages/merge.py", "tunepipe/merging.py", "tunepipe/data"]
EVAL_CODE = ["stages/evaluate.py", "tunepipe/evaluation.py", "tunepipe/metrics.py", "tunepipe/data",
             "tunepipe/knowledge.py", "tunepipe/assets/lm_eval"]
REGISTER_CODE = ["stages/register.py", "tunepipe/tracking.py", "tunepipe/knowledge.py"]
HEADER = ("# Generated from params.yaml by `python -m stages.dag` (tunepipe run does it for you): edit params.yaml,\n"
          "# not this file. One chain of stages per enabled stage; see docs/pipeline.md.\n")


def dataset_files(root: Path, params, names: list[str]) -> list[str]:
    """The local files behind dataset names (relative to the project root), for precise DVC deps."""
    from tunepipe.data.registry import get_dataset_attrs, split_names

    dataset_dir = root / params.data.dataset_dir
    files = []
    for attr in get_dataset_attrs(split_names(",".join(names)), dataset_dir):
        if attr.load_from in ("file", "script"):
            path = (dataset_dir / attr.dataset_name).resolve()
            files.append(str(path.relative_to(root.resolve())))
    return sorted(set(files))


def build(root: Path, params, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dvc.yaml document for `params`. `raw` is params.yaml as written: DVC fails on a declared parameter that
    the file does not contain, so sections left to their defaults are not declared (the code deps cover them)."""
    from tunepipe.models import TINY

    enabled = params.enabled_stages()
    data_dir = params.data.dataset_dir
    base_deps = ["stages/base.py", "tunepipe/models.py"]
    if params.model.model_name_or_path == TINY:  # its tokenizer is trained on this frozen corpus
        base_deps.append("tunepipe/assets/tiny_corpus.jsonl")

    def input_of(stage: str) -> str:
        previous = params.previous_stage(stage)
        return f"outputs/models/{previous}" if previous else "outputs/models/base"

    files = {}
    train, merge = {}, {}
    for stage in enabled:
        s = params.stage(stage)
        files[stage] = dataset_files(root, params, [n for n in (s.dataset, s.eval_dataset, s.replay_dataset)
                                                    if n]) or [
            f"{data_dir}/dataset_info.json"]  # hub datasets: nothing local to watch
        train[stage] = {"input": input_of(stage)}
        merge[stage] = {"input": input_of(stage)}
    # DVC cannot interpolate a list into deps, so each stage's data files fill numbered slots; stages with fewer
    # files repeat their first one (DVC accepts a repeated dep).
    slots = max(len(paths) for paths in files.values())
    prepare = {stage: {f"data{i}": (paths[i] if i < len(paths) else paths[0]) for i in range(slots)}
               for stage, paths in files.items()}
    for stage in enabled:  # merge checks the chat template on the stage's own conversations
        merge[stage].update(prepare[stage])
    data_slots = [f"${{item.data{i}}}" for i in range(slots)]
    pref = [s for s in enabled if s in ("dpo", "kto")]

    final = enabled[-1]
    raw = raw if raw is not None else {}

    def present(*keys: str) -> list[str]:
        def found(key: str) -> bool:
            if "${key}" in key:  # foreach: must exist for every enabled stage
                return all(found(key.replace("${key}", stage)) for stage in enabled)
            node: Any = raw
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            return node is not None

        return [key for key in keys if found(key)]

    document = {
        "stages": {
            "base": {
                "cmd": "python -m stages.base",
                "params": present("model"),
                "deps": base_deps,
                "outs": ["outputs/models/base"],
            },
            "prepare": {
                "foreach": prepare,
                "do": {
                    "cmd": "python -m stages.prepare ${key}",
                    "params": present("model", "data", "stages.${key}", "train.packing"),
                    "deps": ["stages/prepare.py", *DATA_CODE, f"{data_dir}/dataset_info.json", "outputs/models/base",
                             *data_slots],
                    "outs": ["outputs/data/${key}"],
                    "metrics": [{"metrics/data_${key}.json": {"cache": False}}],
                },
            },
            "train": {
                "foreach": train,
                "do": {
                    "cmd": "python -m stages.train ${key}",
                    "params": present("model", "lora", "train", "stages.${key}"),
                    "deps": [*TRAIN_CODE, "outputs/data/${key}", "outputs/models/base", "${item.input}"],
                    "outs": ["outputs/adapters/${key}"],
                    "metrics": [{"metrics/train_${key}.json": {"cache": False}}],
                    "plots": [{"plots/loss_${key}.csv": {"cache": False, "x": "step", "y": "loss"}},
                              {"plots/loss_${key}.png": {"cache": False}}],
                },
            },
            "merge": {
                "foreach": merge,
                "do": {
                    "cmd": "python -m stages.merge ${key}",
                    "params": present("model", "data", "lora", "stages.${key}", "evaluate"),
                    "deps": [*MERGE_CODE, f"{data_dir}/dataset_info.json", "outputs/adapters/${key}",
                             "${item.input}", *data_slots],
                    "outs": [{"outputs/models/${key}": {"cache": False}}],
                    "metrics": [{"metrics/merge_${key}.json": {"cache": False}}],
                },
            },
            "evaluate": {
                "cmd": "python -m stages.evaluate",
                "params": present("evaluate", "model", "data", "train", *[f"stages.{s}" for s in ("sft", *pref)
                                                                          if s in enabled]),
                "deps": [*EVAL_CODE, f"{data_dir}/dataset_info.json", "outputs/models/base",
                         *[f"outputs/models/{s}" for s in enabled], *[f"outputs/data/{s}" for s in enabled],
                         *(files["sft"] if "sft" in enabled else []),
                         *([f"{data_dir}/{params.evaluate.knowledge_file}"] if params.evaluate.knowledge_file else [])],
                "metrics": [{"metrics/evaluate.json": {"cache": False}}],
                "outs": [{"metrics/samples.json": {"cache": False}}],
            },
            "register": {
                "cmd": "python -m stages.register",
                "params": present("registry"),
                "deps": [*REGISTER_CODE, "metrics/evaluate.json", f"outputs/models/{final}"],
                "metrics": [{"metrics/register.json": {"cache": False}}],
            },
        }
    }
    for stage in document["stages"].values():  # an empty params list is not valid DVC
        body = stage.get("do", stage)
        if not body.get("params"):
            body.pop("params", None)
    return document


def render(root: Path, params, raw: dict[str, Any]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    # block lists everywhere: DVC cannot interpolate ${...} inside flow-style lists next to a '/'
    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=False))
    return HEADER + yaml.dump(build(root, params, raw), Dumper=Dumper, sort_keys=False, width=120)


def sync(root: Path | None = None, *, check: bool = False) -> bool:
    """Rewrite dvc.yaml if it differs from what params.yaml implies; True if it was (or would be) changed."""
    from tunepipe.io import atomic_write_text

    import yaml

    from tunepipe.config import load_params

    root = root or common.ROOT
    path = root / "dvc.yaml"
    raw = yaml.safe_load((root / "params.yaml").read_text()) or {}
    text = render(root, load_params(root / "params.yaml"), raw)
    current = path.read_text() if path.exists() else None
    if current == text:
        return False
    if not check:
        atomic_write_text(path, text)
    return True


def main(argv: list[str]) -> None:
    check = "--check" in argv
    changed = sync(check=check)
    if check and changed:
        print("dvc.yaml is out of date with params.yaml: run `python -m stages.dag` (or `tunepipe run`)",
              file=sys.stderr)
        sys.exit(1)
    print("dvc.yaml " + ("updated from params.yaml" if changed else "is up to date"))


if __name__ == "__main__":
    common.run(main)
