"""Train-time SFT packing (tunepipe/train/packing.py): best-fit-decreasing rows, the length-grouped row sampler, and
the padding they leave on fixed datasets. The contamination checks on the model are in tests/test_training.py."""

from __future__ import annotations

import random

import pytest

from tests.conftest import ROOT
from tunepipe.train.packing import PackedRows, PackedRowsSampler, best_fit_decreasing, padding_fraction


def test_best_fit_decreasing_fills_rows_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(500)] + [700]  # one longer than a row: a row of its own
    rows = best_fit_decreasing(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every example exactly once
    assert [700] in [[lengths[i] for i in row] for row in rows]
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows if row != [500])
    lower_bound = -(-sum(lengths[:-1]) // 512) + 1
    assert len(rows) <= lower_bound + 2  # BFD is within a few rows of the optimum here
    assert best_fit_decreasing(lengths, 512) == rows  # deterministic


def test_best_fit_puts_an_example_in_the_tightest_row():
    # 300 and 260 open two rows (free 212 and 252); 210 goes into the tighter one, 250 into the other
    assert best_fit_decreasing([300, 260, 210, 250], 512) == [[0, 2], [1, 3]]


def test_sampler_groups_the_global_batch_the_same_on_any_number_of_processes():
    """The order depends on seed, epoch and the global batch only: 2 processes x 4 rows see exactly the rows of one
    process x 8, and rows of similar length land in the same batch."""
    rng = random.Random(1)
    lengths = [rng.randint(100, 512) for _ in range(400)]
    one = list(PackedRowsSampler(lengths, global_batch=8, seed=3))
    assert sorted(one) == list(range(400))
    assert list(PackedRowsSampler(lengths, global_batch=2 * 4, seed=3)) == one
    epoch = PackedRowsSampler(lengths, global_batch=8, seed=3)
    epoch.set_epoch(1)
    assert list(epoch) != one
    grouped = padding_fraction([lengths[i] for i in one], 8)
    shuffled = padding_fraction(random.Random(0).sample(lengths, len(lengths)), 8)
    assert grouped < shuffled / 4


def _lengths(tiny: str, dataset_dir, names: str, cutoff: int) -> list[int]:
    from tunepipe.data.features import DataArgs, prepare
    from tunepipe.models.loading import load_tokenizer

    args = DataArgs(dataset_dir=str(dataset_dir), template="qwen", cutoff_len=cutoff)
    return [len(ids) for ids in prepare("sft", names, args, load_tokenizer(tiny)).train["input_ids"]]


def _batched_padding(lengths: list[int], cutoff: int, batch: int) -> tuple[float, int]:
    rows = PackedRows(None, best_fit_decreasing(lengths, cutoff), lengths, cutoff)
    row_lengths = rows.row_lengths()
    order = list(PackedRowsSampler(row_lengths, global_batch=batch, seed=42))
    return padding_fraction([row_lengths[i] for i in order], batch), len(rows)


def test_padding_on_alpaca_en_demo_is_below_three_percent(tiny, lf_demo):
    """LLaMA-Factory's alpaca_en_demo, template qwen, cutoff 512, batch 8 rows: what bench/train.py trains on."""
    lengths = _lengths(tiny, lf_demo, "alpaca_en_demo", 512)
    padding, rows = _batched_padding(lengths, 512, 8)
    assert len(lengths) == 999 and rows < len(lengths) * 0.7  # several examples per row
    assert padding < 0.03
    # packing within each batch of 8 examples (the previous packer) left 14.5% here
    within = [lengths[i:i + 8] for i in range(0, len(lengths), 8)]
    slots = sum(max(sum(b[j] for j in r) for r in best_fit_decreasing(b, 512)) * len(best_fit_decreasing(b, 512))
                for b in within)
    assert 1 - sum(lengths) / slots > 4 * padding


def test_padding_on_the_demo_sft_data(tiny):
    """The shipped demo (55-118 tokens, cutoff 256): rows are only ~89% full, but batched by length they pad <3%."""
    lengths = _lengths(tiny, ROOT / "data", "demo_sft,demo_sft_chat", 256)
    padding, rows = _batched_padding(lengths, 256, 8)
    assert sum(lengths) / (rows * 256) < 0.95  # the rows themselves are not full ...
    assert padding < 0.03  # ... yet little is padded: similar rows are batched together


def test_packed_rows_dataset_reads_its_examples():
    from datasets import Dataset

    from tunepipe.train.packing import pack_dataset

    sizes = (100, 20, 90, 30)
    ds = Dataset.from_dict({"input_ids": [[1] * n for n in sizes], "labels": [[1] * n for n in sizes]})
    packed = pack_dataset(ds, 128)  # 100 | 90; 30 fits only beside 90; 20 beside 100
    assert packed.rows == [[0, 1], [2, 3]] and len(packed) == 2
    assert [len(e["input_ids"]) for e in packed[1]] == [90, 30]
    assert packed.row_lengths() == [120, 120] and packed.fill() == pytest.approx(240 / 256)
