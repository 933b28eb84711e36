"""`tunepipe run`, `serve` and `params`: the pipeline of the project in the current directory.

`run` and `serve` hand over to `python -m flows ...` in the project directory (flows/__main__.py), which runs the
flow of the entrypoint `flows/pipeline.py:pipeline` (the one prefect.yaml deploys); this package never imports
prefect, flows/ or stages/ itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunepipe.cli.app import STATE, app

FLOW_ENTRYPOINT = "flows/pipeline.py:pipeline"


def _project(project: Path) -> Path:
    from tunepipe.errors import ConfigError

    root = project.resolve()
    if not (root / "params.yaml").exists():
        raise ConfigError(f"no params.yaml in {root}: run from a tunepipe project (or pass --project)")
    if not (root / "flows" / "pipeline.py").exists():
        raise ConfigError(f"no {FLOW_ENTRYPOINT.split(':')[0]} in {root}: not a tunepipe project")
    return root


def _exec_flow(root: Path, args: list[str]) -> None:
    """Become `python -m flows ARGS` in the project directory (flows/__main__.py runs the flow; Prefect is never
    imported by this package). The same interpreter, so the same virtualenv."""
    os.chdir(root)
    sys.stdout.flush()
    sys.stderr.flush()
    debug = ["--debug"] if STATE["debug"] else []
    os.execv(sys.executable, [sys.executable, "-m", "flows", *debug, *args])


def _validated(root: Path, force: list[str]) -> None:
    """Check the project before anything slow (tunepipe/validate.py): one line and exit 2 on a problem; no Prefect,
    DVC or torch is imported on this path."""
    from tunepipe.validate import check_force, validate_project

    result = validate_project(root)
    check_force(result.params, force)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)


@app.command("run")
def run_pipeline(
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Rerun this stage even if DVC says it is "
                                                                       "up to date (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for a run already in progress instead of refusing.")] = False,
    strict: Annotated[bool, typer.Option(help="For schedulers and CI: exit 3 when the newly registered model was "
                                              "not promoted.")] = False,
    project: Annotated[Path, typer.Option(help="Project directory.")] = Path("."),
) -> None:
    """Run the pipeline: check the project, then every stage DVC finds stale, in order, then register the model.

    Exit status: 0 done, 1 a stage failed, 2 bad input, 3 not promoted (--strict), 130 / 143 stopped by Ctrl-C /
    SIGTERM (the running stage is stopped and checkpointed, everything the run started is stopped)."""
    root = _project(project)
    _validated(root, force or [])
    args = ["run", *[a for stage in force or [] for a in ("--force", stage)]]
    flags = (["--json"] if as_json else []) + (["--wait"] if wait else []) + (["--strict"] if strict else [])
    _exec_flow(root, args + flags)


@app.command("validate")
def validate(project: Annotated[Path, typer.Option(help="Project directory.")] = Path(".")) -> None:
    """Check params.yaml, datasets, templates, the model, lora_target, gates and the registry name (what `tunepipe
    run` checks first) without running anything."""
    root = _project(project)
    _validated(root, [])
    print(f"{root / 'params.yaml'}: ok", file=sys.stderr)


@app.command("serve")
def serve(
    cron: Annotated[Optional[str], typer.Option(help="Cron schedule, e.g. '0 2 * * *' (every night at 02:00).")]
    = None,
    interval: Annotated[Optional[float], typer.Option(min=1, help="Or: seconds between runs.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Deployment name (default: <project>-nightly).")] = None,
    timezone: Annotated[Optional[str], typer.Option(help="IANA time zone of the cron schedule (default UTC).")]
    = None,
    keep_server: Annotated[bool, typer.Option(help="Leave the Prefect server running when serve stops.")] = False,
    status: Annotated[bool, typer.Option("--status", help="Show the project's Prefect server, its deployments "
                                                          "and their latest runs.")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Stop the project's Prefect server.")] = False,
    project: Annotated[Path, typer.Option(help="Project directory.")] = Path("."),
) -> None:
    """Run the pipeline on a schedule: serves a deployment against the project's own Prefect server (started if
    needed and stopped with serve). Prefect state is per project: <project>/.prefect unless PREFECT_HOME is set."""
    from tunepipe.errors import ConfigError

    root = _project(project)
    if status or stop:
        if status and stop:
            raise ConfigError("use one of --status and --stop", key="--status")
        _exec_flow(root, ["status" if status else "stop"])
    _validated(root, [])
    if (cron is None) == (interval is None):
        raise ConfigError("give a schedule: --cron '0 2 * * *' or --interval SECONDS", key="--cron")
    args = ["serve", *(["--cron", cron] if cron else ["--interval", str(interval)])]
    args += (["--name", name] if name else []) + (["--timezone", timezone] if timezone else [])
    _exec_flow(root, args + (["--keep-server"] if keep_server else []))


@app.command("params")
def params_table(
    prefix: Annotated[Optional[str], typer.Argument(help="Only keys starting with this (e.g. train, stages.sft).")]
    = None,
    show_all: Annotated[bool, typer.Option("--all", help="Every key, also those at their default.")] = False,
    keys: Annotated[bool, typer.Option("--keys", help="Every key with its default and help text (no project "
                                                      "needed).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print [{key, value, default, set}] as JSON.")] = False,
    project: Annotated[Path, typer.Option(help="Project directory.")] = Path("."),
) -> None:
    """The project's params: each key's value in effect and its default (* = written in params.yaml)."""
    import json

    from tunepipe.config import load_params, read_yaml, schema_rows

    if keys or not (project / "params.yaml").exists():
        rows = [r for r in schema_rows() if not prefix or r[0].startswith(prefix)]
        if as_json:
            print(json.dumps([{"key": k, "default": d, "help": h} for k, d, h in rows], indent=2))
            return
        width, dwidth = max(len(r[0]) for r in rows), min(24, max(len(r[1]) for r in rows))
        print("\n".join(f"{k:<{width}}  {_short(d, 24):<{dwidth}}  {h}" for k, d, h in rows))
        return
    params = load_params(project / "params.yaml")
    rows = [r for r in effective_rows(params, read_yaml(project / "params.yaml"))
            if not prefix or r["key"].startswith(prefix)]
    shown = rows if show_all else [r for r in rows if r["set"] or r["value"] != r["default"]]
    if as_json:
        print(json.dumps(shown, indent=2))
        return
    width = max((len(r["key"]) for r in shown), default=3)
    print(f"  {'key':<{width}}  {'in effect':<32}  default")
    for r in shown:
        mark = "*" if r["set"] else " "
        print(f"{mark} {r['key']:<{width}}  {_short(r['value'], 32):<32}  {_short(r['default'], 40)}")
    hidden = len(rows) - len(shown)
    print("* = written in params.yaml" + (f"; {hidden} more keys at their defaults (--all)" if hidden else "")
          + "; stage keys not shown take train: and lora:; --keys: help text", file=sys.stderr)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _text(value) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def effective_rows(params, raw: dict) -> list[dict]:
    """{key, value (in effect), default, set (written in params.yaml)} for every key of the shared sections and,
    per enabled stage, its datasets, held-out split, template and the keys written for it."""
    from tunepipe.config import LoraParams, PreferenceParams, TrainParams, schema_rows

    defaults = {key: default for key, default, _ in schema_rows()}

    def written(*path: str) -> bool:
        node = raw
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    registry = params.registry_in_effect()
    rows = []
    for key, default, _ in schema_rows():
        section, _, name = key.partition(".")
        if section == "stages":
            continue
        source = registry if section == "registry" else getattr(params, section)
        value = getattr(source, name)
        value = [g.model_dump(exclude_none=True) for g in value] if name == "gates" else value
        rows.append({"key": key, "value": _text(value), "default": default, "set": written(section, name)})
    for stage in params.enabled_stages():
        spec, own = params.stage(stage), (raw.get("stages") or {}).get(stage) or {}
        train, lora, pref = params.stage_train(stage), params.stage_lora(stage), params.stage_preference(stage)
        names = ["dataset", "eval_dataset", *[k for k in own if k not in ("lora", "enabled")]]
        names += ["val_size"] * (params.stage_val_size(stage) > 0)  # a split taken from data.val_size
        for name in dict.fromkeys(names):
            if name in TrainParams.model_fields:
                value = getattr(train, name)
            elif name in PreferenceParams.model_fields:
                value = getattr(pref, name)
            else:
                value = {"val_size": params.stage_val_size(stage), "template": params.stage_template(stage)}.get(
                    name, getattr(spec, name))
            rows.append({"key": f"stages.{stage}.{name}", "value": _text(value),
                         "default": defaults[f"stages.<stage>.{name}"], "set": name in own})
        for name in own.get("lora") or {}:
            if name in LoraParams.model_fields:
                rows.append({"key": f"stages.{stage}.lora.{name}", "value": _text(getattr(lora, name)),
                             "default": defaults[f"stages.<stage>.lora.{name}"], "set": True})
    return rows
