"""`dataset_info.json`: LLaMA-Factory's dataset registry, read with LLaMA-Factory 0.9.5's semantics.

An existing LLaMA-Factory data folder must work unchanged, so the attribute names, defaults, the source priority
(hub > script > cloud file > file) and the "a present `columns`/`tags` block replaces all defaults" rule are LF's
(LF 0.9.5's data/parser.py). What differs is the failure mode: LF raises a bare `KeyError` for an
entry without `file_name`, accepts any type for any key and fails much later; here every problem is a one-line
`DataError` naming the dataset, the file and the key.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tunepipe.errors import DataError

DATASET_INFO = "dataset_info.json"
FORMATS = ("alpaca", "sharegpt", "openai")
LoadFrom = Literal["hf_hub", "ms_hub", "om_hub", "script", "cloud_file", "file"]

COLUMN_NAMES = (
    "prompt", "query", "response", "history", "messages", "system", "tools",
    "images", "videos", "audios", "chosen", "rejected", "kto_tag",
)  # fmt: skip
TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
SOURCE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name", "file_name")
TOP_LEVEL_KEYS = (*SOURCE_KEYS, "formatting", "ranking", "subset", "split", "folder", "num_samples", "columns", "tags")


def _truthy_env(name: str) -> bool:
    return os.getenv(name, "0").lower() in ("true", "y", "1")


@dataclass
class DatasetAttr:
    """One resolved `dataset_info.json` entry. Field names and defaults are LLaMA-Factory's."""

    name: str  # the key in dataset_info.json (what users pass as `dataset:`)
    load_from: LoadFrom
    dataset_name: str  # hub id, script path or file/folder name, relative to dataset_dir for local sources
    formatting: str = "alpaca"
    ranking: bool = False
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None
    # columns (LF defaults; all become None as soon as the entry has a "columns" block)
    system: str | None = None
    tools: str | None = None
    images: str | None = None
    videos: str | None = None
    audios: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    # sharegpt tags (same replace-all rule with a "tags" block)
    role_tag: str | None = "from"
    content_tag: str | None = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"
    # columns the user named explicitly: a missing explicit column is an error, a missing default one is not
    explicit_columns: frozenset[str] = field(default_factory=frozenset)

    def __repr__(self) -> str:
        return self.dataset_name

    @property
    def is_local(self) -> bool:
        return self.load_from in ("file", "script")

    def column(self, key: str) -> str | None:
        return getattr(self, key)


def read_dataset_info(dataset_dir: str | Path) -> tuple[dict[str, Any], Path]:
    """Parse `<dataset_dir>/dataset_info.json`; a missing or broken file is a one-line error."""
    path = Path(dataset_dir) / DATASET_INFO
    if not Path(dataset_dir).is_dir():
        raise DataError(f"dataset directory {dataset_dir} does not exist (dataset_dir is resolved against the "
                        f"current directory {Path.cwd()})", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{DATASET_INFO} not found in {dataset_dir}", file=str(path)) from None
    except OSError as err:
        raise DataError(f"cannot read {DATASET_INFO}: {err.strerror}", file=str(path)) from None
    try:
        info = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}", file=str(path)) from None
    if not isinstance(info, dict):
        raise DataError(f"expected a JSON object mapping dataset names to entries, got {type(info).__name__}",
                        file=str(path))
    return info, path


def parse_entry(name: str, entry: Any, *, file: str | None = None) -> DatasetAttr:
    """Resolve one entry exactly as LLaMA-Factory's `get_dataset_list` + `DatasetAttr.join` do, but validated."""

    def fail(message: str, key: str | None = None) -> DataError:
        return DataError(message, dataset=name, file=file, field=key)

    if not isinstance(entry, dict):
        raise fail(f"entry must be a JSON object, got {type(entry).__name__}")
    for key in SOURCE_KEYS:
        if key in entry and (not isinstance(entry[key], str) or not entry[key]):
            raise fail("must be a non-empty string", key)

    has_hf, has_ms, has_om = ("hf_hub_url" in entry), ("ms_hub_url" in entry), ("om_hub_url" in entry)
    if has_hf or has_ms or has_om:
        if has_ms and (_truthy_env("USE_MODELSCOPE_HUB") or not has_hf):
            load_from, dataset_name = "ms_hub", entry["ms_hub_url"]
        elif has_om and (_truthy_env("USE_OPENMIND_HUB") or not has_hf):
            load_from, dataset_name = "om_hub", entry["om_hub_url"]
        else:
            load_from, dataset_name = "hf_hub", entry["hf_hub_url"]
    elif "script_url" in entry:
        load_from, dataset_name = "script", entry["script_url"]
    elif "cloud_file_name" in entry:
        load_from, dataset_name = "cloud_file", entry["cloud_file_name"]
    elif "file_name" in entry:
        load_from, dataset_name = "file", entry["file_name"]
    else:
        raise fail("entry names no source: give one of " + ", ".join(SOURCE_KEYS))

    attr = DatasetAttr(name=name, load_from=load_from, dataset_name=dataset_name)

    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATS:
        raise fail(f"unknown formatting {formatting!r}; expected one of {', '.join(FORMATS)}", "formatting")
    attr.formatting = formatting
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise fail(f"must be true or false, got {ranking!r}", "ranking")
    attr.ranking = ranking
    for key in ("subset", "folder"):
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"must be a string, got {value!r}", key)
        setattr(attr, key, value)
    split = entry.get("split", "train")
    if not isinstance(split, str) or not split:
        raise fail(f"must be a non-empty string, got {split!r}", "split")
    attr.split = split
    num_samples = entry.get("num_samples")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise fail(f"must be a positive integer, got {num_samples!r}", "num_samples")
    attr.num_samples = num_samples

    if "columns" in entry:
        columns = entry["columns"]
        if not isinstance(columns, dict):
            raise fail(f"must be a JSON object, got {type(columns).__name__}", "columns")
        for key in COLUMN_NAMES:  # LF: every column not listed becomes None
            value = columns.get(key)
            if value is not None and not isinstance(value, str):
                raise fail(f"must be a column name (string), got {value!r}", f"columns.{key}")
            setattr(attr, key, value)
        attr.explicit_columns = frozenset(k for k in COLUMN_NAMES if columns.get(k))
    if "tags" in entry:
        tags = entry["tags"]
        if not isinstance(tags, dict):
            raise fail(f"must be a JSON object, got {type(tags).__name__}", "tags")
        for key in TAG_NAMES:  # LF: every tag not listed becomes None
            value = tags.get(key)
            if value is not None and not isinstance(value, str):
                raise fail(f"must be a string, got {value!r}", f"tags.{key}")
            setattr(attr, key, value)

    _check_shape(attr, fail)
    return attr


def _check_shape(attr: DatasetAttr, fail) -> None:
    """Catch entries that cannot yield a single training example (LF fails later, or silently drops every row)."""
    if attr.formatting == "alpaca":
        if attr.ranking and not (attr.chosen and attr.rejected):
            raise fail("a ranking alpaca dataset needs columns.chosen and columns.rejected", "columns")
    else:
        if not attr.messages:
            raise fail(f"a {attr.formatting} dataset needs columns.messages", "columns.messages")
        if not (attr.role_tag and attr.content_tag):
            raise fail("tags.role_tag and tags.content_tag are required", "tags")
        if attr.ranking and not (attr.chosen and attr.rejected):
            raise fail(f"a ranking {attr.formatting} dataset needs columns.chosen and columns.rejected", "columns")


def get_dataset_attrs(names: list[str], dataset_dir: str | Path) -> list[DatasetAttr]:
    """Resolve dataset names through `<dataset_dir>/dataset_info.json` (LF's `get_dataset_list`)."""
    if str(dataset_dir) == "ONLINE":  # LF: every name is a hub dataset id with all defaults
        hub = ("ms_hub" if _truthy_env("USE_MODELSCOPE_HUB")
               else "om_hub" if _truthy_env("USE_OPENMIND_HUB") else "hf_hub")
        return [DatasetAttr(name=name, load_from=hub, dataset_name=name) for name in names]
    info, path = read_dataset_info(dataset_dir)
    attrs = []
    for name in names:
        if name not in info:
            hint = ""
            if any(sep in name for sep in ("/", "\\", ".json", ".jsonl", ".csv", ".parquet", ".txt")):
                hint = " (use the entry's name, the key in dataset_info.json, not a file path)"
            close = difflib.get_close_matches(name, list(info), n=3, cutoff=0.6)
            known = ", ".join(sorted(info)[:12]) + (", ..." if len(info) > 12 else "")
            which = "did you mean " + " or ".join(f"'{c}'" for c in close) + "?" if close else f"known: {known}"
            raise DataError(f"undefined dataset{hint}; {which}", dataset=name, file=str(path))
        attrs.append(parse_entry(name, info[name], file=str(path)))
    return attrs


def split_names(value: str | list[str] | None) -> list[str]:
    """`a, b` -> ["a", "b"] (LF's split_arg); an empty string is no dataset."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [name.strip() for name in value if name.strip()]


def attr_field_names() -> list[str]:
    return [f.name for f in fields(DatasetAttr)]
