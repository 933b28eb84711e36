"""The `tunepipe` Typer application and the state its commands share (the --debug flag)."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Staged LoRA fine-tuning (CPT -> SFT -> DPO) with LLaMA-Factory-compatible data.")

STATE = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    STATE["debug"] = debug
