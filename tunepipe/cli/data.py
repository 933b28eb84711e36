"""`tunepipe data check|preview|export|templates`: LLaMA-Factory-style datasets, without the pipeline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunepipe.cli.app import app

data_app = typer.Typer(no_args_is_help=True, help="Check, preview and export LLaMA-Factory-style datasets.")
app.add_typer(data_app, name="data")


def _cache_dir() -> Path:
    """Where the embedded tiny model is built (once per seed and corpus)."""
    return Path(os.getenv("TUNEPIPE_CACHE", Path.home() / ".cache" / "tunepipe"))


def _load_tokenizer(path: str, trust_remote_code: bool = False):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tunepipe.errors import ConfigError
    from tunepipe.models.loading import load_tokenizer
    from tunepipe.models.tiny import resolve_model_path

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
def _params_template() -> str | None:
    """model.template of the params.yaml in the current directory, if there is one (read, not validated)."""
    from tunepipe.config import read_yaml

    if not Path("params.yaml").is_file():
        return None
    data = read_yaml("params.yaml")
    model = data.get("model") if isinstance(data, dict) else None
    return model.get("template") if isinstance(model, dict) else None


@data_app.command("check")
def data_check(
    names: Annotated[Optional[list[str]], typer.Argument(help="Entries to check (default: all).")] = None,
    dataset_dir: Annotated[str, typer.Option(help="Folder with dataset_info.json.")] = "data",
    template: Annotated[Optional[str], typer.Option(
        help="Chat template the data is for (default: model.template of ./params.yaml); rows with media are "
             "unusable with every (text-only) template, as `preview` and training say.")] = None,
    hub: Annotated[bool, typer.Option(help="Also load hub datasets when checking all entries.")] = False,
    allow_scripts: Annotated[bool, typer.Option(help="Run dataset scripts (executes their code).")] = False,
    show_dropped: Annotated[bool, typer.Option("--show-dropped", help="List the dropped rows (file and row, "
                                                                     "0-based) under each reason.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON (dropped rows included).")]
    = False,
) -> None:
    """Validate dataset_info.json entries and every row; exit 1 if an entry is unusable."""
    import numpy as np

    from tunepipe.data.converters import convert
    from tunepipe.data.loading import load_raw
    from tunepipe.data.processors import media_error, row_issue
    from tunepipe.data.registry import get_dataset_attrs, read_dataset_info, split_names
    from tunepipe.errors import DataError

    template = template or _params_template()
    explicit = split_names(names or [])
    if not explicit:
        info, _ = read_dataset_info(dataset_dir)
        explicit = list(info)
    results = []
    for name in explicit:
        result = {"dataset": name, "status": "ok", "rows": 0, "ok": 0, "dropped": {}, "dropped_rows": {},
                  "error": None}
        try:
            attr = get_dataset_attrs([name], dataset_dir)[0]
            result["stage"] = stage = _stage_of(attr)
            if attr.load_from not in ("file", "script", "cloud_file") and not names and not hub:
                result.update(status="skipped", error=f"{attr.load_from} dataset (use --hub or name it to load)")
                results.append(result)
                continue
            raw = load_raw(attr, dataset_dir=dataset_dir, rng=np.random.RandomState(42), allow_scripts=allow_scripts)
            examples = convert(raw, media_dir=Path(dataset_dir), skip_bad_rows=True)
            result["rows"] = len(examples)
            for example in examples:
                reason = row_issue(example, stage)
                file, row = raw.locate(example.position)
                if reason:
                    result["dropped"][reason] = result["dropped"].get(reason, 0) + 1
                    result["dropped_rows"].setdefault(reason, []).append({"file": file, "row": row})
                    continue
                media = media_error(example, template) if stage != "pt" else None
                if media:  # training and `preview` stop here with this very message
                    raise media.located(dataset=name, file=file, row=row)
                result["ok"] += 1
            if result["ok"] == 0:
                result.update(status="unusable", error="no usable rows")
        except DataError as err:
            result.update(status="unusable", error=str(err))
        results.append(result)

    if as_json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        _print_check(results, show_dropped)
    if any(r["status"] == "unusable" for r in results):
        raise typer.Exit(1)


def _print_check(results: list[dict], show_dropped: bool, limit: int = 50) -> None:
    from tunepipe.data.health import describe

    width = max(len(r["dataset"]) for r in results)
    pad = f"{'':<{width}}  {'':<5}  {'':>7}  {'':>7}  "
    print(f"{'dataset':<{width}}  {'stage':<5}  {'rows':>7}  {'ok':>7}  {'dropped':>7}  status")
    for r in results:
        dropped = sum(r["dropped"].values())
        print(f"{r['dataset']:<{width}}  {r.get('stage', '-'):<5}  {r['rows']:>7}  {r['ok']:>7}  {dropped:>7}  "
              f"{r['status']}" + (f": {r['error']}" if r["error"] else ""))
        for reason, count in sorted(r["dropped"].items(), key=lambda item: -item[1]):
            print(f"{pad}{count:>7}  {reason}: {describe(reason)}")
            if show_dropped:
                rows = r["dropped_rows"][reason]
                listed = ", ".join(f"{Path(d['file']).name if d['file'] else '?'}:{d['row']}" for d in rows[:limit])
                more = f" (+{len(rows) - limit} more: --json lists all)" if len(rows) > limit else ""
                print(f"{pad}{'':>7}    rows {listed}{more}")


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
    from tunepipe.data.features import DataArgs, prepare
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
    from tunepipe.data.features import DataArgs, prepare
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
