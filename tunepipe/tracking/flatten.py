"""Nested params and metrics -> MLflow's flat `a.b.c` keys, with values cut to MLflow's limits."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

# MLflow limits (mlflow.utils.validation, 3.17)
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
BATCH = 100  # params/tags per log_batch call
_KEY_BAD_CHARS = re.compile(r"[^\w\-. :/]")


def flatten(data: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts (and pydantic models) -> {"a.b.c": leaf}; lists stay leaves."""
    if hasattr(data, "model_dump"):
        data = data.model_dump()
    if not isinstance(data, Mapping):
        return {prefix: data} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric leaves of a (nested) metrics dict, flattened with dots; bools, strings, lists are skipped."""
    return {key: float(value) for key, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def clean_key(key: str) -> str:
    """A key MLflow accepts: unsupported characters become '_', at most MAX_KEY characters."""
    return _KEY_BAD_CHARS.sub("_", key)[:MAX_KEY]


def clip_value(value: Any, limit: int) -> str:
    """A param/tag value as text (JSON for containers), cut to `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(
        value, (list, tuple, dict)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
