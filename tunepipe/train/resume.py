"""Resume a killed training run, and only an identical one.

`run_fingerprint` lists everything that decides a training trajectory (the stage's effective values, the bytes of its
data, input model and tokenizer, library versions, world size); `resolve_resume` continues from the latest
checkpoint only when the stored fingerprint matches, and otherwise clears the stale checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("tunepipe.train")

FINGERPRINT_FILE = "fingerprint.json"


def _hash_file(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as handle:
        if size <= 256 * 2**20:
            for chunk in iter(lambda: handle.read(2**20), b""):
                h.update(chunk)
        else:  # multi-GB weights: size + head + tail is a fingerprint, not a checksum (DVC checksums the files)
            h.update(handle.read(8 * 2**20))
            handle.seek(-8 * 2**20, os.SEEK_END)
            h.update(handle.read())


def hash_tree(path: str | Path) -> str:
    """sha256 over the files of a directory (names, sizes, contents), or over the string for a hub id."""
    h = hashlib.sha256()
    path = Path(path)
    if not path.exists():
        h.update(str(path).encode())
        return h.hexdigest()
    if path.is_file():
        files = [path]
    else:  # hidden files (.partial dirs, caches) are not part of the content
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for file in files:
        h.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        _hash_file(file, h)
    return h.hexdigest()


def run_fingerprint(inputs, paths) -> dict[str, Any]:
    """Everything that decides the training trajectory: a checkpoint is resumed only if all of it is unchanged.

    `inputs` is the stage's TrainInputs (tunepipe.plan) minus the bookkeeping that does not change the trajectory
    (logging and checkpoint cadence); `paths` its StagePaths."""
    import peft
    import torch
    import transformers
    import trl

    values = inputs.model_dump(mode="json")
    # Bookkeeping and how the processes are started do not change the trajectory (the number of processes, which
    # does, is `world_size`); a DeepSpeed / accelerate config does (and its checkpoints' format), so it stays.
    for key in ("logging_steps", "save_steps", "save_total_limit", "launcher", "nproc_per_node", "nnodes",
                "master_addr", "master_port"):
        values["train"].pop(key, None)
    return {
        "inputs": values,
        "data": hash_tree(paths.data),
        "input_model": hash_tree(paths.input_model),
        "tokenizer": hash_tree(paths.tokenizer),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft)},
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "launch_configs": {key: hash_tree(path) for key in ("deepspeed", "config_file")
                           if (path := values["train"].get(key))},
    }


def last_complete_checkpoint(checkpoints: Path, *, remove_incomplete: bool) -> str | None:
    """The highest `checkpoint-N` that transformers finished writing (tunepipe.train.stopping marks those)."""
    from tunepipe.train.stopping import is_complete

    if not checkpoints.is_dir():
        return None
    found = sorted((int(p.name.rsplit("-", 1)[1]), p) for p in checkpoints.glob("checkpoint-*")
                   if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit())
    for step, path in reversed(found):
        if is_complete(path):
            return str(path)
        log.warning("skipping incomplete checkpoint %s (it was not completely written); removing it", path)
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def resolve_resume(checkpoints: Path, fingerprint: dict[str, Any], *, is_main: bool) -> str | None:
    """The latest complete checkpoint if it was written for this exact fingerprint; otherwise clear stale checkpoints
    (main process only) and record the new fingerprint. Returns the checkpoint path or None (fresh start).

    Incomplete checkpoints (no completion marker: killed mid-save, disk full, an empty folder) are skipped with a
    warning and removed, so one bad save never blocks later runs."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    file = checkpoints / FINGERPRINT_FILE
    try:
        stored = json.loads(file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        stored = None
    last = last_complete_checkpoint(checkpoints, remove_incomplete=is_main)
    if stored is not None and stored.get("digest") == digest and last is not None:
        state = json.loads((Path(last) / "trainer_state.json").read_text())
        if state["global_step"] < state["max_steps"]:
            return last
        log.info("the run in %s had finished (its adapter may not have been saved): starting fresh", checkpoints)
    if is_main:
        if checkpoints.exists():
            if last is not None:
                changed = sorted(k for k in fingerprint if (stored or {}).get("fingerprint", {}).get(k)
                                 != fingerprint[k]) if stored else ["(no fingerprint)"]
                log.info("discarding checkpoints in %s: %s changed", checkpoints, ", ".join(changed))
            shutil.rmtree(checkpoints)
        checkpoints.mkdir(parents=True, exist_ok=True)
        from tunepipe.io import atomic_write_text

        atomic_write_text(file, json.dumps({"digest": digest, "fingerprint": fingerprint}, indent=2,
                                           sort_keys=True) + "\n")
    return None
