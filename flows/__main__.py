"""`python -m flows run|serve ...`, from the project root: what `tunepipe run` and `tunepipe serve` execute.

The tunepipe CLI validates its arguments and then replaces itself with this command (os.execv), so the flow runs
in the process the user started: its exit status, its signals, its output. Prefect reads its settings at import,
so the quiet local defaults are set before `flows.pipeline` is imported.

    python -m flows run [--force STAGE ...] [--json] [--wait]
    python -m flows serve --cron "0 2 * * *" | --interval SECONDS [--name NAME] [--timezone Europe/Berlin]
    python -m flows status | stop                 # the project's Prefect server
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _defaults() -> None:
    from flows.server import project_home

    project_home(Path.cwd())  # per-project Prefect state, before prefect is imported
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


NOT_PROMOTED = 3  # `run --strict`: the run registered a model and it did not become champion


def run(args: argparse.Namespace) -> int:
    """Run the flow once; exit 0, 1 (a stage failed), 2 (bad input), 3 (--strict: not promoted), 130/143 (stopped
    by SIGINT/SIGTERM: the running stage was stopped, a checkpoint kept, the lock released)."""
    import signal

    # The temporary Prefect server, started at the flow's first API call, inherits "ignore SIGINT": a Ctrl-C in the
    # terminal goes to the whole foreground process group, and the server must outlive it long enough for the flow
    # to report how the run ended. The flow itself turns SIGINT/SIGTERM into an orderly stop (flows/lifecycle.py).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # before the flow: exit, no residue
    from flows.pipeline import pipeline, status_line
    from tunepipe.errors import TunepipeError

    state = pipeline(project_dir=str(Path.cwd()), force=args.force, wait=args.wait, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, TunepipeError):
        raise result
    if isinstance(result, BaseException):
        raise TunepipeError(f"pipeline failed: {result}")
    print(json.dumps(result) if args.json else status_line(result))
    if result.get("stopped"):
        stopped = next(r for r in result["stages"] if r["status"] == "stopped")
        done = sum(r["status"] == "ran" for r in result["stages"])
        print(f"error: {stopped['error']} during {stopped['name']} ({done} stage(s) had run; the next run resumes "
              f"from the last checkpoint)", file=sys.stderr)
        return 128 + result["stopped"]
    if state.is_failed():  # the failed stage's own status: 2 for a user error (bad data, params), as the CLI's
        failed = next(r for r in result["stages"] if r["status"] == "failed")
        print(f"error: {failed.get('error', 'a stage failed')}", file=sys.stderr)
        return 2 if failed.get("exit_code") == TunepipeError.exit_code else 1
    model = result.get("model")
    registered = any(r["name"] == "register" and r["status"] == "ran" for r in result["stages"])
    if args.strict and registered and model and not model.get("promoted"):
        print(f"error: {model['name']} v{model['version']} was not promoted (see metrics/register.json)",
              file=sys.stderr)
        return NOT_PROMOTED
    return 0


def deployment_name(root: Path, name: str | None) -> str:
    """Named after the project, so two projects sharing one server never replace each other's schedule."""
    return name or f"{root.name}-nightly"


def serve(args: argparse.Namespace) -> int:
    """Serve the pipeline on a schedule from this process, against the project's server (started if needed, and
    stopped on the way out if this process started it: nothing is left running behind the user's back)."""
    import fcntl

    from flows import server

    root = Path.cwd()
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    serving = open(home / "serve.lock", "a+")  # one serve per project: two would run every schedule twice
    try:
        fcntl.flock(serving, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        serving.seek(0)
        raise _error(f"tunepipe serve is already running for this project ({serving.read().strip() or 'pid ?'}); "
                     "stop it first (Ctrl-C in its terminal, or SIGTERM)") from None
    serving.seek(0)
    serving.truncate()
    serving.write(f"pid {os.getpid()}")
    serving.flush()
    external = os.environ.get("PREFECT_API_URL")
    if external:
        if not server.healthy(external):
            raise _error(f"PREFECT_API_URL={external} does not answer; start that server or unset it")
        api_url, started = external, None
    else:
        started_server, new = server.ensure(home)
        api_url, started = started_server.api_url, started_server if new else None
        os.environ["PREFECT_API_URL"] = api_url
    from prefect import serve as prefect_serve

    from flows.pipeline import schedule_deployment

    name = deployment_name(root, args.name)
    when = f"every {args.interval:g} s" if args.interval else f"'{args.cron}'"
    print(f"serving tunepipe-pipeline/{name} {when} via {api_url} (UI: {api_url.removesuffix('/api')}); "
          f"Ctrl-C stops{' it and the server' if started else ''}", file=sys.stderr)
    try:
        prefect_serve(schedule_deployment(project_dir=str(root), name=name, cron=args.cron, interval=args.interval,
                                          timezone=args.timezone), print_starting_message=False)
    finally:
        if started is not None and not args.keep_server:
            server.stop(home)
            print(f"stopped the Prefect server (pid {started.pid})", file=sys.stderr)
    return 0


def status(args: argparse.Namespace) -> int:
    """The project's server, its deployments and their latest runs; exit 0 if a server is running, 1 if not."""
    from flows import server

    home = Path(os.environ["PREFECT_HOME"])
    record = server.recorded(home)
    if record is None or not record.alive():
        print(f"no Prefect server running for this project (state in {home})"
              + (f"; stale record of pid {record.pid} removed" if record else ""))
        if record:
            (home / server.RECORD).unlink(missing_ok=True)
        return 1
    print(f"Prefect server: {record.api_url} (pid {record.pid}, UI {record.ui_url}, log {record.log})")
    import asyncio

    from flows.pipeline import deployment_summary

    for line in asyncio.run(deployment_summary(record.api_url)):
        print(line)
    return 0


def stop(args: argparse.Namespace) -> int:
    from flows import server

    stopped = server.stop(Path(os.environ["PREFECT_HOME"]))
    print(f"stopped the Prefect server (pid {stopped.pid})" if stopped else "no Prefect server was running")
    return 0


def _error(message: str):
    from tunepipe.errors import TunepipeError

    return TunepipeError(message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="run the pipeline once")
    p.add_argument("--force", action="append", default=[], help="rerun this stage (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--wait", action="store_true", help="wait for a run in progress instead of refusing")
    p.add_argument("--strict", action="store_true", help="exit 3 when the newly registered model was not promoted")
    s = commands.add_parser("serve", help="serve the pipeline on a schedule")
    when = s.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron")
    when.add_argument("--interval", type=float, help="seconds between runs")
    s.add_argument("--name", default=None, help="deployment name (default: <project>-nightly)")
    s.add_argument("--timezone", default=None)
    s.add_argument("--keep-server", action="store_true", help="leave the server running when serve stops")
    commands.add_parser("status", help="the project's Prefect server, deployments and latest runs")
    commands.add_parser("stop", help="stop the project's Prefect server")
    args = parser.parse_args(argv)
    _defaults()
    from tunepipe.errors import TunepipeError

    try:
        return {"run": run, "serve": serve, "status": status, "stop": stop}[args.command](args)
    except TunepipeError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
