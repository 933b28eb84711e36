"""The `tunepipe` command.

Imports stay inside the commands: torch, transformers and friends cost seconds to import on a small machine, and
`tunepipe --help` or a failing `data check` should not pay for them. Every user error (`TunepipeError`) is printed
as one line on stderr with exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys

from tunepipe.cli import data, lf, pipeline, registry  # noqa: F401  (they register their commands on `app`)
from tunepipe.cli.app import STATE, app

__all__ = ["app", "main"]


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
