"""Tokenize converted examples into training features, token for token as LLaMA-Factory 0.9.5 does.

The package is laid out as LF's `llamafactory/data/processor/`:

    driver.py          the batches (LF's `datasets.map` batches), the tokenize thread, worker processes
    processor_utils.py the options that change tokens, health counts, drop rules, LF's truncation and knapsack
    pretrain.py        pt           -> PretrainDatasetProcessor (packing into blocks, or truncation per document)
    supervised.py      sft          -> SupervisedDatasetProcessor / PackedSupervisedDatasetProcessor (packing,
                                       neat_packing)
    pairwise.py        dpo (LF: rm) -> PairwiseDatasetProcessor
    feedback.py        kto          -> FeedbackDatasetProcessor
    unsupervised.py    unsupervised -> UnsupervisedDatasetProcessor (prompts for generation-based evaluation)

`Processor(stage, template, tokenizer, options)` gives the stage's processor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from tunepipe.data.processors.driver import BatchTokenizer, DatasetProcessor, shards
from tunepipe.data.processors.feedback import FeedbackDatasetProcessor
from tunepipe.data.processors.pairwise import PairwiseDatasetProcessor
from tunepipe.data.processors.pretrain import PretrainDatasetProcessor
from tunepipe.data.processors.processor_utils import (IGNORE_INDEX, Health, ProcessorOptions, greedy_knapsack,
                                                      infer_seqlen, media_error, row_issue)
from tunepipe.data.processors.supervised import SupervisedDatasetProcessor
from tunepipe.data.processors.unsupervised import UnsupervisedDatasetProcessor

if TYPE_CHECKING:
    from tunepipe.data.templates import Template

Stage = Literal["pt", "sft", "dpo", "kto", "unsupervised"]
PROCESSORS: dict[str, type[DatasetProcessor]] = {cls.stage: cls for cls in (
    PretrainDatasetProcessor, SupervisedDatasetProcessor, PairwiseDatasetProcessor, FeedbackDatasetProcessor,
    UnsupervisedDatasetProcessor)}
STAGES: tuple[str, ...] = tuple(PROCESSORS)


def Processor(stage: Stage, template: Template, tokenizer, options: ProcessorOptions) -> DatasetProcessor:  # noqa: N802
    """The processor of LF's `stage` (pt, sft, dpo, kto, unsupervised)."""
    if stage not in PROCESSORS:
        raise ValueError(f"unknown stage {stage}")
    return PROCESSORS[stage](template, tokenizer, options)


__all__ = ["IGNORE_INDEX", "PROCESSORS", "STAGES", "BatchTokenizer", "DatasetProcessor", "Health", "Processor",
           "ProcessorOptions", "Stage", "greedy_knapsack", "infer_seqlen", "media_error", "row_issue", "shards"]
