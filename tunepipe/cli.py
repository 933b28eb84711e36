"""The `tunepipe` command.

Imports stay inside the commands: torch, transformers and friends cost seconds to import on a small machine, and
`tunepipe --help` or a failing `data check` should not pay for them. Every user error (`TunepipeError`) is printed
as one line on stderr with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Staged LoRA fine-tuning (CPT -> SFT -> DPO) with LLaMA-Factory-compatible data.")
data_app = typer.Typer(no_args_is_help=True, help="Check, preview and export LLaMA-Factory-style datasets.")
app.add_typer(data_app, name="data")

STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    STATE["debug"] = debug


def _cache_dir() -> Path:
    """Where the embedded tiny model is built (once per seed and corpus)."""
    return Path(os.getenv("TUNEPIPE_CACHE", Path.home() / ".cache" / "tunepipe"))


def _load_tokenizer(path: str, trust_remote_code: bool = False):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tunepipe.errors import ConfigError
    from tunepipe.models import load_tokenizer, resolve_model_path

    resolved = resolve_model_path(path, cache_dir=_cache_dir())
    try:
        return load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        offline = " (offline: only local paths and 'tiny' work)" if os.getenv("HF_HUB_OFFLINE") == "1" else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot load a tokenizer from {path!r}{offline}: {first}", key="--tokenizer") from None


def _stage_of(attr) -> str:
    """The stage an entry is made for: ranking -> dpo, kto_tag -> kto, text-only alpaca -> pt, else sft."""
    if attr.ranking:
        return "dpo"
    if attr.kto_tag:
        return "kto"
    if attr.formatting == "alpaca" and not attr.response:
        return "pt"
    return "sft"


# ------------------------------------------------------------------------------------------------------------ data
@data_app.command("check")
def data_check(
    names: Annotated[Optional[list[str]], typer.Argument(help="Entries to check (default: all).")] = None,
    dataset_dir: Annotated[str, typer.Option(help="Folder with dataset_info.json.")] = "data",
    hub: Annotated[bool, typer.Option(help="Also load hub datasets when checking all entries.")] = False,
    allow_scripts: Annotated[bool, typer.Option(help="Run dataset scripts (executes their code).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Validate dataset_info.json entries and every row; exit 1 if an entry is unusable."""
    import numpy as np

    from tunepipe.data.converters import convert
    from tunepipe.data.loading import load_raw
    from tunepipe.data.processors import row_issue
    from tunepipe.data.registry import get_dataset_attrs, read_dataset_info, split_names
    from tunepipe.errors import DataError

    explicit = split_names(names or [])
    if not explicit:
        info, _ = read_dataset_info(dataset_dir)
        explicit = list(info)
    results = []
    for name in explicit:
        result = {"dataset": name, "status": "ok", "rows": 0, "ok": 0, "dropped": {}, "error": None}
        try:
            attr = get_dataset_attrs([name], dataset_dir)[0]
            result["stage"] = _stage_of(attr)
            if attr.load_from not in ("file", "script", "cloud_file") and not names and not hub:
                result.update(status="skipped", error=f"{attr.load_from} dataset (use --hub or name it to load)")
                results.append(result)
                continue
            raw = load_raw(attr, dataset_dir=dataset_dir, rng=np.random.RandomState(42), allow_scripts=allow_scripts)
            examples = convert(raw, media_dir=Path(dataset_dir), skip_bad_rows=True)
            result["rows"] = len(examples)
            for example in examples:
                reason = row_issue(example, result["stage"])
                if reason:
                    result["dropped"][reason] = result["dropped"].get(reason, 0) + 1
                else:
                    result["ok"] += 1
            if result["ok"] == 0:
                result.update(status="unusable", error="no usable rows")
        except DataError as err:
            result.update(status="unusable", error=str(err))
        results.append(result)

    if as_json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        from tunepipe.data.health import describe

        width = max(len(r["dataset"]) for r in results)
        print(f"{'dataset':<{width}}  {'stage':<5}  {'rows':>7}  {'ok':>7}  {'dropped':>7}  status")
        for r in results:
            dropped = sum(r["dropped"].values())
            print(f"{r['dataset']:<{width}}  {r.get('stage', '-'):<5}  {r['rows']:>7}  {r['ok']:>7}  {dropped:>7}  "
                  f"{r['status']}" + (f": {r['error']}" if r["error"] else ""))
            for reason, count in sorted(r["dropped"].items(), key=lambda item: -item[1]):
                print(f"{'':<{width}}  {'':<5}  {'':>7}  {'':>7}  {count:>7}  {reason}: {describe(reason)}")
    if any(r["status"] == "unusable" for r in results):
        raise typer.Exit(1)


@data_app.command("preview")
def data_preview(
    name: Annotated[str, typer.Argument(help="Dataset entry to preview.")],
    template: Annotated[str, typer.Option(help="Chat template.")] = ...,
    tokenizer: Annotated[str, typer.Option(help="Tokenizer path or model id ('tiny' = embedded model).")] = ...,
    n: Annotated[int, typer.Option("-n", help="Number of examples.")] = 3,
    dataset_dir: Annotated[str, typer.Option(help="Folder with dataset_info.json.")] = "data",
    cutoff_len: Annotated[int, typer.Option(help="cutoff_len.")] = 2048,
    stage: Annotated[Optional[str], typer.Option(help="pt/sft/dpo/kto (default: from the entry).")] = None,
) -> None:
    """Show rendered examples; the tokens that are trained on are marked."""
    from tunepipe.data.prepare import DataArgs, prepare
    from tunepipe.data.preview import render_example
    from tunepipe.data.registry import get_dataset_attrs

    stage = stage or _stage_of(get_dataset_attrs([name], dataset_dir)[0])
    tok = _load_tokenizer(tokenizer)
    args = DataArgs(dataset_dir=dataset_dir, template=template, cutoff_len=cutoff_len, max_samples=max(n * 4, n),
                    packing=False)
    prepared = prepare(stage, [name], args, tok)
    color = sys.stdout.isatty() and not os.getenv("NO_COLOR")
    for i, text in enumerate(render_example(prepared, tok, n, color=color)):
        print(f"--- example {i} ---\n{text}")
    print("--- trained tokens are " + ("highlighted" if color else "between ⟦ and ⟧") + " ---")


@data_app.command("export")
def data_export(
    stage: Annotated[str, typer.Option(help="pt, sft, dpo or kto.")],
    dataset: Annotated[str, typer.Option(help="Dataset name(s), comma-separated.")],
    tokenizer: Annotated[str, typer.Option(help="Tokenizer path or model id ('tiny' = embedded model).")],
    out: Annotated[Path, typer.Option(help="Output JSON Lines file.")],
    template: Annotated[Optional[str], typer.Option(help="Chat template (default: the tokenizer's).")] = None,
    dataset_dir: Annotated[str, typer.Option(help="Folder with dataset_info.json.")] = "data",
    cutoff_len: Annotated[int, typer.Option(help="Maximum tokens per example.")] = 2048,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing",
                                                    help="Pack examples (default: on for pt only).")] = None,
    neat_packing: Annotated[bool, typer.Option(help="Packing without cross-attention (sft).")] = False,
    train_on_prompt: Annotated[bool, typer.Option(help="Train on prompt tokens too (sft).")] = False,
    mask_history: Annotated[bool, typer.Option(help="Train on the last turn only (sft).")] = False,
    max_samples: Annotated[Optional[int], typer.Option(help="First N rows of each dataset.")] = None,
    mix_strategy: Annotated[str, typer.Option(help="concat, interleave_under/over/once.")] = "concat",
    interleave_probs: Annotated[Optional[str], typer.Option(help="Comma-separated probabilities.")] = None,
    seed: Annotated[int, typer.Option(help="Seed (LF default 42).")] = 42,
    tool_format: Annotated[Optional[str], typer.Option(help="Tool format override.")] = None,
    default_system: Annotated[Optional[str], typer.Option(help="Default system prompt override.")] = None,
    preprocessing_batch_size: Annotated[int, typer.Option(help="Rows per processing batch.")] = 1000,
    allow_scripts: Annotated[bool, typer.Option(help="Run dataset scripts (executes their code).")] = False,
    skip_bad_rows: Annotated[bool, typer.Option(help="Drop malformed rows instead of failing.")] = False,
    overlength: Annotated[str, typer.Option(help="truncate (LF) or drop examples over cutoff_len.")] = "truncate",
    report: Annotated[Optional[Path], typer.Option(help="Also write the data health report (JSON) here.")] = None,
) -> None:
    """Write one JSON object per processed example, in LLaMA-Factory's order and column names."""
    from tunepipe.data import health
    from tunepipe.data.prepare import DataArgs, prepare
    from tunepipe.errors import ConfigError
    from tunepipe.io import atomic_open

    if stage not in ("pt", "sft", "dpo", "kto"):
        raise ConfigError(f"unknown stage {stage!r}; expected pt, sft, dpo or kto", key="--stage")
    if overlength not in ("truncate", "drop"):
        raise ConfigError(f"expected truncate or drop, got {overlength!r}", key="--overlength")
    if cutoff_len < 1:
        raise ConfigError(f"must be a positive integer, got {cutoff_len}", key="--cutoff-len")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"must be a positive integer, got {max_samples}", key="--max-samples")
    args = DataArgs(dataset_dir=dataset_dir, template=template, cutoff_len=cutoff_len, packing=packing,
                    neat_packing=neat_packing, train_on_prompt=train_on_prompt, mask_history=mask_history,
                    max_samples=max_samples, mix_strategy=mix_strategy, interleave_probs=interleave_probs, seed=seed,
                    tool_format=tool_format, default_system=default_system, allow_scripts=allow_scripts,
                    preprocessing_batch_size=preprocessing_batch_size, skip_bad_rows=skip_bad_rows,
                    overlength=overlength)
    import orjson

    tok = _load_tokenizer(tokenizer)
    with atomic_open(out, "wb") as handle:

        def write(columns: dict[str, list]) -> None:
            keys = list(columns)
            handle.write(b"".join(orjson.dumps(dict(zip(keys, row))) + b"\n" for row in zip(*columns.values())))

        prepared = prepare(stage, dataset, args, tok, on_train_batch=write)
    data = health.report(stage, prepared.datasets, prepared.health, cutoff_len, prepared.notes)
    if report:
        health.write(report, data)
    print(health.format_table(data), file=sys.stderr)
    print(f"wrote {data['examples_out']} examples to {out}", file=sys.stderr)


@data_app.command("templates")
def data_templates() -> None:
    """List the chat templates."""
    from tunepipe.data.templates import template_names

    print("\n".join(template_names()))


# ------------------------------------------------------------------------------------------------------ pipeline
def _project(project: Path) -> Path:
    """Make the project's flows/ and stages/ importable and set up quiet, local Prefect defaults."""
    root = project.resolve()
    if not (root / "params.yaml").exists():
        from tunepipe.errors import ConfigError

        raise ConfigError(f"no params.yaml in {root}: run from a tunepipe project (or pass --project)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return root


@contextlib.contextmanager
def _warm_start(root: Path):
    """Start, while Prefect starts up, the warm server that imports torch & co. once for all stages and opens (a
    fresh one: creates and migrates) the MLflow store (tunepipe/warm.py; TUNEPIPE_WARM=0 turns it off)."""
    from tunepipe import tracking, warm

    if os.getenv("TUNEPIPE_WARM") == "0":
        yield
        return
    with warm.server({**os.environ, tracking.ENV_TRACKING_URI: tracking.tracking_uri(root)}) as address:
        if address:
            os.environ[warm.ENV] = address
        try:
            yield
        finally:
            os.environ.pop(warm.ENV, None)


@app.command("run")
def run_pipeline(
    force: Annotated[Optional[list[str]], typer.Option("--force", help="Rerun this stage even if DVC says it is "
                                                                       "up to date (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the result on stdout.")] = False,
    wait: Annotated[bool, typer.Option(help="Wait for a run already in progress instead of refusing.")] = False,
    project: Annotated[Path, typer.Option(help="Project directory.")] = Path("."),
) -> None:
    """Run the pipeline: every stage DVC finds stale, in order, then register the model."""
    from tunepipe.errors import TunepipeError

    root = _project(project)
    with _warm_start(root):
        from flows.pipeline import PipelineBusy, pipeline, status_line

        state = pipeline(project_dir=str(root), force=force or [], wait=wait, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, PipelineBusy):
        raise TunepipeError(str(result))
    if isinstance(result, BaseException):
        raise TunepipeError(f"pipeline failed: {result}")
    if as_json:
        print(json.dumps(result))
    else:
        print(status_line(result))
    if state.is_failed():
        failed = next(r for r in result["stages"] if r["status"] == "failed")
        print(f"error: {failed.get('error', 'a stage failed')}", file=sys.stderr)
        raise typer.Exit(1)


@app.command("serve")
def serve(
    cron: Annotated[str, typer.Option(help="Cron schedule, e.g. '0 2 * * *' (every night at 02:00).")],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    timezone: Annotated[Optional[str], typer.Option(help="IANA time zone of the schedule (default UTC).")] = None,
    project: Annotated[Path, typer.Option(help="Project directory.")] = Path("."),
) -> None:
    """Run the pipeline on a schedule: starts (or reuses) a local Prefect server and serves a deployment."""
    root = _project(project)
    from flows.server import ensure_server

    api_url = ensure_server(root)
    os.environ["PREFECT_API_URL"] = api_url
    from prefect import serve as prefect_serve

    from flows.pipeline import schedule_deployment

    print(f"serving deployment tunepipe-pipeline/{name} on '{cron}' via {api_url} "
          f"(UI: {api_url.removesuffix('/api')}); Ctrl-C stops", file=sys.stderr)
    prefect_serve(schedule_deployment(cron, project_dir=str(root), name=name, timezone=timezone))


@app.command("params")
def params_keys(keys: Annotated[bool, typer.Option("--keys", help="List every params.yaml key with its help.")] = True,
                ) -> None:
    """Describe params.yaml (every key, with its help text)."""
    from tunepipe.config import describe_keys

    rows = describe_keys()
    width = max(len(key) for key, _ in rows)
    print("\n".join(f"{key:<{width}}  {text}" for key, text in rows))


# ---------------------------------------------------------------------------------------------- models and ui
models_app = typer.Typer(no_args_is_help=True, help="The MLflow model registry: versions, champion, rollback.")
app.add_typer(models_app, name="models")


def _registry_project(project: Path, name: Optional[str]) -> tuple[Path, str, str]:
    """(root, registered model name, compare metric) from the project's params.yaml (or --name)."""
    from tunepipe.config import RegistryParams, load_params
    from tunepipe.errors import ConfigError
    from tunepipe.tracking import DB_NAME, ENV_TRACKING_URI

    root = project.resolve()
    params_file = root / "params.yaml"
    if params_file.exists():
        registry = load_params(params_file).registry
    elif os.getenv(ENV_TRACKING_URI) or (root / DB_NAME).exists():
        registry = RegistryParams()
    else:  # don't create an empty store in the wrong directory
        raise ConfigError(f"no params.yaml and no {DB_NAME} in {root}: run from a tunepipe project (or pass "
                          f"--project, or set {ENV_TRACKING_URI})")
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

    from tunepipe import tracking

    root, name, metric = _registry_project(project, name)
    rows = tracking.list_versions(root, name)
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
    name: NameOption = None,
    project: ProjectOption = Path("."),
) -> None:
    """Make VERSION the champion by hand (recorded in the champion history, so rollback undoes it)."""
    from tunepipe import tracking

    root, name, _ = _registry_project(project, name)
    previous = tracking.promote(root, name, version)
    was = f"was v{previous}" if previous is not None else "no previous champion"
    print(f"champion: {name} v{version} ({'unchanged' if previous == version else was})")


@models_app.command("rollback")
def models_rollback(name: NameOption = None, project: ProjectOption = Path(".")) -> None:
    """Move champion back to the previous champion."""
    from tunepipe import tracking

    root, name, _ = _registry_project(project, name)
    new, old = tracking.rollback(root, name)
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

    from tunepipe import tracking

    root, _, _ = _registry_project(project, None)
    uri = tracking.tracking_uri(root)
    tracking.ensure_store(uri)
    command = tracking.ui_command(root, host=host, port=port)
    print(f"MLflow UI: http://{host}:{port}  (store {uri}); Ctrl-C stops", file=sys.stderr)
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


def main() -> None:
    import gc

    from tunepipe.errors import TunepipeError

    try:
        app()
    except TunepipeError as err:
        if STATE["debug"]:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        # The work is done; interpreter shutdown would still run one more full collection over every object
        # Prefect, MLflow, DVC and torch left behind (~2 s after `tunepipe run`). Frozen objects are skipped.
        gc.freeze()


if __name__ == "__main__":
    main()
