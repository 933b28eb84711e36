"""dvc.yaml from params.yaml: one concrete DVC stage per pipeline step, every dependency exact.

    python -m stages.dag          # rewrite dvc.yaml if it is out of date
    python -m stages.dag --check  # exit 1 if dvc.yaml does not match params.yaml and the code

The steps and their order come from the plan (tunepipe.plan): a switched-off stage disappears and the next stage
depends on the last enabled stage's merged model. Each step depends on

- its values: its own section of outputs/params.yaml (written by the `params` step), so a changed value reruns
  exactly the steps that read it, and nothing else;
- its code: the project modules its stage module imports, directly or not (found by grimp, the import-graph
  library behind import-linter), so the list cannot fall behind the code. Left out: tunepipe.config and
  tunepipe.plan, whose whole effect is the values above, and, except for register, tunepipe.tracking, which
  writes only to MLflow, never to a versioned output;
- its data: the files of its own datasets (resolved through dataset_info.json) and the outputs of earlier steps.

Rerun this generator (tunepipe run does) when the enabled stages, the datasets of a stage or the imports change.
Cache choice (docs/pipeline.md): adapters, tokenized data and the base model are cached by DVC; merged models are
`cache: false` - they are rebuilt from base + adapters in seconds, and a merged 7B model would otherwise exist three
times (workspace, DVC cache, MLflow registry).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from stages import common, register

HEADER = ("# Generated from params.yaml by `python -m stages.dag` (tunepipe run does it for you): edit params.yaml,\n"
          "# not this file. One stage per pipeline step; see docs/pipeline.md.\n")
PLAN = str(common.PLAN)
# Modules whose effect on a stage is entirely the plan's values (declared as params, compared by DVC).
VALUES_ONLY = ("tunepipe.config", "tunepipe.plan")
TRACKING = "tunepipe.tracking"
TINY_CORPUS = "tunepipe/assets/tiny_corpus.jsonl"
LM_EVAL_TASKS = "tunepipe/assets/lm_eval"  # read by lm_eval at run time (YAML + its utils), not imported
CHAT_MODEL = "tunepipe/tracking/chat_model.py"  # the registered model's code (MLflow models-from-code)


class CodeGraph:
    """The project's import graph (tunepipe + stages), built once per generation."""

    def __init__(self, root: Path):
        import grimp

        self.root = root
        added = str(root) not in sys.path
        if added:
            sys.path.insert(0, str(root))
        try:
            self.graph = grimp.build_graph("tunepipe", "stages", include_external_packages=False, cache_dir=None)
        finally:
            if added:
                sys.path.remove(str(root))

    def files(self, module: str, *, tracking: bool = False, values: bool = False) -> list[str]:
        """The source files `module` runs: itself, every project module it imports, directly or not, and their
        packages' __init__ files. Not followed: the values-only modules (unless `values`) and tracking (unless
        `tracking`); what they import is theirs."""
        def counts(m: str) -> bool:
            return (values or not m.startswith(VALUES_ONLY)) and (tracking or not m.startswith(TRACKING))

        seen, todo = {module}, [module]
        while todo:
            for imported in self.graph.find_modules_directly_imported_by(todo.pop()):
                if imported not in seen and counts(imported):
                    seen.add(imported)
                    todo.append(imported)
        packages = {".".join(m.split(".")[:i]) for m in seen for i in range(1, m.count(".") + 1)}
        return [self._path(m) for m in sorted(seen | packages)]

    def _path(self, module: str) -> str:
        base = self.root.joinpath(*module.split("."))
        path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        return path.relative_to(self.root).as_posix()


def _relative(root: Path, path: Path) -> str:
    """A dependency path as DVC should see it: relative to the project when inside it; outside it, as params.yaml
    wrote it (`../lf-data/x.json` stays relative, so dvc.yaml is the same in every checkout beside the data)."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        pass
    try:
        return Path(os.path.normpath(path.relative_to(root))).as_posix()
    except ValueError:  # an absolute path written in params.yaml
        return str(path)


def dataset_files(root: Path, dataset_dir: str, names: list[str]) -> list[str]:
    """The local files behind dataset names, for precise DVC deps (hub datasets have none)."""
    from tunepipe.data.registry import get_dataset_attrs, split_names

    folder = root / dataset_dir
    files = []
    for attr in get_dataset_attrs(split_names(",".join(n for n in names if n)), str(folder)):
        if attr.load_from in ("file", "script"):
            files.append(_relative(root, folder / attr.dataset_name))
    return sorted(set(files))


def train_command(stage: str, train) -> str:
    """The train stage's command: `python -m stages.train <stage>`, or that module under torchrun / accelerate
    launch with the stage's launcher keys (tunepipe.config.TrainParams). Every process runs the same trainer
    (gloo on CPU, nccl on GPU); only rank 0 writes. Multi-machine runs: each machine sets its own rank
    (PET_NODE_RANK for torchrun, machine_rank in its accelerate config)."""
    import shlex

    from tunepipe.errors import ConfigError

    key = f"stages.{stage}"
    module = f"-m stages.train {stage}"
    if train.config_file is not None and train.launcher != "accelerate":
        raise ConfigError("config_file is an accelerate config: set launcher: accelerate", key=f"{key}.config_file")
    if train.launcher == "none":
        extra = [name for name in ("nproc_per_node", "nnodes", "master_addr", "master_port")
                 if getattr(train, name) not in (None, 1)]
        if extra:
            raise ConfigError(f"{', '.join(extra)} need a launcher: set launcher: torchrun or accelerate",
                              key=f"{key}.launcher")
        return f"python {module}"
    def flags(*pairs: tuple[str, Any]) -> list[str]:
        return [f"{flag} {value}" for flag, value in pairs if value is not None]

    def quoted(value: str | None) -> str | None:
        return shlex.quote(value) if value is not None else None

    if train.launcher == "torchrun":
        parts = ["torchrun", *flags(("--nnodes", train.nnodes), ("--nproc-per-node", train.nproc_per_node),
                                    ("--master-addr", quoted(train.master_addr)),
                                    ("--master-port", train.master_port))]
    else:  # accelerate counts processes over all machines
        processes = train.nproc_per_node * (train.nnodes or 1) if train.nproc_per_node is not None else None
        parts = ["accelerate launch", *flags(("--config_file", quoted(train.config_file)),
                                             ("--num_processes", processes), ("--num_machines", train.nnodes),
                                             ("--main_process_ip", quoted(train.master_addr)),
                                             ("--main_process_port", train.master_port))]
    return " ".join([*parts, module])


def build(root: Path, params) -> dict[str, Any]:
    """The dvc.yaml document for `params`."""
    from tunepipe.config import TINY
    from tunepipe.plan import plan

    steps = plan(params)
    code = CodeGraph(root)
    info = _relative(root, root / params.data.dataset_dir / "dataset_info.json")
    base = "outputs/models/base"

    def values(name: str) -> list[dict[str, list[str]]]:
        return [{PLAN: [name]}]

    def model_of(previous: str | None) -> str:
        return f"outputs/models/{previous}" if previous else base

    def data_files(stage: str, *, replay: bool = False) -> list[str]:
        s = params.stage(stage)
        names = [s.dataset, s.eval_dataset, *([s.replay_dataset] if replay and s.replay_ratio > 0 else [])]
        return [info, *dataset_files(root, params.data.dataset_dir, names)]

    # pyproject.toml: its [project] name is the registered model's default name (tunepipe.config.project_name)
    project = ["pyproject.toml"] if (root / "pyproject.toml").is_file() else []
    stages: dict[str, Any] = {
        "params": {"cmd": "python -m stages.params",
                   "deps": ["params.yaml", *project, *code.files("stages.params", values=True)], "outs": [PLAN]},
    }
    base_deps = code.files("stages.base")
    if params.model.model_name_or_path == TINY:  # its tokenizer is trained on this frozen corpus
        base_deps.append(TINY_CORPUS)
    stages["base"] = {"cmd": "python -m stages.base", "params": values("base"), "deps": base_deps, "outs": [base]}
    for name, spec in steps.items():
        step, _, stage = name.partition("-")
        if step == "prepare":
            stages[name] = {
                "cmd": f"python -m stages.prepare {stage}", "params": values(name),
                "deps": [*code.files("stages.prepare"), *data_files(stage, replay=True), base],
                "outs": [f"outputs/data/{stage}"],
                "metrics": [{f"metrics/data_{stage}.json": {"cache": False}}],
                "meta": {"artifacts": [f"outputs/data/{stage}/health.json"]},
            }
        elif step == "train":
            launch_configs = [_relative(root, root / p) for p in (spec.train.deepspeed, spec.train.config_file) if p]
            stages[name] = {
                "cmd": train_command(stage, spec.train), "params": values(name),
                "deps": [*code.files("stages.train"), f"outputs/data/{stage}", base, model_of(spec.previous),
                         *launch_configs],
                "outs": [f"outputs/adapters/{stage}"],
                "metrics": [{f"metrics/train_{stage}.json": {"cache": False}}],
                "plots": [{f"plots/loss_{stage}.csv": {"cache": False, "x": "step", "y": "loss"}},
                          {f"plots/loss_{stage}.png": {"cache": False}}],
            }
        elif step == "merge":
            chat = data_files(stage) if spec.dataset else []  # the template round trip reads these conversations
            stages[name] = {
                "cmd": f"python -m stages.merge {stage}", "params": values(name),
                "deps": [*code.files("stages.merge"), f"outputs/adapters/{stage}", base, model_of(spec.previous),
                         *chat],
                "outs": [{f"outputs/models/{stage}": {"cache": False}}],
                "metrics": [{f"metrics/merge_{stage}.json": {"cache": False}}],
                "meta": {"artifacts": [f"outputs/models/{stage}/merge_report.json"]},
            }
        elif step == "evaluate":
            enabled = list(spec.stages)
            knowledge = [_relative(root, root / spec.dataset_dir / spec.evaluate.knowledge_file)
                         ] if spec.evaluate.knowledge_file else []
            stages[name] = {
                "cmd": "python -m stages.evaluate", "params": values(name),
                "deps": [*code.files("stages.evaluate"), LM_EVAL_TASKS, base,
                         *[f"outputs/models/{s}" for s in enabled], *[f"outputs/data/{s}" for s in enabled],
                         *(data_files("sft") if spec.sft else []), *knowledge],
                "metrics": [{"metrics/evaluate.json": {"cache": False}}],
                "outs": [{"metrics/samples.json": {"cache": False}}],
                "meta": {"artifacts": ["metrics/samples.json"]},
            }
        elif step == "register":
            # the recipe sections and row counts are the model's lineage; chat_model.py is not imported but copied
            # into the registered model; `persist` keeps DVC's run cache from ever restoring register.json instead
            # of running the stage (the registry would not hear of it)
            recipe = register.recipe_steps(steps)
            stages[name] = {
                "cmd": "python -m stages.register", "params": [{PLAN: [name, *recipe]}],
                "deps": [*code.files("stages.register", tracking=True), CHAT_MODEL, "metrics/evaluate.json",
                         *[f"metrics/data_{n.partition('-')[2]}.json" for n in recipe if n.startswith("prepare-")],
                         f"outputs/models/{spec.final_stage}"],
                "metrics": [{"metrics/register.json": {"cache": False, "persist": True}}],
            }
    for body in stages.values():  # a path listed twice (e.g. a dataset used for train and eval) once
        body["deps"] = list(dict.fromkeys(body["deps"]))
    return {"stages": stages}


def render(root: Path, params) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=False))
    return HEADER + yaml.dump(build(root, params), Dumper=Dumper, sort_keys=False, width=120)


def sync(root: Path | None = None, *, check: bool = False) -> bool:
    """Regenerate dvc.yaml from params.yaml and the code; True if it changed (or, with check, would change)."""
    from tunepipe.config import load_params
    from tunepipe.io import atomic_write_text

    root = Path(root) if root is not None else Path.cwd()
    path = root / "dvc.yaml"
    text = render(root, load_params(root / "params.yaml"))
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
    common.run(main, lambda argv: "dag")
