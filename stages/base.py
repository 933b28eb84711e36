"""base: pin the base model every stage chain starts from.

    python -m stages.base

`model_name_or_path: tiny` builds the embedded model deterministically into outputs/models/base (same seed and
corpus -> same bytes, so DVC reruns nothing). A hub id or local path is recorded by reference in
outputs/models/base/base_model.json instead of copying possibly many GB of weights.
"""

from __future__ import annotations

import json

from stages import common

TINY_CORPUS = "tunepipe/assets/tiny_corpus.jsonl"  # the tiny model's tokenizer is trained on this frozen corpus


def dvc_entry(name: str, spec, steps) -> common.Entry:
    from tunepipe.config import TINY

    return common.Entry(cmd="python -m stages.base", module="stages.base",
                        deps=[TINY_CORPUS] if spec.model_name_or_path == TINY else [], outs=[common.base_model_dir()])


def main(argv: list[str]) -> None:
    from tunepipe.io import atomic_dir
    from tunepipe.models.tiny import TINY, build_tiny_model

    spec = common.inputs("base")
    common.work_begins("base")
    with atomic_dir(common.base_model_dir()) as tmp:
        if spec.model_name_or_path == TINY:
            build_tiny_model(tmp, seed=spec.tiny_seed)
        else:
            (tmp / "base_model.json").write_text(json.dumps({"model_name_or_path": spec.model_name_or_path},
                                                            indent=2) + "\n")
    print(f"base model: {spec.model_name_or_path} -> {common.base_model_dir()}")


if __name__ == "__main__":
    common.run(main, common.no_argument("base"))
