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
    strict: Annotated[bool, typer.Option(help="For schedulers and CI: exit 3 when the newly registered model was "
                                              "not promoted.")] = False,
    project: Annotated[Path, typer.Option(help="Project directory.")] = Path("."),
) -> None:
    """Run the pipeline: every stage DVC finds stale, in order, then register the model.

    Exit status: 0 done, 1 a stage failed, 2 bad input, 3 not promoted (--strict), 130 / 143 stopped by Ctrl-C /
    SIGTERM (the running stage is stopped and checkpointed, everything the run started is stopped)."""
    root = _project(project)
    args = ["run", *[a for stage in force or [] for a in ("--force", stage)]]
    flags = (["--json"] if as_json else []) + (["--wait"] if wait else []) + (["--strict"] if strict else [])
    _exec_flow(root, args + flags)


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
    if (cron is None) == (interval is None):
        raise ConfigError("give a schedule: --cron '0 2 * * *' or --interval SECONDS", key="--cron")
    args = ["serve", *(["--cron", cron] if cron else ["--interval", str(interval)])]
    args += (["--name", name] if name else []) + (["--timezone", timezone] if timezone else [])
    _exec_flow(root, args + (["--keep-server"] if keep_server else []))


@app.command("params")
def params_keys(keys: Annotated[bool, typer.Option("--keys", help="List every params.yaml key with its help.")] = True,
                ) -> None:
    """Describe params.yaml (every key, with its help text)."""
    from tunepipe.config import describe_keys

    rows = describe_keys()
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {text}" for key, text in rows))
