"""`tunepipe models list|promote|rollback` and `tunepipe ui`: the MLflow registry and UI of the project."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunepipe.cli.app import app

# ---------------------------------------------------------------------------------------------- models and ui
models_app = typer.Typer(no_args_is_help=True, help="The MLflow model registry: versions, champion, rollback.")
app.add_typer(models_app, name="models")


def _registry_settings(project: Path):
    """(root, the project's registry: settings in effect) from params.yaml; defaults where only a store exists."""
    from tunepipe.config import DEFAULT_PROJECT_NAME, HEADLINE_METRIC, RegistryParams, load_params, project_name
    from tunepipe.errors import ConfigError
    from tunepipe.tracking.store import DB_NAME, ENV_TRACKING_URI

    root = project.resolve()
    params_file = root / "params.yaml"
    if params_file.exists():
        registry = load_params(params_file).registry_in_effect()
    elif os.getenv(ENV_TRACKING_URI) or (root / DB_NAME).exists():  # no params: the defaults of a dpo chain
        registry = RegistryParams(model_name=project_name(root) or DEFAULT_PROJECT_NAME,
                                  compare_metric=HEADLINE_METRIC["dpo"])
    else:  # don't create an empty store in the wrong directory
        raise ConfigError(f"no params.yaml and no {DB_NAME} in {root}: run from a tunepipe project (or pass "
                          f"--project, or set {ENV_TRACKING_URI})")
    return root, registry


def _registry_project(project: Path, name: Optional[str]) -> tuple[Path, str, str]:
    """(root, registered model name, compare metric) from the project's params.yaml (or --name)."""
    root, registry = _registry_settings(project)
    return root, name or registry.model_name, registry.compare_metric


NameOption = Annotated[Optional[str], typer.Option("--name", help="Registered model (default: params.yaml "
                                                                  "registry.model_name).")]
ProjectOption = Annotated[Path, typer.Option(help="Project directory.")]


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print [{version, aliases, metrics, ...}] as JSON.")] = False,
    name: NameOption = None,
    project: ProjectOption = Path("."),
) -> None:
    """List registered versions with their aliases (champion, candidate) and compare metric."""
    from datetime import datetime

    from tunepipe.tracking import registry

    root, name, metric = _registry_project(project, name)
    rows = registry.list_versions(root, name)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"no versions of {name!r} registered yet")
        return
    header = ("version", "aliases", metric, "created")
    table = [(str(r["version"]), ",".join(r["aliases"]) or "-",
              f"{r['metrics'][metric]:.4f}" if metric in r["metrics"] else "-",
              datetime.fromisoformat(r["created"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")) for r in rows]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    print(f"{name}")
    for row in [header, *table]:
        print("  ".join(cell.rjust(w) if i in (0, 2) else cell.ljust(w) for i, (cell, w) in
                        enumerate(zip(row, widths))).rstrip())


@models_app.command("promote")
def models_promote(
    version: Annotated[int, typer.Argument(help="Version to make champion.")],
    force: Annotated[bool, typer.Option("--force", help="Promote although the version fails registry.gates.")]
    = False,
    name: NameOption = None,
    project: ProjectOption = Path("."),
) -> None:
    """Make VERSION the champion by hand (recorded in the champion history, so rollback undoes it). A version that
    fails the project's registry.gates needs --force; the current champion is left as it is."""
    from tunepipe.tracking import registry

    root, settings = _registry_settings(project)
    name = name or settings.model_name
    previous = registry.promote(root, name, version, gates=settings.gates, force=force)
    was = f"was v{previous}" if previous is not None else "no previous champion"
    print(f"champion: {name} v{version} ({'unchanged' if previous == version else was})")


@models_app.command("rollback")
def models_rollback(name: NameOption = None, project: ProjectOption = Path(".")) -> None:
    """Move champion back to the previous champion."""
    from tunepipe.tracking import registry

    root, name, _ = _registry_project(project, name)
    new, old = registry.rollback(root, name)
    print(f"champion: {name} v{new} (rolled back from {f'v{old}' if old is not None else 'no champion'})")


@app.command("ui")
def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help="MLflow UI port.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes the registry to the network.")]
    = "127.0.0.1",
    project: ProjectOption = Path("."),
) -> None:
    """Open the MLflow UI on this project's store (and tell how to open Prefect's)."""
    import signal
    import subprocess

    from tunepipe.tracking import store, ui

    root, name, _ = _registry_project(project, None)
    uri = store.tracking_uri(root)
    experiment_id = store.ensure_store(uri)
    command = ui.ui_command(root, host=host, port=port)
    print(f"MLflow UI on {uri}; Ctrl-C stops", file=sys.stderr)
    for label, url in ui.urls(host, port, experiment_id, name).items():
        print(f"  {label}: {url}", file=sys.stderr)
    print("Prefect UI: run `prefect server start --host 127.0.0.1` in another terminal, then open "
          "http://127.0.0.1:4200", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this port can read and change the registry",
              file=sys.stderr)
    # MLflow's GenAI job runner starts ~7 worker processes; browsing runs and the registry needs none of them
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.getenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                          "false")}
    server = subprocess.Popen(command, cwd=root, env=env)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        code = server.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: `mlflow ui` forwards SIGTERM to its server processes
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)
