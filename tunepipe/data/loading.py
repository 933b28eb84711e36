"""Load the raw rows of a registered dataset: local files and folders, the Hugging Face hub, ModelScope, S3/GCS files
and (only when the user opts in) dataset scripts.

Rows are read with the `datasets` library, as LLaMA-Factory does, because its Arrow schema inference is part of the
observable behaviour (a key missing in one JSON row reads as null; struct fields are unified across rows). What we do
differently, on purpose (docs/compat.md):
- a path in `file_name` that resolves outside the dataset directory is refused;
- a folder is read recursively in sorted order, skipping hidden files and non-data files such as README.md
  (LF takes every `os.listdir` entry in arbitrary order and fails on a README);
- file extensions match case-insensitively (`.JSON` works);
- broken JSON, type clashes between rows and empty files are one-line errors naming the file and line;
- dataset scripts never run unless `allow_scripts` is set.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunepipe.data.registry import DatasetAttr
from tunepipe.errors import DataError

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset

FILE_TYPES = {"arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet", "txt": "text"}


@dataclass
class RawDataset:
    """The raw rows of one dataset plus where each row came from (for error messages that name file and row)."""

    attr: DatasetAttr
    rows: list[dict[str, Any]]
    row_ids: Sequence[int]  # index of each row in the concatenated source files (before num_samples/max_samples)
    files: list[tuple[str, int]]  # (display path, first row id) for every source file, in order; [] for hub data
    columns: list[str]
    table: Any = None  # streaming: the Arrow dataset the rows are read from in chunks (rows is then empty)

    def locate(self, position: int) -> tuple[str | None, int]:
        """(file, row-in-file) of the row at `position` in `rows`."""
        row_id = self.row_ids[position]
        file, start = None, 0
        for path, first in self.files:
            if first > row_id:
                break
            file, start = path, first
        return file, row_id - start


def resolve_inside(base: Path, relative: str, *, what: str, dataset: str) -> Path:
    """Join `relative` to `base` and refuse anything that ends up outside `base` (`..`, absolute paths, symlinks)."""
    base_real = base.resolve()
    target = (base / relative).resolve()
    if target != base_real and base_real not in target.parents:
        raise DataError(f"{what} {relative!r} escapes the dataset directory {base}; paths must stay inside it",
                        dataset=dataset, field=what)
    return target


def _data_files(attr: DatasetAttr, dataset_dir: Path) -> list[Path]:
    local = resolve_inside(dataset_dir, attr.dataset_name, what="file_name", dataset=attr.name)
    if local.is_file():
        files = [local]
    elif local.is_dir():
        files = sorted(
            path for path in local.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(local).parts)
            and path.suffix[1:].lower() in FILE_TYPES
        )
        if not files:
            raise DataError(f"folder {local} holds no data file ({', '.join(sorted(FILE_TYPES))})",
                            dataset=attr.name, field="file_name")
    else:
        raise DataError(f"file {local} not found", dataset=attr.name, field="file_name")
    types = {FILE_TYPES.get(path.suffix[1:].lower()) for path in files}
    if None in types:
        raise DataError(f"unsupported file type {files[0].suffix!r}; allowed: {', '.join(sorted(FILE_TYPES))}",
                        dataset=attr.name, file=str(files[0]), field="file_name")
    if len(types) > 1:
        raise DataError(f"all files of a dataset must have the same type, found {sorted(types)}",
                        dataset=attr.name, file=str(local), field="file_name")
    return files


def _locate_json_error(path: Path) -> str | None:
    """Find the first syntax error in a JSON / JSON Lines file (only called after `datasets` failed to load it)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                if lineno == 1 and text.lstrip().startswith("{") and path.suffix.lower() == ".json":
                    break  # one pretty-printed object: fall through to whole-file parsing
                return f"line {lineno}: invalid JSON: {err.msg} (column {err.colno})"
            if not isinstance(value, dict):
                return f"line {lineno}: expected a JSON object per line, got {type(value).__name__}"
        else:
            return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return f"line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})"
    if isinstance(value, list) and any(not isinstance(item, dict) for item in value):
        index = next(i for i, item in enumerate(value) if not isinstance(item, dict))
        return f"row {index}: expected a JSON object, got {type(value[index]).__name__}"
    return None


def _first_line(err: BaseException) -> str:
    cause: BaseException = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # the root cause says what is wrong in the file
    lines = [line for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__]
    return lines[0][:300]


def _load_file(path: Path, builder: str, attr: DatasetAttr, cache_dir: str | None) -> Dataset:
    from datasets import load_dataset

    if path.stat().st_size == 0:
        raise DataError("file is empty", dataset=attr.name, file=str(path))
    # datasets >= 5 keeps mixed-shape JSON objects as raw JSON and reshapes "agent trace" files; LF's datasets 4
    # unifies objects into Arrow structs (missing keys -> null) and reads every file as is. Ask for that behaviour.
    extra = {"on_mixed_types": None, "parse_agent_traces": False} if builder == "json" else {}
    try:
        return load_dataset(builder, data_files=[str(path)], split="train", cache_dir=cache_dir, **extra)
    except Exception as err:  # datasets wraps parse errors in several exception types
        detail = _locate_json_error(path) if builder == "json" else None
        raise DataError(detail or f"cannot read {builder} file: {_first_line(err)}", dataset=attr.name,
                        file=str(path)) from None


def _load_local_files(attr: DatasetAttr, dataset_dir: Path, cache_dir: str | None) -> tuple[Dataset, list]:
    from datasets import concatenate_datasets

    if attr.split != "train":
        raise DataError(f"local files only have a 'train' split, got split {attr.split!r}", dataset=attr.name,
                        field="split")
    paths = _data_files(attr, dataset_dir)
    builder = FILE_TYPES[paths[0].suffix[1:].lower()]
    parts, files, offset = [], [], 0
    for path in paths:
        part = _load_file(path, builder, attr, cache_dir)
        files.append((str(path), offset))
        offset += len(part)
        parts.append(part)
    try:
        dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    except Exception as err:
        raise DataError(f"files of the folder have incompatible columns: {_first_line(err)}", dataset=attr.name,
                        file=str(dataset_dir / attr.dataset_name)) from None
    return dataset, files


def _load_hub(attr: DatasetAttr, cache_dir: str | None) -> Dataset:
    from datasets import load_dataset

    try:
        dataset = load_dataset(attr.dataset_name, name=attr.subset, data_dir=attr.folder, split=attr.split,
                               cache_dir=cache_dir)
    except Exception as err:
        offline = " (this machine may be offline: HF_HUB_OFFLINE is set)" if os.getenv("HF_HUB_OFFLINE") else ""
        raise DataError(f"cannot load hub dataset {attr.dataset_name!r}{offline}: {_first_line(err)}",
                        dataset=attr.name, field="hf_hub_url") from None
    return dataset


def _load_modelscope(attr: DatasetAttr, cache_dir: str | None) -> Dataset:
    try:
        from modelscope import MsDataset  # type: ignore[import-not-found]
    except ImportError:
        raise DataError("this entry loads from ModelScope (ms_hub_url); install it with `pip install modelscope`",
                        dataset=attr.name, field="ms_hub_url") from None
    try:
        dataset = MsDataset.load(dataset_name=attr.dataset_name, subset_name=attr.subset, data_dir=attr.folder,
                                 split=attr.split, cache_dir=cache_dir)
        return dataset.to_hf_dataset() if isinstance(dataset, MsDataset) else dataset
    except Exception as err:
        raise DataError(f"cannot load ModelScope dataset {attr.dataset_name!r}: {_first_line(err)}",
                        dataset=attr.name, field="ms_hub_url") from None


def _load_script(attr: DatasetAttr, dataset_dir: Path, cache_dir: str | None, allow_scripts: bool) -> Dataset:
    """Run a `datasets` builder script, only with the user's explicit opt-in (it is arbitrary code)."""
    script = resolve_inside(dataset_dir, attr.dataset_name, what="script_url", dataset=attr.name)
    if not allow_scripts:
        raise DataError(f"refusing to run dataset script {script}: it executes code from the dataset folder; "
                        "pass --allow-scripts (data.allow_scripts: true) if you trust it", dataset=attr.name,
                        field="script_url")
    if script.is_dir():
        candidates = sorted(script.glob("*.py"))
        script = candidates[0] if len(candidates) == 1 else script / f"{script.name}.py"
    if not script.is_file():
        raise DataError(f"dataset script {script} not found", dataset=attr.name, field="script_url")
    import importlib.util

    import datasets

    # datasets>=4 no longer runs scripts itself, so we import the builder class and drive it directly.
    spec = importlib.util.spec_from_file_location(f"tunepipe_dataset_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # datasets re-imports the builder's module by name to hash it
    try:
        spec.loader.exec_module(module)
        builders = [obj for obj in vars(module).values() if isinstance(obj, type)
                    and issubclass(obj, datasets.DatasetBuilder) and obj.__module__ == module.__name__]
        if not builders:
            raise ValueError("the script defines no datasets.DatasetBuilder subclass")
        builder = builders[0](config_name=attr.subset, data_dir=attr.folder or str(script.parent),
                              cache_dir=cache_dir)
        builder.download_and_prepare()
        return builder.as_dataset(split=attr.split)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"dataset script failed: {_first_line(err)}", dataset=attr.name, file=str(script)) from None


def _load_cloud(attr: DatasetAttr) -> Dataset:
    from datasets import Dataset

    path = attr.dataset_name
    if not path.startswith(("s3://", "gs://", "gcs://")):
        raise DataError("cloud_file_name must start with s3://, gs:// or gcs://", dataset=attr.name,
                        field="cloud_file_name")
    try:
        import fsspec

        protocol = "s3" if path.startswith("s3://") else "gcs"
        try:
            fs = fsspec.filesystem(protocol, anon=True)
            fs.exists(path)
        except Exception:
            fs = fsspec.filesystem(protocol)
        files = [entry["name"] if isinstance(entry, dict) else entry for entry in fs.ls(path)] if fs.isdir(path) \
            else [path]
        files = [f for f in files if f.endswith((".json", ".jsonl"))]
        if not files:
            raise ValueError(f"no JSON/JSONL files in {path}")
        rows: list = []
        for file in files:
            with fs.open(file, "r") as handle:
                rows += [json.loads(line) for line in handle if line.strip()] if file.endswith(".jsonl") \
                    else json.load(handle)
        return Dataset.from_list(rows)
    except ImportError as err:
        raise DataError(f"cloud files need {err.name}: pip install {'s3fs' if path.startswith('s3') else 'gcsfs'}",
                        dataset=attr.name, field="cloud_file_name") from None
    except Exception as err:
        raise DataError(f"cannot read cloud file: {_first_line(err)}", dataset=attr.name, file=path) from None


def load_raw(
    attr: DatasetAttr,
    *,
    dataset_dir: str | Path,
    rng: np.random.RandomState,
    max_samples: int | None = None,
    allow_scripts: bool = False,
    cache_dir: str | None = None,
    lazy: bool = False,
) -> RawDataset:
    """Load one dataset's rows, then apply `num_samples` and `max_samples` with LF's semantics.

    `rng` must be shared by all datasets of a run in LF's order: LF draws `num_samples` from the global numpy RNG
    that `transformers.set_seed(seed)` seeded, so `np.random.RandomState(seed)` reproduces its draw exactly.
    """
    import datasets

    dataset_dir = Path(dataset_dir)
    files: list[tuple[str, int]] = []
    datasets.disable_progress_bars()  # our own report says what was loaded; per-file bars are noise
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # load failures become our own one-line errors
    if attr.load_from == "file":
        dataset, files = _load_local_files(attr, dataset_dir, cache_dir)
    elif attr.load_from == "hf_hub":
        dataset = _load_hub(attr, cache_dir)
    elif attr.load_from == "ms_hub":
        dataset = _load_modelscope(attr, cache_dir)
    elif attr.load_from == "script":
        dataset = _load_script(attr, dataset_dir, cache_dir, allow_scripts)
        files = [(str(dataset_dir / attr.dataset_name), 0)]
    elif attr.load_from == "cloud_file":
        dataset = _load_cloud(attr)
        files = [(attr.dataset_name, 0)]
    else:  # om_hub
        raise DataError("OpenMind hub datasets (om_hub_url) are not supported; use hf_hub_url or a local file",
                        dataset=attr.name, field="om_hub_url")

    if len(dataset) == 0:
        raise DataError("dataset has no rows", dataset=attr.name, file=files[0][0] if files else None)

    import numpy as np

    indices = np.arange(len(dataset))
    if attr.num_samples is not None:
        target = attr.num_samples
        picked = rng.permutation(len(dataset))[:target]  # every row once, shuffled ...
        if target > len(picked):  # ... then random duplicates (with replacement) up to num_samples
            picked = np.concatenate((picked, rng.choice(len(dataset), target - len(picked))), axis=0)
        indices = picked
    if max_samples is not None:
        indices = indices[: min(max_samples, len(indices))]
    if attr.num_samples is not None or max_samples is not None:
        dataset = dataset.select(indices)
    sampled = attr.num_samples is not None or max_samples is not None
    row_ids = [int(i) for i in indices] if sampled else range(len(dataset))
    if lazy:  # streaming: the rows stay in the (memory-mapped) Arrow table; `iter_rows` reads them in chunks
        return RawDataset(attr=attr, rows=[], row_ids=row_ids, files=files, columns=list(dataset.column_names),
                          table=dataset)
    return RawDataset(attr=attr, rows=dataset.to_list(), row_ids=row_ids, files=files,
                      columns=list(dataset.column_names))


def iter_rows(raw: RawDataset, chunk: int) -> Iterator[RawDataset]:
    """A lazily loaded dataset (load_raw(lazy=True)) as RawDatasets of at most `chunk` rows each, in order; each
    keeps the full `row_ids`, so `locate(offset + position)` names the file and row."""
    offset = 0
    for columns in raw.table.iter(batch_size=chunk):
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        yield RawDataset(attr=raw.attr, rows=rows, row_ids=raw.row_ids[offset:offset + len(rows)], files=raw.files,
                         columns=raw.columns)
        offset += len(rows)
