"""What every stage's processor shares (LLaMA-Factory's processor_utils.py and the drop rules of its processors):
the options that change tokens, the health counts, LF's truncation budget and its packing knapsack."""

from __future__ import annotations

import bisect
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from tunepipe.data.converters import Example
from tunepipe.errors import RowError

IGNORE_INDEX = -100


@dataclass
class ProcessorOptions:
    """The data arguments that change tokens. Names and defaults are LLaMA-Factory's."""

    cutoff_len: int = 2048
    packing: bool | None = None  # None: on for pt, off otherwise (LF)
    neat_packing: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    preprocessing_batch_size: int = 1000
    overlength: Literal["truncate", "drop"] = "truncate"  # tunepipe: drop instead of truncating (opt-in)

    def resolved(self, stage: str) -> ProcessorOptions:
        """Apply LF's argument post-processing: neat_packing forces packing; packing set explicitly (not the pt
        default) makes LF use cutoff_len - 1 internally (DataArguments.__post_init__)."""
        opts = ProcessorOptions(**vars(self))
        if opts.neat_packing:
            opts.packing = True
        explicit_packing = opts.packing is True
        if opts.packing is None:
            opts.packing = stage == "pt"
        if explicit_packing:
            opts.cutoff_len -= 1
        return opts


@dataclass
class Health:
    """Counts for the data health report (filled while processing)."""

    rows_in: int = 0
    examples_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    lost_eos: int = 0  # truncated responses that lost their final (EOS) token
    zero_label: int = 0  # examples whose labels are all IGNORE_INDEX (nothing to learn from)
    # token length per example before packing; 4 bytes each (a corpus of millions of documents streams through)
    lengths: array = field(default_factory=lambda: array("I"))
    label_tokens: int = 0
    tokens: int = 0
    pad_tokens: int = 0  # padding added by packing

    def merge(self, other: Health) -> None:
        """Add another part's counts (a worker's shard, a streamed batch)."""
        self.rows_in += other.rows_in
        self.examples_out += other.examples_out
        self.dropped.update(other.dropped)
        for name in ("truncated", "lost_eos", "zero_label", "label_tokens", "tokens", "pad_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lengths += other.lengths

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in, "examples_out": self.examples_out, "dropped": dict(self.dropped),
            "rows_dropped": sum(self.dropped.values()), "truncated": self.truncated, "lost_eos": self.lost_eos,
            "zero_label": self.zero_label, "tokens": self.tokens, "label_tokens": self.label_tokens,
            "pad_tokens": self.pad_tokens,
        }


def row_issue(example: Example, stage: str) -> str | None:
    """Why LF's processor for `stage` would drop this example (None = usable). Same rules as LF's processors."""
    if example.drop:
        return example.drop
    if stage == "pt":
        return None if example.prompt else "no_prompt"
    if len(example.prompt) % 2 != 1:
        return "invalid_message_count"
    if stage == "sft" and len(example.response) != 1:
        return "no_response" if not example.response else "invalid_message_count"
    if stage == "dpo" and len(example.response) < 2:
        return "not_a_preference_pair"
    if stage == "kto" and len(example.response) < 2:
        return "kto_tag_not_bool" if len(example.response) == 1 else "not_a_kto_example"
    return None


def media_error(example: Example, template: str | None) -> RowError | None:
    """A row with images/videos/audios cannot be trained with a text template (every tunepipe template is one):
    the processors refuse it, and `tunepipe data check` says the same for the same row."""
    if not (example.images or example.videos or example.audios):
        return None
    kind = "images" if example.images else "videos" if example.videos else "audios"
    which = f"template {template!r}" if template else "the template"
    return RowError(f"row has {kind} but {which} is text-only (tunepipe trains text models)", field=kind,
                    reason="media")


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LF's truncation budget: keep the target when it is short, else the source when it is short, else split
    proportionally. Both sides keep their prefixes."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def greedy_knapsack(lengths: list[int], capacity: int) -> list[list[int]]:
    """LF's packing: sort ascending, fill each bin with the largest length that still fits (binary search)."""
    numbers = sorted(lengths)
    bins = []
    while numbers:
        current, remaining = [], capacity
        while True:
            index = bisect.bisect(numbers, remaining) - 1
            if index < 0:
                break
            remaining -= numbers[index]
            current.append(numbers.pop(index))
        bins.append(current)
    return bins
