"""`tunepipe import llamafactory FILE.yaml [FILE.yaml ...] [KEY=VALUE ...]`: LLaMA-Factory YAMLs -> params.yaml."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunepipe.cli.app import app

import_app = typer.Typer(no_args_is_help=True, help="Import configurations from other tools.")
app.add_typer(import_app, name="import")


@import_app.command("llamafactory", context_settings={"allow_extra_args": False})
def import_llamafactory(
    files: Annotated[Optional[list[str]], typer.Argument(
        help="LLaMA-Factory training YAMLs (one per stage: pt, sft, dpo or kto), then any KEY=VALUE overrides of "
             "LF keys applied to every file (as `llamafactory-cli train x.yaml key=value`).")] = None,
    dataset_dir: Annotated[Optional[str], typer.Option(
        help="The LLaMA-Factory data folder (dataset_info.json); same as dataset_dir=DIR.")] = None,
    model_name: Annotated[Optional[str], typer.Option(
        help="Registered model name (default: the project directory's name).")] = None,
    project: Annotated[Path, typer.Option(help="Project directory (params.yaml is written there).")] = Path("."),
    force: Annotated[bool, typer.Option(help="Overwrite an existing params.yaml.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the params.yaml instead of writing it.")] = False,
    keys: Annotated[bool, typer.Option("--keys", help="List the LF keys tunepipe supports, ignores and refuses "
                                                      "(JSON with --json).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --keys: print JSON.")] = False,
) -> None:
    """Write params.yaml from LLaMA-Factory training YAMLs: each YAML becomes a stage (pt -> cpt)."""
    from tunepipe import lf_import
    from tunepipe.errors import ConfigError
    from tunepipe.io import atomic_write_text

    if keys:
        lists = lf_import.key_lists()
        if as_json:
            print(json.dumps(lists, indent=2))
            return
        for kind, rows in lists.items():
            print(f"{kind}:")
            width = max(len(k) for k in rows)
            print("\n".join(f"  {key:<{width}}  {text}" for key, text in rows.items()))
        return
    args = files or []
    yamls = [a for a in args if "=" not in a]
    overrides = lf_import.parse_overrides([a for a in args if "=" in a])
    if not yamls:
        raise ConfigError("give at least one LLaMA-Factory training YAML", key="FILES")
    root = project.resolve()
    out = root / "params.yaml"
    if out.exists() and not (force or dry_run):
        raise ConfigError("exists: pass --force to replace it (git keeps the old one), or --dry-run to print",
                          file=str(out))
    imported = lf_import.import_llamafactory(yamls, project=root, overrides=overrides, dataset_dir=dataset_dir,
                                             model_name=model_name)
    text = lf_import.render(imported)
    if dry_run:
        print(text, end="")
    else:
        atomic_write_text(out, text)
        sources = ", ".join(f"{stage} <- {Path(src).name}" for stage, src in imported.sources.items())
        print(f"wrote {out}: {sources}", file=sys.stderr)
    if imported.ignored:
        print(f"ignored LLaMA-Factory keys (no effect here; --keys says why): {', '.join(sorted(imported.ignored))}",
              file=sys.stderr)
    for note in imported.note_lines():
        print(f"note: {note}", file=sys.stderr)
    if not dry_run:
        _report_validation(root)


def _report_validation(root: Path) -> None:
    """What `tunepipe run` will say about the new params.yaml (its refusal as a warning: the file is written)."""
    from tunepipe.errors import TunepipeError
    from tunepipe.validate import validate_project

    try:
        for warning in validate_project(root).warnings:
            print(f"warning: {warning}", file=sys.stderr)
    except TunepipeError as err:
        print(f"warning: `tunepipe run` will refuse it: {err}", file=sys.stderr)
        return
    print("next: tunepipe run", file=sys.stderr)
