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


@app.command("run")
def run_pipeline(
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Rerun this stage even if DVC says it is "
                                                                       "up to date (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for a run already in progress instead of refusing.")] = False,
    project: Annotated[Path, typer.Option(help="Project directory.")] = Path("."),
) -> None:
    """Run the pipeline: every stage DVC finds stale, in order, then register the model."""
    root = _project(project)
    args = ["run", *[a for stage in force or [] for a in ("--force", stage)]]
    _exec_flow(root, args + (["--json"] if as_json else []) + (["--wait"] if wait else []))


@app.command("serve")
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 2 * * *' (every night at 02:00).")],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    timezone: Annotated[Optional[str], typer.Option(help="IANA time zone of the schedule (default UTC).")] = None,
    project: Annotated[Path, typer.Option(help="Project directory.")] = Path("."),
) -> None:
    """Run the pipeline on a schedule: starts (or reuses) a local Prefect server and serves a deployment."""
    root = _project(project)
    _exec_flow(root, ["serve", "--cron", cron, "--name", name] + (["--timezone", timezone] if timezone else []))


@app.command("params")
def params_keys(keys: Annotated[bool, typer.Option("--keys", help="List every params.yaml key with its help.")] = True,
                ) -> None:
    """Describe params.yaml (every key, with its help text)."""
    from tunepipe.config import describe_keys

    rows = describe_keys()
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {text}" for key, text in rows))
