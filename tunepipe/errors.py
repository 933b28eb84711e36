"""Errors that reach users as one line.

Everything a user can cause (a bad dataset_info.json entry, a malformed row, a bad params.yaml value) raises a
subclass of `TunepipeError`. The CLI prints `str(err)` on one line and exits non-zero; only `--debug` shows a
traceback. Library code that knows only part of the context (a formatter sees one message, not its row) raises
`RowError` and the caller that knows the dataset, file and row re-raises it as a `DataError`.
"""

from __future__ import annotations


class TunepipeError(Exception):
    """Base class of every error meant for the user rather than for a developer."""

    exit_code = 2


class ConfigError(TunepipeError):
    """A bad value in params.yaml, a CLI option or another configuration input."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.message, self.key, self.file = message, key, file
        where = ", ".join(part for part in (f"file {file}" if file else "", f"key '{key}'" if key else "") if part)
        super().__init__(f"{where}: {message}" if where else message)


class DataError(TunepipeError):
    """A dataset problem, located as precisely as it is known: dataset name, file, row (0-based) and field."""

    def __init__(
        self,
        message: str,
        *,
        dataset: str | None = None,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
    ):
        self.message, self.dataset, self.file, self.row, self.field = message, dataset, file, row, field
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.dataset is not None:
            parts.append(f"dataset '{self.dataset}'")
        if self.file is not None:
            parts.append(f"file {self.file}")
        if self.row is not None:
            parts.append(f"row {self.row}")
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        return f"{', '.join(parts)}: {self.message}" if parts else self.message


class RowError(Exception):
    """A problem inside one row, raised where the row's dataset and index are not known.

    `field` names the offending column or path inside the row (e.g. "conversations[3].value", "tools").
    `reason` is a short stable key used when the row is dropped instead of failing the run.
    """

    def __init__(self, message: str, *, field: str | None = None, reason: str = "malformed"):
        self.message, self.field, self.reason = message, field, reason
        super().__init__(message)

    def located(self, *, dataset: str | None, file: str | None, row: int | None) -> DataError:
        return DataError(self.message, dataset=dataset, file=file, row=row, field=self.field)


class PipelineBusy(TunepipeError):
    """Another pipeline run holds this project's lock."""


def describe_failure(err: BaseException) -> str:
    """One line for an unexpected exception: its own message, or, when the root cause is a full disk anywhere in
    the chain (often wrapped by a library, e.g. SQLAlchemy's "raised as a result of Query-invoked autoflush"), that."""
    import errno

    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            where = f": {cause.filename}" if cause.filename else ""
            return f"no space left on device{where}"
        if "database or disk is full" in str(cause) or "No space left on device" in str(cause):
            return "no space left on device (" + str(cause).strip().splitlines()[0][:200] + ")"
        cause = cause.__cause__ or cause.__context__
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
