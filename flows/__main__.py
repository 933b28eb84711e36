"""`python -m flows run|serve ...`, from the project root: what `tunepipe run` and `tunepipe serve` execute.

The tunepipe CLI validates its arguments and then replaces itself with this command (os.execv), so the flow runs
in the process the user started: its exit status, its signals, its output. Prefect reads its settings at import,
so the quiet local defaults are set before `flows.pipeline` is imported.

    python -m flows run [--force STAGE ...] [--json] [--wait]
    python -m flows serve --cron "0 2 * * *" [--name nightly] [--timezone Europe/Berlin]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(args: argparse.Namespace) -> int:
    from flows.pipeline import pipeline, status_line
    from tunepipe.errors import TunepipeError

    state = pipeline(project_dir=str(Path.cwd()), force=args.force, wait=args.wait, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, TunepipeError):
        raise result
    if isinstance(result, BaseException):
        raise TunepipeError(f"pipeline failed: {result}")
    print(json.dumps(result) if args.json else status_line(result))
    if state.is_failed():  # the failed stage's own status: 2 for a user error (bad data, params), as the CLI's
        failed = next(r for r in result["stages"] if r["status"] == "failed")
        print(f"error: {failed.get('error', 'a stage failed')}", file=sys.stderr)
        return 2 if failed.get("exit_code") == TunepipeError.exit_code else 1
    return 0


def serve(args: argparse.Namespace) -> int:
    from flows.server import ensure_server

    api_url = ensure_server(Path.cwd())
    os.environ["PREFECT_API_URL"] = api_url
    from prefect import serve as prefect_serve

    from flows.pipeline import schedule_deployment

    print(f"serving deployment tunepipe-pipeline/{args.name} on '{args.cron}' via {api_url} "
          f"(UI: {api_url.removesuffix('/api')}); Ctrl-C stops", file=sys.stderr)
    prefect_serve(schedule_deployment(args.cron, project_dir=str(Path.cwd()), name=args.name,
                                      timezone=args.timezone))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="run the pipeline once")
    p.add_argument("--force", action="append", default=[], help="rerun this stage (repeatable)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--wait", action="store_true", help="wait for a run in progress instead of refusing")
    s = commands.add_parser("serve", help="serve the pipeline on a schedule")
    s.add_argument("--cron", required=True)
    s.add_argument("--name", default="nightly")
    s.add_argument("--timezone", default=None)
    args = parser.parse_args(argv)
    _defaults()
    from tunepipe.errors import TunepipeError

    try:
        return {"run": run, "serve": serve}[args.command](args)
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
