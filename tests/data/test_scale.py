"""Data preparation at scale: `preprocessing_num_workers` (LF's datasets.map(num_proc) shards) and `streaming`
(the corpus read and written batch by batch). Both give LLaMA-Factory's tokens: streaming exactly the in-memory
features, workers exactly LF's sharded batching."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from tunepipe.data.features import DataArgs, prepare, prepare_to_disk
from tunepipe.data.processors import shards
from tunepipe.errors import DataError

DATA = ROOT / "data"


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from tunepipe.models.loading import load_tokenizer

    return load_tokenizer(tiny)


def args(**kwargs) -> DataArgs:
    return DataArgs(**{"dataset_dir": str(DATA), "template": "qwen", "cutoff_len": 64,
                       "preprocessing_batch_size": 16, **kwargs})


def test_shards_are_those_of_datasets_map_num_proc():
    from datasets import Dataset

    table = Dataset.from_dict({"i": list(range(103))})
    for count in (1, 2, 3, 7):
        expected = [table.shard(num_shards=count, index=k, contiguous=True)["i"] for k in range(count)]
        assert [list(range(a, b)) for a, b in shards(103, count)] == expected


@pytest.mark.parametrize("stage, names", [("pt", "demo_cpt"), ("sft", "demo_sft,demo_sft_chat"), ("kto", "demo_kto")])
def test_streaming_gives_the_in_memory_features(tokenizer, stage, names):
    base = prepare(stage, names, args(), tokenizer)
    for extra in ({"streaming": True}, {"streaming": True, "preprocessing_num_workers": 2}):
        streamed = prepare(stage, names, args(**extra), tokenizer)
        assert streamed.train == base.train, extra
        assert streamed.health.to_dict() == base.health.to_dict()


def test_workers_batch_within_their_shards_like_lf(tokenizer):
    """pt drops each batch's remainder, so LF's output with num_proc=N depends on N; ours follows the same shards
    (each shard processed alone = the workers' result, in order)."""
    names = "demo_cpt"
    one = prepare("pt", names, args(preprocessing_batch_size=7), tokenizer)
    three = prepare("pt", names, args(preprocessing_batch_size=7, preprocessing_num_workers=3), tokenizer)
    assert three.health.rows_in == one.health.rows_in
    from tunepipe.data.features import load_template

    # the same shards by hand: the rows of shard k processed alone, concatenated
    import numpy as np

    from tunepipe.data.features import load_examples
    from tunepipe.data.processors import Processor

    a = args(preprocessing_batch_size=7)
    template = load_template(a, tokenizer, stage="pt")
    examples = load_examples(["demo_cpt"], a, "pt", np.random.RandomState(a.seed), [], {})
    expected: list = []
    for start, end in shards(len(examples), 3):
        expected += Processor("pt", template, tokenizer, a.processor_options()).process(examples[start:end])[
            "input_ids"]
    assert three.train["input_ids"] == expected
    assert three.train["input_ids"] != one.train["input_ids"]  # the batch boundaries moved, as in LF


def test_streaming_writes_what_load_from_disk_reads(tokenizer, tmp_path):
    from datasets import load_from_disk

    prepared = prepare_to_disk("pt", "demo_cpt", args(streaming=True), tokenizer, tmp_path,
                               eval_names="demo_cpt_eval")
    base = prepare("pt", "demo_cpt", args(), tokenizer)
    train = load_from_disk(str(tmp_path / "train"))
    assert train["input_ids"] == base.train["input_ids"] and prepared.train == {}
    assert (tmp_path / "eval").is_dir() and not list(tmp_path.glob(".*"))  # no staging file left


def test_streaming_refuses_what_needs_the_whole_dataset(tokenizer):
    with pytest.raises(DataError, match="streaming reads the training data once"):
        prepare("sft", "demo_sft", args(streaming=True, val_size=0.1), tokenizer)


def test_a_bad_row_found_by_a_worker_names_its_file_and_row(tokenizer, tmp_path):
    import json

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    rows[33]["output"] = {"not": "text"}
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    bad = DataArgs(dataset_dir=str(tmp_path), template="qwen", cutoff_len=64, preprocessing_batch_size=8,
                   preprocessing_num_workers=2)
    with pytest.raises(DataError) as err:
        prepare("sft", "d", bad, tokenizer)
    assert "d.json" in str(err.value) and "33" in str(err.value)
