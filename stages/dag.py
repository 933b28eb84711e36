"""dvc.yaml from params.yaml: one concrete DVC stage per pipeline step, every dependency exact.

    python -m stages.dag          # rewrite dvc.yaml if it is out of date
    python -m stages.dag --check  # exit 1 if dvc.yaml does not match params.yaml and the code

The steps and their order come from the plan (tunepipe.plan): a switched-off stage disappears and the next stage
depends on the last enabled stage's merged model. Each step's entry (command, data deps, outs, metrics, plots,
artifacts) is declared by its stage module (`dvc_entry`, from stages/common.py's path functions); this module adds
what every entry shares. Each step depends on

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

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from stages import common
from stages.launch import train_command  # noqa: F401  (where it lived: tests and users call dag.train_command)

HEADER = ("# Generated from params.yaml by `python -m stages.dag` (tunepipe run does it for you): edit params.yaml,\n"
          "# not this file. One stage per pipeline step; see docs/pipeline.md.\n")
PLAN = str(common.PLAN)
# Modules whose effect on a stage is entirely the plan's values (declared as params, compared by DVC).
VALUES_ONLY = ("tunepipe.config", "tunepipe.plan")
TRACKING = "tunepipe.tracking"


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


# The stage module that declares each step's entry (`dvc_entry`). Imported by name: a stage module imports the
# training stack inside its main() only, which import-linter's static contracts cannot tell from a module-level
# import; tests/test_architecture.py checks at run time that building dvc.yaml loads none of it.
MODULES = {step: f"stages.{step}" for step in ("params", "base", "prepare", "train", "merge", "evaluate", "register")}


def build(root: Path, params) -> dict[str, Any]:
    """The dvc.yaml document for `params`: each enabled step's entry, as its stage module declares it."""
    from tunepipe.plan import plan

    steps = plan(params)
    code = CodeGraph(root)
    stages: dict[str, Any] = {}
    for name in ("params", *steps):
        module = importlib.import_module(MODULES[name.partition("-")[0]])
        entry = module.dvc_entry(name, steps.get(name), steps)
        stages[name] = _stage(root, params, code, name, entry)
    return {"stages": stages}


def _stage(root: Path, params, code: CodeGraph, name: str, entry: common.Entry) -> dict[str, Any]:
    """One dvc.yaml stage from a declaration: + its code, its plan sections, its datasets' files."""
    names = [n for n in entry.datasets if n]
    data = [_relative(root, root / params.data.dataset_dir / "dataset_info.json"),
            *dataset_files(root, params.data.dataset_dir, names)] if names else []
    if entry.values:  # the params stage: params.yaml first, then the code that turns it into the plan
        deps = [*map(_posix, entry.deps), *(d for d in entry.optional if (root / d).is_file()),
                *code.files(entry.module, values=True)]
    else:
        deps = [*code.files(entry.module, tracking=entry.tracking), *map(_posix, entry.deps), *data,
                *(_relative(root, root / f) for f in entry.files)]
    body: dict[str, Any] = {"cmd": entry.cmd}
    sections = [name] if entry.sections is None else entry.sections
    if sections:
        body["params"] = [{PLAN: sections}]
    body["deps"] = list(dict.fromkeys(deps))  # a path listed twice (a dataset for train and eval) once
    outs = [*map(_posix, entry.outs), *({_posix(o): {"cache": False}} for o in entry.uncached)]
    if outs:
        body["outs"] = outs
    metric = {"cache": False, **({"persist": True} if entry.persist else {})}
    if entry.metrics:
        body["metrics"] = [{_posix(m): dict(metric)} for m in entry.metrics]
    if entry.plots:
        body["plots"] = [{_posix(path): {"cache": False, **options}} for path, options in entry.plots.items()]
    if entry.artifacts:
        body["meta"] = {"artifacts": [_posix(a) for a in entry.artifacts]}
    return body


def _posix(path: Path | str) -> str:
    return Path(path).as_posix()


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
